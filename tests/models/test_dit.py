"""DiT (adaLN-Zero) and the paper-scale parameter counts, from shapes only (jax.eval_shape)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models.dit import DiT, DiTBlock, dit_kwargs

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _param_counts_module():
  spec = importlib.util.spec_from_file_location("param_counts", os.path.join(_ROOT, "benchmarks", "param_counts.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_paper_param_counts():
  pc = _param_counts_module()
  diffit = pc.count_params(dict(name="diffit_latent", input_size=32), (32, 32, 4))
  assert abs(diffit / 561.0e6 - 1) < 1e-3, diffit                     # DiffiT Table 9: 561M
  cfg = dict(name="dit", input_size=32, **dit_kwargs("XL/2"))
  dit = pc.count_params(cfg, (32, 32, 4)) + pc.pos_embed_size(cfg)
  assert abs(dit / 675.1e6 - 1) < 1e-3, dit                           # DiT-XL/2: 675M (675.1M with pos table)
  cfg_b = dict(name="dit", input_size=32, **dit_kwargs("B/2"))
  assert abs((pc.count_params(cfg_b, (32, 32, 4)) + pc.pos_embed_size(cfg_b)) / 130.5e6 - 1) < 2e-3


def test_dit_kwargs_errors():
  assert dit_kwargs("S/8") == dict(depth=12, hidden_size=384, num_heads=6, patch_size=8)
  with pytest.raises(ValueError, match="Valid DiT size"):
    dit_kwargs("M/2")


def _np_ln(x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _np_attn(x, p, heads):
  n, d = x.shape
  hd = d // heads
  qkv = x @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])
  q, k, v = np.split(qkv, 3, axis=1)
  out = np.zeros_like(x)
  for h in range(heads):
    sl = slice(h * hd, (h + 1) * hd)
    a = q[:, sl] @ k[:, sl].T / np.sqrt(hd)
    a = np.exp(a - a.max(-1, keepdims=True))
    out[:, sl] = (a / a.sum(-1, keepdims=True)) @ v[:, sl]
  return out @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])


def test_dit_block_matches_numpy_adaln():
  d, heads = 8, 2
  x = np.random.RandomState(0).randn(2, 5, d).astype(np.float32)
  c = np.random.RandomState(1).randn(2, d).astype(np.float32)
  m = DiTBlock(d, heads, mlp_ratio=2.0)
  apply = jax.jit(m.apply)
  v = jax.jit(m.init)(jax.random.key(0), x, c)
  # adaLN-Zero: the block is the identity at init.
  np.testing.assert_allclose(np.asarray(apply(v, x, c)), x, atol=1e-6)
  leaves, tree = jax.tree.flatten(v)
  ks = jax.random.split(jax.random.key(1), len(leaves))
  v = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(ks, leaves)])
  p = v["params"]
  got = np.asarray(apply(v, x, c))
  for i in range(2):
    silu = c[i] / (1 + np.exp(-c[i]))
    mod = silu @ np.asarray(p["adaLN_modulation_1"]["kernel"]) + np.asarray(p["adaLN_modulation_1"]["bias"])
    sh1, sc1, g1, sh2, sc2, g2 = np.split(mod, 6)
    h = x[i] + g1 * _np_attn(_np_ln(x[i]) * (1 + sc1) + sh1, p["attn"], heads)
    z = (_np_ln(h) * (1 + sc2) + sh2) @ np.asarray(p["mlp"]["fc1"]["kernel"]) + np.asarray(p["mlp"]["fc1"]["bias"])
    z = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    want = h + g2 * (z @ np.asarray(p["mlp"]["fc2"]["kernel"]) + np.asarray(p["mlp"]["fc2"]["bias"]))
    np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-4)


def test_dit_tiny_zero_init_output_and_shapes():
  m = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=4,
          learn_sigma=True)
  x = jnp.ones((2, 8, 8, 3))
  v = jax.jit(m.init)(jax.random.key(0), x, jnp.array([1.0, 2.0]), jnp.array([0, 4]))
  out = jax.jit(m.apply)(v, x, jnp.array([1.0, 2.0]), jnp.array([0, 4]))
  assert out.shape == (2, 8, 8, 6)
  np.testing.assert_array_equal(np.asarray(out), 0.0)   # zero-initialised final layer
  assert v["params"]["y_embedder"]["embedding_table"].shape == (5, 16)   # null class row
