"""DiffiT: Diffusion Vision Transformers (Hatamizadeh et al., ECCV 2024) in Flax linen.

* `TMSA`: time-dependent multi-head self-attention (DiffiT Eq. 3-6). q, k, v are a spatial projection of the
  tokens plus a temporal projection of the time token x_t (separate weights), i.e. one Dense(3D) on tokens plus one
  Dense(3D) on x_t broadcast-added; Softmax(Q K^T / sqrt(d) + B) V with a learned Swin-style relative position
  bias table B of (2w-1)^2 x heads (not time-conditioned), inside non-overlapping w x w windows (no shift) or
  globally; output Dense. Attention runs through `models/attention.py`.
* `DiffiTBlock`: pre-LN transformer block, x = TMSA(LN(x), x_t) + x; x = MLP(LN(x)) + x (Eq. 7-8).
* `DiffiTResBlock`: x = DiffiTBlock(Conv3x3(Swish(GN(x))), x_t) + x (Eq. 9-10).
* `DiffiTImage` ("diffit_image"): the image-space U-shaped hybrid network (Fig. 4, App. H.1 / I.1).
* `DiffiTLatent` ("diffit_latent"): the latent DiffiT-XL/2 of the released code (patch 2, depth 28, width 1152,
  16 heads, global window, label embedding added to the time embedding, no adaLN, LN -> SiLU -> zero-init head).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import attention as attn_lib
from diffusion_jax.models import MODELS
from diffusion_jax.models.layers import (LabelEmbedder, Mlp, TimestepEmbedder, get_2d_sincos_pos_embed,
                                         maybe_remat, patchify_conv, to_dtype, unpatchify, xavier_uniform)
from diffusion_jax.registry import check_choice

Dtype = Any


def relative_position_index(window: int) -> np.ndarray:
  """Static [w*w, w*w] index into the (2w-1)^2 bias table (Swin): (dy + w-1) * (2w-1) + (dx + w-1)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  return ((rel[..., 0] + window - 1) * (2 * window - 1) + (rel[..., 1] + window - 1)).astype(np.int32)


