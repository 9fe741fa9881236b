"""Flax AutoencoderKL (the Stable Diffusion VAE), diffusers layout, NHWC.

Encoder: conv_in -> DownEncoderBlock2D x n (ResnetBlock2D without time embedding, GN eps 1e-6; Downsample2D with
asymmetric (0, 1, 0, 1) padding, except the last block) -> mid block (resnet, single-head self-attention with GN
and residual, resnet) -> GN -> SiLU -> conv_out to 2 * latent_channels (mean, logvar). quant_conv (1x1) maps the
moments; the posterior is a diagonal Gaussian with logvar clipped to [-30, 20].
Decoder: post_quant_conv (1x1) -> conv_in -> mid block -> UpDecoderBlock2D x n (layers_per_block + 1 resnets,
nearest x2 + conv, except the last) -> GN -> SiLU -> conv_out.
Latents for the diffusion model are `z * scaling_factor` (0.18215 for SD 1.x/2.x; `shift_factor` subtracted first
when set).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attn_lib
from diffusion_jax.models import sd_layers as L
from diffusion_jax.models.unet import config_from_dict, config_to_dict, count_params  # noqa: F401
from diffusion_jax.models import MODELS
from diffusion_jax.registry import Registry, check_choice


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """AutoencoderKL hyper-parameters (diffusers config names and defaults)."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: Tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True

  def __post_init__(self):
    for t in self.down_block_types:
      check_choice("VAE down block type", t, ("DownEncoderBlock2D",))
    for t in self.up_block_types:
      check_choice("VAE up block type", t, ("UpDecoderBlock2D",))
    check_choice("VAE act_fn", self.act_fn, ("silu",))
    if not (len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels)):
      raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length.")

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any]) -> "VAEConfig":
    for k in ("latents_mean", "latents_std"):
      if d.get(k) is not None:
        raise ValueError(f"AutoencoderKL config key {k} is not supported by this port.")
    return config_from_dict(cls, d, "AutoencoderKL")

  def to_diffusers(self) -> Dict[str, Any]:
    return config_to_dict(self, "AutoencoderKL")


def vae_config_from_diffusers(d: Mapping[str, Any]) -> VAEConfig:
  """diffusers `vae/config.json` dict -> VAEConfig."""
  return VAEConfig.from_diffusers(d)


def sd_vae_config() -> VAEConfig:
  """The SD 1.x/2.x VAE (KL-f8, 4 latent channels), 83.65M parameters."""
  return VAEConfig(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)


def tiny_vae_config(**overrides) -> VAEConfig:
  """A small VAE for tests and CPU experiments (downsampling x2, 32/64 channels)."""
  kw = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16)
  kw.update(overrides)
  return VAEConfig(**kw)


VAE_CONFIGS = Registry("SD VAE config preset")
VAE_CONFIGS.register("sd")(sd_vae_config)
VAE_CONFIGS.register("tiny")(tiny_vae_config)


def resolve_vae_config(c) -> VAEConfig:
  return VAE_CONFIGS.get(c)() if isinstance(c, str) else c


