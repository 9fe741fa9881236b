"""One scaled dot-product attention for every network, with the implementation selected by name.

    from diffusion_jax.models.attention import dot_product_attention
    out = dot_product_attention(q, k, v, bias=None, mask=None, causal=False, scale=None, implementation=None)

Shapes follow `jax.nn.dot_product_attention`: q (B, T, N, H), k (B, S, N, H), v (B, S, N, Hv) -> (B, T, N, Hv)
in q's dtype. `bias` (additive) and `mask` (boolean, True = attend) broadcast to (B, N, T, S); `causal` masks
keys after the query position (query i sees keys j <= i). `scale` defaults to H ** -0.5. Scores, softmax and
the accumulation are float32 whatever the input dtype (bf16 inputs: the probabilities are cast back to bf16
for the PV product, which accumulates in float32).

Implementations (`IMPLEMENTATIONS`):
* "xla": einsum -> softmax -> einsum, normalising after the PV product (one pass fewer over the score matrix);
  plain XLA, every backend, materialises the (B, N, T, S) scores. Fastest on CPU for short key sequences.
* "dot_product_attention": `jax.nn.dot_product_attention`; on GPU with bf16/fp16 inputs and a head width cuDNN
  accepts it asks for `implementation="cudnn"` (fused flash attention), else XLA's generic lowering.
* "chunked": memory-efficient attention (Rabe & Staats 2021; FlashAttention's online softmax) in plain JAX:
  queries in chunks of `query_chunk` (default: a power of two giving about `BLOCK_SCORES` scores per block),
  keys in chunks of `key_chunk` (default `DEFAULT_KEY_CHUNK`) with a running max / sum, so at most a
  (B, N, query_chunk, key_chunk) block of scores exists at a time, forward and backward (custom VJP that
  recomputes the block from the saved log-sum-exp). Any backend; the one for long sequences.
* "auto": per platform at trace time: CPU -> "chunked" from `AUTO_CPU_CHUNK_MIN_SCORES` score elements on
  (the full score matrix no longer fits in cache and XLA:CPU spends its time writing it), except for heads of
  `AUTO_CPU_WIDE_HEAD` features or more below `AUTO_CPU_WIDE_HEAD_MAX_SCORES` (more FLOPs per score: the full
  matrix is faster), else "xla"; GPU ->
  "dot_product_attention" (cuDNN for bf16/fp16); TPU -> "xla" up to `AUTO_TPU_CHUNK_MIN_KEYS` keys, else
  "chunked". "auto" never picks "splash" (below): it has not run on a TPU.
* "splash": the TPU Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`, the
  flash kernel maxtext / maxdiffusion use), opt-in by name. q is scaled before the kernel, the head width is
  zero-padded to a multiple of 128 and the sequences to whole blocks (at most `SPLASH_BLOCK`; padded keys are
  masked, padded queries dropped), one kernel per example (vmap), and under a mesh with batch axes
  (`jax.set_mesh`, as the trainer runs) the batch is split over ("data", "fsdp") by `shard_map`, since a
  Pallas call is not partitioned automatically. Off TPU the same kernel runs in Pallas interpret mode (correct,
  slow: what the tests use). Calls the kernel cannot express (an additive bias, a boolean mask, Hv != H) use
  "xla" instead.

The choice: an explicit `implementation=` argument wins; else the innermost `use(name)` context (every
top-level model with an `attention` field opens one around its body); else the process default
(`set_default`, which `diffusion_jax.main` sets from `config.attention`); else "auto". The name is read when a
function is traced: change it before jitting, not between calls of a compiled function.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMPLEMENTATIONS = ("auto", "xla", "dot_product_attention", "chunked", "splash")

# "auto" thresholds and chunk sizes, measured on a 2-core x86 CPU (docs/speed.md): XLA:CPU is fastest on a
# score matrix that fits in cache and slow once it has to write a large one (first-touch of a fresh buffer),
# so "auto" chunks from AUTO_CPU_CHUNK_MIN_SCORES score elements (B * N * T * S; 8 MiB of float32) on -- for
# narrow heads. Heads of AUTO_CPU_WIDE_HEAD or more features do 4x+ the FLOPs per score written, and there the
# full matrix was faster at every size measured (fwd + bwd, 1 thread: (8, 256, 4, 64) 1.23x, (32, 256, 4, 64)
# 2.14x, (8, 1024, 4, 64) 1.46x, (4, 256, 8, 160) 1.56x slower chunked; width 40 and 16 were 0.86-0.92x and
# 0.51-0.68x), so they stay on "xla" until the scores reach AUTO_CPU_WIDE_HEAD_MAX_SCORES (256 MiB of
# float32), where memory decides.
AUTO_CPU_CHUNK_MIN_SCORES = 2 ** 21
AUTO_CPU_WIDE_HEAD = 64
AUTO_CPU_WIDE_HEAD_MAX_SCORES = 2 ** 26
AUTO_TPU_CHUNK_MIN_KEYS = 8192
DEFAULT_KEY_CHUNK = 256
BLOCK_SCORES = 2 ** 19  # query chunk (when not given): about this many score elements per (B, N, tq, tk) block

_default = ["auto"]
_stack: List[str] = []


def check_implementation(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown attention implementation {name!r}. Valid attention implementation names: "
                     f"{', '.join(IMPLEMENTATIONS)}.")
  return name


def set_default(name: str) -> None:
  """Sets the process-wide implementation (what `config.attention` selects)."""
  _default[0] = check_implementation(name)


def get_default() -> str:
  return _stack[-1] if _stack else _default[0]


@contextlib.contextmanager
def use(name: Optional[str]) -> Iterator[None]:
  """Within the block (while a model traces), attention without an explicit implementation uses `name`;
  `None` leaves the current choice."""
  if name is None:
    yield
    return
  _stack.append(check_implementation(name))
  try:
    yield
  finally:
    _stack.pop()


def resolve(name: Optional[str], q_shape, key_len: int, platform: Optional[str] = None) -> str:
  """The concrete implementation "auto" (or None) stands for with (B, T, N, H) queries and `key_len` keys on
  `platform` (default: JAX's default backend)."""
  name = check_implementation(name or get_default())
  if name != "auto":
    return name
  platform = platform or jax.default_backend()
  if platform == "gpu" or platform == "cuda" or platform == "rocm":
    return "dot_product_attention"
  if platform == "tpu":
    return "chunked" if key_len > AUTO_TPU_CHUNK_MIN_KEYS else "xla"
  b, t, n, h = q_shape
  scores = b * n * t * key_len
  if scores < AUTO_CPU_CHUNK_MIN_SCORES or (h >= AUTO_CPU_WIDE_HEAD and scores < AUTO_CPU_WIDE_HEAD_MAX_SCORES):
    return "xla"
  return "chunked"


def _neg(dtype=jnp.float32):
  return jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, dtype)


