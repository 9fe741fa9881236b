"""A folder of images (png / jpg / jpeg / webp / bmp), optionally with captions, as a grain source.

Captions, in order of precedence:
  * a captions file: `captions.jsonl` (one JSON object per line with "file", a path relative to the folder,
    and "caption" or "text") or `captions.tsv` (`file<TAB>caption` per line) in the folder, or any such
    `.jsonl` / `.tsv` file passed as `captions=` (`config.data.captions_file`). Only listed files are used;
    each line is one example, so an image listed on several lines (several captions) gives several examples;
  * a same-name `.txt` next to an image (`cat.png` + `cat.txt`).
Images are found recursively and sorted by relative path (so the index order is stable across machines; a
captions file's lines are sorted by file, lines of the same file keeping their order).
Labels: with `labels_from_subdirs=True`, the first-level sub-folder name is the class (sorted names -> 0..K-1).

Each example: {"image": uint8 [size, size, 3] (`pipeline.resize_center_crop`: shorter side resized, then
center-cropped), "caption": str (when captions exist), "label": int32 (when labels_from_subdirs)}.

`source_from_config(config.data, split)` reads the config keys (`data_dir`, using `data_dir/<split>` when that
folder exists; `image_size`; `captions_file` or `captions`; `labels_from_subdirs`); both
`make_image_source` (name "folder") and the CLIP embedding cache (`clip_cache`, name "image_folder") use it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from diffusion_jax.data.pipeline import resize_center_crop

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_FILES = ("captions.jsonl", "captions.tsv")


def read_captions_file(path: str) -> List[Tuple[str, str]]:
  """(file, caption) per non-empty line of a `.jsonl` ({"file", "caption" | "text"}) or a `.tsv`
  (`file<TAB>caption`), in file order."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Captions file {path!r} not found (config.data.captions_file). Expected captions.jsonl "
                            '(lines {"file": "img.png", "caption": "..."}) or a .tsv of file<TAB>caption.')
  rows: List[Tuple[str, str]] = []
  tsv = path.lower().endswith(".tsv")
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      if tsv:
        parts = line.rstrip("\r\n").split("\t", 1)
        if len(parts) != 2:
          raise ValueError(f"{path} line {n}: expected 'file<TAB>caption'; got {line.strip()!r}.")
        rows.append((parts[0], parts[1]))
        continue
      try:
        row = json.loads(line)
        file, caption = row["file"], row.get("caption", row.get("text"))
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} line {n}: expected a JSON object with 'file' and 'caption'; got {line.strip()!r} "
                         f"({e}).") from e
      if caption is None:
        raise ValueError(f"{path} line {n}: no 'caption' (or 'text') field.")
      rows.append((file, str(caption)))
  return rows


class FolderSource:
  """Random-access source over an image folder (see module docstring). Picklable.

  captions: "auto" (a captions file in the folder, else `.txt` side files, else none), "txt", None / "" (no
  captions), or the path of a `.jsonl` / `.tsv` captions file."""

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
    # self.captions[i] is the caption of example i (self.files[i]); None without captions.
    self.captions: Optional[List[str]] = None
    if captions == "auto":
      found = [os.path.join(root, c) for c in CAPTION_FILES if os.path.exists(os.path.join(root, c))]
      captions = found[0] if found else ("txt" if any(
          os.path.exists(os.path.join(root, os.path.splitext(f)[0] + ".txt")) for f in files) else None)
    if captions == "txt":
      self.captions = []
      kept = []
      for f in files:
        p = os.path.join(root, os.path.splitext(f)[0] + ".txt")
        if os.path.exists(p):
          with open(p, encoding="utf-8") as fh:
            self.captions.append(fh.read().strip())
          kept.append(f)
      files = kept
    elif captions:
      rows = read_captions_file(captions)
      missing = sorted({f for f, _ in rows if not os.path.exists(os.path.join(root, f))})
      if missing:
        raise FileNotFoundError(f"{captions} lists files that are not in {root}: {missing[:5]}")
      rows.sort(key=lambda r: r[0])  # stable: several captions of one file keep their order
      files = [f for f, _ in rows]
      self.captions = [c for _, c in rows]
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
      out["caption"] = self.captions[int(index)]
    if self.class_names is not None:
      out["label"] = np.int32(self.class_names.index(f.split(os.sep)[0]))
    return out

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, n={len(self)}, image_size={self.image_size})"


def source_from_config(dc: Any, split: str, *, image_size: Optional[int] = None) -> FolderSource:
  """The FolderSource a data config names: `dc.data_dir` (its `<split>` sub-folder when that exists),
  `dc.image_size` (or `image_size`, e.g. a CLIP's input size), `dc.captions_file` (a captions path; takes
  precedence) or `dc.captions` ("auto" | "txt" | path), `dc.labels_from_subdirs`."""
  from diffusion_jax.data import _get
  root = _get(dc, "data_dir", "")
  if not root:
    raise ValueError(f"config.data.name={_get(dc, 'name', 'folder')!r} needs config.data.data_dir (the image folder).")
  if os.path.isdir(os.path.join(root, split)):
    root = os.path.join(root, split)
  size = int(image_size) if image_size else int(_get(dc, "image_size", 32))
  return FolderSource(root, size, captions=_get(dc, "captions_file", "") or _get(dc, "captions", "auto"),
                      labels_from_subdirs=bool(_get(dc, "labels_from_subdirs", False)))
