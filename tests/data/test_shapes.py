"""Tests of the procedural shapes world (diffusion_jax/data/shapes.py)."""

import pickle
import re

import numpy as np
import pytest

from diffusion_jax.data import shapes as S


def test_constants():
  assert S.NUM_CLASSES == len(S.SHAPES) * len(S.COLOURS)
  pal = S.PALETTE.astype(int)
  # Palette colours are well separated from each other and from the black background.
  d = np.sqrt(((pal[:, None] - pal[None]) ** 2).sum(-1))
  assert d[~np.eye(len(pal), dtype=bool)].min() >= 255
  assert np.sqrt((pal ** 2).sum(-1)).min() >= 255
  assert S.class_label("circle", "red") == 0
  assert S.class_label("square", "green") == 1 * len(S.COLOURS) + 1
  assert S.label_name(S.class_label("cross", "white")) == "white cross"
  with pytest.raises(ValueError, match="Valid shape names"):
    S.class_label("hexagon", "red")


def test_determinism_and_splits():
  cfg = S.ShapesConfig()
  a, b = S.make_example(7, 11, cfg), S.make_example(7, 11, cfg)
  for k in a:
    assert np.array_equal(a[k], b[k]), k
  other_index = S.make_example(7, 12, cfg)
  other_seed = S.make_example(8, 11, cfg)
  assert not np.array_equal(a["image"], other_index["image"])
  assert not np.array_equal(a["image"], other_seed["image"])
  assert S.split_seed(5, "train") == 5 and S.split_seed(5, "test") == 5 + 1_000_003
  train, test = S.ShapesSource(50, seed=5), S.ShapesSource(50, seed=5, split="test")
  assert np.array_equal(test[3]["image"], S.make_example(5 + 1_000_003, 3, cfg)["image"])
  train_imgs = {train[i]["image"].tobytes() for i in range(50)}
  same = sum(test[i]["image"].tobytes() in train_imgs for i in range(50))
  assert same < 5   # 1-object scenes can coincide by chance, but the streams differ
  with pytest.raises(ValueError, match="Valid split names"):
    S.ShapesSource(5, split="validation")


