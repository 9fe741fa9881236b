"""Loading `configs/<task>.py[:arg]` files outside of absl flags (tests, notebooks, benchmarks)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Dict, Optional

import ml_collections


def flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
  """A nested dict (a config's JSON) -> {"a.b.c": leaf}."""
  out: Dict[str, Any] = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(flatten(v, f"{prefix}{k}."))
  else:
    out[prefix[:-1]] = d
  return out


def _repo_root_for(path: str) -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(path)))


def load_config(spec: str, overrides: Optional[Dict[str, Any]] = None) -> ml_collections.ConfigDict:
  """`load_config("configs/x.py:tiny", {"train.num_steps": 3})`: calls the file's `get_config(arg)` and
  applies dotted overrides; an unknown override key raises KeyError naming it."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  root = _repo_root_for(path)
  if root not in sys.path:
    sys.path.insert(0, root)  # lets config files `from configs import _base`.
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in (overrides or {}).items():
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise KeyError(f"Unknown config key {key!r}: {p!r} is not in the config.")
      node = node[p]
    if parts[-1] not in node:
      raise KeyError(f"Unknown config key {key!r}; valid keys here: {sorted(node.keys())}.")
    node[parts[-1]] = value
  return config
