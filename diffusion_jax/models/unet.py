"""Flax UNet2DConditionModel: the Stable Diffusion 1.x / 2.x denoiser (diffusers layout, NHWC).

Config fields use diffusers' `config.json` names, so `UNetConfig.from_diffusers(json_dict)` and
`.to_diffusers()` are a straight copy. Note the diffusers naming quirk kept here for compatibility:
`attention_head_dim` is the **number of heads** per block when `num_attention_heads` is unset (SD-1.5: 8 heads
everywhere; SD-2.x: [5, 10, 20, 20] heads, i.e. 64-wide heads); the head width is `channels // heads`.

Forward (diffusers `UNet2DConditionModel.forward`): sinusoidal time projection -> TimestepEmbedding
(+ class embedding) -> conv_in -> down blocks (collect skips) -> (+ ControlNet residuals on every skip)
-> mid block (+ ControlNet mid residual) -> up blocks (consume skips) -> GN -> SiLU -> conv_out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import attention as attn_lib
from diffusion_jax.models import sd_layers as L
from diffusion_jax.models import MODELS
from diffusion_jax.registry import Registry, check_choice

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers config keys this port does not implement, with the only value it accepts.
_UNSUPPORTED_DEFAULTS: Dict[str, Any] = {
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "only_cross_attention": False, "dual_cross_attention": False, "attention_type": "default",
    "cross_attention_norm": None, "act_fn": "silu", "reverse_transformer_layers_per_block": None,
    "class_embeddings_concat": False, "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None, "mid_block_only_cross_attention": None,
}


def _tup(v):
  return tuple(_tup(x) for x in v) if isinstance(v, (list, tuple)) else v


def check_unsupported(d: Mapping[str, Any], what: str) -> None:
  """Raises if a diffusers config asks for a feature this port does not implement."""
  bad = []
  for k, default in _UNSUPPORTED_DEFAULTS.items():
    if k in d and d[k] != default and not (isinstance(d[k], (list, tuple)) and not any(d[k])
                                           and default is False):
      bad.append(f"{k}={d[k]!r} (supported: {default!r})")
  if bad:
    raise ValueError(f"{what} config uses features this Flax port does not implement: {', '.join(bad)}.")


def config_from_dict(cls, d: Mapping[str, Any], what: str):
  """Builds dataclass `cls` from a diffusers config dict: known keys copied (lists -> tuples), unknown ignored."""
  check_unsupported(d, what)
  names = {f.name for f in dataclasses.fields(cls)}
  kw = {k: _tup(v) for k, v in d.items() if k in names}
  return cls(**kw)


def config_to_dict(cfg, class_name: str) -> Dict[str, Any]:
  out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
  out = {k: ([list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, list) else v)
         for k, v in out.items()}
  out["_class_name"] = class_name
  return out


def _per_block(v, n: int, name: str) -> Tuple:
  if isinstance(v, (list, tuple)):
    if len(v) != n:
      raise ValueError(f"{name} has {len(v)} entries but there are {n} blocks; give one per block or an int.")
    return tuple(v)
  return (v,) * n


class BlockConfigMixin:
  """Per-block quantities derived from diffusers-style fields (shared by UNet and ControlNet configs)."""

  @property
  def heads(self) -> Tuple[int, ...]:
    h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
    return _per_block(h, len(self.down_block_types), "attention_head_dim")

  @property
  def layers(self) -> Tuple[int, ...]:
    return _per_block(self.layers_per_block, len(self.down_block_types), "layers_per_block")

  @property
  def transformer_layers(self) -> Tuple[int, ...]:
    return _per_block(self.transformer_layers_per_block, len(self.down_block_types), "transformer_layers_per_block")

  @property
  def time_embed_dim(self) -> int:
    return self.block_out_channels[0] * 4

  def check_blocks(self):
    n = len(self.down_block_types)
    for t in self.down_block_types:
      check_choice("down block type", t, DOWN_BLOCK_TYPES)
    check_choice("mid block type", self.mid_block_type, MID_BLOCK_TYPES)
    if len(self.block_out_channels) != n:
      raise ValueError(f"down_block_types ({n}) and block_out_channels ({len(self.block_out_channels)}) must "
                       "have the same length.")
    if isinstance(self.cross_attention_dim, (list, tuple)):
      raise ValueError("cross_attention_dim must be an int (one text-embedding width for every block).")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block_out_channels {self.block_out_channels} must be divisible by "
                         f"norm_num_groups={self.norm_num_groups}.")
    self.heads, self.layers, self.transformer_layers  # validates list lengths


@dataclasses.dataclass(frozen=True)
class UNetConfig(BlockConfigMixin):
  """UNet2DConditionModel hyper-parameters (diffusers config names and defaults)."""
  sample_size: Optional[int] = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "DownBlock2D")
  mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
  up_block_types: Tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
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
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3

  def __post_init__(self):
    self.check_blocks()
    for t in self.up_block_types:
      check_choice("up block type", t, UP_BLOCK_TYPES)
    if len(self.up_block_types) != len(self.down_block_types):
      raise ValueError(f"up_block_types ({len(self.up_block_types)}) and down_block_types "
                       f"({len(self.down_block_types)}) must have the same length.")

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any]) -> "UNetConfig":
    return config_from_dict(cls, d, "UNet2DConditionModel")

  def to_diffusers(self) -> Dict[str, Any]:
    return config_to_dict(self, "UNet2DConditionModel")


def unet_config_from_diffusers(d: Mapping[str, Any]) -> UNetConfig:
  """diffusers `unet/config.json` dict -> UNetConfig (unsupported features raise)."""
  return UNetConfig.from_diffusers(d)


def sd15_unet_config() -> UNetConfig:
  """Stable Diffusion 1.5 UNet (runwayml/stable-diffusion-v1-5 `unet/config.json`)."""
  return UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def sd21_unet_config() -> UNetConfig:
  """Stable Diffusion 2.1 (768-v) UNet: linear projections, per-block heads [5, 10, 20, 20], OpenCLIP-H 1024."""
  return UNetConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                    use_linear_projection=True, upcast_attention=True)


def tiny_unet_config(**overrides) -> UNetConfig:
  """A small SD-1-style UNet for tests and CPU experiments (2 levels, 32/64 channels)."""
  kw = dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=32, attention_head_dim=2)
  kw.update(overrides)
  return UNetConfig(**kw)


UNET_CONFIGS = Registry("SD UNet config preset")
UNET_CONFIGS.register("sd15")(sd15_unet_config)
UNET_CONFIGS.register("sd21")(sd21_unet_config)
UNET_CONFIGS.register("tiny")(tiny_unet_config)


def resolve_unet_config(c: Union[UNetConfig, str]) -> UNetConfig:
  """A UNetConfig, or a preset name looked up in UNET_CONFIGS."""
  return UNET_CONFIGS.get(c)() if isinstance(c, str) else c


def build_embedding(config, dtype, timesteps, class_labels, batch: int):
  """time_proj + time_embedding (+ class_embedding); call inside a compact module (creates submodules)."""
  t = jnp.asarray(timesteps)
  t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (batch,))
  t_emb = L.get_timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos,
                                   config.freq_shift).astype(dtype)
  emb = L.TimestepEmbedding(config.time_embed_dim, dtype=dtype, name="time_embedding")(t_emb)
  if config.num_class_embeds is not None:
    if class_labels is None:
      raise ValueError("This model has num_class_embeds set; pass class_labels.")
    emb = emb + nn.Embed(config.num_class_embeds, config.time_embed_dim,
                         name="class_embedding")(class_labels).astype(dtype)
  return emb


def build_down_blocks(config, dtype, x, temb, context, remat: str = "none"):
  """conv_in output `x` through the down blocks; returns (h, skips) with skips[0] = x (diffusers order)."""
  skips = [x]
  n = len(config.down_block_types)
  for i, kind in enumerate(config.down_block_types):
    final = i == n - 1
    c = config.block_out_channels[i]
    if kind == "CrossAttnDownBlock2D":
      blk = L.CrossAttnDownBlock2D(c, config.layers[i], config.heads[i], (config.transformer_layers[i],) * config.layers[i],
                                   add_downsample=not final, groups=config.norm_num_groups, eps=config.norm_eps,
                                   downsample_padding=config.downsample_padding,
                                   use_linear_projection=config.use_linear_projection,
                                   upcast_attention=config.upcast_attention, remat=remat, dtype=dtype,
                                   name=f"down_blocks_{i}")
    else:
      blk = L.DownBlock2D(c, config.layers[i], add_downsample=not final, groups=config.norm_num_groups,
                          eps=config.norm_eps, downsample_padding=config.downsample_padding, remat=remat,
                          dtype=dtype, name=f"down_blocks_{i}")
    x, states = blk(x, temb, context)
    skips.extend(states)
  return x, skips


def build_mid_block(config, dtype, x, temb, context, remat: str = "none"):
  if config.mid_block_type is None:
    return x
  return L.UNetMidBlock2DCrossAttn(config.heads[-1], 1, config.transformer_layers[-1], config.norm_num_groups,
                                   config.norm_eps, config.mid_block_scale_factor, config.use_linear_projection,
                                   config.upcast_attention, remat=remat, dtype=dtype,
                                   name="mid_block")(x, temb, context)


def build_up_blocks(cfg, dtype, x, skips, temb, context, remat: str = "none", forward_size: bool = False):
  """The decoder half (up blocks consuming `skips`), conv_norm_out and conv_out: the UNet's output."""
  rev_ch = list(reversed(cfg.block_out_channels))
  rev_heads = list(reversed(cfg.heads))
  rev_layers = list(reversed(cfg.layers))
  rev_tl = list(reversed(cfg.transformer_layers))
  skips = list(skips)
  for i, kind in enumerate(cfg.up_block_types):
    final = i == len(cfg.up_block_types) - 1
    nl = rev_layers[i] + 1
    block_skips, skips = skips[-nl:], skips[:-nl]
    size = tuple(skips[-1].shape[1:3]) if (not final and forward_size) else None
    if kind == "CrossAttnUpBlock2D":
      x = L.CrossAttnUpBlock2D(rev_ch[i], nl, rev_heads[i], (rev_tl[i],) * nl, add_upsample=not final,
                               groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                               use_linear_projection=cfg.use_linear_projection,
                               upcast_attention=cfg.upcast_attention, remat=remat, dtype=dtype,
                               name=f"up_blocks_{i}")(x, block_skips, temb, context, size)
    else:
      x = L.UpBlock2D(rev_ch[i], nl, add_upsample=not final, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                      remat=remat, dtype=dtype, name=f"up_blocks_{i}")(x, block_skips, temb, None, size)
  x = nn.silu(L._gn(cfg.norm_num_groups, cfg.norm_eps, dtype, "conv_norm_out")(x))
  pad = (cfg.conv_out_kernel - 1) // 2
  return L._conv(cfg.out_channels, kernel=cfg.conv_out_kernel, padding=pad, dtype=dtype, name="conv_out")(x)


