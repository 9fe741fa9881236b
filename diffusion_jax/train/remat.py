"""Rematerialisation (activation checkpointing) policies named in `config.remat`.

Experiments wrap their repeated blocks with `maybe_remat(BlockCls, config.remat)` (or pass
`remat_policy(name)` to `flax.linen.remat`). Models never import this module; experiments hand them the
wrapped class or a policy.

  "none"          no remat: every activation is stored for the backward pass (fastest, most memory);
  "full"          nothing saved inside the block: recompute everything (least memory);
  "dots"          save matmul outputs, recompute element-wise ops (jax.checkpoint_policies.checkpoint_dots);
  "dots_no_batch" save only matmuls without batch dims (weights-stationary; checkpoint_dots_with_no_batch_dims).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax

from diffusion_jax.registry import check_choice

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def remat_policy(name: str) -> Optional[Callable[..., Any]]:
  """Returns the `jax.checkpoint` policy for `name` (None for "none" and for "full" = save nothing)."""
  check_choice("remat policy (config.remat)", name, REMAT_POLICIES)
  return {
      "none": None,
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }[name]


def maybe_remat(module_cls: Any, name: str, **kwargs) -> Any:
  """`nn.remat(module_cls, policy=...)` unless `name == "none"`. kwargs go to `nn.remat`
  (e.g. `static_argnums` for boolean call arguments such as `deterministic`)."""
  check_choice("remat policy (config.remat)", name, REMAT_POLICIES)
  if name == "none":
    return module_cls
  return nn.remat(module_cls, policy=remat_policy(name), **kwargs)
