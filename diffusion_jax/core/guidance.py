"""Classifier-free guidance (Ho & Salimans 2022) with both halves in one batched forward.

Batch layout: the network is called once on `[x; x]` with conditioning `[cond; uncond]` (conditional half
FIRST, as in DiT/DiffiT `forward_with_cfg`), the output is split into `(out_cond, out_uncond)` and combined as

    out = out_uncond + s(t) * (out_cond - out_uncond)

* constant scale: s(t) = w.
* "power_cosine" (MDT / DiffiT ImageNet-256, DiffiT Sec. 5.8):
  s(t) = 1 + (w - 1) * 0.5 * (1 - cos(pi * (1 - t / T) ** p)), p = 4, T = 1000; s = 1 at t = T (pure
  noise), s = w at t = 0.
* channel subset (DiffiT latent model, Sec. 3.2 / App. H.2): only the first `channels` output channels
  (last axis) are guided; the rest (4th latent channel, learned-variance channels) come from the
  conditional half.

A guidance scale without an unconditional branch (`uncond is None`) is an error: there is nothing to guide
against.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.registry import check_choice

GUIDANCE_SCHEDULES = ("constant", "power_cosine")


def power_cosine_scale(t, scale, num_train_timesteps: int = 1000, power: float = 4.0):
  """MDT/DiffiT power-cosine guidance ramp s(t) = 1 + (w-1) * 0.5 * (1 - cos(pi * (1 - t/T)^p))."""
  t = jnp.asarray(t, jnp.float32)
  u = jnp.clip(1.0 - t / num_train_timesteps, 0.0, 1.0)
  return 1.0 + (scale - 1.0) * 0.5 * (1.0 - jnp.cos(jnp.pi * u ** power))


def guidance_scale_at(t, scale, schedule: str = "constant", num_train_timesteps: int = 1000,
                      power: float = 4.0):
  """Per-example guidance scale `[B]` at model times `t` `[B]`."""
  check_choice("guidance schedule", schedule, GUIDANCE_SCHEDULES)
  t = jnp.asarray(t, jnp.float32)
  if schedule == "constant":
    return jnp.broadcast_to(jnp.asarray(scale, jnp.float32), t.shape)
  return power_cosine_scale(t, scale, num_train_timesteps, power)


def cfg_combine(out_cond, out_uncond, scale, channels: Optional[int] = None):
  """out_uncond + scale * (out_cond - out_uncond), on the first `channels` channels (last axis) only.

  `scale` is a scalar or per-example `[B]`. Channels >= `channels` are taken from `out_cond`.
  """
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim == 1:
    scale = scale.reshape(scale.shape + (1,) * (out_cond.ndim - 1))
  oc, ou = out_cond.astype(jnp.float32), out_uncond.astype(jnp.float32)
  guided = ou + scale * (oc - ou)
  if channels is None or channels >= out_cond.shape[-1]:
    return guided.astype(out_cond.dtype)
  return jnp.concatenate([guided[..., :channels], oc[..., channels:]], axis=-1).astype(out_cond.dtype)


def check_guidance(guidance_scale, uncond, cond=None):
  """Validates a guidance request. Returns True if guidance (a doubled batch) is needed."""
  if uncond is None:
    is_one = False
    try:
      is_one = float(guidance_scale) == 1.0
    except TypeError:  # a traced scale: cannot know, require an unconditional branch
      pass
    if guidance_scale is not None and not is_one:
      raise ValueError(
          f"guidance_scale={guidance_scale} was given but the model has no unconditional branch (uncond=None). "
          "Pass `uncond=` (e.g. the null class label or the empty-prompt embedding the model was trained with "
          "for condition dropout), or use guidance_scale=1.0 / None for unguided sampling.")
    return False
  if cond is None:
    raise ValueError("uncond was given but cond is None: classifier-free guidance needs both the conditional "
                     "and the unconditional inputs.")
  return True


def guided_call(fn: Callable, x, t, cond: Any, uncond: Any = None, scale=1.0, *, schedule: str = "constant",
                num_train_timesteps: int = 1000, power: float = 4.0, channels: Optional[int] = None):
  """Calls `fn(x, t, cond)`; with `uncond` given, runs one batched forward on `[x; x]`, `[t; t]`,
  `[cond; uncond]` (conditional half first) and combines the halves with `cfg_combine`.

  `cond`/`uncond` are pytrees with the same structure whose leaves have the batch as their leading axis.
  """
  if uncond is None:
    return fn(x, t, cond)
  b = x.shape[0]
  x2 = jnp.concatenate([x, x], axis=0)
  t2 = jnp.concatenate([t, t], axis=0)
  c2 = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, jnp.asarray(u, c.dtype)], axis=0), cond, uncond)
  out = fn(x2, t2, c2)
  out_c, out_u = out[:b], out[b:]
  s = guidance_scale_at(t, scale, schedule, num_train_timesteps, power)
  return cfg_combine(out_c, out_u, s, channels)