@MODELS.register("sd_unet")
class UNet2DConditionModel(nn.Module):
  """SD UNet. Inputs NHWC: `sample` (B, H, W, in_channels), `timesteps` scalar or (B,),
  `encoder_hidden_states` (B, T, cross_attention_dim). Returns (B, H, W, out_channels).

  ControlNet: pass both `down_block_additional_residuals` (one per skip, in skip order, as returned by
  `ControlNetModel`) and `mid_block_additional_residual`; they are added to the skips / mid output.

  `config` is a UNetConfig or a preset name ("sd15", "sd21", "tiny"); `dtype` is the compute dtype (params stay
  float32); `remat` ("none" | "full" | "dots" | ...) rematerialises every resnet and transformer block;
  `attention` names the attention implementation (`models/attention.py`; None: the process default)."""
  config: Union[UNetConfig, str]
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: Optional[str] = None  # attention implementation (models/attention.py); None = inherit

  @nn.compact
  @attn_lib.scoped
  def __call__(self, sample, timesteps, encoder_hidden_states, class_labels=None,
               down_block_additional_residuals: Optional[Sequence[jax.Array]] = None,
               mid_block_additional_residual: Optional[jax.Array] = None):
    cfg, dtype = resolve_unet_config(self.config), jnp.dtype(self.dtype)
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"UNet expects NHWC samples with {cfg.in_channels} channels; got shape {sample.shape}.")
    if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
      raise ValueError("Pass both down_block_additional_residuals and mid_block_additional_residual "
                       "(ControlNet outputs), or neither.")
    b = sample.shape[0]
    n_up = len(cfg.up_block_types) - 1
    forward_size = any(s % (2 ** n_up) for s in sample.shape[1:3])
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0
    emb = build_embedding(cfg, dtype, timesteps, class_labels, b)
    ctx = encoder_hidden_states.astype(dtype)
    pad = (cfg.conv_in_kernel - 1) // 2
    x = L._conv(cfg.block_out_channels[0], kernel=cfg.conv_in_kernel, padding=pad, dtype=dtype,
                name="conv_in")(sample.astype(dtype))
    x, skips = build_down_blocks(cfg, dtype, x, emb, ctx, self.remat)
    if down_block_additional_residuals is not None:
      if len(down_block_additional_residuals) != len(skips):
        raise ValueError(f"Got {len(down_block_additional_residuals)} down-block residuals; this UNet has "
                         f"{len(skips)} skip connections.")
      skips = [s + r.astype(dtype) for s, r in zip(skips, down_block_additional_residuals)]
    x = build_mid_block(cfg, dtype, x, emb, ctx, self.remat)
    if mid_block_additional_residual is not None:
      x = x + mid_block_additional_residual.astype(dtype)

    return build_up_blocks(cfg, dtype, x, skips, emb, ctx, self.remat, forward_size)