def window_partition(x, window: int):
  """[B, H, W, C] -> [B, (H/w)*(W/w), w*w, C] (non-overlapping, row-major windows and tokens)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(x, window: int, h: int, w: int):
  b, _, _, c = x.shape
  x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def resolve_window(window: Optional[int], h: int, w: int) -> int:
  """`None` (or >= the grid) means global attention; a window must tile the (square) grid exactly."""
  if window is None or window >= max(h, w):
    if h != w:
      raise ValueError(f"Global-window TMSA needs a square token grid, got {h}x{w}; set a window_size.")
    return h
  if h % window or w % window:
    raise ValueError(f"window_size={window} does not tile the {h}x{w} token grid; pick a divisor of {h}.")
  return window


class TMSA(nn.Module):
  """Time-dependent multi-head self-attention over windows of tokens (DiffiT Eq. 3-6).

  x: [B, nW, N, D] (N = window_size**2 tokens per window, row-major) or [B, N, D]; c: [B, Dc] time token or
  None. `use_time=False` and `rel_pos_bias=False` give plain timm/DiT attention (names qkv / proj kept).
  """
  dim: int
  num_heads: int
  window_size: int
  use_time: bool = True
  rel_pos_bias: bool = True
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c=None):
    squeeze = x.ndim == 3
    if squeeze:
      x = x[:, None]
    b, nw, n, d = x.shape
    if d != self.dim or self.dim % self.num_heads:
      raise ValueError(f"TMSA dim {self.dim} / heads {self.num_heads} do not fit input channels {d}.")
    hd = self.dim // self.num_heads
    dense = lambda f, name, bias=True: nn.Dense(f, use_bias=bias, kernel_init=xavier_uniform(),
                                                dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    qkv = dense(3 * self.dim, "qkv", self.qkv_bias)(x)                        # x_s W_{q,k,v}s
    if self.use_time:
      if c is None:
        raise ValueError("TMSA with use_time=True needs the time token c.")
      qkv = qkv + dense(3 * self.dim, "qkv_temb")(c)[:, None, None, :]      # + x_t W_{q,k,v}t
    qkv = qkv.reshape(b * nw, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                         # [B*nW, N, heads, hd]
    bias = None
    if self.rel_pos_bias:
      w = self.window_size
      if w * w != n:
        raise ValueError(f"TMSA window_size={w} expects {w * w} tokens per window, got {n}.")
      table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                         ((2 * w - 1) ** 2, self.num_heads), self.param_dtype)
      idx = relative_position_index(w).reshape(-1)
      bias = jnp.take(table, idx, axis=0).reshape(n, n, self.num_heads).transpose(2, 0, 1)[None]
      bias = bias.astype(q.dtype)
    out = attn_lib.dot_product_attention(q, k, v, bias=bias, scale=hd ** -0.5)
    out = out.reshape(b, nw, n, self.dim)
    out = dense(self.dim, "proj")(out)
    return out[:, 0] if squeeze else out


class DiffiTBlock(nn.Module):
  """Pre-LN DiffiT transformer block on a token grid [B, H, W, D] (DiffiT Eq. 7-8).

  TMSA runs inside non-overlapping `window_size` windows (None = global). The released latent model uses
  non-affine LayerNorm (eps 1e-6) and a tanh-GELU MLP of ratio 4.
  """
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  window_size: Optional[int] = None
  ln_affine: bool = False
  ln_eps: float = 1e-6
  act: str = "gelu_tanh"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    b, h, w, d = x.shape
    win = resolve_window(self.window_size, h, w)
    ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, use_scale=self.ln_affine, use_bias=self.ln_affine,
                                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = window_partition(ln("norm1")(x), win)
    y = TMSA(self.dim, self.num_heads, win, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(y, c)
    x = x + window_reverse(y, win, h, w)
    y = Mlp(int(self.dim * self.mlp_ratio), act=self.act, dtype=self.dtype, param_dtype=self.param_dtype,
            name="mlp")(ln("norm2")(x))
    return x + y


class DiffiTResBlock(nn.Module):
  """Image-space DiffiT ResBlock: x = DiffiTBlock(Conv3x3(Swish(GN(x))), x_t) + x (DiffiT Eq. 9-10).

  When the channel count changes (first block of a stage), the residual goes through a 1x1 conv (`skip`);
  the paper leaves this open.
  """
  channels: int
  num_heads: int
  mlp_ratio: float
  window_size: int
  gn_groups: int = 32
  ln_affine: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    groups = min(self.gn_groups, x.shape[-1])
    if x.shape[-1] % groups:
      raise ValueError(f"gn_groups={self.gn_groups} does not divide {x.shape[-1]} channels; change "
                       "config.model.gn_groups.")
    h = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(x)
    h = nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, param_dtype=self.param_dtype,
                name="conv")(nn.silu(h))
    h = DiffiTBlock(self.channels, self.num_heads, self.mlp_ratio, self.window_size, ln_affine=self.ln_affine,
                    ln_eps=1e-6, act="gelu_tanh", dtype=self.dtype, param_dtype=self.param_dtype,
                    name="block")(h, c)
    skip = x
    if x.shape[-1] != self.channels:
      skip = nn.Conv(self.channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="skip")(x)
    return h + skip


@MODELS.register("diffit_image")
class DiffiTImage(nn.Module):
  """Image-space U-shaped hybrid DiffiT (DiffiT Fig. 4, App. H.1, I.1).

  Encoder: Conv3x3 tokenizer -> per stage `num_blocks[i]` DiffiT ResBlocks at `channels[i]`, a skip saved at
  the end of every non-bottleneck stage, then a downsampler (stride-2 Conv3x3, or bilinear resize + Conv3x3).
  The last stage is the bottleneck. Decoder (symmetric): upsampler (nearest/bilinear x2 + Conv3x3), skip merge
  (`concat` then the stage's first ResBlock's 1x1 projection, or `add` with a 1x1 projection of the skip), the
  stage's ResBlocks; head GN -> Swish -> Conv3x3 (zero-initialised, as EDM's output conv).

  Defaults follow App. I.1 (CIFAR-10: 3 stages x 2 blocks, channels 128/256/256, window 4; the FFHQ-64 config
  uses 4 stages with 1/2/2/2 blocks, window 8; App. H.1's 4-per-stage is a config away). Choices the paper
  leaves open, with our defaults: num_heads=4, mlp_ratio=4, gn_groups=32, skip_merge='concat', affine LN in
  the transformer blocks. The time token (dim `time_embed_dim`=512, Table 3) is a positional embedding of the
  noise condition through Dense -> Swish -> Dense, shared by every block; a class label (num_classes > 0)
  embedding is added to it (as in the latent model).

  __call__(x [B, H, W, C], t [B] noise condition (EDM c_noise), y [B] int labels or None (null = num_classes))
  -> [B, H, W, out_channels].
  """
  out_channels: int = 3
  channels: Sequence[int] = (128, 256, 256)
  num_blocks: Sequence[int] = (2, 2, 2)
  num_heads: int = 4
  mlp_ratio: float = 4.0
  window_size: int = 4
  gn_groups: int = 32
  time_embed_dim: int = 512
  time_freq_dim: int = 128
  num_classes: int = 0
  skip_merge: str = "concat"
  resample: str = "conv"
  ln_affine: bool = True
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  @nn.compact
  @attn_lib.scoped
  def __call__(self, x, t, y=None):
    check_choice("skip_merge", self.skip_merge, ("concat", "add"))
    check_choice("resample", self.resample, ("conv", "resize"))
    if len(self.channels) != len(self.num_blocks):
      raise ValueError(f"config.model.channels {tuple(self.channels)} and num_blocks {tuple(self.num_blocks)} "
                       "must have one entry per stage.")
    dtype, pdt = to_dtype(self.dtype), to_dtype(self.param_dtype)
    n_stages = len(self.channels)
    if x.shape[1] % (2 ** (n_stages - 1)) or x.shape[2] % (2 ** (n_stages - 1)):
      raise ValueError(f"Image size {x.shape[1:3]} is not divisible by 2^{n_stages - 1} for {n_stages} stages.")
    conv = lambda f, k, name, s=1, **kw: nn.Conv(f, (k, k), strides=(s, s), padding=k // 2, dtype=dtype,
                                                 param_dtype=pdt, name=name, **kw)
    c = TimestepEmbedder(self.time_embed_dim, self.time_freq_dim, act="silu", dtype=dtype, param_dtype=pdt,
                         name="t_embedder")(t)
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      c = c + LabelEmbedder(self.num_classes, self.time_embed_dim, dtype=dtype, param_dtype=pdt,
                            name="y_embedder")(y)
    Res = maybe_remat(DiffiTResBlock, self.remat)
    res = lambda ch, name: Res(ch, self.num_heads, self.mlp_ratio, self.window_size, self.gn_groups,
                               self.ln_affine, dtype=dtype, param_dtype=pdt, name=name)

    h = conv(self.channels[0], 3, "tokenizer")(x.astype(dtype))
    skips = []
    for i, (ch, nb) in enumerate(zip(self.channels, self.num_blocks)):
      for j in range(nb):
        h = res(ch, f"enc_{i}_{j}")(h, c)
      if i < n_stages - 1:
        skips.append(h)
        if self.resample == "conv":
          h = conv(h.shape[-1], 3, f"down_{i}", s=2)(h)
        else:
          b, hh, ww, cc = h.shape
          h = conv(cc, 3, f"down_{i}")(jax.image.resize(h, (b, hh // 2, ww // 2, cc), "bilinear"))
    for i in reversed(range(n_stages - 1)):
      b, hh, ww, cc = h.shape
      method = "nearest" if self.resample == "conv" else "bilinear"
      h = conv(cc, 3, f"up_{i}")(jax.image.resize(h, (b, 2 * hh, 2 * ww, cc), method))
      s = skips.pop()
      if self.skip_merge == "concat":
        h = jnp.concatenate([h, s], axis=-1)
      else:
        if s.shape[-1] != cc:
          s = conv(cc, 1, f"skip_proj_{i}")(s)
        h = h + s
      for j in range(self.num_blocks[i]):
        h = res(self.channels[i], f"dec_{i}_{j}")(h, c)
    groups = min(self.gn_groups, h.shape[-1])
    h = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, param_dtype=pdt, name="head_norm")(h)
    h = conv(self.out_channels, 3, "head_conv", kernel_init=nn.initializers.zeros)(nn.silu(h))
    return h.astype(jnp.float32)


class FinalLayer(nn.Module):
  """Latent DiffiT head: LN (no affine, eps 1e-6) -> SiLU -> zero-initialised Linear(D -> p*p*C_out)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=self.dtype, name="norm_final")(x)
    return nn.Dense(self.features, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="linear")(nn.silu(x))


