"""Flax ControlNet (diffusers `ControlNetModel` layout, NHWC) for CoDi and Prompt Diffusion.

Facts implemented (CoDi A3 "Released ControlNet"; Prompt Diffusion B2; diffusers `controlnet.py`):
* a trainable copy of the UNet encoder: conv_in, time_embedding, down_blocks, mid_block;
* the condition image goes through `controlnet_cond_embedding`: conv_in (-> 16) + SiLU, then per pair of
  widths (c_in, c_out) in (16, 32, 96, 256): conv3x3 c_in->c_in + SiLU, conv3x3 stride 2 c_in->c_out + SiLU,
  then a **zero-initialised** conv_out to block_out_channels[0]; the result is added to conv_in(sample);
* every skip (conv_in output + each down-block state) passes through a zero-initialised 1x1 conv
  (`controlnet_down_blocks`), the mid output through `controlnet_mid_block`; all are multiplied by
  `conditioning_scale` (or by logspace(-1, 0) scales in guess mode) and handed to the UNet;
* `init_controlnet_from_unet` copies conv_in, time_embedding, (class_embedding,) down_blocks and mid_block from
  UNet params (diffusers `ControlNetModel.from_unet`), so at step 0 the residuals are exactly zero.
* Prompt Diffusion (B2): with `query_conditioning_channels` set, a second embedding
  `controlnet_query_cond_embedding` (same structure) embeds the query image; both embeddings are summed with
  conv_in(sample) (the example pair goes in `controlnet_cond`, 6 channels = source then target).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attn_lib
from diffusion_jax.models import sd_layers as L
from diffusion_jax.models import MODELS
from diffusion_jax.models.unet import (BlockConfigMixin, UNetConfig, build_down_blocks, build_embedding,
                                       build_mid_block, config_from_dict, config_to_dict, tiny_unet_config)
from diffusion_jax.registry import Registry, check_choice


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(BlockConfigMixin):
  """ControlNetModel hyper-parameters (diffusers config names and defaults)."""
  in_channels: int = 4
  conditioning_channels: int = 3
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "DownBlock2D")
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: Union[int, Tuple[int, ...]] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: Union[int, Tuple[int, ...]] = 1
  attention_head_dim: Union[int, Tuple[int, ...]] = 8
  num_attention_heads: Optional[Union[int, Tuple[int, ...]]] = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  num_class_embeds: Optional[int] = None
  controlnet_conditioning_channel_order: str = "rgb"
  conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
  global_pool_conditions: bool = False
  # Prompt Diffusion: channels of the query image (second hint encoder); None = plain ControlNet.
  query_conditioning_channels: Optional[int] = None

  def __post_init__(self):
    self.check_blocks()
    check_choice("controlnet_conditioning_channel_order", self.controlnet_conditioning_channel_order,
                 ("rgb", "bgr"))
    if self.mid_block_type is None:
      raise ValueError("ControlNet needs mid_block_type='UNetMidBlock2DCrossAttn'.")

  @property
  def num_residuals(self) -> int:
    n = len(self.block_out_channels)
    return 1 + sum(self.layers) + (n - 1)

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any]) -> "ControlNetConfig":
    return config_from_dict(cls, d, "ControlNetModel")

  def to_diffusers(self) -> Dict[str, Any]:
    out = config_to_dict(self, "ControlNetModel")
    if self.query_conditioning_channels is None:
      out.pop("query_conditioning_channels")
    else:
      out["_class_name"] = "PromptDiffusionControlNetModel"
    return out


def controlnet_config_from_diffusers(d: Mapping[str, Any]) -> ControlNetConfig:
  """diffusers `controlnet/config.json` dict -> ControlNetConfig."""
  return ControlNetConfig.from_diffusers(d)


def controlnet_config_from_unet(unet: UNetConfig, **overrides) -> ControlNetConfig:
  """The ControlNet matching a UNet (diffusers `ControlNetModel.from_unet`); `overrides` e.g.
  conditioning_channels=6, query_conditioning_channels=3 for Prompt Diffusion."""
  names = {f.name for f in dataclasses.fields(ControlNetConfig)}
  kw = {k: v for k, v in dataclasses.asdict(unet).items() if k in names}
  kw.update(overrides)
  return ControlNetConfig(**kw)


def sd15_controlnet_config(**overrides) -> ControlNetConfig:
  """SD-1.5 ControlNet (lllyasviel/sd-controlnet-*), 361.3M parameters."""
  kw = dict(cross_attention_dim=768, attention_head_dim=8)
  kw.update(overrides)
  return ControlNetConfig(**kw)


def tiny_controlnet_config(**overrides) -> ControlNetConfig:
  """The ControlNet of `tiny_unet_config()` (conditioning at 8x the latent size, as in SD)."""
  return controlnet_config_from_unet(tiny_unet_config(), **overrides)


CONTROLNET_CONFIGS = Registry("SD ControlNet config preset")
CONTROLNET_CONFIGS.register("sd15")(sd15_controlnet_config)
CONTROLNET_CONFIGS.register("tiny")(tiny_controlnet_config)


def resolve_controlnet_config(c: Union[ControlNetConfig, str]) -> ControlNetConfig:
  return CONTROLNET_CONFIGS.get(c)() if isinstance(c, str) else c


class ControlNetConditioningEmbedding(nn.Module):
  """Small CNN from the condition image (full resolution) to latent resolution, zero-initialised output
  (`zero_out=False`: a random output conv, as CoDi's condition embedding uses it)."""
  out_channels: int
  block_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
  dtype: Any = jnp.float32
  zero_out: bool = True

  @nn.compact
  def __call__(self, x):
    ch = self.block_out_channels
    x = nn.silu(L._conv(ch[0], dtype=self.dtype, name="conv_in")(x.astype(self.dtype)))
    for i in range(len(ch) - 1):
      x = nn.silu(L._conv(ch[i], dtype=self.dtype, name=f"blocks_{2 * i}")(x))
      x = nn.silu(L._conv(ch[i + 1], stride=2, dtype=self.dtype, name=f"blocks_{2 * i + 1}")(x))
    return L._conv(self.out_channels, dtype=self.dtype, name="conv_out", zero_init=self.zero_out)(x)


@MODELS.register("sd_controlnet")
class ControlNetModel(nn.Module):
  """Returns `(down_block_residuals, mid_block_residual)` for `UNet2DConditionModel`.

  Inputs NHWC: `sample` (B, h, w, in_channels) latents, `controlnet_cond` (B, h*8, w*8, conditioning_channels)
  for the default 3-stride embedding, `encoder_hidden_states` (B, T, cross_attention_dim).
  `config`: a ControlNetConfig or a preset name ("sd15", "tiny"); `remat` as in UNet2DConditionModel."""
  config: Union[ControlNetConfig, str]
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  @nn.compact
  @attn_lib.scoped
  def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
               class_labels=None, guess_mode: bool = False, controlnet_query_cond=None):
    cfg, dtype = resolve_controlnet_config(self.config), jnp.dtype(self.dtype)
    if controlnet_cond.shape[-1] != cfg.conditioning_channels:
      raise ValueError(f"controlnet_cond has {controlnet_cond.shape[-1]} channels (NHWC expected); this ControlNet "
                       f"takes conditioning_channels={cfg.conditioning_channels}.")
    if cfg.controlnet_conditioning_channel_order == "bgr":
      controlnet_cond = controlnet_cond[..., ::-1]
    b = sample.shape[0]
    emb = build_embedding(cfg, dtype, timesteps, class_labels, b)
    ctx = encoder_hidden_states.astype(dtype)
    x = L._conv(cfg.block_out_channels[0], dtype=dtype, name="conv_in")(sample.astype(dtype))
    cond = ControlNetConditioningEmbedding(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                           dtype=dtype, name="controlnet_cond_embedding")(controlnet_cond)
    if cond.shape[1:3] != x.shape[1:3]:
      raise ValueError(f"controlnet_cond embeds to spatial size {cond.shape[1:3]} but the latents are "
                       f"{x.shape[1:3]}; give the condition at {2 ** (len(cfg.conditioning_embedding_out_channels) - 1)}x "
                       "the latent resolution.")
    x = x + cond
    if cfg.query_conditioning_channels is not None:
      if controlnet_query_cond is None:
        raise ValueError("This ControlNet has query_conditioning_channels set (Prompt Diffusion); pass "
                         "controlnet_query_cond.")
      x = x + ControlNetConditioningEmbedding(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                              dtype=dtype, name="controlnet_query_cond_embedding")(controlnet_query_cond)
    x, skips = build_down_blocks(cfg, dtype, x, emb, ctx, self.remat)
    x = build_mid_block(cfg, dtype, x, emb, ctx, self.remat)
    down = [L._conv(s.shape[-1], kernel=1, padding=0, dtype=dtype, name=f"controlnet_down_blocks_{i}",
                    zero_init=True)(s) for i, s in enumerate(skips)]
    mid = L._conv(x.shape[-1], kernel=1, padding=0, dtype=dtype, name="controlnet_mid_block", zero_init=True)(x)
    if guess_mode and not cfg.global_pool_conditions:
      scales = jnp.logspace(-1.0, 0.0, len(down) + 1) * conditioning_scale
      down = [d * scales[i] for i, d in enumerate(down)]
      mid = mid * scales[-1]
    else:
      down = [d * conditioning_scale for d in down]
      mid = mid * conditioning_scale
    if cfg.global_pool_conditions:
      down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
      mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
    return tuple(down), mid


