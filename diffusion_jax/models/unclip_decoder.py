"""A small image-embedding-conditioned UNet denoiser: the unCLIP decoder h(z_x) for the shapes world.

unCLIP (and ECLIPSE §3.1) renders an image from a CLIP image embedding z_x with a diffusion decoder; only
the prior is trained by ECLIPSE, the decoder stays frozen. This module is the small stand-in decoder used
for the end-to-end evaluation on the shapes world: a convolutional UNet (one level per entry of `channels`,
stride-2 down-sampling between levels) whose residual blocks are modulated (scale/shift) by
`time embedding + Linear(z_x)`; as in unCLIP's decoder the image embedding is projected into the timestep
embedding. A zero embedding plus `cond_mask = 0` is the unconditional branch
used for classifier-free guidance.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def sinusoidal_embedding(t, dim: int, max_period: float = 10000.0):
  """Transformer sinusoidal embedding of (possibly fractional) timesteps `t: [B]` -> `[B, dim]`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResBlock(nn.Module):
  features: int
  groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    h = nn.silu(nn.GroupNorm(num_groups=min(self.groups, x.shape[-1]), dtype=self.dtype)(x))
    h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(h)
    scale_shift = nn.Dense(2 * self.features, dtype=self.dtype)(nn.silu(emb))[:, None, None, :]
    scale, shift = jnp.split(scale_shift, 2, axis=-1)
    h = nn.GroupNorm(num_groups=min(self.groups, self.features), dtype=self.dtype)(h) * (1 + scale) + shift
    h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(nn.silu(h))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), dtype=self.dtype)(x)
    return x + h


class UnCLIPDecoder(nn.Module):
  """Predicts the noise of `x_t` given `t` and a CLIP image embedding (epsilon parameterisation)."""
  channels: Sequence[int] = (32, 64)
  num_res_blocks: int = 1
  emb_dim: int = 128
  out_channels: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, image_emb, cond_mask=None):
    b = x.shape[0]
    temb = sinusoidal_embedding(t, self.channels[0])
    temb = nn.Dense(self.emb_dim, dtype=self.dtype)(temb)
    temb = nn.Dense(self.emb_dim, dtype=self.dtype)(nn.silu(temb))
    z = jnp.asarray(image_emb, jnp.float32)
    if cond_mask is None:
      cond_mask = jnp.ones((b,), jnp.float32)
    z = z * cond_mask[:, None]
    cemb = nn.Dense(self.emb_dim, dtype=self.dtype, name="image_emb_proj")(z)
    null = self.param("null_emb", nn.initializers.zeros, (self.emb_dim,))
    emb = temb + cemb + (1.0 - cond_mask[:, None]) * null[None]

    h = nn.Conv(self.channels[0], (3, 3), dtype=self.dtype)(x.astype(self.dtype))
    skips = [h]
    for level, ch in enumerate(self.channels):
      for _ in range(self.num_res_blocks):
        h = ResBlock(ch, dtype=self.dtype)(h, emb)
        skips.append(h)
      if level < len(self.channels) - 1:
        h = nn.Conv(ch, (3, 3), strides=(2, 2), dtype=self.dtype)(h)
        skips.append(h)
    h = ResBlock(self.channels[-1], dtype=self.dtype)(h, emb)
    h = ResBlock(self.channels[-1], dtype=self.dtype)(h, emb)
    for level, ch in reversed(list(enumerate(self.channels))):
      for _ in range(self.num_res_blocks + 1):
        h = ResBlock(ch, dtype=self.dtype)(jnp.concatenate([h, skips.pop()], axis=-1), emb)
      if level > 0:
        n, hh, ww, c = h.shape
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = nn.Conv(ch, (3, 3), dtype=self.dtype)(h)
    h = nn.silu(nn.GroupNorm(num_groups=min(8, h.shape[-1]), dtype=self.dtype)(h))
    out = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
    return out.astype(jnp.float32)
