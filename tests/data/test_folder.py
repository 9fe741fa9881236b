"""data/folder.py: the captions files and config keys that the CLIP embedding cache reads through it
(captions.tsv, config.data.captions_file, <data_dir>/<split>/, several captions of one image)."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import make_image_source
from diffusion_jax.data.folder import FolderSource, read_captions_file, source_from_config
from diffusion_jax.data.pipeline import resize_center_crop


def _images(root, names, size=(20, 12)):
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(1)
  out = {}
  for n in names:
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(os.path.join(root, n))
    out[n] = arr
  return out


def test_tsv_captions_split_subfolder_and_repeated_files(tmp_path):
  root = tmp_path / "d" / "train"
  raw = _images(str(root), ["b.png", "a.png", "c.png"])
  # c.png is not listed (unused); b.png has two captions (two examples, in line order).
  (root / "captions.tsv").write_text("b.png\tfirst b\na.png\tan a\n\nb.png\tsecond\tb\n")
  dc = ml_collections.ConfigDict(dict(name="folder", data_dir=str(tmp_path / "d"), image_size=8))
  src = make_image_source(dc, "train", 0)  # auto: <data_dir>/train/captions.tsv
  assert src.files == ["a.png", "b.png", "b.png"]
  assert [src[i]["caption"] for i in range(3)] == ["an a", "first b", "second\tb"]
  np.testing.assert_array_equal(src[1]["image"], resize_center_crop(raw["b.png"], 8))
  # config.data.captions_file (any path; file names relative to the image folder) wins over "captions".
  jl = tmp_path / "caps.jsonl"
  jl.write_text("\n".join(json.dumps(r) for r in [{"file": "c.png", "caption": "a c"},
                                                  {"file": "a.png", "text": "a via text"}]) + "\n")
  dc.captions_file = str(jl)
  dc.captions = "txt"
  src = source_from_config(dc, "train", image_size=6)
  assert src.files == ["a.png", "c.png"] and src[1]["caption"] == "a c" and src[0]["image"].shape == (6, 6, 3)


def test_captions_file_errors(tmp_path):
  _images(str(tmp_path), ["a.png"])
  with pytest.raises(FileNotFoundError, match="Captions file .*nope.tsv.* not found"):
    FolderSource(str(tmp_path), 8, captions=str(tmp_path / "nope.tsv"))
  (tmp_path / "bad.tsv").write_text("a.png no tab here\n")
  with pytest.raises(ValueError, match="bad.tsv line 1: expected 'file<TAB>caption'"):
    read_captions_file(str(tmp_path / "bad.tsv"))
  (tmp_path / "missing.tsv").write_text("a.png\tok\nz.png\tnot there\n")
  with pytest.raises(FileNotFoundError, match=r"not in .*\['z.png'\]"):
    FolderSource(str(tmp_path), 8, captions=str(tmp_path / "missing.tsv"))
  assert FolderSource(str(tmp_path), 8).captions is None  # no captions anywhere: images only
