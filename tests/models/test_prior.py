"""Flax PriorTransformer: parameter counts of the ECLIPSE priors (ECLIPSE App. A: 33M Karlo-size, 34M
Kandinsky-size), masking behaviour and argument checks. Parity with diffusers is in
tests/pretrained/test_prior_pretrained.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import prior
from diffusion_jax.pretrained.prior import abstract_prior_params
from diffusion_jax.models.clip import count_params


def _random_params(module, *args, seed=0, **kw):
  """Random params with the module's shapes, without running the (slow, per-shape compiled) initialisers."""
  shapes = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kw), *args)
  r = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * r.randn(*s.shape), s.dtype), shapes)


def test_param_counts_eclipse_and_unclip():
  karlo = count_params(abstract_prior_params(prior.prior_config("eclipse-karlo")))
  kand = count_params(abstract_prior_params(prior.prior_config("eclipse-kandinsky")))
  assert round(karlo / 1e6, 1) == 33.1 and round(kand / 1e6, 1) == 34.2
  assert (karlo, kand) == (33_143_040, 34_193_152)
  # the original Karlo prior is ~1B (ECLIPSE Table 3)
  assert 1.0e9 < count_params(abstract_prior_params(prior.prior_config("karlo"))) < 1.1e9


def _tiny(**kw):
  return prior.prior_config("eclipse-karlo", num_layers=2, embedding_dim=8, num_embeddings=5,
                            num_attention_heads=2, attention_head_dim=4, **kw)


def test_text_mask_hides_padded_tokens():
  cfg = _tiny()
  m = prior.PriorTransformer(cfg)
  r = np.random.RandomState(0)
  x, emb, enc = r.randn(2, 8), r.randn(2, 8), r.randn(2, 5, 8)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  p = _random_params(m, x, emb, enc, mask)
  f = jax.jit(m.apply)
  a = f(p, x, emb, enc, mask)
  enc2 = enc.copy()
  enc2[:, 3:] += 5.0
  b = f(p, x, emb, enc2, mask)
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # row 0 masks text tokens 3, 4
  assert not np.allclose(a[1], b[1], atol=1e-3)  # row 1 sees them
  assert a.shape == (2, 8)
  # Different noise input -> different prediction (the noise token is seen by the prd token).
  assert not np.allclose(f(p, x + 1.0, emb, enc, mask), a, atol=1e-3)


def test_timestep_argument_checks_and_remat():
  cfg = _tiny(use_timestep=True, additional_embeddings=4)
  m = prior.PriorTransformer(cfg)
  x, emb, enc = jnp.ones((2, 8)), jnp.ones((2, 8)), jnp.ones((2, 5, 8))
  p = _random_params(m, x, emb, enc, None, jnp.array([1, 2]))
  assert "time_embedding" in p["params"]
  with pytest.raises(ValueError, match="pass `timestep`"):
    m.apply(p, x, emb, enc)
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    m.apply(p, x, emb, None, None, jnp.array([1, 2]))
  out = jax.jit(m.apply)(p, x, emb, enc, None, 7)  # a scalar timestep broadcasts
  out_r = jax.jit(prior.PriorTransformer(cfg, remat=True).apply)(p, x, emb, enc, None, 7)
  np.testing.assert_allclose(out, out_r, atol=1e-5)
  with pytest.raises(ValueError, match="Valid added_emb_type"):
    prior.PriorTransformer(_tiny(added_emb_type="clip")).apply(p, x, emb, enc)
