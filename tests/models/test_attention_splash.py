"""The "splash" implementation (the TPU Pallas splash-attention kernel), run here in Pallas interpret mode:
the same kernel code, so the padding of heads and sequences, the masks, the scaling, the gradients and the
per-device split under a mesh are checked; the Mosaic lowering itself needs a TPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import attention as A
from tests.models.test_attention import reference

B, T, S, N, H = 2, 37, 45, 3, 8  # odd lengths and a head width far from 128: every padding path


def _qkv(seed=0, t=T, s=S, b=B):
  r = np.random.default_rng(seed)
  return (r.standard_normal((b, t, N, H), np.float32), r.standard_normal((b, s, N, H), np.float32),
          r.standard_normal((b, s, N, H), np.float32))


def _splash(q, k, v, **kw):
  return A.dot_product_attention(q, k, v, implementation="splash", **kw)


@pytest.mark.parametrize("case", [dict(), dict(causal=True), dict(scale=0.37)])
def test_kernel_matches_reference(case, monkeypatch):
  calls = []
  orig = A._splash_local
  monkeypatch.setattr(A, "_splash_local", lambda *a, **kw: (calls.append(1), orig(*a, **kw))[1])
  q, k, v = _qkv()
  out = jax.jit(functools.partial(_splash, **case))(q, k, v)
  assert calls, "the kernel path was not taken"
  assert out.shape == (B, T, N, H) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), reference(q, k, v, **case), atol=2e-5, rtol=0)


def test_several_blocks_and_causal_across_them(monkeypatch):
  """With 128-wide blocks, 300 queries and 200 keys span 3 x 2 blocks (both padded); causal crosses them."""
  monkeypatch.setattr(A, "SPLASH_BLOCK", 128)
  assert A._splash_blocks(300, 200) == (128, 128, 384, 256)
  q, k, v = _qkv(1, t=300, s=200, b=1)
  for causal in (False, True):
    out = jax.jit(functools.partial(_splash, causal=causal))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, causal=causal), atol=2e-5, rtol=0)


def test_gradients_match_autodiff_of_the_formula():
  q, k, v = _qkv(2)

  def loss(attn, q, k, v):
    return jnp.sum(jnp.sin(attn(q, k, v)) * jnp.arange(H))

  got = jax.jit(jax.grad(functools.partial(loss, functools.partial(_splash, causal=True)), argnums=(0, 1, 2)))(
      q, k, v)
  want = jax.grad(functools.partial(loss, functools.partial(A.dot_product_attention, implementation="xla",
                                                            causal=True)), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=0, err_msg=f"d{name}")


def test_bfloat16():
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(3))
  out = _splash(q, k, v, causal=True)
  assert out.dtype == jnp.bfloat16
  want = reference(*(np.asarray(a, np.float32) for a in (q, k, v)), causal=True)
  err = np.abs(np.asarray(out, np.float32) - want)
  assert err.max() < 0.05 and err.mean() < 0.01, (err.max(), err.mean())


def test_what_the_kernel_cannot_express_falls_back_to_xla(monkeypatch):
  r = np.random.default_rng(4)
  q, k, v = _qkv(4)
  bias = r.standard_normal((1, N, T, S), np.float32)
  mask = r.random((B, 1, 1, S)) > 0.3
  assert A.splash_supported(q, k, v) and not A.splash_supported(q, k, v, bias=bias)
  assert not A.splash_supported(q, k, v, mask=mask) and not A.splash_supported(q, k, v[..., :5])
  monkeypatch.setattr(A, "_splash_local", lambda *a, **kw: pytest.fail("the kernel cannot take this call"))
  for kw in (dict(bias=bias), dict(mask=mask, causal=True)):
    np.testing.assert_allclose(np.asarray(_splash(q, k, v, **kw)), reference(q, k, v, **kw), atol=2e-6, rtol=0)


def test_split_over_the_batch_axes_under_a_mesh():
  """Under `jax.set_mesh` (as the trainer runs) the kernel runs once per device on its share of the batch
  (shard_map over ("data", "fsdp")); the result equals the unsharded reference."""
  from diffusion_jax.train import mesh as mesh_lib
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
  q, k, v = _qkv(5, b=4)
  fn = jax.jit(functools.partial(_splash, causal=True))
  with jax.set_mesh(mesh):
    text = str(jax.make_jaxpr(fn)(q, k, v))
    out = fn(q, k, v)
  assert "shard_map" in text
  np.testing.assert_allclose(np.asarray(out), reference(q, k, v, causal=True), atol=2e-5, rtol=0)
  text = str(jax.make_jaxpr(fn)(q, k, v))  # no mesh: one kernel call over the whole batch
  assert "shard_map" not in text


def test_config_and_model_field_accept_it():
  assert A.configure({"attention": "splash"}) == "splash"
  A.set_default("auto")
  from diffusion_jax.models.dit import DiT
  x, t, y = jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), jnp.array([3.0, 500.0]), jnp.array([0, 2])
  outs = {}
  for impl in ("xla", "splash"):
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
            attention=impl)
    params = m.init(jax.random.key(1), x, t, y)["params"]
    outs[impl] = np.asarray(m.apply({"params": params}, x, t, y))
  np.testing.assert_allclose(outs["splash"], outs["xla"], atol=2e-5, rtol=0)