@pytest.mark.parametrize("size", [32, 64])
def test_modalities_shapes_and_dtypes(size):
  cfg = S.ShapesConfig(image_size=size)
  ex = S.make_example(0, 3, cfg)
  spec = {
      "image": ((size, size, 3), np.uint8), "segmentation": ((size, size), np.uint8),
      "instances": ((size, size), np.uint8), "edges": ((size, size), np.uint8),
      "depth": ((size, size), np.float32), "lowres": ((size // 4, size // 4, 3), np.uint8),
      "mask": ((size, size), np.uint8), "masked_image": ((size, size, 3), np.uint8),
      "objects": ((3, len(S.OBJECT_FIELDS)), np.int32), "label": ((), np.int32),
      "num_objects": ((), np.int32), "relation": ((), np.int32),
  }
  assert set(ex) == set(spec) | {"caption"}
  for k, (shape, dtype) in spec.items():
    assert np.shape(ex[k]) == shape and np.asarray(ex[k]).dtype == dtype, (k, np.shape(ex[k]), ex[k].dtype)
  assert isinstance(ex["caption"], str)


def test_modalities_consistent_with_scene():
  cfg = S.ShapesConfig()
  for i in range(40):
    ex = S.make_example(1, i, cfg)
    scene = S.example_scene(ex)
    n = len(scene.objects)
    assert ex["num_objects"] == n and cfg.min_objects <= n <= cfg.max_objects
    assert (ex["objects"][n:] == -1).all()
    img, seg, inst = ex["image"], ex["segmentation"], ex["instances"]
    bg = inst == 0
    assert (img[bg] == 0).all() and (seg[bg] == 0).all() and (ex["depth"][bg] == 1.0).all()
    for k, o in enumerate(scene.objects):
      m = inst == k + 1
      # The object sits in its box, touches all four sides, and has its colour/shape id/constant depth.
      ys, xs = np.nonzero(m)
      assert (xs.min(), ys.min(), xs.max(), ys.max()) == (o.x0, o.y0, o.x0 + o.extent - 1, o.y0 + o.extent - 1)
      assert (img[m] == S.COLOURS[o.colour]).all()
      assert (seg[m] == S.SHAPES.index(o.shape) + 1).all()
      assert np.ptp(ex["depth"][m]) == 0 and ex["depth"][m][0] < 1.0
      assert o.extent == cfg.extent(o.size)
    # Edges: object pixels next to a different instance; interior pixels are not edges.
    e = ex["edges"].astype(bool)
    assert set(np.unique(ex["edges"])) <= {0, 1} and not (e & bg).any() and e.any()
    assert e.sum() < (~bg).sum()
    # Low-res image is the 4x4 box mean.
    ref = img.reshape(8, 4, 8, 4, 3).astype(float).mean((1, 3))
    assert np.abs(ex["lowres"].astype(float) - ref).max() <= 0.5
    # Mask is one box; masked image differs from the image exactly there.
    mk = ex["mask"].astype(bool)
    ys, xs = np.nonzero(mk)
    assert mk.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
    assert (ex["masked_image"][mk] == cfg.masked_value).all()
    assert (ex["masked_image"][~mk] == img[~mk]).all()
    assert ex["label"] == S.SHAPES.index(scene.objects[0].shape) * 7 + S.COLOUR_NAMES.index(scene.objects[0].colour)


def test_scene_rules():
  cfg = S.ShapesConfig()
  counts = set()
  for i in range(200):
    scene = S.sample_scene(np.random.default_rng(i), cfg)
    objs = scene.objects
    counts.add(len(objs))
    assert len({o.shape for o in objs}) == len(objs) and len({o.colour for o in objs}) == len(objs)
    if len(objs) > 1:
      assert objs[0].size == "large" and all(o.size == "small" for o in objs[1:])
      a, b = objs[0], objs[1]
      dx, dy = b.cx - a.cx, b.cy - a.cy
      assert abs(abs(dx) - abs(dy)) >= cfg.relation_margin
    # Boxes keep `gap` pixels apart and stay inside the border.
    for k, o in enumerate(objs):
      assert o.x0 >= 1 and o.y0 >= 1 and o.x0 + o.extent <= 31 and o.y0 + o.extent <= 31
      for p in objs[:k]:
        assert (o.x0 >= p.x0 + p.extent + 2 or p.x0 >= o.x0 + o.extent + 2
                or o.y0 >= p.y0 + p.extent + 2 or p.y0 >= o.y0 + o.extent + 2)
  assert counts == {1, 2, 3}
  one = S.ShapesConfig(min_objects=2, max_objects=2)
  assert all(len(S.sample_scene(i, one).objects) == 2 for i in range(20))


def test_relation_rule():
  assert S.relation_of(10, 10, 20, 12) == "left of"
  assert S.relation_of(20, 10, 10, 12) == "right of"
  assert S.relation_of(10, 10, 12, 20) == "above"
  assert S.relation_of(10, 20, 12, 10) == "below"


def test_caption_matches_scene():
  pat = re.compile(r"^a (small|large) (\w+) (\w+)(?: (left of|right of|above|below) a (small|large) (\w+) (\w+))?"
                   r"((?: and a (?:small|large) \w+ \w+)*)$")
  for i in range(100):
    ex = S.make_example(2, i)
    scene = S.example_scene(ex)
    m = pat.match(ex["caption"])
    assert m, ex["caption"]
    o0 = scene.objects[0]
    assert m.group(1, 2, 3) == (o0.size, o0.colour, o0.shape)
    if len(scene.objects) > 1:
      o1 = scene.objects[1]
      assert m.group(5, 6, 7) == (o1.size, o1.colour, o1.shape)
      assert m.group(4) == S.RELATIONS[ex["relation"]]
      # The caption's relation agrees with the rendered positions.
      inst = ex["instances"]
      c0 = np.argwhere(inst == 1).mean(0)
      c1 = np.argwhere(inst == 2).mean(0)
      dy, dx = c1 - c0
      want = ("left of" if dx > 0 else "right of") if abs(dx) > abs(dy) else ("above" if dy > 0 else "below")
      assert m.group(4) == want
    else:
      assert m.group(4) is None and ex["relation"] == -1
    assert m.group(8).count(" and ") == max(0, len(scene.objects) - 2)
  hand = S.Scene((S.Obj("circle", "red", "large", 2, 2, 12), S.Obj("square", "blue", "small", 20, 4, 8)))
  assert S.caption(hand) == "a large red circle left of a small blue square"


def test_counterfactual_swaps():
  cfg = S.ShapesConfig(min_objects=2, max_objects=3)
  for i in range(50):
    scene = S.sample_scene(i, cfg)
    a, b = scene.objects[:2]
    sc = S.swap_colours(scene)
    assert [o.shape for o in sc.objects] == [o.shape for o in scene.objects]
    assert sorted(o.colour for o in sc.objects) == sorted(o.colour for o in scene.objects)
    assert sc.objects[0].colour == b.colour and sc.objects[1].colour == a.colour
    assert {(o.shape, o.colour) for o in sc.objects} != {(o.shape, o.colour) for o in scene.objects}
    assert S.caption(sc) != S.caption(scene) and sc.relation == scene.relation
    sp = S.swap_positions(scene)
    key = lambda o: (o.shape, o.colour, o.size)
    assert sorted(map(key, sp.objects)) == sorted(map(key, scene.objects))
    assert (sp.objects[0].cx, sp.objects[0].cy) == (b.cx, b.cy)
    assert (sp.objects[1].cx, sp.objects[1].cy) == (a.cx, a.cy)
    assert sp.relation == S.OPPOSITE_RELATION[scene.relation]
    # The swapped scene is still valid: renders with non-overlapping objects inside the image.
    inst = S.render(sp, cfg)["instances"]
    assert [np.count_nonzero(inst == k + 1) for k in range(len(sp.objects))] == \
           [S.shape_mask(o.shape, o.extent).sum() for o in sp.objects]
  with pytest.raises(ValueError, match="at least 2 objects"):
    S.swap_colours(S.sample_scene(0, S.ShapesConfig(max_objects=1)))


def test_objects_encoding_round_trip():
  cfg = S.ShapesConfig(image_size=64)
  for i in range(20):
    scene = S.sample_scene(i, cfg)
    assert S.Scene.from_array(scene.to_array(3), 64) == scene


def test_config_errors():
  with pytest.raises(ValueError, match="Valid keys"):
    S.ShapesConfig.from_dict({"image_sise": 32})
  assert S.ShapesConfig.from_dict({"image_size": 64}).image_size == 64
  ml_collections = pytest.importorskip("ml_collections")
  cd = ml_collections.ConfigDict({"image_size": 64, "max_objects": 2, "background": [10, 20, 30]})
  c = S.ShapesConfig.from_dict(cd)
  assert (c.image_size, c.max_objects, c.background) == (64, 2, (10, 20, 30))
  assert hash(c) == hash(S.ShapesConfig.from_dict(cd))
  with pytest.raises(ValueError, match="min_objects"):
    S.ShapesConfig(min_objects=3, max_objects=2)
  with pytest.raises(ValueError, match="lowres_factor"):
    S.ShapesConfig(image_size=34)


def test_source_is_picklable_and_indexable():
  src = S.ShapesSource(10, seed=3)
  assert len(src) == 10
  clone = pickle.loads(pickle.dumps(src))
  assert np.array_equal(clone[4]["image"], src[4]["image"])
  with pytest.raises(IndexError):
    src[10]


def test_grain_pipeline():
  grain = pytest.importorskip("grain")
  src = S.ShapesSource(24, seed=1)
  ds = grain.MapDataset.source(src).shuffle(seed=0).batch(8, drop_remainder=True)
  batches = list(ds)
  assert len(batches) == 3
  b = batches[0]
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["objects"].shape == (8, 3, 6) and b["label"].shape == (8,)
  assert len(b["caption"]) == 8
  # Shuffled but complete: every example appears once.
  labels = np.concatenate([x["label"] for x in batches])
  assert sorted(labels.tolist()) == sorted(int(src[i]["label"]) for i in range(24))
  again = list(grain.MapDataset.source(src).shuffle(seed=0).batch(8, drop_remainder=True))
  assert np.array_equal(again[2]["image"], batches[2]["image"])

