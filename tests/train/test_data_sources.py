"""grain pipeline determinism / sharding / checkpointing, mock-TFDS input (TF-free), image folders."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import make_image_source
from diffusion_jax.data.folder import FolderSource
from diffusion_jax.data.pipeline import ResizeCrop, ToFloatImage, make_pipeline
from diffusion_jax.data.tfds_source import TfdsSource, map_tfds_example


class Range:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"x": np.int32(i)}


def double(e):
  return {"x": e["x"] * 2}


def _take(it, k):
  return [next(it)["x"].tolist() for _ in range(k)]


def test_pipeline_deterministic_per_seed_and_worker_count():
  a = _take(iter(make_pipeline(Range(20), [double], batch_size=4, seed=3)), 8)
  b = _take(iter(make_pipeline(Range(20), [double], batch_size=4, seed=3)), 8)
  c = _take(iter(make_pipeline(Range(20), [double], batch_size=4, seed=4)), 8)
  assert a == b and a != c
  # epoch 1 = batches 0-4 (20 examples): a permutation of all doubled indices; epoch 2 differs in order.
  assert sorted(sum(a[:5], [])) == list(range(0, 40, 2))
  assert a[:5] != a[5:8] + a[:2]
  it = iter(make_pipeline(Range(20), [double], batch_size=4, seed=3, num_workers=2))
  try:
    assert _take(it, 8) == a
  finally:
    it.close()


def test_pipeline_shards_are_disjoint_and_cover():
  seen = []
  for i in range(2):
    seen += sum(_take(iter(make_pipeline(Range(16), [], batch_size=4, seed=0, shard_index=i, shard_count=2)), 2), [])
  assert sorted(seen) == list(range(16))


def test_pipeline_iterator_state_restores_position():
  ds = make_pipeline(Range(20), [double], batch_size=3, seed=1)
  it = iter(ds)
  _take(it, 4)
  state = it.get_state()
  expect = _take(it, 5)
  it2 = iter(ds)
  it2.set_state(state)
  assert _take(it2, 5) == expect


def test_pipeline_errors():
  with pytest.raises(ValueError, match="fewer than the per-host batch size"):
    make_pipeline(Range(3), [], batch_size=4, seed=0)
  with pytest.raises(TypeError, match="not callable"):
    make_pipeline(Range(8), [42], batch_size=4, seed=0)


def test_mock_tfds_source_without_tensorflow(tmp_path):
  code = f"""
import sys, numpy as np
import tensorflow_datasets as tfds
from diffusion_jax.data.tfds_source import TfdsSource
from diffusion_jax.data.pipeline import make_pipeline, ToFloatImage
with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
  src = TfdsSource("cifar10", "train", {str(tmp_path)!r})
  assert len(src) == 12, len(src)
  e = src[3]
  assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8, e["image"].shape
  assert e["label"].dtype == np.int32 and 0 <= int(e["label"]) < 10
  b = next(iter(make_pipeline(src, [ToFloatImage()], batch_size=4, seed=0)))
  assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  m = TfdsSource("mnist", "test", {str(tmp_path)!r})
  assert m[0]["image"].shape == (28, 28, 3)
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
print("OK")
"""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                     env={**os.environ, "PYTHONPATH": os.getcwd()})
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_tfds_example_mapping_and_missing_dir():
  ex = {"image": np.zeros((5, 6, 1), np.uint8), "captions": {"text": np.array([b"a cat", b"cat"])}, "id": 3}
  out = map_tfds_example(ex, caption_key="captions/text")
  assert out["image"].shape == (5, 6, 3) and out["caption"] == "a cat" and out["label"] == -1
  with pytest.raises(KeyError, match="no feature 'captions/txt'"):
    map_tfds_example(ex, caption_key="captions/txt")
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    TfdsSource("cifar10", "train", "/nonexistent/tfds")


def _write_folder(root, n=5, size=(20, 12), captions="txt"):
  rng = np.random.default_rng(0)
  os.makedirs(root, exist_ok=True)
  rows = []
  for i in range(n):
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    name = f"img_{i}.png" if i % 2 else f"img_{i}.jpg"
    Image.fromarray(arr).save(os.path.join(root, name))
    if captions == "txt":
      with open(os.path.join(root, os.path.splitext(name)[0] + ".txt"), "w") as f:
        f.write(f"caption {i}\n")
    rows.append({"file": name, "caption": f"json {i}"})
  if captions == "jsonl":
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)


def test_folder_source_txt_captions_resize_crop(tmp_path):
  _write_folder(str(tmp_path / "a"), captions="txt")
  src = FolderSource(str(tmp_path / "a"), 8)
  assert len(src) == 5
  e = src[2]
  assert e["image"].shape == (8, 8, 3) and e["image"].dtype == np.uint8
  assert e["caption"] == "caption 2"
  # center crop of a 20x12 image resized to 13x8 keeps the middle columns.
  ref = np.asarray(Image.open(tmp_path / "a" / "img_1.png").resize((13, 8), Image.BICUBIC))[:, 2:10]
  np.testing.assert_array_equal(src[1]["image"], ref)


def test_folder_source_jsonl_and_registry(tmp_path):
  _write_folder(str(tmp_path / "b" / "train"), n=4, captions="jsonl")
  dc = ml_collections.ConfigDict(dict(name="folder", data_dir=str(tmp_path / "b"), image_size=8))
  src = make_image_source(dc, "train", 0)
  assert [src[i]["caption"] for i in range(4)] == [f"json {i}" for i in range(4)]
  b = next(iter(make_pipeline(src, [ResizeCrop(8), ToFloatImage()], batch_size=2, seed=0)))
  assert b["image"].shape == (2, 8, 8, 3) and b["caption"].shape == (2,)
  dc.name = "flickr"
  with pytest.raises(ValueError, match="Unknown dataset 'flickr'.*folder, shapes, tfds"):
    make_image_source(dc, "train", 0)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    FolderSource(str(tmp_path / "nope"), 8)
