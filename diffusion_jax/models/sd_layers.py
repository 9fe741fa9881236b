"""Stable Diffusion building blocks in Flax linen, following diffusers' conventions.

Shared by `unet.py` (UNet2DConditionModel), `controlnet.py` and `vae.py` (AutoencoderKL). Activations
are NHWC (diffusers/PyTorch is NCHW); parameter names mirror diffusers' module names with list indices
joined by "_" (`down_blocks.0.resnets.1.conv1.weight` <-> `down_blocks_0/resnets_1/conv1/kernel`), so
the weight mapping in `pretrained/diffusers_io.py` is mechanical.

Facts implemented (diffusers `resnet.py`, `attention.py`, `transformer_2d.py`, `unet_2d_blocks.py`,
`embeddings.py`):
* timestep embedding: sinusoidal, `half = dim // 2`, frequencies `exp(-ln(10000) * i / (half - freq_shift))`,
  `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`), then Linear -> SiLU -> Linear (`TimestepEmbedding`);
* ResnetBlock2D: GN -> SiLU -> conv3x3 -> (+ Linear(SiLU(temb))) -> GN -> SiLU -> conv3x3, 1x1 conv shortcut
  when channels change, `(x + h) / output_scale_factor`;
* Transformer2DModel: GN (eps 1e-6) -> proj_in (1x1 conv, SD 1.x; Linear with `use_linear_projection`,
  SD 2.x) -> BasicTransformerBlocks (LN -> self-attn, LN -> cross-attn, LN -> GEGLU feed-forward, each
  residual) -> proj_out -> + input;
* Downsample2D: conv3x3 stride 2 (padding 1; padding 0 means an asymmetric (0, 1, 0, 1) zero pad first,
  as in the VAE encoder); Upsample2D: nearest x2 (or to a given size) then conv3x3.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attn_lib

Dtype = Any


def maybe_remat(module_cls, remat: str):
  """`nn.remat(module_cls)` with the policy named by `config.remat` ('none' | 'full' | 'dots' | ...)."""
  from diffusion_jax.models.layers import maybe_remat as _maybe_remat
  return module_cls if remat == "none" else _maybe_remat(module_cls, remat)


def get_timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                           freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, diffusers `get_timestep_embedding`."""
  timesteps = jnp.asarray(timesteps, jnp.float32)
  if timesteps.ndim == 0:
    timesteps = timesteps[None]
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = timesteps[:, None] * jnp.exp(exponent)[None, :] * scale
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _gn(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int = 3, stride: int = 1, padding: int = 1, dtype: Dtype = jnp.float32,
          name: Optional[str] = None, zero_init: bool = False) -> nn.Conv:
  kw = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros) if zero_init else {}
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), dtype=dtype, name=name, **kw)


class TimestepEmbedding(nn.Module):
  """Linear -> SiLU -> Linear on the sinusoidal projection (diffusers `TimestepEmbedding`)."""
  time_embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_emb):
    h = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(t_emb)
    h = nn.silu(h)
    return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(h)


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (time_embedding_norm="default"); `temb=None` for the VAE variant."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  use_temb: bool = True
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    h = nn.silu(_gn(self.groups, self.eps, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
    if self.use_temb:
      if temb is None:
        raise ValueError("ResnetBlock2D built with a time embedding projection needs `temb`.")
      t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(_gn(self.groups, self.eps, self.dtype, "norm2")(h))
    h = _conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, kernel=1, padding=0, dtype=self.dtype, name="conv_shortcut")(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


def attention(q, k, v, heads: int, upcast: bool, dtype: Dtype, implementation: Optional[str] = None):
  """Multi-head scaled dot-product attention on (B, T, heads*dh) tensors (`models/attention.py`; scores and
  softmax are float32 in every implementation). `upcast` also runs the QK and PV products in float32
  (diffusers `upcast_attention` / `upcast_softmax`)."""
  if upcast:
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  out = attn_lib.multihead(q, k, v, heads, implementation=implementation)
  return out.astype(dtype)


class Attention(nn.Module):
  """diffusers `Attention` as used by BasicTransformerBlock: to_q/to_k/to_v (no bias), to_out.0 (bias)."""
  heads: int
  dim_head: int
  out_dim: int
  qkv_bias: bool = False
  upcast: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = self.heads * self.dim_head
    q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
    k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context)
    v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context)
    h = attention(q, k, v, self.heads, self.upcast, self.dtype)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="to_out_0")(h)


class GEGLU(nn.Module):
  """Linear to 2*inner, split into (hidden, gate), hidden * GELU(gate) (exact erf GELU), diffusers `GEGLU`."""
  inner_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net.0 = GEGLU(dim -> 4*dim), net.2 = Linear(4*dim -> dim)."""
  dim: int
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """LN -> self-attention, LN -> cross-attention, LN -> GEGLU FF; each with a residual (LN eps 1e-5)."""
  dim: int
  heads: int
  dim_head: int
  upcast_attention: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)
    x = x + Attention(self.heads, self.dim_head, self.dim, upcast=self.upcast_attention, dtype=self.dtype,
                      name="attn1")(ln("norm1")(x))
    x = x + Attention(self.heads, self.dim_head, self.dim, upcast=self.upcast_attention, dtype=self.dtype,
                      name="attn2")(ln("norm2")(x), context)
    x = x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x))
    return x


class Transformer2DModel(nn.Module):
  """Spatial transformer of SD: GN(eps 1e-6), proj_in, `num_layers` BasicTransformerBlocks, proj_out, residual.

  `heads` attention heads of width `channels // heads` (diffusers passes `num_attention_heads` and
  `out_channels // num_attention_heads`). `use_linear_projection` selects Linear (SD 2.x) instead of a 1x1
  conv (SD 1.x) for proj_in/proj_out."""
  heads: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  upcast_attention: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, hh, ww, c = x.shape
    dim_head = c // self.heads
    inner = self.heads * dim_head
    residual = x
    h = _gn(self.groups, 1e-6, self.dtype, "norm")(x)
    if self.use_linear_projection:
      h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hh * ww, c))
    else:
      h = _conv(inner, kernel=1, padding=0, dtype=self.dtype, name="proj_in")(h).reshape(b, hh * ww, inner)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(inner, self.heads, dim_head, self.upcast_attention, dtype=self.dtype,
                                name=f"transformer_blocks_{i}")(h, context)
    if self.use_linear_projection:
      h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hh, ww, c)
    else:
      h = _conv(c, kernel=1, padding=0, dtype=self.dtype, name="proj_out")(h.reshape(b, hh, ww, inner))
    return h + residual


class Downsample2D(nn.Module):
  """conv3x3 stride 2; `padding=0` pads (0, 1, 0, 1) (right/bottom) first, as diffusers does."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.out_channels, stride=2, padding=self.padding, dtype=self.dtype, name="conv")(x)