def _as4d(a, name):
  if a is None:
    return None
  a = jnp.asarray(a)
  if a.ndim > 4:
    raise ValueError(f"attention {name} must broadcast to (B, N, T, S); got shape {a.shape}.")
  return a.reshape((1,) * (4 - a.ndim) + a.shape)


def _check(q, k, v, bias, mask):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention wants (B, T, N, H) q/k/v; got {q.shape}, {k.shape}, {v.shape}.")
  b, t, n, h = q.shape
  if k.shape[0] != b or k.shape[2:] != (n, h) or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"attention shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}.")
  s = k.shape[1]
  for name, a in (("bias", bias), ("mask", mask)):
    if a is None:
      continue
    for got, want in zip(a.shape, (b, n, t, s)):
      if got not in (1, want):
        raise ValueError(f"attention {name} of shape {a.shape} does not broadcast to (B, N, T, S) = "
                         f"{(b, n, t, s)}.")


def dot_product_attention(q, k, v, *, bias=None, mask=None, causal: bool = False, scale: Optional[float] = None,
                          implementation: Optional[str] = None, query_chunk: Optional[int] = None,
                          key_chunk: Optional[int] = None):
  """Multi-head attention, (B, T, N, H) layout; see the module docstring for the arguments."""
  bias, mask = _as4d(bias, "bias"), _as4d(mask, "mask")
  _check(q, k, v, bias, mask)
  if mask is not None:
    mask = mask.astype(bool)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  impl = resolve(implementation, q.shape, k.shape[1])
  if impl == "xla":
    return _xla(q, k, v, bias, mask, causal, scale)
  if impl == "dot_product_attention" and v.shape[-1] == q.shape[-1]:  # jax.nn needs Hv == H
    return _jax_nn(q, k, v, bias, mask, causal, scale)
  if impl == "splash":
    if splash_supported(q, k, v, bias, mask):
      return _splash(q, k, v, causal, scale)
    return _xla(q, k, v, bias, mask, causal, scale)
  if impl != "chunked":
    return _xla(q, k, v, bias, mask, causal, scale)
  key_chunk = int(key_chunk or DEFAULT_KEY_CHUNK)
  if not query_chunk:
    per_row = q.shape[0] * q.shape[2] * min(key_chunk, k.shape[1])
    query_chunk = 1 << max(4, min(10, (BLOCK_SCORES // max(per_row, 1)).bit_length() - 1))
  return _chunked(q, k, v, bias, mask, causal, scale, int(query_chunk), key_chunk)


def multihead(q, k, v, heads: int, **kw):
  """`dot_product_attention` on (B, T, heads * H) tensors (the diffusers layout); returns (B, T, heads * Hv)."""
  b, t, _ = q.shape
  s = k.shape[1]
  out = dot_product_attention(q.reshape(b, t, heads, -1), k.reshape(b, s, heads, -1),
                              v.reshape(b, s, heads, -1), **kw)
  return out.reshape(b, t, -1)


# ---------------------------------------------------------------------------------------------------- xla


def _scores(q, k, scale):
  s = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
  return s * jnp.float32(scale)


def _causal_mask(t0, t, s0, s):
  qi = t0 + lax.broadcasted_iota(jnp.int32, (t, s), 0)
  kj = s0 + lax.broadcasted_iota(jnp.int32, (t, s), 1)
  return (qi >= kj)[None, None]


def _xla(q, k, v, bias, mask, causal, scale):
  s = _scores(q, k, scale)
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  keep = mask
  if causal:
    cm = _causal_mask(0, q.shape[1], 0, k.shape[1])
    keep = cm if keep is None else keep & cm
  if keep is not None:
    s = jnp.where(keep, s, _neg())
  m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)                                                       # (B, N, T)
  o = jnp.einsum("bnts,bsnh->btnh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = o / jnp.swapaxes(l, 1, 2)[..., None]
  return o.astype(q.dtype)


# --------------------------------------------------------------------------------------------- jax.nn


def _cudnn_ok(q, k, bias, mask):
  dt = jnp.dtype(q.dtype)
  h = q.shape[-1]
  return (jax.default_backend() == "gpu" and dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and h <= 128 and h % 8 == 0 and k.dtype == q.dtype)


def _jax_nn(q, k, v, bias, mask, causal, scale):
  impl = "cudnn" if _cudnn_ok(q, k, bias, mask) else None
  if bias is not None:
    bias = bias.astype(q.dtype)
  if impl == "cudnn" and mask is not None:
    # cuDNN takes an additive bias more generally than a boolean mask.
    add = jnp.where(mask, 0.0, _neg()).astype(q.dtype)
    bias, mask = (add if bias is None else bias + add), None
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal,
                                      implementation=impl)


# ------------------------------------------------------------------------------------------------- splash

SPLASH_BLOCK = 512  # largest query / key block of the splash kernel (blocks are multiples of 128)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def splash_supported(q, k, v, bias=None, mask=None) -> bool:
  """Whether "splash" runs this call as the kernel (else it falls back to "xla"): no additive bias, no
  boolean mask (causal is fine), Hv == H."""
  return bias is None and mask is None and v.shape[-1] == q.shape[-1]


def _splash_blocks(t: int, s: int):
  bq = min(SPLASH_BLOCK, _round_up(t, 128))
  bk = min(SPLASH_BLOCK, _round_up(s, 128))
  return bq, bk, _round_up(t, bq), _round_up(s, bk)


def _splash_kernel(n: int, t: int, s: int, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  bq, bk, tp, sp = _splash_blocks(t, s)
  if not causal and sp == s:
    head_mask = sm.FullMask((tp, sp))
  else:  # padded keys masked out; causal as in `_causal_mask` (query i sees keys j <= i)
    keep = np.zeros((tp, sp), bool)
    keep[:, :s] = True
    if causal:
      keep &= np.arange(tp)[:, None] >= np.arange(sp)[None, :]
    head_mask = sm.NumpyMask(keep)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                         block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  return sk.make_splash_mha(sm.MultiHeadMask([head_mask] * n), block_sizes=blocks, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, causal, scale):
  """(B, T, N, H) -> (B, T, N, H) through the kernel, on one device's share of the batch."""
  b, t, n, h = q.shape
  s = k.shape[1]
  _, _, tp, sp = _splash_blocks(t, s)
  hp = _round_up(h, 128)
  kernel = _splash_kernel(n, t, s, causal, interpret=jax.default_backend() != "tpu")

  def prep(a, length):  # (B, L, N, H) -> (B, N, Lp, Hp), zero padded
    a = jnp.swapaxes(a, 1, 2)
    return jnp.pad(a, ((0, 0), (0, 0), (0, length - a.shape[2]), (0, hp - h)))

  qs = (q.astype(jnp.float32) * jnp.float32(scale)).astype(q.dtype)
  o = jax.vmap(kernel)(prep(qs, tp), prep(k, sp), prep(v, sp))
  return jnp.swapaxes(o[:, :, :t, :h], 1, 2).astype(q.dtype)


def _splash(q, k, v, causal, scale):
  from jax.sharding import PartitionSpec as P
  fn = functools.partial(_splash_local, causal=causal, scale=scale)
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in ("data", "fsdp") if not mesh.empty and a in mesh.axis_names and mesh.shape[a] > 1)
  shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
  if shards == 1 or q.shape[0] % shards:
    return fn(q, k, v)
  spec = P(axes)
  return jax.shard_map(fn, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


# ------------------------------------------------------------------------------------------------ chunked


def _pad_axis(a, axis, size, value=0):
  if a is None or a.shape[axis] == 1 or a.shape[axis] == size:
    return a
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad, constant_values=value)


def _slice(a, axis, start, size):
  """`size` entries of `a` along `axis` from `start` (a broadcast axis of size 1 is kept)."""
  if a is None or a.shape[axis] == 1:
    return a
  return lax.dynamic_slice_in_dim(a, start, size, axis)


def _block_scores(qi, kj, bias_ij, mask_ij, t0, s0, causal, s_valid, scale):
  """Masked float32 scores of a (query block, key block) pair, (B, N, tq, tk)."""
  s = _scores(qi, kj, scale)
  if bias_ij is not None:
    s = s + bias_ij.astype(jnp.float32)
  if mask_ij is not None:
    s = jnp.where(mask_ij, s, _neg())
  if causal:
    s = jnp.where(_causal_mask(t0, qi.shape[1], s0, kj.shape[1]), s, _neg())
  if s_valid is not None:  # zero-padded keys never receive weight
    kj_idx = s0 + lax.broadcasted_iota(jnp.int32, s.shape[-1:], 0)
    s = jnp.where(kj_idx < s_valid, s, -jnp.inf)
  return s


def _chunked(q, k, v, bias, mask, causal, scale, query_chunk, key_chunk):
  if query_chunk < 1 or key_chunk < 1:
    raise ValueError(f"attention chunks must be positive; got query_chunk={query_chunk}, key_chunk={key_chunk}.")
  t, s = q.shape[1], k.shape[1]
  tq, tk = min(query_chunk, t), min(key_chunk, s)
  tp, sp = -(-t // tq) * tq, -(-s // tk) * tk
  q = _pad_axis(q, 1, tp)
  k, v = _pad_axis(k, 1, sp), _pad_axis(v, 1, sp)
  bias = _pad_axis(_pad_axis(bias, 2, tp), 3, sp)
  mask = _pad_axis(_pad_axis(mask, 2, tp, True), 3, sp, True)
  cfg = (tq, tk, causal, s if sp != s else None, scale, bias is not None, mask is not None)
  out = _flash(cfg, q, k, v, bias, mask)
  return out[:, :t]


def _fwd_blocks(cfg, q, k, v, bias, mask):
  """Forward over blocks: returns out (B, Tp, N, Hv) in q.dtype and the softmax statistics `lse` =
  (row max, 1 / row sum) (2, B, N, Tp) float32."""
  tq, tk, causal, s_valid, scale, _, _ = cfg
  b, tp, n, _ = q.shape
  sp, hv = k.shape[1], v.shape[-1]
  nk = sp // tk

  def q_block(i):
    t0 = i * tq
    qi = lax.dynamic_slice_in_dim(q, t0, tq, 1)
    bias_i, mask_i = _slice(bias, 2, t0, tq), _slice(mask, 2, t0, tq)

    def kv_step(carry, j):
      m, l, acc = carry
      s0 = j * tk
      kj, vj = lax.dynamic_slice_in_dim(k, s0, tk, 1), lax.dynamic_slice_in_dim(v, s0, tk, 1)
      sc = _block_scores(qi, kj, _slice(bias_i, 3, s0, tk), _slice(mask_i, 3, s0, tk), t0, s0, causal,
                         s_valid, scale)
      m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
      p = jnp.exp(sc - m_new[..., None])
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bnts,bsnh->bnth", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
      return (m_new, l, acc * corr[..., None] + pv), None

    init = (jnp.full((b, n, tq), -jnp.inf, jnp.float32), jnp.zeros((b, n, tq), jnp.float32),
            jnp.zeros((b, n, tq, hv), jnp.float32))
    if nk == 1:
      (m, l, acc), _ = kv_step(init, 0)
    else:
      (m, l, acc), _ = lax.scan(kv_step, init, jnp.arange(nk))
    o = (acc / l[..., None]).astype(q.dtype)
    # (m, 1/l) rather than m + log(l): exact also in fully masked rows, where m is the huge mask value.
    return jnp.swapaxes(o, 1, 2), jnp.stack([m, 1.0 / l])                      # (B, tq, N, Hv), (2, B, N, tq)

  nq = tp // tq
  if nq == 1:
    return q_block(0)
  o, lse = lax.map(q_block, jnp.arange(nq))                                  # (nq, B, tq, N, Hv), (nq, 2, B, N, tq)
  o = jnp.moveaxis(o, 0, 1).reshape(b, tp, n, hv)
  lse = jnp.moveaxis(lse, 0, 3).reshape(2, b, n, tp)
  return o, lse


def _sum_to(x, shape):
  """Sums the float32 block cotangent `x` over the axes where `shape` (the bias block) broadcasts."""
  axes = tuple(i for i, (a, b) in enumerate(zip(shape, x.shape)) if a == 1 and b != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _bwd_blocks(cfg, q, k, v, bias, mask, o, lse, do):
  """FlashAttention-2 style backward: per query block, loop over key blocks, recompute P = exp(S - m) / l."""
  tq, tk, causal, s_valid, scale, has_bias, _ = cfg
  b, tp, n, h = q.shape
  sp = k.shape[1]
  nk, nq = sp // tk, tp // tq
  delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32))  # rowsum(dO * O)
  bias_blk_t = tq if (has_bias and bias.shape[2] != 1) else 1
  bias_blk_s = tk if (has_bias and bias.shape[3] != 1) else 1

  def q_block(carry, i):
    dk, dv, dbias = carry
    t0 = i * tq
    qi, doi = lax.dynamic_slice_in_dim(q, t0, tq, 1), lax.dynamic_slice_in_dim(do, t0, tq, 1)
    lse_i, delta_i = lax.dynamic_slice_in_dim(lse, t0, tq, 3), lax.dynamic_slice_in_dim(delta, t0, tq, 2)
    bias_i, mask_i = _slice(bias, 2, t0, tq), _slice(mask, 2, t0, tq)

    def kv_step(carry, j):
      dq_i, dk, dv, dbias = carry
      s0 = j * tk
      kj, vj = lax.dynamic_slice_in_dim(k, s0, tk, 1), lax.dynamic_slice_in_dim(v, s0, tk, 1)
      sc = _block_scores(qi, kj, _slice(bias_i, 3, s0, tk), _slice(mask_i, 3, s0, tk), t0, s0, causal,
                         s_valid, scale)
      p = jnp.exp(sc - lse_i[0][..., None]) * lse_i[1][..., None]              # (B, N, tq, tk) f32
      dv_j = jnp.einsum("bnts,btnh->bsnh", p.astype(do.dtype), doi, preferred_element_type=jnp.float32)
      dp = jnp.einsum("btnh,bsnh->bnts", doi, vj, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None])                                        # d(scores incl. bias)
      ds = jnp.where(sc > 0.5 * _neg(), ds, 0.0)  # masked scores are constants (matters in fully masked rows)
      if has_bias:
        blk = _sum_to(ds, (bias.shape[0], bias.shape[1], bias_blk_t, bias_blk_s))
        if bias.shape[2] != 1 and bias.shape[3] != 1:
          dbias = lax.dynamic_update_slice(dbias, blk, (0, 0, t0, s0))
        elif bias.shape[2] != 1:
          cur = lax.dynamic_slice_in_dim(dbias, t0, tq, 2)
          dbias = lax.dynamic_update_slice_in_dim(dbias, cur + blk, t0, 2)
        elif bias.shape[3] != 1:
          cur = lax.dynamic_slice_in_dim(dbias, s0, tk, 3)
          dbias = lax.dynamic_update_slice_in_dim(dbias, cur + blk, s0, 3)
        else:
          dbias = dbias + blk
      ds = ds * jnp.float32(scale)
      dq_i = dq_i + jnp.einsum("bnts,bsnh->btnh", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("bnts,btnh->bsnh", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
      dk = lax.dynamic_update_slice_in_dim(dk, lax.dynamic_slice_in_dim(dk, s0, tk, 1) + dk_j, s0, 1)
      dv = lax.dynamic_update_slice_in_dim(dv, lax.dynamic_slice_in_dim(dv, s0, tk, 1) + dv_j, s0, 1)
      return (dq_i, dk, dv, dbias), None

    init = (jnp.zeros(qi.shape, jnp.float32), dk, dv, dbias)
    if nk == 1:
      (dq_i, dk, dv, dbias), _ = kv_step(init, 0)
    else:
      (dq_i, dk, dv, dbias), _ = lax.scan(kv_step, init, jnp.arange(nk))
    return (dk, dv, dbias), dq_i

  dbias0 = jnp.zeros(bias.shape, jnp.float32) if has_bias else jnp.zeros((), jnp.float32)
  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), dbias0)
  if nq == 1:
    (dk, dv, dbias), dq = q_block(init, 0)
  else:
    (dk, dv, dbias), dq = lax.scan(q_block, init, jnp.arange(nq))
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), (dbias.astype(bias.dtype) if has_bias
                                                                        else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, mask):
  return _fwd_blocks(cfg, q, k, v, bias, mask)[0]


def _flash_fwd(cfg, q, k, v, bias, mask):
  o, lse = _fwd_blocks(cfg, q, k, v, bias, mask)
  return o, (q, k, v, bias, mask, o, lse)


def _flash_bwd(cfg, res, do):
  q, k, v, bias, mask, o, lse = res
  dq, dk, dv, dbias = _bwd_blocks(cfg, q, k, v, bias, mask, o, lse, do)
  dmask = None if mask is None else _zero_cotangent(mask)
  return dq, dk, dv, dbias, dmask


def _zero_cotangent(x):
  return np.zeros(x.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def scoped(method):
  """Decorator for a method of a module with an `attention` field (None = inherit): the method (and every
  submodule it calls) runs inside `use(self.attention)`. Put it under `@nn.compact`."""

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    with use(getattr(self, "attention", None)):
      return method(self, *args, **kwargs)

  return wrapper


def configure(config) -> str:
  """Sets the process default from a run config's top-level `attention` key ("auto" when absent) and
  returns it; an unknown name fails here, before any work starts."""
  name = str(config.get("attention", "auto") or "auto")
  set_default(name)
  return name
