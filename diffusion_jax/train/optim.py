"""Optimiser and learning-rate schedule from `config.optim`.

  name: adamw | adam | sgd (sgd uses `momentum`, 0 = plain SGD)
  schedule: constant (optional linear warmup) | cosine (optional warmup) | warmup_cosine |
            cosine_restarts (SGDR: warmup + cosine cycles of `restart_period` steps, Loshchilov & Hutter)
  grad_clip: clip by global norm (0 = off); weight_decay applies to arrays with ndim >= 2 only.
Gradient accumulation (`grad_accum`) is done by the train step itself (micro-batches under `lax.scan`),
so one optimiser update is one train step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import optax

from diffusion_jax.registry import check_choice

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "cosine_restarts")


def make_schedule(optim_config: Any, num_steps: int) -> Callable[[Any], Any]:
  oc = optim_config
  lr = float(oc.lr)
  warmup = int(oc.get("warmup_steps", 0))
  decay = int(oc.get("decay_steps", 0) or num_steps)
  end = lr * float(oc.get("min_lr_ratio", 0.0))
  name = check_choice("learning-rate schedule (config.optim.schedule)", oc.get("schedule", "constant"), SCHEDULES)
  if name == "constant":
    if warmup > 0:
      return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.constant_schedule(lr)
  if name == "cosine" and warmup == 0:
    return optax.cosine_decay_schedule(lr, max(1, decay), alpha=end / lr if lr else 0.0)
  if name in ("cosine", "warmup_cosine"):
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(decay, warmup + 1), end)
  period = int(oc.get("restart_period", 0) or max(1, decay // 4))
  cycles = max(1, math.ceil(decay / period))
  w = min(warmup, period - 1)
  return optax.sgdr_schedule([dict(init_value=0.0 if w else lr, peak_value=lr, warmup_steps=w,
                                   decay_steps=period, end_value=end)] * cycles)


def _decay_mask(params):
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(optim_config: Any, num_steps: int):
  """Returns (optax transformation, schedule)."""
  oc = optim_config
  name = check_choice("optimizer (config.optim.name)", oc.get("name", "adamw"), OPTIMIZERS)
  schedule = make_schedule(oc, num_steps)
  b1, b2, eps = float(oc.get("b1", 0.9)), float(oc.get("b2", 0.999)), float(oc.get("eps", 1e-8))
  wd = float(oc.get("weight_decay", 0.0))
  if name == "adamw":
    opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=_decay_mask)
  elif name == "adam":
    opt = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  else:
    momentum = float(oc.get("momentum", 0.0)) or None
    opt = optax.sgd(schedule, momentum=momentum)
  parts = []
  clip = float(oc.get("grad_clip", 0.0))
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(opt)
  return optax.chain(*parts), schedule