def upsample_nearest(x, size: Optional[Tuple[int, int]] = None):
  """Nearest-neighbour upsampling x2, or to `size` (torch `interpolate(mode="nearest")` index rule)."""
  b, h, w, c = x.shape
  if size is None or tuple(size) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  oh, ow = size
  ih = jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32)
  iw = jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32)
  return x[:, ih][:, :, iw]


class Upsample2D(nn.Module):
  """Nearest x2 (or to `size`) then conv3x3 padding 1."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size: Optional[Tuple[int, int]] = None):
    x = upsample_nearest(x, size)
    return _conv(self.out_channels, dtype=self.dtype, name="conv")(x)


class CrossAttnDownBlock2D(nn.Module):
  """`num_layers` x (ResnetBlock2D, Transformer2DModel), optional Downsample2D; returns (h, skip states)."""
  out_channels: int
  num_layers: int
  heads: int
  transformer_layers: Sequence[int] = (1,)
  add_downsample: bool = True
  groups: int = 32
  eps: float = 1e-5
  downsample_padding: int = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    Res = maybe_remat(ResnetBlock2D, self.remat)
    Tr = maybe_remat(Transformer2DModel, self.remat)
    states = []
    for i in range(self.num_layers):
      x = Res(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
      x = Tr(self.heads, self.transformer_layers[i], self.groups, self.use_linear_projection,
             self.upcast_attention, dtype=self.dtype, name=f"attentions_{i}")(x, context)
      states.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype, name="downsamplers_0")(x)
      states.append(x)
    return x, tuple(states)


class DownBlock2D(nn.Module):
  """`num_layers` ResnetBlock2D (with temb), optional Downsample2D."""
  out_channels: int
  num_layers: int
  add_downsample: bool = True
  groups: int = 32
  eps: float = 1e-5
  downsample_padding: int = 1
  remat: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context=None):
    Res = maybe_remat(ResnetBlock2D, self.remat)
    states = []
    for i in range(self.num_layers):
      x = Res(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
      states.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype, name="downsamplers_0")(x)
      states.append(x)
    return x, tuple(states)


class UNetMidBlock2DCrossAttn(nn.Module):
  """ResnetBlock2D, then `num_layers` x (Transformer2DModel, ResnetBlock2D)."""
  heads: int
  num_layers: int = 1
  transformer_layers: int = 1
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  use_linear_projection: bool = False
  upcast_attention: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    Res = maybe_remat(ResnetBlock2D, self.remat)
    Tr = maybe_remat(Transformer2DModel, self.remat)
    c = x.shape[-1]
    x = Res(c, self.groups, self.eps, output_scale_factor=self.output_scale_factor, dtype=self.dtype,
            name="resnets_0")(x, temb)
    for i in range(self.num_layers):
      x = Tr(self.heads, self.transformer_layers, self.groups, self.use_linear_projection,
             self.upcast_attention, dtype=self.dtype, name=f"attentions_{i}")(x, context)
      x = Res(c, self.groups, self.eps, output_scale_factor=self.output_scale_factor,
              dtype=self.dtype, name=f"resnets_{i + 1}")(x, temb)
    return x


class CrossAttnUpBlock2D(nn.Module):
  """`num_layers` x (concat skip on channels, ResnetBlock2D, Transformer2DModel), optional Upsample2D.

  Skips are consumed from the end of `skips` (diffusers pops `res_hidden_states_tuple[-1]`)."""
  out_channels: int
  num_layers: int
  heads: int
  transformer_layers: Sequence[int] = (1,)
  add_upsample: bool = True
  groups: int = 32
  eps: float = 1e-5
  use_linear_projection: bool = False
  upcast_attention: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size=None):
    Res = maybe_remat(ResnetBlock2D, self.remat)
    Tr = maybe_remat(Transformer2DModel, self.remat)
    skips = list(skips)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = Res(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
      x = Tr(self.heads, self.transformer_layers[i], self.groups, self.use_linear_projection,
             self.upcast_attention, dtype=self.dtype, name=f"attentions_{i}")(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
    return x


class UpBlock2D(nn.Module):
  """`num_layers` x (concat skip, ResnetBlock2D), optional Upsample2D."""
  out_channels: int
  num_layers: int
  add_upsample: bool = True
  groups: int = 32
  eps: float = 1e-5
  remat: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips, temb, context=None, upsample_size=None):
    Res = maybe_remat(ResnetBlock2D, self.remat)
    skips = list(skips)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = Res(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
    return x
