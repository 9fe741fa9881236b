"""The shapes world: a procedural, multi-modal image data set generated from (seed, index).

Every method in this project trains on it and is *measured* on it (`diffusion_jax.eval.shapes_parser`
recovers the objects from any image). Pure numpy; about 0.1 ms per 32x32 example.

A scene holds 1-3 objects (`ShapesConfig.min_objects` / `max_objects`). Each object has

* a shape from `SHAPES` (circle, square, triangle, diamond, cross),
* a colour from the named palette `COLOURS` (the seven non-black corners of the RGB cube),
* a size from `SIZES` (small: bounding box `small_frac * image_size` pixels, large: `large_frac * image_size`,
  both rounded to even numbers of pixels),
* a position: the top-left corner of its axis-aligned bounding box; boxes never overlap and keep `gap` pixels
  of background between each other, so every object is its own connected component.

Objects in one scene have distinct shapes and distinct colours (`distinct=True`), so "the circle" names one
object and binding (which colour goes with which shape) is well defined.

**Object 0 is the main object.** With more than one object it is always *large* and every other object is
*small* (`main_largest=True`), so a parser finds it as the object with the largest bounding box.

**Class label** (`example["label"]`, int32): ``shape_index * len(COLOURS) + colour_index`` of object 0;
`NUM_CLASSES = len(SHAPES) * len(COLOURS)` (35). `label_name(label)` gives e.g. ``"red circle"``.

**Relation** between objects 0 and 1 (`RELATIONS`): with ``dx = cx1 - cx0`` and ``dy = cy1 - cy0`` (pixel
coordinates, y grows downwards), the dominant axis decides: ``|dx| > |dy|`` gives "left of" (``dx > 0``,
object 0 is left of object 1) or "right of"; otherwise "above" (``dy > 0``) or "below". Scenes are sampled so
that ``||dx| - |dy|| >= relation_margin`` pixels (the relation is never borderline) and so that swapping the
two objects' centres (`swap_positions`) is again a valid scene with the opposite relation.

**Caption**: ``"a large red circle left of a small blue square and a small green triangle"`` (object 0,
relation, object 1, then "and ..." for the rest); a single object gives ``"a small cyan diamond"``.

**Example dict** (`make_example`, `ShapesSource[i]`), all numpy:

==================  ===================  ===========================================================
key                 dtype / shape        meaning
==================  ===================  ===========================================================
image               uint8 [H, W, 3]      the rendered scene (background `background`, default black)
label               int32 []             class label of object 0 (see above)
caption             str                  the caption
segmentation        uint8 [H, W]         semantic map: 0 background, ``1 + shape_index`` on objects
instances           uint8 [H, W]         instance map: 0 background, ``1 + k`` on object k
edges               uint8 [H, W]         1 on object pixels with a 4-neighbour of another instance
                                         (or background), else 0
depth               float32 [H, W]       1.0 on background; object k at the constant depth
                                         ``0.8 - 0.6 * cy_k / H`` (lower in the image = nearer)
lowres              uint8 [H/f, W/f, 3]  box-filtered image, ``f = lowres_factor`` (default 4)
mask                uint8 [H, W]         1 inside a random box (the region to fill in), else 0
masked_image        uint8 [H, W, 3]      image with the box set to `masked_value` (default 128 grey)
objects             int32 [M, 6]         one row per object, ``OBJECT_FIELDS`` = (shape, colour, size,
                                         cx, cy, extent); rows past `num_objects` are -1. Centres are
                                         bounding-box centres in pixels, ``cx = x0 + extent / 2``
                                         (extents are even, so these are integers)
num_objects         int32 []             number of objects
relation            int32 []             index into `RELATIONS`, -1 for a single object
==================  ===================  ===========================================================

``M = max_objects``. `Scene.from_array(example["objects"])` rebuilds the scene from the encoding.

**Determinism and splits**: example ``i`` of a source with seed ``s`` is a pure function of ``(s, i, cfg)``
(numpy ``default_rng([s, i])``). The test split uses ``split_seed(s, "test") = s + 1_000_003``, so train and test
scenes come from disjoint random streams; `ShapesSource(n, seed, cfg, split="test")` applies it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from diffusion_jax.registry import check_choice

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
COLOUR_NAMES: Tuple[str, ...] = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.uint8)  # [num_colours, 3]
SIZES: Tuple[str, ...] = ("small", "large")
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUM_CLASSES = len(SHAPES) * len(COLOURS)
OBJECT_FIELDS: Tuple[str, ...] = ("shape", "colour", "size", "cx", "cy", "extent")
TEST_SEED_OFFSET = 1_000_003
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
  """Parameters of the shapes world. All fractions are of `image_size`."""
  image_size: int = 32
  min_objects: int = 1
  max_objects: int = 3
  small_frac: float = 0.25     # small objects: bounding box 8 px at 32x32
  large_frac: float = 0.375    # large objects: 12 px at 32x32
  gap: int = 2                 # background pixels kept between object boxes
  border: int = 1              # background pixels kept at the image border
  relation_margin: float = 2.0  # ||dx| - |dy|| >= this many pixels between objects 0 and 1
  distinct: bool = True        # distinct shapes and colours within a scene
  main_largest: bool = True    # object 0 large, others small (when more than one object)
  background: Tuple[int, int, int] = (0, 0, 0)
  lowres_factor: int = 4
  mask_min_frac: float = 0.25  # side of the inpainting box, as a fraction of image_size
  mask_max_frac: float = 0.5
  masked_value: int = 128
  # Nuisance: image content the caption does not describe (all off by default; off, every example is
  # bit-identical to a config without these keys). Drawn from `nuisance_rng(scene)`, a function of what the
  # colour / position swaps keep, so a counterfactual image shares its scene's background and texture.
  background_jitter: int = 0   # > 0: a random background colour per image, each channel in [0, this]
  texture_noise: float = 0.0   # > 0: std (0-255 scale) of per-pixel Gaussian noise on the background pixels
  size_jitter: int = 0         # > 0: small boxes up to this many px smaller, large ones up to this many larger
                               # (even steps; the size words stay true: every small box < every large box)

  def __post_init__(self):
    s = self.image_size
    if s < 16:
      raise ValueError(f"ShapesConfig.image_size={s} is too small; use 16 or more (default 32).")
    if not 1 <= self.min_objects <= self.max_objects:
      raise ValueError(f"ShapesConfig needs 1 <= min_objects <= max_objects, got min_objects={self.min_objects}, "
                       f"max_objects={self.max_objects}.")
    if self.max_objects > 4:
      raise ValueError(f"ShapesConfig.max_objects={self.max_objects}: at most 4 objects fit; use 1-3.")
    if s % self.lowres_factor:
      raise ValueError(f"ShapesConfig.image_size={s} must be divisible by lowres_factor={self.lowres_factor}.")
    if self.extent("small") >= self.extent("large"):
      raise ValueError("ShapesConfig: small_frac must give a smaller box than large_frac.")
    if len(self.background) != 3:
      raise ValueError(f"ShapesConfig.background must be an RGB triple, got {self.background!r}.")
    if not 0 <= self.background_jitter <= 255:
      raise ValueError(f"ShapesConfig.background_jitter={self.background_jitter} must be in [0, 255].")
    if self.texture_noise < 0:
      raise ValueError(f"ShapesConfig.texture_noise={self.texture_noise} must be >= 0.")
    if self.size_jitter < 0 or self.size_jitter % 2:
      raise ValueError(f"ShapesConfig.size_jitter={self.size_jitter} must be an even number of pixels >= 0.")
    if self.size_jitter and (self.extent("small") - self.size_jitter < 4
                             or self.extent("large") + self.size_jitter > s - 2 * self.border):
      raise ValueError(f"ShapesConfig.size_jitter={self.size_jitter} makes small boxes under 4 px or large boxes "
                       "larger than the image.")

  @property
  def has_nuisance(self) -> bool:
    return bool(self.background_jitter or self.texture_noise)

  def extent(self, size: str) -> int:
    """Bounding-box side in pixels of a `size` object (an even number, at least 4)."""
    frac = {"small": self.small_frac, "large": self.large_frac}[check_choice("size", size, SIZES)]
    return max(4, 2 * int(round(frac * self.image_size / 2)))

  @classmethod
  def from_dict(cls, d: Optional[Mapping[str, Any]] = None, **overrides) -> "ShapesConfig":
    """Builds a config from a mapping (e.g. a ConfigDict); unknown keys raise with the list of valid ones."""
    d = dict(d or {}, **overrides)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
      raise ValueError(f"Unknown shapes-world config key(s) {unknown}. Valid keys: {', '.join(valid)}.")
    if "background" in d:
      d["background"] = tuple(int(v) for v in d["background"])
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Obj:
  """One object: names plus its bounding box (top-left `x0, y0`, side `extent` pixels)."""
  shape: str
  colour: str
  size: str
  x0: int
  y0: int
  extent: int

  @property
  def cx(self) -> int:
    return self.x0 + self.extent // 2

  @property
  def cy(self) -> int:
    return self.y0 + self.extent // 2

  def describe(self) -> str:
    return f"a {self.size} {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: Tuple[Obj, ...]
  image_size: int = 32

  @property
  def relation(self) -> Optional[str]:
    """Relation of object 0 to object 1 (see module docstring), None for a single object."""
    if len(self.objects) < 2:
      return None
    a, b = self.objects[0], self.objects[1]
    return relation_of(a.cx, a.cy, b.cx, b.cy)

  @property
  def label(self) -> int:
    return class_label(self.objects[0].shape, self.objects[0].colour)

  def to_array(self, max_objects: int) -> np.ndarray:
    """int32 [max_objects, len(OBJECT_FIELDS)], -1 padded."""
    out = np.full((max_objects, len(OBJECT_FIELDS)), -1, np.int32)
    for k, o in enumerate(self.objects):
      out[k] = (SHAPES.index(o.shape), COLOUR_NAMES.index(o.colour), SIZES.index(o.size), o.cx, o.cy, o.extent)
    return out

  @classmethod
  def from_array(cls, arr: np.ndarray, image_size: int = 32) -> "Scene":
    """Inverse of `to_array` (rows with shape -1 are padding)."""
    arr = np.asarray(arr)
    objs = []
    for row in arr:
      if row[0] < 0:
        continue
      s, c, z, cx, cy, e = (int(v) for v in row)
      objs.append(Obj(SHAPES[s], COLOUR_NAMES[c], SIZES[z], cx - e // 2, cy - e // 2, e))
    return cls(tuple(objs), image_size)


def relation_of(ax: float, ay: float, bx: float, by: float) -> str:
  """Relation of a point A to a point B by the dominant axis of ``B - A`` (ties go to "above"/"below")."""
  dx, dy = bx - ax, by - ay
  if abs(dx) > abs(dy):
    return "left of" if dx > 0 else "right of"
  return "above" if dy > 0 else "below"


def class_label(shape: str, colour: str) -> int:
  """``shape_index * len(COLOURS) + colour_index``."""
  return SHAPES.index(check_choice("shape", shape, SHAPES)) * len(COLOURS) + COLOUR_NAMES.index(
      check_choice("colour", colour, COLOUR_NAMES))


def label_name(label: int) -> str:
  """``"red circle"`` for label 0."""
  s, c = divmod(int(label), len(COLOURS))
  return f"{COLOUR_NAMES[c]} {SHAPES[s]}"


def split_seed(seed: int, split: str) -> int:
  """The seed of a split: train uses `seed`, test uses ``seed + 1_000_003`` (disjoint streams)."""
  check_choice("split", split, SPLITS)
  return int(seed) + (TEST_SEED_OFFSET if split == "test" else 0)


# ----------------------------------------------------------------------------------------------- shapes


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, height: int, width: Optional[int] = None) -> np.ndarray:
  """Boolean [height, width] raster of `shape` filling its box (touches all four sides).

  Pixel centres map to ``u, v in (-1, 1)`` (v grows downwards); a tolerance of one pixel makes thin tips and
  the top of the triangle at least one pixel wide. The parser matches components against these same
  rasters, so keep the two in sync (they are the same function).
  """
  width = height if width is None else width
  v = (np.arange(height) + 0.5) / height * 2 - 1
  u = (np.arange(width) + 0.5) / width * 2 - 1
  v, u = v[:, None], u[None, :]
  tu, tv = 1.0 / width, 1.0 / height
  if shape == "square":
    m = np.ones((height, width), bool)
  elif shape == "circle":
    m = u ** 2 + v ** 2 <= 1.0 + tu * tv
  elif shape == "triangle":   # apex up, base at the bottom
    m = np.abs(u) <= (v + 1) / 2 + tu
  elif shape == "diamond":
    m = np.abs(u) + np.abs(v) <= 1.0 + tu
  elif shape == "cross":      # a plus sign with arms a third of the box wide
    m = (np.abs(u) <= 1 / 3 + 1e-9) | (np.abs(v) <= 1 / 3 + 1e-9)
  else:
    check_choice("shape", shape, SHAPES)
    raise AssertionError(shape)
  m = np.broadcast_to(m, (height, width)).copy()
  m.setflags(write=False)
  return m


# ------------------------------------------------------------------------------------------------ scenes


def _as_rng(rng_or_seed) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  return np.random.default_rng(rng_or_seed)


def _boxes_ok(boxes: Sequence[Tuple[int, int, int]], cfg: ShapesConfig) -> bool:
  s, g, b = cfg.image_size, cfg.gap, cfg.border
  for i, (x, y, e) in enumerate(boxes):
    if x < b or y < b or x + e > s - b or y + e > s - b:
      return False
    for (x2, y2, e2) in boxes[:i]:
      if x < x2 + e2 + g and x2 < x + e + g and y < y2 + e2 + g and y2 < y + e + g:
        return False
  return True


def _swapped(boxes: List[Tuple[int, int, int]]) -> List[Tuple[int, int, int]]:
  (x0, y0, e0), (x1, y1, e1) = boxes[0], boxes[1]
  c0 = (x0 + e0 // 2, y0 + e0 // 2)
  c1 = (x1 + e1 // 2, y1 + e1 // 2)
  return [(c1[0] - e0 // 2, c1[1] - e0 // 2, e0), (c0[0] - e1 // 2, c0[1] - e1 // 2, e1)] + list(boxes[2:])


def sample_scene(rng_or_seed, cfg: ShapesConfig = ShapesConfig()) -> Scene:
  """Samples a scene (see the module docstring for the rules) from a numpy Generator or a seed."""
  rng = _as_rng(rng_or_seed)
  n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
  shapes = rng.choice(len(SHAPES), n, replace=not cfg.distinct)
  colours = rng.choice(len(COLOURS), n, replace=not cfg.distinct)
  if n > 1 and cfg.main_largest:
    sizes = ["large"] + ["small"] * (n - 1)
  else:
    sizes = [SIZES[i] for i in rng.integers(0, len(SIZES), n)]
  extents = [cfg.extent(z) for z in sizes]
  if cfg.size_jitter:  # small boxes only shrink, large ones only grow: "small" < "large" stays true
    steps = rng.integers(0, cfg.size_jitter // 2 + 1, n)
    extents = [e + (2 if z == "large" else -2) * int(k) for e, z, k in zip(extents, sizes, steps)]
  s, b = cfg.image_size, cfg.border
  for _ in range(1000):
    boxes: List[Tuple[int, int, int]] = []
    for e in extents:
      for _ in range(50):
        x, y = (int(v) for v in rng.integers(b, s - b - e + 1, size=2))
        if _boxes_ok(boxes + [(x, y, e)], cfg):
          boxes.append((x, y, e))
          break
      else:
        break
    if len(boxes) < n:
      continue
    if n >= 2:
      dx = (boxes[1][0] + boxes[1][2] / 2) - (boxes[0][0] + boxes[0][2] / 2)
      dy = (boxes[1][1] + boxes[1][2] / 2) - (boxes[0][1] + boxes[0][2] / 2)
      if abs(abs(dx) - abs(dy)) < cfg.relation_margin or not _boxes_ok(_swapped(boxes), cfg):
        continue
    objs = tuple(Obj(SHAPES[shapes[k]], COLOUR_NAMES[colours[k]], sizes[k], *boxes[k]) for k in range(n))
    return Scene(objs, s)
  raise RuntimeError(f"Could not place {n} objects of extents {extents} in a {s}x{s} image; "
                     "lower max_objects or the size fractions.")


def caption(scene: Scene) -> str:
  """``"a large red circle left of a small blue square and a small green triangle"``."""
  objs = scene.objects
  text = objs[0].describe()
  if len(objs) >= 2:
    text += f" {scene.relation} {objs[1].describe()}"
  for o in objs[2:]:
    text += f" and {o.describe()}"
  return text


def swap_colours(scene: Scene) -> Scene:
  """Counterfactual: objects 0 and 1 exchange colours (binding changes; shapes, colours, places kept)."""
  if len(scene.objects) < 2:
    raise ValueError("swap_colours needs a scene with at least 2 objects; sample with min_objects=2.")
  a, b = scene.objects[:2]
  return Scene((dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
               + scene.objects[2:], scene.image_size)


def swap_positions(scene: Scene) -> Scene:
  """Counterfactual: objects 0 and 1 exchange centres, so the relation flips (left of <-> right of, ...)."""
  if len(scene.objects) < 2:
    raise ValueError("swap_positions needs a scene with at least 2 objects; sample with min_objects=2.")
  a, b = scene.objects[:2]
  (x0, y0, _), (x1, y1, _) = _swapped([(a.x0, a.y0, a.extent), (b.x0, b.y0, b.extent)])
  return Scene((dataclasses.replace(a, x0=x0, y0=y0), dataclasses.replace(b, x0=x1, y0=y1))
               + scene.objects[2:], scene.image_size)


# --------------------------------------------------------------------------------------------- rendering


def instance_map(scene: Scene, size: Optional[int] = None) -> np.ndarray:
  """uint8 [S, S]: 0 background, ``1 + k`` on object k."""
  size = size or scene.image_size
  inst = np.zeros((size, size), np.uint8)
  for k, o in enumerate(scene.objects):
    m = shape_mask(o.shape, o.extent)
    region = inst[o.y0:o.y0 + o.extent, o.x0:o.x0 + o.extent]
    region[m] = k + 1
  return inst


def edges_from_instances(inst: np.ndarray) -> np.ndarray:
  """uint8 map, 1 on non-zero pixels that have a 4-neighbour with another value (image border = 0)."""
  p = np.pad(inst, [(0, 0)] * (inst.ndim - 2) + [(1, 1), (1, 1)])
  c = p[..., 1:-1, 1:-1]
  diff = ((p[..., :-2, 1:-1] != c) | (p[..., 2:, 1:-1] != c) | (p[..., 1:-1, :-2] != c) | (p[..., 1:-1, 2:] != c))
  return (diff & (c != 0)).astype(np.uint8)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
  """Box filter by an integer factor, rounded back to uint8."""
  h, w, c = image.shape
  x = image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float32).mean(axis=(1, 3))
  return np.round(x).astype(np.uint8)


def nuisance_rng(scene: Scene) -> np.random.Generator:
  """The random stream of a scene's nuisance (background colour, texture): seeded by what `swap_colours` and
  `swap_positions` keep (the sorted shapes, colours, centres and extents), so a counterfactual image has the same
  background and texture as the scene it was made from."""
  key = []
  for field in ("shape", "colour", "centre", "extent"):
    if field == "shape":
      vals = sorted(SHAPES.index(o.shape) for o in scene.objects)
    elif field == "colour":
      vals = sorted(COLOUR_NAMES.index(o.colour) for o in scene.objects)
    elif field == "centre":
      vals = [v for c in sorted((o.cx, o.cy) for o in scene.objects) for v in c]
    else:
      vals = sorted(o.extent for o in scene.objects)
    key += [len(vals)] + vals
  return np.random.default_rng([7919] + key)


def render_image(scene: Scene, cfg: ShapesConfig = ShapesConfig(), inst: Optional[np.ndarray] = None) -> np.ndarray:
  """uint8 [S, S, 3]: the RGB image alone (objects in their palette colours over the background, plus the
  nuisance of `cfg`: a random background colour and background texture noise, both from `nuisance_rng`)."""
  s = cfg.image_size
  inst = instance_map(scene, s) if inst is None else inst
  image = np.empty((s, s, 3), np.uint8)
  if cfg.has_nuisance:
    rng = nuisance_rng(scene)
    bg = np.asarray(cfg.background, np.float32)
    if cfg.background_jitter:
      bg = rng.integers(0, cfg.background_jitter + 1, 3).astype(np.float32)
    field = np.broadcast_to(bg, (s, s, 3)).astype(np.float32)
    if cfg.texture_noise:
      field = field + rng.normal(0.0, cfg.texture_noise, (s, s, 3)).astype(np.float32)
    image[:] = np.clip(np.round(field), 0, 255).astype(np.uint8)
  else:
    image[:] = np.asarray(cfg.background, np.uint8)
  for k, o in enumerate(scene.objects):
    image[inst == k + 1] = COLOURS[o.colour]
  return image


def render(scene: Scene, cfg: ShapesConfig = ShapesConfig(), rng_or_seed=None) -> Dict[str, np.ndarray]:
  """Renders every image modality of `scene` (see the module docstring).

  The inpainting box of `mask`/`masked_image` is drawn from `rng_or_seed` (default: a fixed seed derived from
  the scene, so `render` is deterministic either way).
  """
  s = cfg.image_size
  if scene.image_size != s:
    raise ValueError(f"Scene is for image_size={scene.image_size} but cfg.image_size={s}.")
  inst = instance_map(scene, s)
  image = render_image(scene, cfg, inst)
  seg = np.zeros((s, s), np.uint8)
  depth = np.ones((s, s), np.float32)
  for k, o in enumerate(scene.objects):
    m = inst == k + 1
    seg[m] = SHAPES.index(o.shape) + 1
    depth[m] = 0.8 - 0.6 * o.cy / s
  if rng_or_seed is None:
    rng_or_seed = [int(v) for v in scene.to_array(len(scene.objects)).ravel() + 1]
  rng = _as_rng(rng_or_seed)
  lo, hi = max(1, int(round(cfg.mask_min_frac * s))), max(1, int(round(cfg.mask_max_frac * s)))
  mh, mw = (int(v) for v in rng.integers(lo, hi + 1, size=2))
  my, mx = int(rng.integers(0, s - mh + 1)), int(rng.integers(0, s - mw + 1))
  mask = np.zeros((s, s), np.uint8)
  mask[my:my + mh, mx:mx + mw] = 1
  masked = image.copy()
  masked[mask.astype(bool)] = cfg.masked_value
  return {
      "image": image,
      "segmentation": seg,
      "instances": inst,
      "edges": edges_from_instances(inst),
      "depth": depth,
      "lowres": downsample(image, cfg.lowres_factor),
      "mask": mask,
      "masked_image": masked,
  }


def make_example(seed: int, index: int, cfg: ShapesConfig = ShapesConfig()) -> Dict[str, Any]:
  """Example `index` of the stream `seed`: every modality plus caption, label, objects (module docstring)."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, int(index)])
  scene = sample_scene(rng, cfg)
  ex = render(scene, cfg, rng)
  ex["label"] = np.int32(scene.label)
  ex["caption"] = caption(scene)
  ex["objects"] = scene.to_array(cfg.max_objects)
  ex["num_objects"] = np.int32(len(scene.objects))
  rel = scene.relation
  ex["relation"] = np.int32(-1 if rel is None else RELATIONS.index(rel))
  return ex


