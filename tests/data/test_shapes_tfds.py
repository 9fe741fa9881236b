"""The shapes world as a TFDS array_record build, written and read back without TensorFlow."""

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from diffusion_jax.data import shapes as S  # noqa: E402
from diffusion_jax.data import shapes_tfds  # noqa: E402


def test_build_and_read_round_trip(tmp_path):
  builder = shapes_tfds.build(str(tmp_path), num_train=12, num_test=5, seed=3, image_size=32)
  assert "tensorflow" not in sys.modules
  assert list(tmp_path.glob("**/*.array_record*")), "no array_record files written"
  cfg = S.ShapesConfig(image_size=32)
  name = f"shapes_world/{builder.builder_config.name}"
  for split, num in (("train", 12), ("test", 5)):
    src = tfds.data_source(name, data_dir=str(tmp_path), split=split)
    assert len(src) == num
    for i in range(num):
      got = shapes_tfds.decode_example(src[i])
      want = S.make_example(S.split_seed(3, split), i, cfg)
      assert set(got) == set(want)
      for k in want:
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
        assert np.array_equal(got[k], want[k]), (split, i, k)
  # Reading from the directory alone (no registered builder code needed) gives the same records.
  ro = tfds.builder_from_directory(builder.data_dir)
  assert np.array_equal(ro.as_data_source("test")[2]["image"],
                        S.make_example(S.split_seed(3, "test"), 2, cfg)["image"])
  assert "tensorflow" not in sys.modules


def test_build_read_by_grain(tmp_path):
  grain = pytest.importorskip("grain")
  builder = shapes_tfds.build(str(tmp_path), num_train=8, num_test=2, seed=0, image_size=32, max_objects=2)
  src = tfds.data_source(f"shapes_world/{builder.builder_config.name}", data_dir=str(tmp_path), split="train")
  ds = grain.MapDataset.source(src).map(shapes_tfds.decode_example).batch(4)
  batch = next(iter(ds))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["objects"].shape == (4, 2, 6)
  want = S.make_example(0, 1, S.ShapesConfig(max_objects=2))
  assert np.array_equal(batch["masked_image"][1], want["masked_image"]) and batch["caption"][1] == want["caption"]
