"""DiT with adaLN-Zero (Peebles & Xie 2023), the baseline of DiffiT's TMSA-vs-adaLN comparison (DiffiT §5.9).

Same skeleton as the latent DiffiT (patch embed + fixed 2-D sin-cos position table, timestep/label embedders,
non-affine LN eps 1e-6, tanh-GELU MLP), but conditioning enters every block through adaLN-Zero: SiLU(c) ->
zero-initialised Dense(6D) -> (shift, scale, gate) for attention and MLP; the final layer is adaLN-modulated
(Dense(2D)) and zero-initialised. Attention is plain global multi-head attention (no relative bias, no time
token). Sizes S/B/L/XL x patch 2/4/8 via `DIT_SIZES` / `dit_kwargs("XL/2")`.

`scan_blocks=True` (DiT and latent DiffiT, default False) runs the blocks as one `nn.scan`, so XLA compiles one
block instead of `depth`; the params then hold one `blocks/block/...` subtree stacked on a leading depth axis
instead of `blocks_0 ... blocks_{depth-1}`. `scan_block_params` / `unscan_block_params` convert between the
two trees (checkpoints, exports and the released-weight ports use the unscanned names); the outputs are the
same for the same weights (tests/models/test_scan_blocks.py).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attn_lib
from diffusion_jax.models import MODELS
from diffusion_jax.models.diffit import TMSA
from diffusion_jax.models.layers import (LabelEmbedder, Mlp, TimestepEmbedder, get_2d_sincos_pos_embed,
                                         maybe_remat, patchify_conv, to_dtype, unpatchify)
from diffusion_jax.registry import check_choice

Dtype = Any

# depth, hidden size, heads (DiT Table 1).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def dit_kwargs(spec: str) -> Dict[str, int]:
  """'XL/2' -> dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)."""
  try:
    size, patch = spec.split("/")
    check_choice("DiT size", size, DIT_SIZES)
    check_choice("DiT patch size", patch, ("2", "4", "8"))
  except ValueError as e:
    raise ValueError(f"Bad DiT spec {spec!r} (want e.g. 'XL/2'): {e}") from None
  depth, width, heads = DIT_SIZES[size]
  return dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=int(patch))


def scan_block_params(params: Mapping[str, Any], depth: int, prefix: str = "blocks_",
                      scanned: str = "blocks") -> Dict[str, Any]:
  """Unscanned -> scanned param tree (`scan_blocks=True` of DiT / latent DiffiT): `prefix0..prefix{depth-1}`
  become one `scanned/block` subtree with a leading depth axis; every other entry is kept."""
  params = dict(params)
  blocks = [params.pop(f"{prefix}{i}") for i in range(depth)]
  if any(k.startswith(prefix) for k in params):
    raise ValueError(f"scan_block_params: more than depth={depth} '{prefix}*' entries in the params.")
  params[scanned] = {"block": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)}
  return params


def unscan_block_params(params: Mapping[str, Any], prefix: str = "blocks_",
                        scanned: str = "blocks") -> Dict[str, Any]:
  """Inverse of `scan_block_params` (scanned -> the per-block names the checkpoints and ports use)."""
  params = dict(params)
  stacked = params.pop(scanned)["block"]
  depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  for i in range(depth):
    params[f"{prefix}{i}"] = jax.tree_util.tree_map(lambda x: x[i], stacked)
  return params


class _ScanStep(nn.Module):
  """One scan step over repeated blocks: carry h, broadcast conditioning c (`nn.scan` body)."""
  block_cls: Any
  block_args: tuple
  block_kwargs: Dict[str, Any]

  @nn.compact
  def __call__(self, h, c):
    return self.block_cls(*self.block_args, **self.block_kwargs, name="block")(h, c), None


def scanned_blocks(block_cls, depth: int, args: tuple, kwargs: Dict[str, Any], name: str = "blocks"):
  """`depth` copies of `block_cls(*args, **kwargs)` as one `nn.scan` (params stacked on axis 0 under
  `name/block`): XLA compiles the block once instead of `depth` times."""
  return nn.scan(_ScanStep, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                 length=depth)(block_cls, tuple(args), dict(kwargs), name=name)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
  """adaLN-Zero block on tokens [B, N, D]."""
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    mod = nn.Dense(6 * self.dim, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="adaLN_modulation_1")(nn.silu(c))
    sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = jnp.split(mod, 6, axis=-1)
    ln = lambda name: nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=self.dtype, name=name)
    a = TMSA(self.dim, self.num_heads, 0, use_time=False, rel_pos_bias=False, dtype=self.dtype,
             param_dtype=self.param_dtype, name="attn")(modulate(ln("norm1")(x), sh_msa, sc_msa))
    x = x + g_msa[:, None] * a
    m = Mlp(int(self.dim * self.mlp_ratio), act="gelu_tanh", dtype=self.dtype, param_dtype=self.param_dtype,
            name="mlp")(modulate(ln("norm2")(x), sh_mlp, sc_mlp))
    return x + g_mlp[:, None] * m


@MODELS.register("dit")
class DiT(nn.Module):
  """DiT (adaLN-Zero). Defaults: DiT-XL/2 on 32x32x4 latents, learned sigma (675.1M params).

  __call__(x [B, H, W, C], t [B], y [B] or None (null = num_classes)) -> [B, H, W, C_out].
  """
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  learn_sigma: bool = True
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit
  # True: the blocks as one nn.scan (params "blocks/block/..." stacked on a depth axis; convert with
  # scan_block_params / unscan_block_params): one block compiled instead of `depth`. Same outputs.
  scan_blocks: bool = False

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @nn.compact
  @attn_lib.scoped
  def __call__(self, x, t, y=None):
    dtype, pdt = to_dtype(self.dtype), to_dtype(self.param_dtype)
    b, hh, ww, cin = x.shape
    p, d = self.patch_size, self.hidden_size
    if hh != self.input_size or ww != self.input_size or cin != self.in_channels:
      raise ValueError(f"DiT built for {self.input_size}x{self.input_size}x{self.in_channels} inputs, got "
                       f"{hh}x{ww}x{cin}; set config.model.input_size / in_channels.")
    g = self.input_size // p
    h = patchify_conv(d, p, dtype, pdt)(x.astype(dtype)).reshape(b, g * g, d)
    h = h + jnp.asarray(get_2d_sincos_pos_embed(d, g), dtype)[None]
    c = TimestepEmbedder(d, 256, dtype=dtype, param_dtype=pdt, name="t_embedder")(t)
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((b,), self.num_classes, jnp.int32)
      c = c + LabelEmbedder(self.num_classes, d, dtype=dtype, param_dtype=pdt, name="y_embedder")(y)
    Block = maybe_remat(DiTBlock, self.remat)
    block_args, block_kw = (d, self.num_heads, self.mlp_ratio), dict(dtype=dtype, param_dtype=pdt)
    if self.scan_blocks:
      h, _ = scanned_blocks(Block, self.depth, block_args, block_kw)(h, c)
    else:
      for i in range(self.depth):
        h = Block(*block_args, **block_kw, name=f"blocks_{i}")(h, c)
    shift, scale = jnp.split(nn.Dense(2 * d, kernel_init=nn.initializers.zeros, dtype=dtype, param_dtype=pdt,
                                      name="final_adaLN_modulation_1")(nn.silu(c)), 2, axis=-1)
    h = modulate(nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name="final_norm")(h),
                 shift, scale)
    h = nn.Dense(p * p * self.out_channels, kernel_init=nn.initializers.zeros, dtype=dtype, param_dtype=pdt,
                 name="final_linear")(h)
    return unpatchify(h, p, self.out_channels, g, g).astype(jnp.float32)
