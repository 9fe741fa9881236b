"""CoDi adapters over a Stable-Diffusion-style UNet (codi.md A3).

* `CoDiUNet` (full CoDi): the base `UNet2DConditionModel` (same parameter names, so the pretrained UNet's
  params load unchanged) plus a trainable **copy of its encoder** `codi_encoder` that reads the condition image,
  fused into the base's encoder features by one learnable scalar gate `mu` (initialised to 0):

      h'_i = (1 - mu) h_theta,i(z_t) + mu h_eta,i(c)     for every skip i and the mid-block output,

  computed as `h + mu * (h_eta - h)`, so with mu = 0 the output is bit-for-bit the base UNet's. The copy is
  `time_embedding`, `down_blocks_*` and `mid_block` of the base (copied by `init_codi_params`); its `conv_in` is
  replaced by a conditioning embedding (the ControlNet CNN, `models/controlnet.ControlNetConditioningEmbedding`
  layout but with a normally initialised output conv) from the condition image at image resolution down to the
  UNet's input resolution, so any condition (RGB, a depth / edge map, masked image + mask) and any latent factor
  fits. The copy sees t and the text like the base encoder (our reading of "h_eta(c), a copy of the UNet encoder").
* PE-CoDi: the diffusers ControlNet of `models/controlnet.py` over the frozen base (zero convs), nothing here;
  `pe_controlnet_config` builds its config for a base UNet and latent factor.

The up path below repeats `UNet2DConditionModel.__call__`'s (same modules, same order) so that params and
outputs match it exactly.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import sd_layers as L
from diffusion_jax.models.controlnet import (ControlNetConditioningEmbedding, ControlNetConfig,
                                             controlnet_config_from_unet)
from diffusion_jax.models.unet import (UNetConfig, UNet2DConditionModel, build_down_blocks, build_embedding,
                                       build_mid_block, build_up_blocks, resolve_unet_config)

CONDITIONING_CHANNELS = (16, 32, 96, 256)  # the ControlNet conditioning CNN widths (3 stride-2 levels: factor 8)
ENCODER_KEYS = ("time_embedding", "mid_block")  # + every down_blocks_* : copied from the base UNet


def cond_embedding_channels(factor: int, widths: Tuple[int, ...] = CONDITIONING_CHANNELS) -> Tuple[int, ...]:
  """Conditioning-CNN widths for a condition at `factor` x the UNet input resolution (1: pixel space, 8: SD)."""
  n = int(round(math.log2(factor))) if factor >= 1 else -1
  if factor < 1 or 2 ** n != factor or n + 1 > len(widths):
    raise ValueError(f"The condition must be 1, 2, 4 or 8 times the UNet's input resolution; got factor {factor}.")
  return tuple(widths[:n + 1])


class ConditionEmbedding(ControlNetConditioningEmbedding):
  """Condition image [B, f*h, f*w, C] -> features [B, h, w, out_channels]: the ControlNet CNN with CoDi's widths,
  its output conv random unless `zero_out`."""
  block_out_channels: Tuple[int, ...] = CONDITIONING_CHANNELS
  zero_out: bool = False


class CoDiEncoder(nn.Module):
  """h_eta(c): conditioning embedding -> the UNet encoder (time embedding, down blocks, mid block).
  Returns (skips, mid) in the UNet's skip order."""
  config: UNetConfig
  cond_channels: Tuple[int, ...] = CONDITIONING_CHANNELS
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, cond, timesteps, context):
    cfg, dtype = self.config, jnp.dtype(self.dtype)
    emb = build_embedding(cfg, dtype, timesteps, None, cond.shape[0])
    x = ConditionEmbedding(cfg.block_out_channels[0], self.cond_channels, dtype=dtype, name="cond_embedding")(cond)
    x, skips = build_down_blocks(cfg, dtype, x, emb, context.astype(dtype), self.remat)
    x = build_mid_block(cfg, dtype, x, emb, context.astype(dtype), self.remat)
    return skips, x