def example_scene(example: Mapping[str, Any], image_size: Optional[int] = None) -> Scene:
  """The `Scene` of an example dict (from its `objects` encoding)."""
  size = image_size or int(np.asarray(example["image"]).shape[-2])
  return Scene.from_array(example["objects"], size)


class ShapesSource:
  """A grain `RandomAccessDataSource` of shapes-world examples: ``len()`` and ``[i]`` -> example dict.

  `split="test"` shifts the seed by 1_000_003 (`split_seed`), so train and test never share a stream.
  Picklable (grain worker processes get a copy).
  """

  def __init__(self, num_examples: int, seed: int = 0, cfg: Optional[ShapesConfig] = None,
               split: str = "train"):
    if num_examples < 1:
      raise ValueError(f"ShapesSource needs num_examples >= 1, got {num_examples}.")
    self.num_examples = int(num_examples)
    self.split = check_choice("split", split, SPLITS)
    self.seed = split_seed(seed, split)
    self.cfg = cfg if cfg is not None else ShapesConfig()

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"ShapesSource index {index} out of range [0, {self.num_examples}).")
    return make_example(self.seed, index, self.cfg)

  def __repr__(self) -> str:
    return f"ShapesSource(num_examples={self.num_examples}, seed={self.seed}, split={self.split!r}, cfg={self.cfg})"


def make_batch(seed: int, indices: Sequence[int], cfg: ShapesConfig = ShapesConfig()) -> Dict[str, np.ndarray]:
  """Stacks `make_example(seed, i, cfg)` for `indices` into a dict of arrays (captions: a str array)."""
  exs = [make_example(seed, i, cfg) for i in indices]
  return {k: np.stack([e[k] for e in exs]) if k != "caption" else np.array([e[k] for e in exs])
          for k in exs[0]}
