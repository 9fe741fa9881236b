"""An exported CLIP (the shapes-world CLIP stage's export) loads with transformers' CLIPProcessor, whose image
preprocessing matches ours (`clip_cache.preprocess_images`) and whose tokenizer gives our ids."""

import importlib
import os

import jax
import numpy as np
import pytest

from diffusion_jax.data import clip_cache
from diffusion_jax.experiments.clip_pretrain import clip_config_from, save_hf_clip
from diffusion_jax.pretrained import clip as clip_io

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  cfg = importlib.import_module("configs.clip_shapes").get_config("tiny")
  config = clip_config_from(cfg.model)
  abstract = clip_io.abstract_params_for("clip", config)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32), abstract)
  d = str(tmp_path_factory.mktemp("clip_export"))
  save_hf_clip(d, params, config)
  return d, config


def test_clip_processor_loads_the_export(export_dir):
  d, config = export_dir
  assert os.path.exists(os.path.join(d, "preprocessor_config.json"))
  proc = transformers.CLIPProcessor.from_pretrained(d)
  size = config.vision.image_size
  rng = np.random.default_rng(1)
  same = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  wide = rng.integers(0, 256, (2, size + 8, 2 * size, 3), dtype=np.uint8)  # resized + centre-cropped
  for images, atol in ((same, 1e-5), (wide, 2e-2)):
    got = proc(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    want = clip_cache.preprocess_images(images, size)
    assert got.shape == want.shape == (2, size, size, 3)
    np.testing.assert_allclose(got, want, atol=atol)
  captions = ["a large red circle", "a small blue square left of a green cross"]
  ids = proc(text=captions, padding="max_length", max_length=config.text.max_position_embeddings,
             return_tensors="np")["input_ids"]
  ours, _ = clip_cache.tokenize(clip_cache.load_tokenizer(d), captions, config.text.max_position_embeddings)
  np.testing.assert_array_equal(ids, ours)


def test_towers_get_the_processor_config_only_with_a_vision_tower(export_dir, tmp_path):
  _, config = export_dir
  rng = np.random.default_rng(0)
  for kind, cfg in (("vision_with_projection", config.vision), ("text_with_projection", config.text)):
    abstract = clip_io.abstract_params_for(kind, cfg)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)
    out = str(tmp_path / kind)
    clip_io.save_clip(out, params, cfg, kind)
    assert os.path.exists(os.path.join(out, "preprocessor_config.json")) == kind.startswith("vision")
  proc = transformers.CLIPImageProcessor.from_pretrained(str(tmp_path / "vision_with_projection"))
  assert proc.crop_size == {"height": config.vision.image_size, "width": config.vision.image_size}
