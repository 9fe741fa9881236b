"""The shapes world's nuisance options (background colour, background texture, size jitter): off by default,
and when on, image content the caption does not describe."""

import numpy as np
import pytest

from diffusion_jax.data import clip_cache
from diffusion_jax.data import shapes as S

NUISANCE = dict(background_jitter=96, texture_noise=24.0)


def test_zero_options_are_the_default_world():
  off = S.ShapesConfig(background_jitter=0, texture_noise=0.0, size_jitter=0)
  for i in range(5):
    a, b = S.make_example(3, i), S.make_example(3, i, off)
    for k in a:
      assert np.array_equal(a[k], b[k]), k


def test_background_and_texture_change_only_the_background_pixels():
  cfg = S.ShapesConfig(**NUISANCE)
  for i in range(5):
    a, b = S.make_example(1, i), S.make_example(1, i, cfg)
    assert a["caption"] == b["caption"]
    for k in ("segmentation", "instances", "objects", "label", "relation", "depth"):
      assert np.array_equal(a[k], b[k]), k
    on = b["instances"] > 0
    assert np.array_equal(a["image"][on], b["image"][on])  # objects keep their palette colours
    assert not np.array_equal(a["image"][~on], b["image"][~on])
    assert b["image"][~on].std() > 5  # texture noise, not a flat colour
    # the fast cache renderer draws the same image
    assert np.array_equal(clip_cache.scene_image(S.example_scene(b), cfg), b["image"])
  backgrounds = {tuple(np.median(S.make_example(1, i, cfg)["image"][:2, :2].reshape(-1, 3), 0)) for i in range(8)}
  assert len(backgrounds) > 4  # a different background per image


def test_counterfactuals_share_the_scene_nuisance():
  cfg = S.ShapesConfig(min_objects=2, **NUISANCE)
  sc = S.sample_scene(np.random.default_rng(0), cfg)
  img = clip_cache.scene_image(sc, cfg)
  for cf in (S.swap_colours(sc), S.swap_positions(sc)):
    bg = (S.instance_map(sc) == 0) & (S.instance_map(cf) == 0)
    assert np.array_equal(clip_cache.scene_image(cf, cfg)[bg], img[bg])


def test_size_jitter_keeps_the_size_words_true():
  cfg = S.ShapesConfig(size_jitter=2)
  small, large = set(), set()
  for i in range(60):
    ex = S.make_example(0, i, cfg)
    for row in ex["objects"][:int(ex["num_objects"])]:
      (small if S.SIZES[row[2]] == "small" else large).add(int(row[5]))
    assert ex["caption"] == S.caption(S.example_scene(ex))
  assert small == {6, 8} and large == {12, 14}


@pytest.mark.parametrize("bad", [dict(background_jitter=300), dict(texture_noise=-1.0), dict(size_jitter=3),
                                 dict(size_jitter=6)])
def test_bad_nuisance_options_raise(bad):
  with pytest.raises(ValueError):
    S.ShapesConfig(**bad)


def test_data_config_world_options():
  import ml_collections
  d = ml_collections.ConfigDict(dict(name="shapes", image_size=32, shapes=dict(size_jitter=2)))
  assert clip_cache.shapes_config(d).size_jitter == 2
  d.shapes = ml_collections.ConfigDict(dict(nope=1))
  with pytest.raises(ValueError, match="nope"):
    clip_cache.shapes_config(d)
