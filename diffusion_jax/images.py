"""Pictures of results: image grids, sample sheets (conditions next to outputs, with captions), PNG files.

Used by the trainer (periodic sample sheets, `--mode sample`) and by experiments (end-to-end grids).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Dict, Optional

import numpy as np


def image_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 1) -> np.ndarray:
  """[N, H, W, 3] floats in [0, 1] -> one uint8 grid image."""
  images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return (grid * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str, image: np.ndarray):
  """Writes a PNG to a local path or a gs:// (fsspec) URL, creating the directory."""
  from PIL import Image
  from diffusion_jax import paths
  with paths.open(path, "wb") as f:
    Image.fromarray(image).save(f, format="PNG")


MIN_CELL = 64
TEXT_KEYS = ("caption", "text", "prompt")


def _as_unit_images(x: np.ndarray) -> Optional[np.ndarray]:
  """An image-like array -> float [B, H, W, 3] in [0, 1], or None if `x` is not image-like.

  [B, H, W, 1|3|4] is an image (uint8 -> /255; floats below -0.01 are taken as [-1, 1]; else [0, 1]);
  a float or int [B, H, W] map with H, W >= 4 is shown as grey, scaled by its own min / max."""
  x = np.asarray(x)
  if x.dtype.kind not in "biuf" or x.ndim not in (3, 4) or (x.ndim == 3 and min(x.shape[1:]) < 4):
    return None
  if x.ndim == 4:
    if x.shape[-1] not in (1, 3, 4):
      return None
    x = x[..., :3]
    if x.dtype == np.uint8:
      y = x.astype(np.float32) / 255.0
    else:
      y = x.astype(np.float32)
      if np.nanmin(y) < -0.01:
        y = (y + 1.0) / 2.0
  else:
    y = x.astype(np.float32)
    lo = y.min(axis=(1, 2), keepdims=True)
    hi = y.max(axis=(1, 2), keepdims=True)
    y = ((y - lo) / np.maximum(hi - lo, 1e-8))[..., None]
  if y.shape[-1] == 1:
    y = np.repeat(y, 3, axis=-1)
  return np.clip(np.nan_to_num(y), 0.0, 1.0)


def _texts(batch: Dict[str, Any], outputs: Dict[str, Any], n: int):
  for src in (outputs, batch):
    for k in TEXT_KEYS:
      if k in src and np.ndim(src[k]) >= 1 and len(src[k]) >= n:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in list(src[k])[:n]]
  for src in (outputs, batch):
    if "label" in src and np.ndim(src["label"]) == 1:
      return [f"label {int(v)}" for v in np.asarray(src["label"])[:n]]
  return None


def sample_sheet(batch: Dict[str, Any], outputs: Dict[str, Any], min_cell: int = MIN_CELL,
                 max_rows: int = 64) -> Optional[np.ndarray]:
  """One row per example: the batch's image-like conditions, then every image-like output (each column
  headed by its name), upscaled (nearest) to at least `min_cell` pixels, with the caption (or label) of the
  example under each cell. Returns a uint8 [H, W, 3] sheet, or None if no output is image-like."""
  from PIL import Image, ImageDraw, ImageFont
  outs = [(k, _as_unit_images(v)) for k, v in outputs.items()]
  outs = [(k, v) for k, v in outs if v is not None]
  if not outs:
    return None
  n = min(min(len(v) for _, v in outs), max_rows)
  conds = [(k, _as_unit_images(v)) for k, v in (batch or {}).items() if not isinstance(v, dict)]
  conds = [(f"{k} (input)", v[:n]) for k, v in conds if v is not None and len(v) >= n]
  cols = conds + [(k, v[:n]) for k, v in outs]
  h = max(v.shape[1] for _, v in cols)
  w = max(v.shape[2] for _, v in cols)
  scale = max(1, int(math.ceil(min_cell / min(h, w))))
  ch, cw = h * scale, w * scale
  texts = _texts(batch or {}, outputs, n)
  font = ImageFont.load_default()
  char_w = 6
  wrap = max(4, cw // char_w)
  wrapped = [textwrap.wrap(t, wrap)[:3] for t in texts] if texts else None
  line_h = 11
  text_h = (max(len(t) for t in wrapped) * line_h + 2) if wrapped else 0
  head_h = line_h + 4
  pad = 2
  sheet_w = len(cols) * (cw + pad) + pad
  sheet_h = head_h + n * (ch + text_h + pad) + pad
  canvas = Image.new("RGB", (sheet_w, sheet_h), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for c, (name, imgs) in enumerate(cols):
    x0 = pad + c * (cw + pad)
    draw.text((x0 + 1, 2), name[:wrap], fill=(0, 0, 0), font=font)
    for r in range(n):
      y0 = head_h + r * (ch + text_h + pad)
      cell = (imgs[r] * 255.0 + 0.5).astype(np.uint8)
      cell = np.repeat(np.repeat(cell, ch // cell.shape[0], 0), cw // cell.shape[1], 1)
      canvas.paste(Image.fromarray(cell), (x0, y0))
      if wrapped:
        for li, line in enumerate(wrapped[r]):
          draw.text((x0 + 1, y0 + ch + 1 + li * line_h), line, fill=(0, 0, 0), font=font)
  return np.asarray(canvas)


def save_grid(path: str, images: np.ndarray) -> None:
  """uint8 [N, H, W, 3] or floats in [0, 1] -> one grid PNG at `path`."""
  x = np.asarray(images)
  save_png(path, image_grid(x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x))
