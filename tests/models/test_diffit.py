"""DiffiT modules against a direct NumPy implementation of the paper's equations (DiffiT Eq. 3-10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import build_model
from diffusion_jax.models.diffit import TMSA, DiffiTBlock, DiffiTImage, DiffiTLatent, relative_position_index


def _randomize(params, seed=0, scale=0.3):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def _np_softmax(a):
  a = a - a.max(-1, keepdims=True)
  e = np.exp(a)
  return e / e.sum(-1, keepdims=True)


def np_tmsa_window(xs, xt, p, heads, w):
  """Eq. 3-6 for one window: xs [N, D] tokens (row-major in a w x w window), xt [Dt] time token."""
  d = xs.shape[-1]
  hd = d // heads
  wq, wk, wv = np.split(np.asarray(p["qkv"]["kernel"]), 3, axis=1)
  bq, bk, bv = np.split(np.asarray(p["qkv"]["bias"]), 3)
  tq, tk, tv = np.split(np.asarray(p["qkv_temb"]["kernel"]), 3, axis=1)
  cq, ck, cv = np.split(np.asarray(p["qkv_temb"]["bias"]), 3)
  q = xs @ wq + bq + xt @ tq + cq          # q_s = x_s W_qs + x_t W_qt
  k = xs @ wk + bk + xt @ tk + ck
  v = xs @ wv + bv + xt @ tv + cv
  table = np.asarray(p["relative_position_bias_table"])
  n = xs.shape[0]
  coords = [(i // w, i % w) for i in range(n)]
  out = np.zeros_like(xs)
  for h in range(heads):
    sl = slice(h * hd, (h + 1) * hd)
    bias = np.zeros((n, n))
    for i, (yi, xi) in enumerate(coords):
      for j, (yj, xj) in enumerate(coords):
        bias[i, j] = table[(yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1), h]
    att = _np_softmax(q[:, sl] @ k[:, sl].T / np.sqrt(hd) + bias)
    out[:, sl] = att @ v[:, sl]
  return out @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])


def np_layernorm(x, eps, scale=None, bias=None):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  y = (x - mu) / np.sqrt(var + eps)
  if scale is not None:
    y = y * scale + bias
  return y


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_diffit_block(x, xt, p, heads, w, affine):
  """Eq. 7-8 on a [H, W, D] grid, TMSA in non-overlapping w x w windows."""
  hh, ww, d = x.shape
  ln = lambda z, name: np_layernorm(z, 1e-6, *( (np.asarray(p[name]["scale"]), np.asarray(p[name]["bias"]))
                                               if affine else ()))
  y = ln(x, "norm1")
  a = np.zeros_like(x)
  for r in range(0, hh, w):
    for c in range(0, ww, w):
      win = y[r:r + w, c:c + w].reshape(w * w, d)
      a[r:r + w, c:c + w] = np_tmsa_window(win, xt, p["attn"], heads, w).reshape(w, w, d)
  x = x + a
  m = p["mlp"]
  hdn = np_gelu_tanh(ln(x, "norm2") @ np.asarray(m["fc1"]["kernel"]) + np.asarray(m["fc1"]["bias"]))
  return x + hdn @ np.asarray(m["fc2"]["kernel"]) + np.asarray(m["fc2"]["bias"])


def test_relative_position_index_matches_definition():
  w = 3
  idx = relative_position_index(w)
  for i in range(w * w):
    for j in range(w * w):
      dy, dx = i // w - j // w, i % w - j % w
      assert idx[i, j] == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
  assert idx.max() == (2 * w - 1) ** 2 - 1


@pytest.mark.parametrize("heads", [1, 2])
def test_tmsa_matches_numpy(heads):
  w, d, dt, b = 3, 8, 6, 2
  x = np.random.RandomState(0).randn(b, 2, w * w, d).astype(np.float32)   # 2 windows per image
  c = np.random.RandomState(1).randn(b, dt).astype(np.float32)
  m = TMSA(d, heads, w)
  params = _randomize(jax.jit(m.init)(jax.random.key(0), x, c))["params"]
  got = np.asarray(jax.jit(m.apply)({"params": params}, x, c))
  for i in range(b):
    for k in range(2):
      want = np_tmsa_window(x[i, k], c[i], params, heads, w)
      np.testing.assert_allclose(got[i, k], want, rtol=1e-4, atol=1e-4)
  assert params["relative_position_bias_table"].shape == ((2 * w - 1) ** 2, heads)


@pytest.mark.parametrize("affine", [False, True])
def test_diffit_block_windows_match_numpy(affine):
  h, w, d, heads, win = 4, 4, 8, 2, 2
  x = np.random.RandomState(2).randn(2, h, w, d).astype(np.float32)
  c = np.random.RandomState(3).randn(2, 5).astype(np.float32)
  m = DiffiTBlock(d, heads, mlp_ratio=2.0, window_size=win, ln_affine=affine)
  params = _randomize(jax.jit(m.init)(jax.random.key(0), x, c), seed=1)["params"]
  got = np.asarray(jax.jit(m.apply)({"params": params}, x, c))
  for i in range(2):
    np.testing.assert_allclose(got[i], np_diffit_block(x[i], c[i], params, heads, win, affine),
                               rtol=2e-4, atol=2e-4)


def test_windows_do_not_communicate():
  """Local attention: no shift, no cross-window mixing (DiffiT §3.2)."""
  x = np.random.RandomState(0).randn(1, 4, 4, 8).astype(np.float32)
  c = np.ones((1, 4), np.float32)
  m = DiffiTBlock(8, 2, window_size=2)
  apply = jax.jit(m.apply)
  params = _randomize(jax.jit(m.init)(jax.random.key(0), x, c))
  y0 = np.asarray(apply(params, x, c))
  x2 = x.copy()
  x2[0, 0, 0] += 1.0                      # a token in the top-left window
  y1 = np.asarray(apply(params, x2, c))
  assert np.abs(y1[0, :2, :2] - y0[0, :2, :2]).max() > 1e-3
  np.testing.assert_allclose(y1[0, 2:], y0[0, 2:], atol=1e-6)
  np.testing.assert_allclose(y1[0, :, 2:], y0[0, :, 2:], atol=1e-6)


def test_time_token_enters_qkv():
  x = np.random.RandomState(0).randn(1, 4, 8).astype(np.float32)
  m = TMSA(8, 2, 2)
  params = _randomize(m.init(jax.random.key(0), x, np.zeros((1, 3), np.float32)))
  a = m.apply(params, x, np.zeros((1, 3), np.float32))
  b = m.apply(params, x, np.ones((1, 3), np.float32))
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_image_unet_tiny_shapes_and_conditioning():
  cfg = dict(name="diffit_image", channels=(8, 16), num_blocks=(1, 1), num_heads=2, window_size=4,
             gn_groups=4, time_embed_dim=16, time_freq_dim=8, num_classes=3)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 3), jnp.float32)
  t, y = jnp.array([0.1, -0.5]), jnp.array([0, 2])
  m = build_model({**cfg, "skip_merge": "add"})
  shapes = jax.eval_shape(m.init, jax.random.key(0), x, t, y)["params"]
  assert shapes["skip_proj_0"]["kernel"].shape == (1, 1, 8, 16)   # skip 8 -> 16 channels, then add
  assert jax.eval_shape(m.apply, {"params": shapes}, x, t, y).shape == (2, 8, 8, 3)
  m = build_model({**cfg, "skip_merge": "concat"})
  v = jax.jit(m.init)(jax.random.key(0), x, t, y)
  assert v["params"]["dec_0_0"]["skip"]["kernel"].shape == (1, 1, 24, 8)   # concat(16 up, 8 skip) -> 8
  apply = jax.jit(m.apply)
  out = apply(v, x, t, y)
  assert out.shape == (2, 8, 8, 3)
  np.testing.assert_array_equal(np.asarray(out), 0.0)   # zero-initialised head conv
  v = _randomize(v, scale=0.1)
  o1, o2, o3 = apply(v, x, t, y), apply(v, x, t, jnp.array([1, 1])), apply(v, x, t + 1.0, y)
  assert float(jnp.abs(o1[0] - o2[0]).max()) > 1e-4
  assert float(jnp.abs(o1 - o3).max()) > 1e-4


def test_latent_tiny_learned_sigma_and_remat_equal():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 4), jnp.float32)
  t, y = jnp.array([3.0, 500.0]), jnp.array([1, 5])
  kw = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
  m = DiffiTLatent(**kw)
  v = _randomize(jax.jit(m.init)(jax.random.key(0), x, t, y), scale=0.1)
  out = jax.jit(m.apply)(v, x, t, y)
  assert out.shape == (2, 8, 8, 8)
  assert v["params"]["blocks_0"]["attn"]["relative_position_bias_table"].shape == ((2 * 4 - 1) ** 2, 4)
  out_r = jax.jit(DiffiTLatent(**kw, remat="full").apply)(v, x, t, y)
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_r), atol=1e-5)
  with pytest.raises(ValueError, match="Valid remat policy"):
    DiffiTLatent(**kw, remat="bogus").init(jax.random.key(0), x, t, y)


def test_build_model_rejects_unknown_keys():
  with pytest.raises(ValueError, match="Valid keys"):
    build_model({"name": "diffit_image", "chanels": (1,)})
  with pytest.raises(ValueError, match="Valid model names"):
    build_model({"name": "diffit_imag"})
