"""Flax linen networks. `MODELS` maps a config name (`config.model.name`) to a module class.

`build_model(model_config, dtype=..., param_dtype=..., remat=...)` constructs the registered class from the
config keys (all keys but `name` are passed as attributes; an unknown key fails listing the valid ones).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

from diffusion_jax.registry import Registry

MODELS = Registry("model")

# Modules that register networks in MODELS; imported lazily by `build_model` / `import_all`.
_MODULES = ("diffit", "dit", "unet", "vae", "controlnet", "clip", "prior")


def import_all():
  for name in _MODULES:
    try:
      importlib.import_module(f"diffusion_jax.models.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"diffusion_jax.models.{name}":
        raise


def _import_until(name: str):
  for mod in _MODULES:
    if name in MODELS:
      return
    try:
      importlib.import_module(f"diffusion_jax.models.{mod}")
    except ModuleNotFoundError as e:
      if e.name != f"diffusion_jax.models.{mod}":
        raise


def build_model(model_config: Mapping[str, Any], **overrides):
  """Instantiates `MODELS[model_config['name']]` with the remaining keys (+ `overrides`, e.g. dtype/remat)."""
  cfg = dict(model_config)
  if "name" not in cfg:
    raise ValueError("config.model needs a `name` key naming the network (e.g. 'diffit_image').")
  _import_until(cfg["name"])
  cls = MODELS.get(cfg.pop("name"))
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  kwargs = {**cfg, **overrides}
  kwargs = {k: v for k, v in kwargs.items() if not (k in overrides and k not in fields)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"Unknown key(s) {unknown} in config.model for {cls.__name__}. Valid keys: "
                     f"{', '.join(sorted(fields))}.")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return cls(**kwargs)