class DiagonalGaussian:
  """Posterior N(mean, exp(logvar)) from the moments (last axis: [mean, logvar]); logvar clipped to [-30, 20]."""

  def __init__(self, moments: jax.Array):
    self.mean, logvar = jnp.split(moments, 2, axis=-1)
    self.logvar = jnp.clip(logvar, -30.0, 20.0)
    self.std = jnp.exp(0.5 * self.logvar)
    self.var = jnp.exp(self.logvar)

  def sample(self, rng) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL to N(0, I), summed over (H, W, C)."""
    return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class VAEAttention(nn.Module):
  """Single-head self-attention over pixels: GN -> to_q/k/v (with bias) -> attention -> to_out.0 -> + x.
  Computed in float32 (diffusers sets upcast_softmax for this block)."""
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = L._gn(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, h * w, c)
    q = nn.Dense(c, dtype=self.dtype, name="to_q")(y)
    k = nn.Dense(c, dtype=self.dtype, name="to_k")(y)
    v = nn.Dense(c, dtype=self.dtype, name="to_v")(y)
    o = L.attention(q, k, v, 1, True, self.dtype)
    o = nn.Dense(c, dtype=self.dtype, name="to_out_0")(o)
    return x + o.reshape(b, h, w, c)


class VAEMidBlock(nn.Module):
  """diffusers `UNetMidBlock2D` without time embedding: resnet, [attention], resnet."""
  groups: int = 32
  add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = L.ResnetBlock2D(c, self.groups, 1e-6, use_temb=False, dtype=self.dtype, name="resnets_0")(x)
    if self.add_attention:
      x = VAEAttention(self.groups, 1e-6, dtype=self.dtype, name="attentions_0")(x)
    return L.ResnetBlock2D(c, self.groups, 1e-6, use_temb=False, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock2D(nn.Module):
  """`num_layers` resnets (no temb, GN eps 1e-6) then, unless last, Downsample2D with (0, 1, 0, 1) padding."""
  out_channels: int
  num_layers: int
  groups: int
  add_downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = L.ResnetBlock2D(self.out_channels, self.groups, 1e-6, use_temb=False, dtype=self.dtype,
                          name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = L.Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """`num_layers` resnets (no temb) then, unless last, nearest x2 + conv."""
  out_channels: int
  num_layers: int
  groups: int
  add_upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = L.ResnetBlock2D(self.out_channels, self.groups, 1e-6, use_temb=False, dtype=self.dtype,
                          name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = L.Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Image (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels), f = 2^(levels - 1)."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, g = self.config, self.config.norm_num_groups
    x = L._conv(cfg.block_out_channels[0], dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    n = len(cfg.block_out_channels)
    for i, c in enumerate(cfg.block_out_channels):
      x = DownEncoderBlock2D(c, cfg.layers_per_block, g, i != n - 1, dtype=self.dtype, name=f"down_blocks_{i}")(x)
    x = VAEMidBlock(g, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
    x = nn.silu(L._gn(g, 1e-6, self.dtype, "conv_norm_out")(x))
    return L._conv(2 * cfg.latent_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
  """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg, g = self.config, self.config.norm_num_groups
    rev = list(reversed(cfg.block_out_channels))
    x = L._conv(rev[0], dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    x = VAEMidBlock(g, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
    for i, c in enumerate(rev):
      x = UpDecoderBlock2D(c, cfg.layers_per_block + 1, g, i != len(rev) - 1, dtype=self.dtype,
                           name=f"up_blocks_{i}")(x)
    x = nn.silu(L._gn(g, 1e-6, self.dtype, "conv_norm_out")(x))
    return L._conv(cfg.out_channels, dtype=self.dtype, name="conv_out")(x)


@MODELS.register("sd_vae")
class AutoencoderKL(nn.Module):
  """SD VAE. `model.apply({"params": p}, x, method="encode")` -> moments (B, h, w, 2*latent_channels) (wrap with
  `DiagonalGaussian`); `method="decode"` maps latents back to images. `__call__(x, rng=None)` reconstructs
  (posterior sample with `rng`, else its mode). Images are NHWC in [-1, 1]. `config`: a VAEConfig or a preset
  name ("sd", "tiny")."""
  config: Any
  dtype: Any = jnp.float32
  remat: str = "none"  # accepted for build_model; the VAE is used frozen, so it is not rematerialised
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  def setup(self):
    cfg = self.cfg = resolve_vae_config(self.config)
    dtype = jnp.dtype(self.dtype)
    self.encoder = Encoder(cfg, dtype=dtype)
    self.decoder = Decoder(cfg, dtype=dtype)
    if cfg.use_quant_conv:
      self.quant_conv = L._conv(2 * cfg.latent_channels, kernel=1, padding=0, dtype=dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = L._conv(cfg.latent_channels, kernel=1, padding=0, dtype=dtype)

  @attn_lib.scoped
  def encode(self, x):
    """Moments [mean, logvar] of the posterior (before clipping)."""
    h = self.encoder(x)
    return self.quant_conv(h) if self.cfg.use_quant_conv else h

  @attn_lib.scoped
  def decode(self, z):
    if self.cfg.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z)

  @attn_lib.scoped
  def __call__(self, x, rng=None):
    post = DiagonalGaussian(self.encode(x))
    z = post.sample(rng) if rng is not None else post.mode()
    return self.decode(z)


def _init(rng, config: VAEConfig, sample_hw):
  return AutoencoderKL(config).init(rng, jnp.zeros((1, *sample_hw, config.in_channels)))["params"]


def init_vae(rng, config: VAEConfig, sample_hw: Tuple[int, int] = (16, 16)):
  """Random params (jitted init)."""
  config = resolve_vae_config(config)
  return jax.jit(lambda r: _init(r, config, sample_hw))(rng)


def abstract_vae_params(config: VAEConfig):
  """Shape/dtype tree of the params via `jax.eval_shape`."""
  config = resolve_vae_config(config)
  return jax.eval_shape(lambda r: _init(r, config, (16, 16)), jax.random.PRNGKey(0))


def encode_to_latents(params, config: VAEConfig, images, rng=None, dtype=jnp.float32):
  """Images NHWC in [-1, 1] -> diffusion latents `(z - shift) * scaling_factor` (sample with `rng`, else mode)."""
  config = resolve_vae_config(config)
  post = DiagonalGaussian(AutoencoderKL(config, dtype=dtype).apply({"params": params}, images, method="encode"))
  z = post.sample(rng) if rng is not None else post.mode()
  if config.shift_factor is not None:
    z = z - config.shift_factor
  return z * config.scaling_factor


def decode_latents(params, config: VAEConfig, latents, dtype=jnp.float32):
  """Diffusion latents -> images NHWC (roughly [-1, 1]); inverts `encode_to_latents`' scaling."""
  config = resolve_vae_config(config)
  z = latents / config.scaling_factor
  if config.shift_factor is not None:
    z = z + config.shift_factor
  return AutoencoderKL(config, dtype=dtype).apply({"params": params}, z, method="decode")
