"""Shared checkpoint I/O: dtype/shape round trip, pickle refusal, name checks, tree flattening."""

import os

import numpy as np
import pytest

from diffusion_jax.pretrained import io


def test_safetensors_round_trip_keeps_shapes_and_casts_floats(tmp_path):
  path = str(tmp_path / "w.safetensors")
  state = {"scalar": np.array(2.5), "w": np.arange(6, dtype=np.float64).reshape(2, 3),
           "ids": np.arange(4, dtype=np.int64)}
  io.save_state_dict(state, path)
  back = io.load_state_dict(path)
  assert back["scalar"].shape == () and back["scalar"].dtype == np.float32 and float(back["scalar"]) == 2.5
  assert back["w"].dtype == np.float32 and back["w"].shape == (2, 3)
  np.testing.assert_array_equal(back["w"], state["w"])
  assert back["ids"].dtype == np.int64
  np.testing.assert_array_equal(back["ids"], state["ids"])


def test_pickle_refused_without_flag(tmp_path):
  path = tmp_path / "model.bin"
  path.write_bytes(b"not really a pickle")
  with pytest.raises(io.CheckpointError, match="allow_pickle"):
    io.load_state_dict(str(path))
  with pytest.raises(io.CheckpointError, match="safetensors are required"):
    io.find_weights_file(str(tmp_path), "model")


def test_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    io.load_state_dict(str(tmp_path / "nope.safetensors"))
  other = tmp_path / "w.npz"
  other.write_bytes(b"")
  with pytest.raises(io.CheckpointError, match="expected a .safetensors"):
    io.load_state_dict(str(other))
  with pytest.raises(FileNotFoundError, match="No model.safetensors"):
    io.find_weights_file(str(tmp_path), "model")


def test_check_names_lists_missing_and_unexpected():
  io.check_names(["a", "b"], ["b", "a"], "ckpt")  # same set: no error
  with pytest.raises(io.CheckpointError) as e:
    io.check_names(["a", "b", "c"], ["a", "x"], "ckpt")
  msg = str(e.value)
  assert "missing 2 name(s) [b, c]" in msg and "unexpected 1 name(s) [x]" in msg
  with pytest.raises(io.CheckpointError, match=r"checkpoint has \(2,\), model expects \(3,\)"):
    io.check_shape("w", (2,), (3,))


def test_flatten_unflatten_inverse():
  tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
  flat = io.flatten(tree)
  assert flat == {"a/b": 1, "a/c/d": 2, "e": 3}
  assert io.unflatten(flat) == tree


def test_json_round_trip(tmp_path):
  p = os.path.join(tmp_path, "sub", "config.json")
  io.write_json({"x": 1, "y": [1, 2]}, p)
  assert io.read_json(p) == {"x": 1, "y": [1, 2]}
  with pytest.raises(FileNotFoundError, match="Missing config file"):
    io.read_json(os.path.join(tmp_path, "none.json"))


def test_load_weights_dir_single_and_sharded(tmp_path):
  single, sharded = tmp_path / "single", tmp_path / "sharded"
  io.save_state_dict({"a": np.ones(2), "b": np.zeros(3)}, str(single / "model.safetensors"))
  assert sorted(io.load_weights_dir(str(single), "model")) == ["a", "b"]
  io.save_state_dict({"a": np.ones(2)}, str(sharded / "model-00001-of-00002.safetensors"))
  io.save_state_dict({"b": np.full(3, 7.0)}, str(sharded / "model-00002-of-00002.safetensors"))
  io.write_json({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}},
                str(sharded / "model.safetensors.index.json"))
  state = io.load_weights_dir(str(sharded), "model")
  assert sorted(state) == ["a", "b"]
  np.testing.assert_array_equal(state["b"], np.full(3, 7.0, np.float32))
  with pytest.raises(FileNotFoundError, match="No other.safetensors"):
    io.load_weights_dir(str(sharded), "other")


def test_sharded_index_may_not_name_files_outside_the_directory(tmp_path):
  model = tmp_path / "model"
  model.mkdir()
  io.save_state_dict({"a": np.ones(2, np.float32)}, str(model / "part-1.safetensors"))
  io.save_state_dict({"b": np.ones(2, np.float32)}, str(tmp_path / "outside.safetensors"))
  io.write_json({"weight_map": {"a": "part-1.safetensors"}}, str(model / "m.safetensors.index.json"))
  assert set(io.load_weights_dir(str(model), "m")) == {"a"}
  for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
    io.write_json({"weight_map": {"a": "part-1.safetensors", "b": bad}}, str(model / "m.safetensors.index.json"))
    with pytest.raises(io.CheckpointError, match="outside"):
      io.load_weights_dir(str(model), "m")


def test_a_tensor_stored_with_another_shape_is_refused_not_reshaped():
  """A 2-D weight stored flattened (same element count) is a shape error; only scalars (() vs (1,)) adapt."""
  import jax
  from diffusion_jax.pretrained import clip as clip_io
  abstract = {"text_projection": {"kernel": jax.ShapeDtypeStruct((4, 3), np.float32)},
              "logit_scale": jax.ShapeDtypeStruct((), np.float32)}
  good = {"text_projection.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "logit_scale": np.ones((1,))}
  out = clip_io.torch_state_to_flax(good, abstract, "test", ignore=())
  assert out["logit_scale"].shape == () and out["text_projection"]["kernel"].shape == (4, 3)
  bad = dict(good, **{"text_projection.weight": np.arange(12, dtype=np.float32)})
  with pytest.raises(ValueError, match="text_projection"):
    clip_io.torch_state_to_flax(bad, abstract, "test", ignore=())