class CoDiUNet(nn.Module):
  """Full CoDi: base UNet + gated encoder copy (module docstring). `cond`: [B, f*H, f*W, C] condition image
  (f = `2 ** (len(cond_channels) - 1)`), float. Returns the base's prediction type, [B, H, W, out_channels]."""
  config: Any
  cond_channels: Tuple[int, ...] = CONDITIONING_CHANNELS
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, cond):
    cfg, dtype = resolve_unet_config(self.config), jnp.dtype(self.dtype)
    if cfg.num_class_embeds is not None or cfg.center_input_sample or cfg.mid_block_type is None:
      raise ValueError("CoDiUNet supports UNets without class embeddings, centre_input_sample or a missing mid "
                       "block (Stable Diffusion 1.x / 2.x layouts).")
    b = sample.shape[0]
    n_up = len(cfg.up_block_types) - 1
    forward_size = any(s % (2 ** n_up) for s in sample.shape[1:3])
    emb = build_embedding(cfg, dtype, timesteps, None, b)
    ctx = encoder_hidden_states.astype(dtype)
    pad = (cfg.conv_in_kernel - 1) // 2
    x = L._conv(cfg.block_out_channels[0], kernel=cfg.conv_in_kernel, padding=pad, dtype=dtype,
                name="conv_in")(sample.astype(dtype))
    x, skips = build_down_blocks(cfg, dtype, x, emb, ctx, self.remat)
    x = build_mid_block(cfg, dtype, x, emb, ctx, self.remat)
    e_skips, e_mid = CoDiEncoder(cfg, self.cond_channels, dtype, self.remat, name="codi_encoder")(
        cond, timesteps, ctx)
    if len(e_skips) != len(skips) or e_mid.shape != x.shape:
      raise ValueError(f"The condition embeds to features of shape {e_skips[0].shape[1:3]} but the UNet input is "
                       f"{skips[0].shape[1:3]}: give the condition at {2 ** (len(self.cond_channels) - 1)}x the "
                       "UNet input resolution.")
    mu = self.param("mu", nn.initializers.zeros, (), jnp.float32).astype(dtype)
    skips = [s + mu * (e.astype(dtype) - s) for s, e in zip(skips, e_skips)]
    x = x + mu * (e_mid.astype(dtype) - x)

    return build_up_blocks(cfg, dtype, x, skips, emb, ctx, self.remat, forward_size)


def _dummy(config: UNetConfig, cond_channels, cond_dim: int, hw=(8, 8)):
  f = 2 ** (len(cond_channels) - 1)
  x = jnp.zeros((1, *hw, config.in_channels))
  ctx = jnp.zeros((1, 4, config.cross_attention_dim))
  c = jnp.zeros((1, hw[0] * f, hw[1] * f, cond_dim))
  return x, ctx, c


def abstract_codi_params(config: UNetConfig, cond_dim: int = 3, cond_channels=CONDITIONING_CHANNELS):
  """Shape/dtype tree of the CoDiUNet params (`jax.eval_shape`, no memory)."""
  config = resolve_unet_config(config)
  x, ctx, c = _dummy(config, cond_channels, cond_dim)
  m = CoDiUNet(config, tuple(cond_channels))
  return jax.eval_shape(lambda r: m.init(r, x, jnp.zeros((1,)), ctx, c)["params"], jax.random.PRNGKey(0))


def init_codi_params(unet_params, config: UNetConfig, cond_dim: int, cond_channels=CONDITIONING_CHANNELS, rng=None):
  """CoDiUNet params from the base UNet's: every base key copied (the trainable base), the encoder copy's
  time_embedding / down_blocks_* / mid_block copied from the base, its conditioning embedding random, mu = 0.
  Jittable (the trainer runs `init` under jit)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  config = resolve_unet_config(config)
  abstract = abstract_codi_params(config, cond_dim, cond_channels)
  missing = [k for k in abstract if k not in ("codi_encoder", "mu") and k not in unet_params]
  if missing:
    raise ValueError(f"The base UNet params lack {missing}: they do not belong to this UNet config.")
  params = {k: jax.tree_util.tree_map(jnp.asarray, unet_params[k]) for k in abstract if k not in ("codi_encoder", "mu")}
  enc = {}
  for k in abstract["codi_encoder"]:
    if k == "cond_embedding":
      f = 2 ** (len(cond_channels) - 1)
      emb = ConditionEmbedding(config.block_out_channels[0], tuple(cond_channels))
      enc[k] = emb.init(rng, jnp.zeros((1, f, f, cond_dim)))["params"]
    else:
      enc[k] = jax.tree_util.tree_map(jnp.array, unet_params[k])
  want = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract)
  params["codi_encoder"] = enc
  params["mu"] = jnp.zeros((), jnp.float32)
  got = jax.tree_util.tree_map(lambda a: tuple(jnp.shape(a)), params)
  if want != got:
    raise ValueError("The base UNet params do not match the UNet config (shapes differ).")
  return params


def pe_controlnet_config(unet: UNetConfig, cond_dim: int, factor: int) -> ControlNetConfig:
  """The PE-CoDi ControlNet of a base UNet: conditioning CNN for a `cond_dim`-channel condition at `factor` x the
  UNet input resolution (8 for SD latents, 1 in pixel space)."""
  return controlnet_config_from_unet(resolve_unet_config(unet), conditioning_channels=int(cond_dim),
                                     conditioning_embedding_out_channels=cond_embedding_channels(factor))


def base_unet(config: UNetConfig, dtype=jnp.float32, remat: str = "none") -> UNet2DConditionModel:
  return UNet2DConditionModel(resolve_unet_config(config), dtype=dtype, remat=remat)
