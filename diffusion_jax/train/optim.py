"""Optimiser and learning-rate schedule from `config.optim`.

  name: adamw | adam | sgd (sgd uses `momentum`, 0 = plain SGD)
  schedule: constant (optional linear warmup) | cosine (optional warmup) | warmup_cosine |
            cosine_restarts (SGDR: warmup + cosine cycles of `restart_period` steps, Loshchilov & Hutter)
  grad_clip: clip by global norm (0 = off); weight_decay applies to arrays with ndim >= 2 only.
Gradient accumulation (`grad_accum`) is done by the train step itself (micro-batches under `lax.scan`),
so one optimiser update is one train step.

Parameter groups (`optim.groups`, optional): named groups `{"match": regex, "lr": float}`; each trainable
leaf belongs to the first group whose `match` finds its "/"-joined path (`re.search`, e.g.
"^controlnet/" or "^unet/up_blocks"). A group trains with its own peak `lr` on the same schedule shape
(warmup, decay); `lr: 0` freezes it. Leaves that match no group use `optim.lr` when
`optim.train_unmatched` is True (the default) and are frozen otherwise. Frozen leaves get no optimiser state
(`optax.set_to_zero`), no update, and do not count in the clipped gradient norm. A group that matches no
parameter is an error (a typo would otherwise silently freeze or train the wrong part).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import optax

from diffusion_jax.registry import check_choice

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "cosine_restarts")


def make_schedule(optim_config: Any, num_steps: int, lr: Optional[float] = None) -> Callable[[Any], Any]:
  """The learning-rate schedule of `optim_config`, peaking at `lr` (default `optim_config.lr`)."""
  oc = optim_config
  lr = float(oc.lr if lr is None else lr)
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


FROZEN = "frozen"


def path_name(path) -> str:
  """A pytree key path as the "/"-joined string that group patterns match, e.g. "unet/up_blocks_0/kernel"."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _groups(oc) -> Dict[str, Any]:
  groups = oc.get("groups", None)
  return dict(groups) if groups else {}


def group_labels(optim_config: Any, params) -> Any:
  """The group name of every leaf of `params` (arrays or ShapeDtypeStructs): a pytree of strings."""
  groups = _groups(optim_config)
  if not groups:
    return jax.tree.map(lambda _: "default", params)
  compiled = [(name, re.compile(str(g["match"]))) for name, g in groups.items()]
  rest = "default" if bool(optim_config.get("train_unmatched", True)) else FROZEN

  def label(path, _):
    name = path_name(path)
    for gname, rx in compiled:
      if rx.search(name):
        return FROZEN if float(groups[gname].get("lr", 0.0)) == 0.0 else gname
    return rest
  return jax.tree_util.tree_map_with_path(label, params)


def check_groups(optim_config: Any, params) -> Dict[str, Tuple[int, int]]:
  """Validates `optim.groups` against `params`; returns group -> (number of leaves, number of parameters)."""
  groups = _groups(optim_config)
  for name, g in groups.items():
    if "match" not in g:
      raise ValueError(f"config.optim.groups.{name} needs a 'match' regex (and an 'lr'; 0 freezes the group).")
    try:
      re.compile(str(g["match"]))
    except re.error as e:
      raise ValueError(f"config.optim.groups.{name}.match={g['match']!r} is not a valid regex: {e}.") from e
    if name in ("default", FROZEN):
      raise ValueError(f"config.optim.groups may not use the reserved name {name!r}; rename the group.")
  counts: Dict[str, list] = {}
  paths = jax.tree_util.tree_leaves_with_path(params)
  first_match: Dict[str, int] = {name: 0 for name in groups}
  for path, leaf in paths:
    pname = path_name(path)
    for gname, g in groups.items():
      if re.search(str(g["match"]), pname):
        first_match[gname] += 1
        break
  empty = [n for n, c in first_match.items() if c == 0]
  if empty:
    some = ", ".join(path_name(p) for p, _ in paths[:6])
    raise ValueError(f"config.optim.groups {empty} match no parameter. Parameter paths look like: {some}, ...")
  labels = jax.tree.leaves(group_labels(optim_config, params))
  for (path, leaf), lab in zip(paths, labels):
    c = counts.setdefault(lab, [0, 0])
    c[0] += 1
    c[1] += int(math.prod(getattr(leaf, "shape", ())))
  if set(counts) == {FROZEN}:
    raise ValueError("config.optim.groups freeze every parameter; give some group a positive lr or set "
                     "config.optim.train_unmatched=True.")
  return {k: (v[0], v[1]) for k, v in counts.items()}


def _base_optimizer(oc, schedule):
  name = check_choice("optimizer (config.optim.name)", oc.get("name", "adamw"), OPTIMIZERS)
  b1, b2, eps = float(oc.get("b1", 0.9)), float(oc.get("b2", 0.999)), float(oc.get("eps", 1e-8))
  wd = float(oc.get("weight_decay", 0.0))
  if name == "adamw":
    return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=_decay_mask)
  if name == "adam":
    return optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  momentum = float(oc.get("momentum", 0.0)) or None
  return optax.sgd(schedule, momentum=momentum)


def make_optimizer(optim_config: Any, num_steps: int):
  """Returns (optax transformation, schedule of the default group's learning rate)."""
  oc = optim_config
  check_choice("optimizer (config.optim.name)", oc.get("name", "adamw"), OPTIMIZERS)
  schedule = make_schedule(oc, num_steps)
  groups = _groups(oc)
  parts = []
  if groups:
    labels = functools.partial(group_labels, oc)
    # Frozen leaves first become zero gradients, so that they do not count in the clipped norm.
    parts.append(optax.multi_transform({FROZEN: optax.set_to_zero(), "train": optax.identity()},
                                       lambda p: jax.tree.map(lambda l: FROZEN if l == FROZEN else "train",
                                                              labels(p))))
  clip = float(oc.get("grad_clip", 0.0))
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  if groups:
    transforms = {FROZEN: optax.set_to_zero(), "default": _base_optimizer(oc, schedule)}
    for name, g in groups.items():
      lr = float(g.get("lr", 0.0))
      if lr > 0:
        transforms[name] = _base_optimizer(oc, make_schedule(oc, num_steps, lr))
    parts.append(optax.multi_transform(transforms, labels))
  else:
    parts.append(_base_optimizer(oc, schedule))
  return optax.chain(*parts), schedule
