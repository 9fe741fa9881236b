"""TFDS data sets read without TensorFlow: array_record builds via `tfds.data_source` + grain.

Prepare a data set once (on any machine with `tfds` and, for the build only, its extra dependencies):

    tfds build cifar10 --data_dir=/data/tfds --file_format=array_record

then point a config at it: `config.data.name = "tfds"`, `config.data.tfds_name = "cifar10"`,
`config.data.data_dir = "/data/tfds"`. Reading uses `tfds.data_source(..., builder_kwargs=
{"file_format": "array_record"})`, a random-access grain source; `tfds.load` / tf.data are never used.

`TfdsSource[i]` maps a TFDS example to the project's example dict:
  image   uint8 [H, W, 3]   (grey images repeated to 3 channels)
  label   int32 []          (if `label_key` is present; -1 otherwise when `label_key` is given)
  caption str               (if `caption_key` is given; a "/"-separated path into nested features, e.g.
                             "captions/text" for coco_captions; a list of captions -> the first one)
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np


def _lookup(example: Dict[str, Any], path: str):
  node: Any = example
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      raise KeyError(f"TFDS example has no feature {path!r} (available at this level: "
                     f"{sorted(node) if isinstance(node, dict) else type(node).__name__}). "
                     "Set config.data.image_key / label_key / caption_key.")
    node = node[part]
  return node


def _to_str(v) -> str:
  if isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim > 0):
    v = v[0] if len(v) else b""
  if isinstance(v, np.ndarray):
    v = v.item()
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def map_tfds_example(example: Dict[str, Any], image_key: str = "image", label_key: Optional[str] = "label",
                     caption_key: Optional[str] = None) -> Dict[str, Any]:
  """One TFDS example dict -> {"image", "label"?, "caption"?} (see module docstring)."""
  out: Dict[str, Any] = {}
  img = np.asarray(_lookup(example, image_key))
  if img.ndim == 2:
    img = img[..., None]
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  if img.shape[-1] == 4:
    img = img[..., :3]
  out["image"] = img.astype(np.uint8)
  if label_key:
    try:
      out["label"] = np.int32(np.asarray(_lookup(example, label_key)))
    except KeyError:
      out["label"] = np.int32(-1)
  if caption_key:
    out["caption"] = _to_str(_lookup(example, caption_key))
  return out


def open_data_source(name: str, split: str, data_dir: str = "", file_format: str = "array_record"):
  """`tfds.data_source` with a clear error when the build is missing."""
  import tensorflow_datasets as tfds
  if data_dir and not os.path.isdir(data_dir):
    raise FileNotFoundError(f"TFDS data_dir {data_dir!r} does not exist. Build the data set there first: "
                            f"tfds build {name} --data_dir={data_dir} --file_format={file_format}")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None,
                            builder_kwargs={"file_format": file_format})
  except Exception as e:  # DatasetNotFoundError, missing split, wrong format...
    raise FileNotFoundError(
        f"Could not open TFDS data set {name!r} split {split!r} in data_dir {data_dir or '(default)'!r}: "
        f"{type(e).__name__}: {e}. Build it with: tfds build {name} --data_dir={data_dir or 'DIR'} "
        f"--file_format={file_format}") from e


class TfdsSource:
  """A grain RandomAccessDataSource over a TFDS array_record build, yielding project example dicts.

  Picklable (grain workers re-open the underlying array_record files)."""

  def __init__(self, name: str, split: str = "train", data_dir: str = "", *, image_key: str = "image",
               label_key: Optional[str] = "label", caption_key: Optional[str] = None,
               file_format: str = "array_record"):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
    self._source = open_data_source(name, split, data_dir, file_format)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    return map_tfds_example(self._source[int(index)], self.image_key, self.label_key, self.caption_key)

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, n={len(self)})"
