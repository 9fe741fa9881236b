"""Tests of the shapes-world parser and scores (diffusion_jax/eval/shapes_parser.py)."""

import numpy as np
import pytest

from diffusion_jax.data import shapes as S
from diffusion_jax.eval import shapes_parser as P


def _examples(seed, n, cfg):
  exs = [S.make_example(seed, i, cfg) for i in range(n)]
  return exs, np.stack([e["image"] for e in exs]), [S.example_scene(e) for e in exs]


def _key(o):
  return (o.shape, o.colour, o.size, float(o.cx), float(o.cy))


@pytest.mark.parametrize("size,num", [(32, 500), (64, 120)])
def test_exact_on_clean_images(size, num):
  cfg = S.ShapesConfig(image_size=size)
  exs, images, scenes = _examples(11, num, cfg)
  parsed = P.parse_batch(images, cfg)
  counts = set()
  for scene, objs in zip(scenes, parsed):
    counts.add(len(scene.objects))
    assert sorted(map(_key, objs)) == sorted(map(_key, scene.objects))
    assert all(o.shape_iou == 1.0 for o in objs)
    if len(scene.objects) > 1:
      a = next(o for o in objs if (o.shape, o.colour) == (scene.objects[0].shape, scene.objects[0].colour))
      b = next(o for o in objs if (o.shape, o.colour) == (scene.objects[1].shape, scene.objects[1].colour))
      assert P.parsed_relation(a, b) == scene.relation
  assert counts == {1, 2, 3}
  scores = P.score_all(images, scenes, cfg)
  assert all(v == 1.0 for v in scores.values()), scores
  for kind in ("segmentation", "edges", "instances"):
    assert P.map_consistency(images, np.stack([e[kind] for e in exs]), kind, cfg) == 1.0


def test_every_shape_and_colour_at_both_sizes():
  cfg = S.ShapesConfig()
  for shape in S.SHAPES:
    for colour in S.COLOUR_NAMES:
      for size in S.SIZES:
        e = cfg.extent(size)
        scene = S.Scene((S.Obj(shape, colour, size, 5, 9, e),))
        objs = P.parse(S.render(scene, cfg)["image"], cfg)
        assert [_key(o) for o in objs] == [_key(scene.objects[0])]


def test_parse_single_and_value_ranges():
  cfg = S.ShapesConfig()
  ex = S.make_example(0, 5, cfg)
  want = sorted(map(_key, S.example_scene(ex).objects))
  img = ex["image"]
  f01 = img.astype(np.float32) / 255.0
  fm11 = f01 * 2 - 1
  for x in (img, f01, fm11, f01.astype(np.float64)):
    assert sorted(map(_key, P.parse(x, cfg))) == want
  assert sorted(map(_key, P.parse(f01, cfg, value_range="0,1"))) == want
  assert sorted(map(_key, P.parse(fm11, cfg, value_range="-1,1"))) == want
  # A [0, 1] image with slight negative overshoot is still read as [0, 1].
  overshoot = f01 - 0.02
  overshoot[f01 > 0] = 1.02
  assert sorted(map(_key, P.parse(overshoot, cfg))) == want
  with pytest.raises(ValueError, match="Valid value_range"):
    P.parse(img, cfg, value_range="0-255")
  with pytest.raises(ValueError, match="parse_batch"):
    P.parse(img[None])


def test_non_black_background():
  cfg = S.ShapesConfig(background=(60, 60, 90))
  exs, images, scenes = _examples(4, 60, cfg)
  assert (images[0][exs[0]["instances"] == 0] == (60, 60, 90)).all()
  for scene, objs in zip(scenes, P.parse_batch(images, cfg)):
    assert sorted(map(_key, objs)) == sorted(map(_key, scene.objects))


def test_degrades_gracefully_with_noise():
  cfg = S.ShapesConfig()
  _, images, scenes = _examples(5, 200, cfg)
  rng = np.random.default_rng(0)
  acc = {}
  for sigma in (0.0, 0.05, 0.1, 0.2, 0.4):
    noisy = np.clip(images / 255.0 + sigma * rng.standard_normal(images.shape), 0.0, 1.0)
    acc[sigma] = P.score_all(noisy, scenes, cfg)["scene_binding"]
  assert acc[0.0] == 1.0 and acc[0.05] >= 0.99 and acc[0.1] >= 0.98 and acc[0.2] >= 0.9, acc
  sig = sorted(acc)
  assert all(acc[a] >= acc[b] - 0.02 for a, b in zip(sig, sig[1:])), acc
  assert acc[0.4] < acc[0.0], acc   # strong noise does hurt: the score measures something


def test_class_accuracy_hand_built():
  cfg = S.ShapesConfig()
  big = S.Obj("triangle", "green", "large", 2, 2, 12)
  small = S.Obj("circle", "red", "small", 20, 20, 8)
  img = S.render(S.Scene((big, small)), cfg)["image"]
  assert P.class_accuracy(img[None], [S.class_label("triangle", "green")], cfg) == 1.0
  # The label of the small object is not the image's class.
  assert P.class_accuracy(img[None], [S.class_label("circle", "red")], cfg) == 0.0
  blank = np.zeros_like(img)
  assert P.class_accuracy(np.stack([img, blank]), [S.class_label("triangle", "green")] * 2, cfg) == 0.5
  with pytest.raises(ValueError, match="labels"):
    P.class_accuracy(np.stack([img, blank]), [0], cfg)


