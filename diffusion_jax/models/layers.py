"""Shared basic Flax layers: timestep / label embedders, MLPs, 2-D sin-cos position tables, patchify.

Conventions: images are NHWC; modules take `dtype` (compute) and `param_dtype` (storage, float32 default).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.registry import check_choice

Dtype = Any

ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def get_activation(name: str) -> Callable:
  check_choice("activation", name, ACTIVATIONS)
  return ACTIVATIONS[name]


def xavier_uniform():
  return nn.initializers.xavier_uniform()


def timestep_embedding(t, dim: int, max_period: float = 10000.0, cos_first: bool = True):
  """Sinusoidal embedding of (possibly fractional) scalars `t` [B] -> [B, dim].

  Frequencies exp(-ln(max_period) * i / half), i < half. `cos_first=True` gives the [cos, sin] order of the
  DiT / released DiffiT `TimestepEmbedder.timestep_embedding`; an odd `dim` gets a zero pad column.
  """
  t = jnp.asarray(t, jnp.float32).reshape(-1)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None] * freqs[None]
  parts = [jnp.cos(args), jnp.sin(args)] if cos_first else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nn.Module):
  """Positional (sinusoidal) time embedding -> Dense -> act -> Dense.

  DiffiT §3.2: the time token is a positional embedding passed through a small MLP with Swish (SiLU).
  Released latent DiffiT / DiT: 256-d [cos, sin] sinusoid, Linear(256->D), SiLU, Linear(D->D), N(0, 0.02) init.
  """
  hidden_size: int
  frequency_embedding_size: int = 256
  max_period: float = 10000.0
  act: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    emb = timestep_embedding(t, self.frequency_embedding_size, self.max_period).astype(self.dtype)
    init = nn.initializers.normal(0.02)
    h = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="mlp_0")(emb)
    h = get_activation(self.act)(h)
    return nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="mlp_2")(h)


class LabelEmbedder(nn.Module):
  """Class-label table with `num_classes + 1` rows; row `num_classes` is the null (unconditional) class.

  Label dropout for classifier-free guidance is done by the caller, which replaces dropped labels by
  `num_classes` (DiT / released DiffiT `LabelEmbedder.token_drop`). Init N(0, 0.02).
  """
  num_classes: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels):
    table = self.param("embedding_table", nn.initializers.normal(0.02),
                       (self.num_classes + 1, self.hidden_size), self.param_dtype)
    return jnp.take(table, labels.astype(jnp.int32), axis=0).astype(self.dtype)


class Mlp(nn.Module):
  """timm-style MLP: fc1 -> act -> fc2 (hidden = ratio * dim). Xavier-uniform kernels, zero biases."""
  hidden_features: int
  out_features: Optional[int] = None
  act: str = "gelu_tanh"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = self.out_features or x.shape[-1]
    x = nn.Dense(self.hidden_features, kernel_init=xavier_uniform(), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc1")(x)
    x = get_activation(self.act)(x)
    return nn.Dense(out, kernel_init=xavier_uniform(), dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc2")(x)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sin-cos table [grid_size**2, embed_dim] (MAE / DiT / released DiffiT layout).

  Tokens are row-major (h, w). The first half of the channels encodes the *column* (w) index, the second
  half the row (h) index (the reference builds `meshgrid(w, h)` and encodes grid[0] first); each half is
  [sin, cos] with frequencies 1 / 10000^(i / (D/4)).
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}.")

  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  gw, gh = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
  return np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1).astype(np.float32)


def patchify_conv(features: int, patch: int, dtype, param_dtype, name="x_embedder"):
  """Patch embedding as a stride-p conv (timm PatchEmbed), Xavier-uniform on the flattened kernel."""
  return nn.Conv(features, (patch, patch), strides=(patch, patch), padding="VALID",
                 kernel_init=xavier_uniform(), dtype=dtype, param_dtype=param_dtype, name=name)


def unpatchify(x, patch: int, channels: int, grid_h: int, grid_w: int):
  """[B, h*w, p*p*C] (per-token (p, q, c) order) -> [B, h*p, w*p, C]."""
  b = x.shape[0]
  x = x.reshape(b, grid_h, grid_w, patch, patch, channels)
  x = jnp.einsum("nhwpqc->nhpwqc", x)
  return x.reshape(b, grid_h * patch, grid_w * patch, channels)


# Same names and semantics as the trainer's `config.remat` (train/remat.py); models do not import train/.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def maybe_remat(module_cls, remat: str, static_argnums=()):
  """Wraps a block class in `nn.remat` with the policy named by `config.remat`
  ('none' | 'full' | 'dots' | 'dots_no_batch')."""
  check_choice("remat policy", remat, REMAT_POLICIES)
  if remat == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[remat], static_argnums=static_argnums)


def to_dtype(name) -> Dtype:
  if not isinstance(name, str):
    return name
  check_choice("dtype", name, ("float32", "bfloat16", "float16"))
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