def _dummy_inputs(config: ControlNetConfig, latent_hw):
  f = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
  x = jnp.zeros((1, *latent_hw, config.in_channels))
  ctx = jnp.zeros((1, 4, config.cross_attention_dim))
  cond = jnp.zeros((1, latent_hw[0] * f, latent_hw[1] * f, config.conditioning_channels))
  q = (jnp.zeros((1, latent_hw[0] * f, latent_hw[1] * f, config.query_conditioning_channels))
       if config.query_conditioning_channels is not None else None)
  labels = jnp.zeros((1,), jnp.int32) if config.num_class_embeds is not None else None
  return x, ctx, cond, q, labels


def _init(rng, config: ControlNetConfig, latent_hw):
  x, ctx, cond, q, labels = _dummy_inputs(config, latent_hw)
  return ControlNetModel(config).init(rng, x, jnp.zeros((1,)), ctx, cond, class_labels=labels,
                                      controlnet_query_cond=q)["params"]


def init_controlnet(rng, config: ControlNetConfig, latent_hw: Tuple[int, int] = (8, 8)):
  """Fresh ControlNet params (zero convs zero, the rest random). To start from a UNet, use
  `init_controlnet_from_unet` instead."""
  config = resolve_controlnet_config(config)
  return jax.jit(lambda r: _init(r, config, latent_hw))(rng)


