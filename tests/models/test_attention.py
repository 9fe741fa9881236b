"""The one attention function: every implementation against a float64 reference (masks, biases, causal, odd
lengths vs the chunk sizes, bf16, gradients), the chunked path's memory claim, the per-platform choice, and
the config / model-field / scope plumbing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from diffusion_jax.models import attention as A

IMPLS = ("xla", "dot_product_attention", "chunked")
B, T, S, N, H = 2, 37, 45, 3, 8  # odd lengths: neither divides the chunks used below (8 queries, 16 keys)


def reference(q, k, v, bias=None, mask=None, causal=False, scale=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  keep = np.ones(s.shape, bool)
  if mask is not None:
    keep &= np.asarray(mask, bool)
  if causal:
    keep &= np.tril(np.ones(s.shape[-2:], bool))
  s = np.where(keep, s, -1e30)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


def _inputs(seed=0, t=T, s=S, hv=H):
  r = np.random.default_rng(seed)
  q = r.standard_normal((B, t, N, H), np.float32)
  k = r.standard_normal((B, s, N, H), np.float32)
  v = r.standard_normal((B, s, N, hv), np.float32)
  extras = {
      "bias_full": dict(bias=r.standard_normal((1, N, t, s), np.float32)),       # DiffiT relative position bias
      "bias_batch": dict(bias=r.standard_normal((B, 1, t, s), np.float32) * 3),  # prior's additive mask
      "key_mask": dict(mask=r.random((B, 1, 1, s)) > 0.3),                       # padding mask
      "full_mask": dict(mask=r.random((B, N, t, s)) > 0.5),
      "causal": dict(causal=True),
      "causal_padded": dict(causal=True, mask=np.arange(s)[None, None, None, :] < np.array([s, 20])[:, None, None,
                                                                                                    None]),
      "all": dict(causal=True, bias=r.standard_normal((1, N, t, s), np.float32), mask=r.random((B, 1, 1, s)) > 0.3),
      "scale": dict(scale=0.37),
  }
  return q, k, v, extras


CASES = ("none", "bias_full", "bias_batch", "key_mask", "full_mask", "causal", "causal_padded", "all", "scale")


def _attn(impl, q, k, v, **kw):
  chunks = dict(query_chunk=8, key_chunk=16) if impl == "chunked" else {}
  return A.dot_product_attention(q, k, v, implementation=impl, **chunks, **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl):
  q, k, v, extras = _inputs()
  for case in CASES:
    kw = extras.get(case, {})
    out = jax.jit(functools.partial(_attn, impl, **kw))(q, k, v) if "scale" not in kw else _attn(impl, q, k, v, **kw)
    assert out.shape == (B, T, N, H) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, **kw), atol=2e-6, rtol=0, err_msg=case)


@pytest.mark.parametrize("qc,kc", [(1, 1), (5, 7), (64, 64), (37, 45), (16, 45)])
def test_chunked_chunk_sizes(qc, kc):
  q, k, v, extras = _inputs(1)
  kw = extras["all"]
  out = A.dot_product_attention(q, k, v, implementation="chunked", query_chunk=qc, key_chunk=kc, **kw)
  np.testing.assert_allclose(np.asarray(out), reference(q, k, v, **kw), atol=2e-6, rtol=0)


def test_value_width_differs_from_key_width():
  q, k, v, _ = _inputs(2, hv=5)
  for impl in IMPLS:  # jax.nn needs Hv == H: "dot_product_attention" falls back to "xla"
    np.testing.assert_allclose(np.asarray(_attn(impl, q, k, v)), reference(q, k, v), atol=2e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_softmax_in_float32(impl):
  q, k, v, extras = _inputs(3)
  # Large logits: a bf16 softmax (8-bit mantissa scores) would be off by far more than the tolerance below.
  qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q * 4, k * 4, v))
  bias = extras["bias_full"]["bias"]
  out = _attn(impl, qb, kb, vb, bias=bias, causal=True)
  assert out.dtype == jnp.bfloat16
  want = reference(*(np.asarray(a, np.float32) for a in (qb, kb, vb)), bias=bias, causal=True)
  err = np.abs(np.asarray(out, np.float32) - want)
  assert err.max() < 0.1 and err.mean() < 0.01, (err.max(), err.mean())


def test_gradients_agree():
  q, k, v, extras = _inputs(4)
  kw = dict(extras["all"])
  bias = kw.pop("bias")

  def loss(impl, q, k, v, bias):
    return jnp.sum(jnp.sin(_attn(impl, q, k, v, bias=bias, **kw)) * jnp.arange(H))

  def ref_loss(q, k, v, bias):  # autodiff through the plain formula
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * H ** -0.5 + bias
    keep = jnp.asarray(kw["mask"]) & jnp.tril(jnp.ones((T, S), bool))
    p = jax.nn.softmax(jnp.where(keep, s, -1e30), axis=-1)
    return jnp.sum(jnp.sin(jnp.einsum("bnts,bsnh->btnh", p, v)) * jnp.arange(H))

  want = jax.grad(ref_loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
  for impl in IMPLS:
    got = jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for name, g, w in zip("qkvb", got, want):
      assert g.shape == w.shape
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=0, err_msg=f"{impl} d{name}")


def test_gradient_of_broadcast_bias():
  """The chunked backward sums the bias cotangent over its broadcast axes."""
  q, k, v, _ = _inputs(5)
  for shape in [(1, 1, 1, S), (B, N, T, 1), (1, N, 1, 1)]:
    bias = np.random.default_rng(6).standard_normal(shape, np.float32)
    gs = [jax.grad(lambda b, i=impl: jnp.sum(_attn(i, q, k, v, bias=b) ** 2))(bias) for impl in ("xla", "chunked")]
    assert gs[1].shape == shape
    np.testing.assert_allclose(np.asarray(gs[1]), np.asarray(gs[0]), atol=2e-5, rtol=0, err_msg=str(shape))


def _max_intermediate(fn, *args):
  """Largest number of elements of any value in the jaxpr of `fn` (sub-jaxprs included)."""
  def walk(jaxpr):
    m = 0
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        m = max(m, int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          if isinstance(sub, jex_core.ClosedJaxpr):
            m = max(m, walk(sub.jaxpr))
          elif isinstance(sub, jex_core.Jaxpr):
            m = max(m, walk(sub))
    return m
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_chunked_never_materialises_the_score_matrix():
  t = s = 512
  q, k, v, _ = _inputs(7, t=t, s=s)
  full = B * N * t * s

  def fwd_bwd(impl, q, k, v):
    f = lambda q, k, v: jnp.sum(A.dot_product_attention(q, k, v, implementation=impl, causal=True, query_chunk=64,
                                                        key_chunk=128) ** 2)
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  assert _max_intermediate(functools.partial(fwd_bwd, "xla"), q, k, v) >= full  # the check can see it
  biggest = _max_intermediate(functools.partial(fwd_bwd, "chunked"), q, k, v)
  assert biggest <= B * N * 64 * 128, biggest


def test_auto_choice_per_platform():
  small, big = (8, 256, 2, 32), (8, 1024, 2, 16)
  assert A.resolve("auto", small, 256, "cpu") == "xla"
  assert A.resolve("auto", big, 1024, "cpu") == "chunked"
  # wide heads (64+ features) keep the full score matrix on CPU until it is 2^26 elements
  assert A.resolve("auto", (8, 1024, 4, 64), 1024, "cpu") == "xla"
  assert A.resolve("auto", (8, 1024, 4, 40), 1024, "cpu") == "chunked"
  assert A.resolve("auto", (16, 2048, 8, 64), 2048, "cpu") == "chunked"  # 2^29 scores: memory decides
  assert A.resolve("auto", big, 1024, "gpu") == "dot_product_attention"
  assert A.resolve("auto", big, 1024, "tpu") == "xla"
  assert A.resolve("auto", big, 16384, "tpu") == "chunked"
  assert A.resolve("chunked", small, 256, "gpu") == "chunked"
  with pytest.raises(ValueError, match="Valid attention implementation names: auto, xla"):
    A.resolve("flash", small, 256, "cpu")


def test_default_scope_and_config(monkeypatch):
  calls = []
  for name in ("_xla", "_jax_nn", "_chunked"):
    orig = getattr(A, name)
    monkeypatch.setattr(A, name, lambda *a, _o=orig, _n=name, **kw: (calls.append(_n), _o(*a, **kw))[1])
  q, k, v, _ = _inputs(8)
  monkeypatch.setattr(A, "_default", ["auto"])
  A.dot_product_attention(q, k, v)
  assert calls[-1] == "_xla"  # small problem on CPU
  assert A.configure({"attention": "chunked"}) == "chunked" and A.get_default() == "chunked"
  A.dot_product_attention(q, k, v)
  assert calls[-1] == "_chunked"
  with A.use("dot_product_attention"):
    A.dot_product_attention(q, k, v)
    assert calls[-1] == "_jax_nn"
    A.dot_product_attention(q, k, v, implementation="xla")  # an explicit argument wins
    assert calls[-1] == "_xla"
  A.dot_product_attention(q, k, v)
  assert calls[-1] == "_chunked"
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    A.configure({"attention": "flash"})


def test_base_config_has_the_key():
  from configs import _base
  from diffusion_jax import stages
  c = _base.base_config()
  assert c.attention == "auto"
  d = c.copy_and_resolve_references()
  d.attention = "chunked"
  assert stages.config_fingerprint(c)[0] == stages.config_fingerprint(d)[0]  # operational: same stage


@pytest.mark.parametrize("kind", ["unet", "dit", "diffit", "clip", "prior"])
def test_model_field_selects_the_implementation(kind, monkeypatch):
  """Every network's `attention` field reaches its attention calls, and the outputs agree across them."""
  calls = []
  orig = A._chunked
  monkeypatch.setattr(A, "_chunked", lambda *a, **kw: (calls.append(1), orig(*a, **kw))[1])
  rng = jax.random.PRNGKey(0)
  if kind == "unet":
    from diffusion_jax.models.unet import UNet2DConditionModel
    make = lambda impl: UNet2DConditionModel("tiny", attention=impl)
    args = (jax.random.normal(rng, (1, 8, 8, 4)), jnp.array([500]), jax.random.normal(rng, (1, 5, 32)))
  elif kind == "dit":
    from diffusion_jax.models.dit import DiT
    make = lambda impl: DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                            num_classes=3, attention=impl)
    args = (jax.random.normal(rng, (2, 8, 8, 4)), jnp.array([3.0, 500.0]), jnp.array([0, 2]))
  elif kind == "diffit":
    from diffusion_jax.models.diffit import DiffiTLatent
    make = lambda impl: DiffiTLatent(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                     num_heads=2, num_classes=3, attention=impl)
    args = (jax.random.normal(rng, (2, 8, 8, 4)), jnp.array([3.0, 500.0]), jnp.array([0, 2]))
  elif kind == "clip":
    from diffusion_jax.models.clip import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12)
    make = lambda impl: CLIPTextModel(cfg, attention=impl)
    args = (jnp.array([[1, 5, 7, 9, 49, 0, 0], [1, 3, 49, 0, 0, 0, 0]]),
            jnp.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]]))
  else:
    from diffusion_jax.models.prior import PriorConfig, PriorTransformer
    cfg = PriorConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=24,
                      num_embeddings=5, additional_embeddings=4)
    make = lambda impl: PriorTransformer(cfg, attention=impl)
    r = np.random.default_rng(0)
    args = (jnp.asarray(r.standard_normal((2, 24), np.float32)), jnp.asarray(r.standard_normal((2, 24), np.float32)),
            jnp.asarray(r.standard_normal((2, 5, 24), np.float32)), jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
            jnp.array([3, 40]))
  params = make("xla").init(rng, *args)
  outs = {}
  for impl in IMPLS:
    n = len(calls)
    out = make(impl).apply(params, *args)
    outs[impl] = out if not isinstance(out, dict) else out["last_hidden_state"]
    assert (len(calls) > n) == (impl == "chunked"), impl
  for impl in IMPLS[1:]:
    np.testing.assert_allclose(np.asarray(outs[impl]), np.asarray(outs["xla"]), atol=5e-5, rtol=0, err_msg=impl)