@MODELS.register("diffit_latent")
class DiffiTLatent(nn.Module):
  """Latent DiffiT (DiffiT §3.2 "Latent Space", Fig. 3; released `diffit/diffit.py`).

  Patch embed (stride-p conv) + fixed 2-D sin-cos position embedding (not a parameter); c = t_emb + y_emb (label
  table with a null row) is the time token of every block's TMSA; `depth` DiffiT blocks with a global window
  (window = input_size / patch, full-grid relative position bias), non-affine LN eps 1e-6, tanh-GELU MLP x4;
  head LN -> SiLU -> zero-init Dense(p*p*C_out); C_out = 2C with learned sigma. Xavier-uniform Linear init.
  Defaults: DiffiT-XL/2 at 256 px (latent 32x32x4), depth 28 (561.0M params; the paper text's 30 gives ~601M).
  Works on pixels too (in_channels=3), which the shapes ablation uses.

  __call__(x [B, H, W, C], t [B], y [B] or None) -> [B, H, W, C_out].
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
  window_size: Optional[int] = None
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit
  # True: the blocks as one nn.scan (params "blocks/block/..." stacked on a depth axis; convert with
  # models.dit.scan_block_params / unscan_block_params): one block compiled instead of `depth`.
  scan_blocks: bool = False

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @nn.compact
  @attn_lib.scoped
  def __call__(self, x, t, y=None):
    dtype, pdt = to_dtype(self.dtype), to_dtype(self.param_dtype)
    b, hh, ww, cin = x.shape
    p = self.patch_size
    if hh != self.input_size or ww != self.input_size or cin != self.in_channels:
      raise ValueError(f"{type(self).__name__} built for {self.input_size}x{self.input_size}x{self.in_channels} "
                       f"inputs, got {hh}x{ww}x{cin}; set config.model.input_size / in_channels.")
    gh = gw = self.input_size // p
    h = patchify_conv(self.hidden_size, p, dtype, pdt)(x.astype(dtype))       # [B, gh, gw, D]
    pos = get_2d_sincos_pos_embed(self.hidden_size, gh).reshape(1, gh, gw, self.hidden_size)
    h = h + jnp.asarray(pos, dtype)
    c = TimestepEmbedder(self.hidden_size, 256, dtype=dtype, param_dtype=pdt, name="t_embedder")(t)
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((b,), self.num_classes, jnp.int32)
      c = c + LabelEmbedder(self.num_classes, self.hidden_size, dtype=dtype, param_dtype=pdt,
                            name="y_embedder")(y)
    Block = maybe_remat(DiffiTBlock, self.remat)
    block_args = (self.hidden_size, self.num_heads, self.mlp_ratio, self.window_size)
    block_kw = dict(ln_affine=False, ln_eps=1e-6, act="gelu_tanh", dtype=dtype, param_dtype=pdt)
    if self.scan_blocks:
      from diffusion_jax.models.dit import scanned_blocks  # dit imports this module
      h, _ = scanned_blocks(Block, self.depth, block_args, block_kw)(h, c)
    else:
      for i in range(self.depth):
        h = Block(*block_args, **block_kw, name=f"blocks_{i}")(h, c)
    h = FinalLayer(p * p * self.out_channels, dtype=dtype, param_dtype=pdt, name="final_layer")(h)
    h = unpatchify(h.reshape(b, gh * gw, -1), p, self.out_channels, gh, gw)
    return h.astype(jnp.float32)


def diffit_xl2(**kw) -> DiffiTLatent:
  """The released DiffiT-XL/2 constructor (depth 28, width 1152, patch 2, 16 heads)."""
  return DiffiTLatent(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kw)
