"""Parser for shapes-world images (`diffusion_jax.data.shapes`) and the compositional scores built on it.

`parse(image)` recovers the objects of one image; `parse_batch(images)` does a batch (vectorised colour
classification and connected components over the whole batch, then a few numpy operations per component).

Algorithm (exact on clean generated images, see the tests):

1. **Pixel colours.** Each pixel goes to the nearest (Euclidean, RGB in [0, 1]) of the background colour and
   the palette `COLOURS`; nearest-background pixels are background.
2. **Components.** 4-connected components of equal colour class, by vectorised min-label propagation with
   pointer jumping (no scipy). Components smaller than `min_area_frac * small_extent**2` pixels are noise.
3. **Per component**: the colour is the palette colour nearest to the component's *mean* colour (robust to
   pixel noise); the bounding box gives the centre ``((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2)`` in the
   generator's convention; the shape is the `SHAPES` raster (`shapes.shape_mask`, rendered at the component's
   box size, or at a box up to 1-2 pixels larger per side, since blur and noise erode tips) with the highest
   IoU against the component's mask; the size compares the fitted raster's box side with the midpoint of the
   small and large sides. On clean images the true shape has IoU 1 at the component's own box and every
   other shape at most 0.81.

Image inputs: uint8 [H, W, 3] in [0, 255], or float [H, W, 3] in [0, 1] or [-1, 1].
``value_range="auto"`` (default) treats a float image (or batch) with any value below -0.25 as [-1, 1] (a
shapes-world image in [-1, 1] has a background near -1), otherwise as [0, 1], so small negative overshoot of
a [0, 1] sampler stays [0, 1]; pass ``value_range="0,1"`` or ``"-1,1"`` to be explicit. Floats are clipped.

Scores (each takes a batch of images and the conditioning it was generated from; scenes are `shapes.Scene`
objects, or the int32 ``objects`` arrays [B, M, 6] of the example dicts):

* `class_accuracy(images, labels)`: the main object (largest box; ties by area) has the label's shape and
  colour.
* `binding_scores(images, scenes)`: per scene object, is there a parsed object with its shape and colour
  (``binding``); plus ``binding_given_shape`` (the same, among objects whose shape was found),
  ``shape_recall``, ``colour_recall``, ``scene_binding`` (every object of a scene bound correctly).
* `relation_accuracy(images, scenes)`: over scenes with >= 2 objects, objects 0 and 1 are both found (by shape
  and colour) and their parsed centres satisfy the relation on its axis (``"left of"``: ``cx0 < cx1``, ...).
* `count_accuracy(images, counts_or_scenes)`: number of parsed objects equals the number asked for.
* `map_consistency(images, maps, kind)`: the parsed image's map against the conditioning map;
  ``kind="segmentation"`` (semantic, 0 = background, 1 + shape index): mean IoU over the classes present in
  either map; ``"instances"``/``"foreground"``: IoU of the foreground; ``"edges"``: F1 of edge pixels with a
  1-pixel tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from diffusion_jax.data import shapes as S
from diffusion_jax.registry import check_choice

VALUE_RANGES = ("auto", "0,1", "-1,1")
MAP_KINDS = ("segmentation", "instances", "foreground", "edges")


@dataclasses.dataclass(frozen=True)
class ParsedObject:
  shape: str
  colour: str
  size: str
  cx: float             # bounding-box centre, pixels (generator convention: x0 + extent / 2)
  cy: float
  bbox: Tuple[int, int, int, int]   # x0, y0, x1, y1 (inclusive)
  area: int
  shape_iou: float      # IoU of the component with the chosen shape raster (1.0 on clean images)
  fit_extent: int = 0   # box side of the fitted raster (>= the bbox side; decides `size`)

  @property
  def extent(self) -> int:
    return max(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]) + 1

  @property
  def label(self) -> int:
    return S.class_label(self.shape, self.colour)


def to_unit_float(images: np.ndarray, value_range: str = "auto") -> np.ndarray:
  """uint8 or float images -> float32 in [0, 1] (see the module docstring for `value_range`)."""
  check_choice("value_range", value_range, VALUE_RANGES)
  x = np.asarray(images)
  if x.shape[-1] != 3:
    raise ValueError(f"Expected images [..., H, W, 3], got shape {x.shape}.")
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"Images must be uint8 or float, got dtype {x.dtype}.")
  x = x.astype(np.float32)
  if value_range == "-1,1" or (value_range == "auto" and x.size and np.nanmin(x) < -0.25):
    x = (x + 1.0) / 2.0
  return np.clip(np.nan_to_num(x), 0.0, 1.0)


def _colour_classes(x: np.ndarray, background) -> np.ndarray:
  """[..., 3] float in [0, 1] -> [...] int32: 0 background, 1 + palette index (nearest colour)."""
  background = tuple(float(v) for v in background)
  if background == (0.0, 0.0, 0.0) and _CUBE_LUT is not None:
    # Palette + black background are the 8 corners of the RGB cube: nearest corner = per-channel rounding.
    code = ((x[..., 0] > 0.5).astype(np.uint8) << 2) | ((x[..., 1] > 0.5).astype(np.uint8) << 1) | (
        x[..., 2] > 0.5).astype(np.uint8)
    return _CUBE_LUT[code]
  refs = np.concatenate([np.asarray(background, np.float32)[None] / 255.0,
                         S.PALETTE.astype(np.float32) / 255.0])               # [K+1, 3]
  # |x - r|^2 = |x|^2 - 2 x.r + |r|^2; the |x|^2 term is common to all r.
  score = x @ (-2.0 * refs.T) + (refs ** 2).sum(-1)
  return np.argmin(score, axis=-1).astype(np.int32)


def _cube_lut():
  corners = {tuple(int(v > 127) for v in rgb): k + 1 for k, rgb in enumerate(S.PALETTE)}
  if len(corners) != 7 or (0, 0, 0) in corners:
    return None
  lut = np.zeros(8, np.int32)
  for (r, g, b), k in corners.items():
    lut[(r << 2) | (g << 1) | b] = k
  return lut


_CUBE_LUT = _cube_lut()


def _runs(classes2d: np.ndarray):
  """Start offsets of the runs of equal value along the rows of a 2-D array (flattened)."""
  n, w = classes2d.shape
  flat = classes2d.reshape(-1)
  change = np.ones(flat.size, bool)
  change[1:] = flat[1:] != flat[:-1]
  change[::w] = True
  starts = np.flatnonzero(change)
  return starts, np.diff(np.append(starts, flat.size))


def label_components(classes: np.ndarray) -> np.ndarray:
  """4-connected components of equal non-zero class, for a batch [B, H, W].

  Returns int64 [B, H, W]: 0 on background, else ``1 + flat index`` of one pixel of the component (the same
  for all its pixels; the smallest index). Alternates exact minimum-label propagation along horizontal and
  vertical runs of equal class (`np.minimum.reduceat`) with pointer jumping until nothing changes; convex
  components converge in two or three rounds.
  """
  b, h, w = classes.shape
  classes = np.ascontiguousarray(classes)
  fg = classes > 0
  lab = np.where(fg, np.arange(1, b * h * w + 1, dtype=np.int64).reshape(b, h, w), 0)
  hs, hl = _runs(classes.reshape(b * h, w))
  ct = np.ascontiguousarray(classes.transpose(0, 2, 1))
  vs, vl = _runs(ct.reshape(b * w, h))
  fg_idx = np.flatnonzero(fg)
  while True:
    prev = lab
    flat = np.repeat(np.minimum.reduceat(lab.reshape(-1), hs), hl)          # rows
    lt = flat.reshape(b, h, w).transpose(0, 2, 1).reshape(-1)
    lt = np.repeat(np.minimum.reduceat(lt, vs), vl)                         # columns
    flat = np.ascontiguousarray(lt.reshape(b, w, h).transpose(0, 2, 1)).reshape(-1)
    for _ in range(2):   # pointer jumping: a label names a pixel of the same component
      flat[fg_idx] = flat[flat[fg_idx] - 1]
    lab = flat.reshape(b, h, w)
    if np.array_equal(lab, prev):
      return lab


# Template boxes may extend the component's box by these (top, bottom, left, right) pixels: blur and noise
# erode tips and corners (a blurred diamond's box shrinks), so the best fit can be a slightly larger shape.
# (0, 0, 0, 0) comes first, so on clean images the exact raster (IoU 1) wins.
_GROWTHS = tuple(itertools.product((0, 1), repeat=4)) + ((2, 2, 2, 2),)
_PAD = 2


@functools.lru_cache(maxsize=4096)
def _templates(h: int, w: int) -> Tuple[np.ndarray, np.ndarray, Tuple[Tuple[str, int], ...]]:
  """Shape rasters for a component box h x w, on an (h + 4) x (w + 4) canvas, for every growth."""
  out, meta = [], []
  for top, bottom, left, right in _GROWTHS:
    for name in S.SHAPES:
      c = np.zeros((h + 2 * _PAD, w + 2 * _PAD), bool)
      c[_PAD - top:_PAD + h + bottom, _PAD - left:_PAD + w + right] = S.shape_mask(
          name, h + top + bottom, w + left + right)
      out.append(c)
      meta.append((name, max(h + top + bottom, w + left + right)))
  t = np.stack(out)
  return t, t.reshape(len(t), -1).sum(-1), tuple(meta)


def _shape_of(mask: np.ndarray) -> Tuple[str, float, int]:
  """Best `SHAPES` raster for a component mask (its bounding-box crop): (shape, IoU, fitted box side).

  Rasters are rendered at the component's box size and at slightly larger boxes (`_GROWTHS`); the one with
  the highest IoU wins (ties: the first, i.e. no growth).
  """
  t, t_area, meta = _templates(*mask.shape)
  m = np.pad(mask, _PAD)
  inter = (t & m).reshape(len(t), -1).sum(-1)
  iou = inter / (t_area + np.count_nonzero(mask) - inter)
  k = int(np.argmax(iou))
  return meta[k][0], float(iou[k]), meta[k][1]


def parse_batch(images, cfg: Optional[S.ShapesConfig] = None, value_range: str = "auto",
                min_area_frac: float = 0.25, return_components: bool = False):
  """Parses a batch [B, H, W, 3] -> list (per image) of lists of `ParsedObject`, in raster order.

  The image size is taken from the images; `cfg` supplies the background colour and the small/large size
  fractions (defaults: `ShapesConfig()`). With `return_components=True` also returns the int [B, H, W] map of
  kept components (0 = background, 1 + index into that image's object list).
  """
  x = to_unit_float(images, value_range)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[1] != x.shape[2]:
    raise ValueError(f"Expected square images [B, H, W, 3] or [H, W, 3], got {np.shape(images)}.")
  bsz, size = x.shape[0], x.shape[1]
  base = cfg if cfg is not None else S.ShapesConfig()
  small, large = base.extent("small") / base.image_size * size, base.extent("large") / base.image_size * size
  size_threshold = (small + large) / 2
  min_area = max(2, int(min_area_frac * small * small))

  classes = _colour_classes(x, base.background)
  lab = label_components(classes)
  out: List[List[ParsedObject]] = [[] for _ in range(bsz)]
  comp_map = np.zeros((bsz, size, size), np.int32) if return_components else None
  flat = lab.reshape(-1)
  fg = np.flatnonzero(flat)
  if fg.size:
    roots, inv = np.unique(flat[fg], return_inverse=True)
    area = np.bincount(inv)
    bi, yy, xx = np.unravel_index(fg, lab.shape)
    ncomp = roots.size
    x0 = np.full(ncomp, size, np.int64); np.minimum.at(x0, inv, xx)
    x1 = np.full(ncomp, -1, np.int64); np.maximum.at(x1, inv, xx)
    y0 = np.full(ncomp, size, np.int64); np.minimum.at(y0, inv, yy)
    y1 = np.full(ncomp, -1, np.int64); np.maximum.at(y1, inv, yy)
    pix = x.reshape(-1, 3)[fg]
    mean = np.stack([np.bincount(inv, pix[:, c], ncomp) for c in range(3)], -1) / area[:, None]
    colour = _colour_classes(mean, (-1e6, -1e6, -1e6)) - 1  # nearest palette colour (background excluded)
    comp_b = (roots - 1) // (size * size)
    keep = np.flatnonzero(area >= min_area)
    for k in keep:       # roots are sorted, so images and raster order come out in order
      b = int(comp_b[k])
      sl = (b, slice(y0[k], y1[k] + 1), slice(x0[k], x1[k] + 1))
      mask = lab[sl] == roots[k]
      shape, iou, ext = _shape_of(mask)
      obj = ParsedObject(
          shape=shape, colour=S.COLOUR_NAMES[int(colour[k])],
          size="large" if ext > size_threshold else "small",
          cx=(x0[k] + x1[k] + 1) / 2, cy=(y0[k] + y1[k] + 1) / 2,
          bbox=(int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k])), area=int(area[k]), shape_iou=iou,
          fit_extent=int(ext))
      out[b].append(obj)
      if comp_map is not None:
        comp_map[sl][mask] = len(out[b])
  if return_components:
    return out, comp_map
  return out


def parse(image, cfg: Optional[S.ShapesConfig] = None, value_range: str = "auto",
          min_area_frac: float = 0.25) -> List[ParsedObject]:
  """Parses one image [H, W, 3] -> list of `ParsedObject` (shape, colour, size, cx, cy, bbox, ...)."""
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"parse takes one image [H, W, 3]; got shape {image.shape} (use parse_batch).")
  return parse_batch(image[None], cfg, value_range, min_area_frac)[0]


def main_object(objs: Sequence[ParsedObject]) -> Optional[ParsedObject]:
  """The object with the largest fitted box (ties: larger area), or None."""
  if not objs:
    return None
  return max(objs, key=lambda o: (o.fit_extent, o.area))


def parsed_relation(a: ParsedObject, b: ParsedObject) -> str:
  """Relation of `a` to `b` by the generator's dominant-axis rule (`shapes.relation_of`)."""
  return S.relation_of(a.cx, a.cy, b.cx, b.cy)


# ----------------------------------------------------------------------------------------------- scoring


def _as_scenes(scenes, size: int) -> List[S.Scene]:
  if isinstance(scenes, np.ndarray) and scenes.dtype != object:
    if scenes.ndim != 3:
      raise ValueError(f"Scene arrays must be [B, max_objects, {len(S.OBJECT_FIELDS)}], got {scenes.shape}.")
    return [S.Scene.from_array(a, size) for a in scenes]
  return list(scenes)


def _parse_all(images, cfg, value_range) -> Tuple[List[List[ParsedObject]], int]:
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  return parse_batch(images, cfg, value_range), images.shape[1]


def _find(objs: Sequence[ParsedObject], shape: str, colour: str) -> Optional[ParsedObject]:
  for o in objs:
    if o.shape == shape and o.colour == colour:
      return o
  return None


def _check_len(name: str, parsed, other, what: str):
  if len(other) != len(parsed):
    raise ValueError(f"{name} got {len(parsed)} images but {len(other)} {what}.")


def class_accuracy_parsed(parsed: Sequence[Sequence[ParsedObject]], labels) -> float:
  """`class_accuracy` on already parsed images."""
  labels = np.asarray(labels).reshape(-1)
  _check_len("class_accuracy", parsed, labels, "labels")
  hits = [(m := main_object(p)) is not None and m.label == int(l) for p, l in zip(parsed, labels)]
  return float(np.mean(hits)) if hits else float("nan")


def class_accuracy(images, labels, cfg=None, value_range: str = "auto") -> float:
  """Fraction of images whose main (largest) parsed object has class `labels[i]` (shape * 7 + colour)."""
  return class_accuracy_parsed(_parse_all(images, cfg, value_range)[0], labels)


def binding_scores_parsed(parsed: Sequence[Sequence[ParsedObject]], scenes: Sequence[S.Scene]) -> Dict[str, float]:
  """`binding_scores` on already parsed images and a list of `Scene`s."""
  _check_len("binding_scores", parsed, scenes, "scenes")
  bound, shape_found, colour_found, scene_ok = [], [], [], []
  for objs, scene in zip(parsed, scenes):
    ok_all = True
    for o in scene.objects:
      b = _find(objs, o.shape, o.colour) is not None
      bound.append(b)
      shape_found.append(any(p.shape == o.shape for p in objs))
      colour_found.append(any(p.colour == o.colour for p in objs))
      ok_all &= b
    scene_ok.append(ok_all)
  bound, shape_found = np.array(bound, bool), np.array(shape_found, bool)
  if not bound.size:
    raise ValueError("binding_scores needs at least one scene object.")
  return {
      "binding": float(bound.mean()),
      "binding_given_shape": float(bound[shape_found].mean()) if shape_found.any() else 0.0,
      "shape_recall": float(shape_found.mean()),
      "colour_recall": float(np.mean(colour_found)),
      "scene_binding": float(np.mean(scene_ok)),
  }


def binding_scores(images, scenes, cfg=None, value_range: str = "auto") -> Dict[str, float]:
  """Colour/shape binding of generated images against the scenes they were conditioned on.

  Returns ``binding`` (fraction of scene objects with a parsed object of the same shape *and* colour),
  ``binding_given_shape`` (same, among scene objects whose shape was found at all), ``shape_recall``,
  ``colour_recall`` (the shape / the colour appears on some parsed object) and ``scene_binding`` (fraction of
  scenes with every object bound).
  """
  parsed, size = _parse_all(images, cfg, value_range)
  return binding_scores_parsed(parsed, _as_scenes(scenes, size))


def _relation_holds(rel: str, a: ParsedObject, b: ParsedObject) -> bool:
  return {"left of": a.cx < b.cx, "right of": a.cx > b.cx,
          "above": a.cy < b.cy, "below": a.cy > b.cy}[rel]


def relation_accuracy_parsed(parsed: Sequence[Sequence[ParsedObject]], scenes: Sequence[S.Scene]) -> float:
  """`relation_accuracy` on already parsed images and a list of `Scene`s (nan if no scene has 2 objects)."""
  _check_len("relation_accuracy", parsed, scenes, "scenes")
  hits = []
  for objs, scene in zip(parsed, scenes):
    if len(scene.objects) < 2:
      continue
    a = _find(objs, scene.objects[0].shape, scene.objects[0].colour)
    b = _find(objs, scene.objects[1].shape, scene.objects[1].colour)
    hits.append(a is not None and b is not None and a is not b and _relation_holds(scene.relation, a, b))
  return float(np.mean(hits)) if hits else float("nan")


def relation_accuracy(images, scenes, cfg=None, value_range: str = "auto") -> float:
  """Over scenes with >= 2 objects: objects 0 and 1 found (shape + colour) and in the asked relation."""
  parsed, size = _parse_all(images, cfg, value_range)
  return relation_accuracy_parsed(parsed, _as_scenes(scenes, size))


def count_accuracy_parsed(parsed: Sequence[Sequence[ParsedObject]], counts: Sequence[int]) -> float:
  """`count_accuracy` on already parsed images and integer counts."""
  _check_len("count_accuracy", parsed, counts, "counts")
  return float(np.mean([len(p) == int(c) for p, c in zip(parsed, counts)]))


def count_accuracy(images, counts, cfg=None, value_range: str = "auto") -> float:
  """Fraction of images with as many parsed objects as asked (`counts`: ints, scenes or object arrays)."""
  parsed, size = _parse_all(images, cfg, value_range)
  if isinstance(counts, np.ndarray) and counts.ndim == 3:
    counts = [len(s.objects) for s in _as_scenes(counts, size)]
  else:
    counts = [len(c.objects) if isinstance(c, S.Scene) else int(c) for c in counts]
  return count_accuracy_parsed(parsed, counts)


def score_all(images, scenes, cfg=None, value_range: str = "auto") -> Dict[str, float]:
  """Class, binding, relation and count scores of images against their scenes, parsing once."""
  parsed, size = _parse_all(images, cfg, value_range)
  scenes = _as_scenes(scenes, size)
  out = {"class_accuracy": class_accuracy_parsed(parsed, [s.label for s in scenes]),
         "relation_accuracy": relation_accuracy_parsed(parsed, scenes),
         "count_accuracy": count_accuracy_parsed(parsed, [len(s.objects) for s in scenes])}
  out.update(binding_scores_parsed(parsed, scenes))
  return out


def parsed_maps(images, cfg=None, value_range: str = "auto") -> Dict[str, np.ndarray]:
  """Maps of the parsed images, in the generator's conventions: segmentation, instances, edges (uint8)."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[None]
  parsed, comp = parse_batch(x, cfg, value_range, return_components=True)
  seg = np.zeros(comp.shape, np.uint8)
  for b, objs in enumerate(parsed):
    lut = np.array([0] + [S.SHAPES.index(o.shape) + 1 for o in objs], np.uint8)
    seg[b] = lut[comp[b]]
  inst = comp.astype(np.uint8)
  return {"segmentation": seg, "instances": inst, "edges": S.edges_from_instances(inst)}


def _dilate(m: np.ndarray) -> np.ndarray:
  p = np.pad(m, [(0, 0), (1, 1), (1, 1)])
  h, w = m.shape[1:]
  out = np.zeros_like(m)
  for dy in range(3):
    for dx in range(3):
      out |= p[:, dy:dy + h, dx:dx + w]
  return out


def segmentation_ious(pred, target) -> list:
  """Per image pair of segment-id maps [B, H, W]: the mean IoU over the classes (> 0) present in either map
  (1.0 for two empty maps)."""
  scores = []
  for p, t in zip(np.asarray(pred), np.asarray(target)):
    classes = sorted((set(np.unique(p).tolist()) | set(np.unique(t).tolist())) - {0})
    if not classes:
      scores.append(1.0)
      continue
    scores.append(float(np.mean([np.count_nonzero((p == c) & (t == c)) / np.count_nonzero((p == c) | (t == c))
                                 for c in classes])))
  return scores


def map_consistency(images, maps, kind: str, cfg=None, value_range: str = "auto") -> float:
  """Agreement (mean over images, in [0, 1]) between the maps of the parsed images and conditioning `maps`."""
  check_choice("map kind", kind, MAP_KINDS)
  maps = np.asarray(maps)
  if maps.ndim == 2:
    maps = maps[None]
  got = parsed_maps(images, cfg, value_range)
  if got["segmentation"].shape != maps.shape:
    raise ValueError(f"map_consistency: images give maps {got['segmentation'].shape}, conditioning maps are "
                     f"{maps.shape}.")
  scores = []
  if kind == "segmentation":
    scores = segmentation_ious(got["segmentation"], maps)
  elif kind in ("instances", "foreground"):
    pred, tgt = got["instances"] > 0, maps > 0
    for p, t in zip(pred, tgt):
      u = np.count_nonzero(p | t)
      scores.append(1.0 if u == 0 else np.count_nonzero(p & t) / u)
  else:  # edges
    pred, tgt = got["edges"] > 0, maps > 0
    pd, td = _dilate(pred), _dilate(tgt)
    for p, t, pdil, tdil in zip(pred, tgt, pd, td):
      np_, nt = np.count_nonzero(p), np.count_nonzero(t)
      if np_ == 0 and nt == 0:
        scores.append(1.0)
        continue
      prec = np.count_nonzero(p & tdil) / max(1, np_)
      rec = np.count_nonzero(t & pdil) / max(1, nt)
      scores.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
  return float(np.mean(scores))



# ------------------------------------------------------------------------------------------ measurement


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of a float batch [B, H, W, 3] (zero padding)."""
  r = max(1, int(np.ceil(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  p = np.pad(x, [(0, 0), (r, r), (r, r), (0, 0)])
  y = sum(k[i] * p[:, i:i + x.shape[1], :, :] for i in range(2 * r + 1))
  return sum(k[i] * y[:, :, i:i + x.shape[2], :] for i in range(2 * r + 1))


def measure(num: int = 500, sizes: Sequence[int] = (32, 64), seed: int = 0,
            sigmas: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3), blurs: Sequence[float] = (0.8, 1.2)) -> str:
  """Parser accuracy (clean, Gaussian noise, Gaussian blur) and speed, as a markdown table."""
  import time
  lines = ["| image size | corruption | class acc. | binding | scene binding | relation acc. | count acc. |",
           "|---|---|---|---|---|---|---|"]
  speed = []
  for size in sizes:
    cfg = S.ShapesConfig(image_size=size)
    t = time.perf_counter()
    batch = S.make_batch(S.split_seed(seed, "test"), range(num), cfg)
    gen_rate = num / (time.perf_counter() - t)
    images = batch["image"]
    scenes = [S.Scene.from_array(a, size) for a in batch["objects"]]
    t = time.perf_counter()
    parse_batch(images, cfg)
    parse_rate = num / (time.perf_counter() - t)
    speed.append(f"| {size} | {gen_rate:.0f} | {parse_rate:.0f} |")
    rng = np.random.default_rng(seed)
    cases = [(f"noise sigma={s:g}" if s else "clean", s, 0.0) for s in sigmas]
    cases += [(f"blur sigma={b:g} px", 0.0, b) for b in blurs]
    for name, sigma, blur in cases:
      x = images.astype(np.float32) / 255.0
      if blur:
        x = _blur(x, blur)
      if sigma:
        x = x + sigma * rng.standard_normal(x.shape).astype(np.float32)
      r = score_all(np.clip(x, 0, 1), scenes, cfg, value_range="0,1")
      lines.append(f"| {size} | {name} | {r['class_accuracy']:.3f} | {r['binding']:.3f} | "
                   f"{r['scene_binding']:.3f} | {r['relation_accuracy']:.3f} | {r['count_accuracy']:.3f} |")
  lines += ["", "| image size | generation (examples/s) | parser (images/s) |", "|---|---|---|"] + speed
  return "\n".join(lines)


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description="Measure the shapes parser: accuracy under noise/blur, and speed.")
  ap.add_argument("--num", type=int, default=500)
  ap.add_argument("--sizes", default="32,64")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  print(measure(args.num, [int(s) for s in args.sizes.split(",")], args.seed))
