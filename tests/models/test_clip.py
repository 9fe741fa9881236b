"""Flax CLIP: parameter counts of the public sizes (built abstractly), masking behaviour, dtype/remat options and
error messages. Numerical parity with transformers is in tests/pretrained/test_clip_pretrained.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import clip


def _random_params(module, *args, seed=0, **kw):
  """Random params with the module's shapes, without running the (slow, per-shape compiled) initialisers."""
  shapes = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kw), *args)
  r = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * r.randn(*s.shape), s.dtype), shapes)


def _abstract_count(module, *shapes_dtypes):
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes_dtypes]
  return clip.count_params(clip.abstract_params(module, *args))


IDS = ((1, 77), jnp.int32)
PX = ((1, 224, 224, 3), jnp.float32)


def test_param_counts_public_sizes():
  l14 = clip.clip_config("vit-l-14")
  # CLIP ViT-L/14 text tower (the SD-1.x text encoder): 123.1M.
  n = _abstract_count(clip.CLIPTextModel(l14.text), IDS)
  assert n == 123_060_480 and round(n / 1e6, 1) == 123.1
  # Whole models: openai/clip-vit-base-patch32 151.3M, openai/clip-vit-large-patch14 427.6M.
  assert _abstract_count(clip.CLIPModel(clip.clip_config("vit-b-32")), IDS, PX) == 151_277_313
  assert _abstract_count(clip.CLIPModel(l14), IDS, PX) == 427_616_513
  # bigG/14 text encoder with projection (SDXL's second text encoder): 694.7M.
  g = clip.clip_config("vit-bigg-14")
  assert round(_abstract_count(clip.CLIPTextModel(g.text, with_projection=True), IDS) / 1e6, 1) == 694.7


def _tiny():
  return clip.CLIPConfig(
      text=clip.CLIPTextConfig(vocab_size=60, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=8, projection_dim=8),
      vision=clip.CLIPVisionConfig(image_size=8, patch_size=4, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=2, projection_dim=8),
      projection_dim=8)


def test_text_causal_and_padding():
  cfg = _tiny().text
  m = clip.CLIPTextModel(cfg, with_projection=True)
  ids = jnp.array([[1, 5, 7, 59, 3, 3, 3, 3]])
  p = _random_params(m, ids)
  f = jax.jit(m.apply)
  a = f(p, ids)
  b = f(p, ids.at[0, 5].set(9))
  # causal: positions before the change are untouched, so is the EOS-pooled feature (EOS = max id at 3)
  np.testing.assert_allclose(a["last_hidden_state"][:, :5], b["last_hidden_state"][:, :5], atol=1e-6)
  np.testing.assert_allclose(a["text_embeds"], b["text_embeds"], atol=1e-6)
  assert not np.allclose(a["last_hidden_state"][:, 5], b["last_hidden_state"][:, 5])
  # padding mask changes the hidden states after EOS only
  mask = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]])
  c = jax.jit(m.apply)(p, ids, mask)
  np.testing.assert_allclose(c["last_hidden_state"][:, :4], a["last_hidden_state"][:, :4], atol=1e-6)
  assert not np.allclose(c["last_hidden_state"][:, 6], a["last_hidden_state"][:, 6])
  assert len(a["hidden_states"]) == cfg.num_hidden_layers + 1


def test_clip_model_dtype_remat_and_errors():
  cfg = _tiny()
  ids = jnp.array([[1, 5, 59, 0, 0, 0, 0, 0], [1, 2, 3, 59, 0, 0, 0, 0]])
  px = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  m = clip.CLIPModel(cfg)
  p = _random_params(m, ids, px)
  p["params"]["logit_scale"] = jnp.asarray(2.6592)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))
  out = jax.jit(m.apply)(p, ids, px)
  np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(out["logits_per_image"], out["logits_per_text"].T)
  np.testing.assert_allclose(out["logits_per_text"],
                             out["text_embeds"] @ out["image_embeds"].T * np.exp(2.6592), rtol=1e-5)
  r = jax.jit(clip.CLIPModel(cfg, remat=True).apply)(p, ids, px)
  np.testing.assert_allclose(r["logits_per_text"], out["logits_per_text"], atol=1e-5)
  half = jax.jit(clip.CLIPModel(cfg, dtype=jnp.bfloat16).apply)(p, ids, px)
  assert half["text_model_output"]["last_hidden_state"].dtype == jnp.bfloat16
  np.testing.assert_allclose(half["logits_per_text"], out["logits_per_text"], atol=0.2)
  with pytest.raises(ValueError, match="NHWC"):
    clip.CLIPVisionModel(cfg.vision).apply({"params": {"vision_model": p["params"]["vision_model"]}},
                                           jnp.zeros((2, 3, 8, 8)))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    clip.CLIPTextModel(cfg.text).apply({"params": {"text_model": p["params"]["text_model"]}},
                                       jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match="vit-l-14"):
    clip.clip_config("vit-h-14")