def abstract_controlnet_params(config: ControlNetConfig):
  """Shape/dtype tree of the params via `jax.eval_shape`."""
  config = resolve_controlnet_config(config)
  return jax.eval_shape(lambda r: _init(r, config, (8, 8)), jax.random.PRNGKey(0))


COPIED_FROM_UNET = ("conv_in", "time_embedding", "class_embedding", "mid_block")


def init_controlnet_from_unet(unet_params, config: ControlNetConfig, rng=None):
  """ControlNet params whose encoder is a copy of the UNet's (conv_in, time_embedding, down_blocks_*, mid_block,
  class_embedding if any); the conditioning embedding(s) are random with a zero conv_out and every
  controlnet_*_block is zero, so the initial residuals are exactly zero (CoDi A3, Prompt Diffusion B3).

  Only the small conditioning embeddings are initialised randomly (no full ControlNet init is run)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  config = resolve_controlnet_config(config)
  abstract = abstract_controlnet_params(config)
  params = {}
  for k, tree in abstract.items():
    if k in COPIED_FROM_UNET or k.startswith("down_blocks_"):
      if k not in unet_params:
        raise ValueError(f"UNet params have no {k!r}; build the ControlNet config with controlnet_config_from_unet.")
      want = jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)
      got = jax.tree_util.tree_map(lambda a: tuple(a.shape), unet_params[k])
      if want != got:
        raise ValueError(f"UNet params {k!r} do not match the ControlNet config (shapes differ); build the "
                         "ControlNet config with controlnet_config_from_unet(unet_config).")
      params[k] = jax.tree_util.tree_map(jnp.array, unet_params[k])
    elif k in ("controlnet_cond_embedding", "controlnet_query_cond_embedding"):
      ch = (config.conditioning_channels if k == "controlnet_cond_embedding"
            else config.query_conditioning_channels)
      emb = ControlNetConditioningEmbedding(config.block_out_channels[0], config.conditioning_embedding_out_channels)
      f = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
      rng, sub = jax.random.split(rng)
      params[k] = jax.jit(emb.init)(sub, jnp.zeros((1, f, f, ch)))["params"]
    else:  # zero convolutions
      params[k] = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
  return params
