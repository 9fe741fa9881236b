"""A folder of images (png / jpg / jpeg / webp / bmp), optionally with captions, as a grain source.

Captions, in order of precedence:
  * `captions.jsonl` in the folder: one JSON object per line with "file" (path relative to the folder) and
    "caption" (or "text"); only listed files are used;
  * a same-name `.txt` next to an image (`cat.png` + `cat.txt`).
Images are found recursively and sorted by relative path (so the index order is stable across machines).
Labels: with `labels_from_subdirs=True`, the first-level sub-folder name is the class (sorted names -> 0..K-1).

Each example: {"image": uint8 [size, size, 3] (shorter side resized, then center-cropped),
"caption": str (when captions exist), "label": int32 (when labels_from_subdirs)}.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

from diffusion_jax.data.pipeline import resize_center_crop

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _read_captions_jsonl(path: str) -> Dict[str, str]:
  out = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        out[row["file"]] = row.get("caption", row.get("text"))
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path} line {n}: expected a JSON object with 'file' and 'caption'; got {line.strip()!r} "
                         f"({e}).") from e
      if out[row["file"]] is None:
        raise ValueError(f"{path} line {n}: no 'caption' (or 'text') field.")
  return out


class FolderSource:
  """Random-access source over an image folder (see module docstring). Picklable."""

  def __init__(self, root: str, image_size: int, *, captions: Optional[str] = "auto",
               labels_from_subdirs: bool = False):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"Image folder {root!r} does not exist (config.data.data_dir).")
    self.root, self.image_size = root, int(image_size)
    files: List[str] = []
    for dirpath, _, names in os.walk(root):
      for n in names:
        if n.lower().endswith(IMAGE_EXTS):
          files.append(os.path.relpath(os.path.join(dirpath, n), root))
    files.sort()
    self.captions: Optional[Dict[str, str]] = None
    jsonl = os.path.join(root, "captions.jsonl")
    if captions == "auto":
      captions = jsonl if os.path.exists(jsonl) else ("txt" if any(
          os.path.exists(os.path.join(root, os.path.splitext(f)[0] + ".txt")) for f in files) else None)
    if captions == "txt":
      self.captions = {}
      for f in files:
        p = os.path.join(root, os.path.splitext(f)[0] + ".txt")
        if os.path.exists(p):
          with open(p) as fh:
            self.captions[f] = fh.read().strip()
      files = [f for f in files if f in self.captions]
    elif captions:
      self.captions = _read_captions_jsonl(captions)
      missing = [f for f in self.captions if not os.path.exists(os.path.join(root, f))]
      if missing:
        raise FileNotFoundError(f"{captions} lists files that are not in {root}: {missing[:5]}")
      files = sorted(self.captions)
    if not files:
      raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTS)}) found under {root!r}.")
    self.files = files
    self.class_names: Optional[List[str]] = None
    if labels_from_subdirs:
      self.class_names = sorted({f.split(os.sep)[0] for f in files if os.sep in f})
      if not self.class_names:
        raise ValueError(f"labels_from_subdirs=True but {root!r} has no class sub-folders.")

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    from PIL import Image
    f = self.files[int(index)]
    with Image.open(os.path.join(self.root, f)) as img:
      arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    out: Dict[str, Any] = {"image": resize_center_crop(arr, self.image_size)}
    if self.captions is not None:
      out["caption"] = self.captions[f]
    if self.class_names is not None:
      out["label"] = np.int32(self.class_names.index(f.split(os.sep)[0]))
    return out

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, n={len(self)}, image_size={self.image_size})"