def init_unet(rng, config: UNetConfig, sample_hw: Tuple[int, int] = (8, 8), seq_len: int = 4):
  """Random params for `config` (float32). Jitted; on a CPU the compile dominates (tens of seconds)."""
  config = resolve_unet_config(config)
  model = UNet2DConditionModel(config)
  x = jnp.zeros((1, *sample_hw, config.in_channels))
  ctx = jnp.zeros((1, seq_len, config.cross_attention_dim))
  labels = jnp.zeros((1,), jnp.int32) if config.num_class_embeds is not None else None
  return jax.jit(model.init)(rng, x, jnp.zeros((1,)), ctx, labels)["params"]


def abstract_unet_params(config: UNetConfig):
  """Shape/dtype tree of the params, built with `jax.eval_shape` (no memory for the weights)."""
  config = resolve_unet_config(config)
  model = UNet2DConditionModel(config)
  x = jnp.zeros((1, 8, 8, config.in_channels))
  ctx = jnp.zeros((1, 4, config.cross_attention_dim))
  labels = jnp.zeros((1,), jnp.int32) if config.num_class_embeds is not None else None
  return jax.eval_shape(lambda r: model.init(r, x, jnp.zeros((1,)), ctx, labels)["params"], jax.random.PRNGKey(0))


def count_params(tree) -> int:
  """Number of scalars in a param tree (works on `jax.ShapeDtypeStruct` leaves too)."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
