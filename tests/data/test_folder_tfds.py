"""The TF-free conversion of an image folder into a TFDS array_record build (data/folder_tfds.py), then the
documented recipe: the build read by `config.data.name=tfds` (configs/diffit_cifar10.py), TensorFlow never
imported."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """train/{cat,dog}/*.png (3 each) and test/{cat,dog}/*.png (1 each), sizes not 16x16, a caption per image."""
  root = tmp_path_factory.mktemp("pets")
  rng = np.random.default_rng(0)
  for split, n in (("train", 3), ("test", 1)):
    for cls in ("cat", "dog"):
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"a {cls} number {i}")
  return str(root)


def test_convert_then_read_with_the_tfds_source(folder, tmp_path):
  data_dir = str(tmp_path / "tfds")
  code = f"""
import sys
from diffusion_jax.data import folder_tfds
folder_tfds.main(["--src", {folder!r}, "--data_dir", {data_dir!r}, "--name", "pets", "--image_size", "16",
                  "--labels_from_subdirs"])
assert "tensorflow" not in sys.modules
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "'train': 6" in out.stdout and "'test': 2" in out.stdout

  # a fresh process that never imports the builder: the documented read path
  code = f"""
import sys, numpy as np
from diffusion_jax.data import make_image_source
from diffusion_jax.data.folder import FolderSource
from diffusion_jax.train.config_loading import load_config
c = load_config("configs/diffit_cifar10.py", {{"data.tfds_name": "folder_array_record/pets",
                                              "data.data_dir": {data_dir!r}}})
for split, n in (("train", 6), ("test", 2)):
  src = make_image_source(c.data, split, 0)
  ref = FolderSource({folder!r} + "/" + split, 16, labels_from_subdirs=True)
  assert len(src) == n == len(ref), (len(src), len(ref))
  for i in range(n):
    a, b = src[i], ref[i]
    assert a["image"].shape == (16, 16, 3) and np.array_equal(a["image"], b["image"]), i
    assert int(a["label"]) == int(b["label"]), i
assert [int(make_image_source(c.data, "train", 0)[i]["label"]) for i in range(6)] == [0, 0, 0, 1, 1, 1]
assert "tensorflow" not in sys.modules
print("ok")
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_captions_and_single_folder(folder, tmp_path):
  from diffusion_jax.data import folder_tfds
  b = folder_tfds.build(os.path.join(folder, "train", "cat"), str(tmp_path / "tfds"), "cats", image_size=8)
  assert list(b.info.splits.keys()) == ["train"]
  src = tfds.data_source("folder_array_record/cats", data_dir=str(tmp_path / "tfds"), split="train")
  caps = [ex["caption"] for ex in (src[i] for i in range(len(src)))]
  assert [c.decode() if isinstance(c, bytes) else str(c) for c in caps] == [f"a cat number {i}" for i in range(3)]
  assert [int(src[i]["label"]) for i in range(3)] == [-1, -1, -1]
  with pytest.raises(FileNotFoundError):
    folder_tfds.build(str(tmp_path / "nope"), str(tmp_path / "tfds"), "x")