def test_binding_and_relation_counterfactuals():
  cfg = S.ShapesConfig(min_objects=2, max_objects=2)
  scenes = [S.sample_scene(i, cfg) for i in range(30)]
  img = lambda scs: np.stack([S.render(s, cfg)["image"] for s in scs])
  clean = img(scenes)
  assert P.binding_scores(clean, scenes, cfg)["binding"] == 1.0
  assert P.relation_accuracy(clean, scenes, cfg) == 1.0
  # Swapped colours: every object's shape is found, none has the asked colour.
  swapped = img([S.swap_colours(s) for s in scenes])
  b = P.binding_scores(swapped, scenes, cfg)
  assert b["binding"] == 0.0 and b["scene_binding"] == 0.0
  assert b["shape_recall"] == 1.0 and b["colour_recall"] == 1.0 and b["binding_given_shape"] == 0.0
  assert P.relation_accuracy(swapped, scenes, cfg) == 0.0   # objects 0 and 1 not found by shape + colour
  # Swapped positions: binding intact, relation always wrong.
  moved = img([S.swap_positions(s) for s in scenes])
  assert P.binding_scores(moved, scenes, cfg)["binding"] == 1.0
  assert P.relation_accuracy(moved, scenes, cfg) == 0.0
  # Half of each: the scores are the fractions.
  mixed = np.concatenate([clean[:15], moved[15:]])
  assert P.relation_accuracy(mixed, scenes, cfg) == 0.5
  # Scenes can be passed as the int32 `objects` arrays of the example dicts.
  arrs = np.stack([s.to_array(2) for s in scenes])
  assert P.relation_accuracy(mixed, arrs, cfg) == 0.5
  assert P.binding_scores(swapped, arrs, cfg)["binding"] == 0.0


def test_binding_one_object_missing():
  cfg = S.ShapesConfig()
  a = S.Obj("square", "blue", "large", 2, 2, 12)
  b = S.Obj("cross", "yellow", "small", 20, 20, 8)
  scene = S.Scene((a, b))
  only_a = S.render(S.Scene((a,)), cfg)["image"]
  r = P.binding_scores(only_a[None], [scene], cfg)
  assert r["binding"] == 0.5 and r["scene_binding"] == 0.0 and r["shape_recall"] == 0.5
  assert P.count_accuracy(only_a[None], [scene], cfg) == 0.0
  assert P.count_accuracy(only_a[None], [1], cfg) == 1.0
  assert np.isnan(P.relation_accuracy(only_a[None], [S.Scene((a,))], cfg))


def test_map_consistency_hand_built():
  cfg = S.ShapesConfig()
  scene = S.Scene((S.Obj("square", "red", "large", 2, 2, 12), S.Obj("circle", "cyan", "small", 20, 20, 8)))
  maps = S.render(scene, cfg)
  img = maps["image"][None]
  assert P.map_consistency(img, maps["segmentation"][None], "segmentation", cfg) == 1.0
  # Conditioning map with the circle's class changed to "diamond": the circle class and the diamond class
  # both get IoU 0, the square 1 -> mean 1/3.
  wrong = maps["segmentation"].copy()
  wrong[wrong == S.SHAPES.index("circle") + 1] = S.SHAPES.index("diamond") + 1
  assert P.map_consistency(img, wrong[None], "segmentation", cfg) == pytest.approx(1 / 3)
  # Foreground IoU: the image lacks the circle -> 144 / (144 + circle area).
  only_square = S.render(S.Scene(scene.objects[:1]), cfg)["image"][None]
  circle_area = S.shape_mask("circle", 8).sum()
  got = P.map_consistency(only_square, maps["instances"][None], "foreground", cfg)
  assert got == pytest.approx(144 / (144 + circle_area))
  # Edges: exact match 1; a 1-pixel shift is within the tolerance; a 4-pixel shift is not; blank scores 0.
  assert P.map_consistency(img, maps["edges"][None], "edges", cfg) == 1.0
  assert P.map_consistency(np.roll(img, 1, axis=2), maps["edges"][None], "edges", cfg) == 1.0
  assert P.map_consistency(np.roll(img, 4, axis=2), maps["edges"][None], "edges", cfg) < 0.6
  assert P.map_consistency(np.zeros_like(img), maps["edges"][None], "edges", cfg) == 0.0
  with pytest.raises(ValueError, match="Valid map kind"):
    P.map_consistency(img, maps["depth"][None], "depth", cfg)


def test_label_components_matches_bfs():
  rng = np.random.default_rng(0)
  classes = (rng.random((3, 17, 13)) < 0.5) * rng.integers(1, 3, (3, 17, 13))
  lab = P.label_components(classes.astype(np.int32))
  for b in range(3):
    # Reference: plain breadth-first search.
    ref = -np.ones((17, 13), int)
    n = 0
    for y in range(17):
      for x in range(13):
        if classes[b, y, x] and ref[y, x] < 0:
          stack = [(y, x)]
          ref[y, x] = n
          while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
              if 0 <= ny < 17 and 0 <= nx < 13 and ref[ny, nx] < 0 and classes[b, ny, nx] == classes[b, cy, cx]:
                ref[ny, nx] = n
                stack.append((ny, nx))
          n += 1
    fg = classes[b] > 0
    assert ((lab[b] > 0) == fg).all()
    pairs = set(zip(ref[fg].tolist(), lab[b][fg].tolist()))
    assert len(pairs) == n == len(set(lab[b][fg].tolist()))
