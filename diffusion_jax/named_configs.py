"""The shipped task configs by name, so that `--config` works without a clone of the repository.

The wheel installs the repository's `configs/` directory as the top-level package `configs` (the config files
import each other as `from configs import _base`). `--config` accepts, in this order:

* an existing file, `path/to/x.py[:arg]`, used as it is;
* a shipped config by name: `eclipse_prior`, `eclipse_prior.py:tiny` or `configs/eclipse_prior.py:tiny` (the
  clone's spelling) when that path does not exist in the current directory.

`python -m diffusion_jax.main --list_configs` prints the names.
"""

from __future__ import annotations

import importlib.util
import os
from typing import List, Optional, Sequence


def shipped_config_dir() -> Optional[str]:
  """The directory of the importable `configs` package holding this project's configs (`_base.py`), or None."""
  try:
    spec = importlib.util.find_spec("configs")
  except (ImportError, ValueError):
    return None
  if spec is None:
    return None
  for d in list(spec.submodule_search_locations or []):
    if os.path.isfile(os.path.join(d, "_base.py")):
      return os.path.abspath(d)
  return None


def list_configs(config_dir: Optional[str] = None) -> List[str]:
  """Names of the task configs in `config_dir` (default: the shipped ones); helpers such as `_base` excluded."""
  config_dir = config_dir or shipped_config_dir()
  if not config_dir or not os.path.isdir(config_dir):
    return []
  return sorted(n[:-3] for n in os.listdir(config_dir) if n.endswith(".py") and not n.startswith("_"))


def resolve_config(spec: str, config_dir: Optional[str] = None) -> str:
  """`spec` (`file.py[:arg]` or a config name `[:arg]`) -> a config file spec that exists.

  An existing path is returned unchanged; otherwise the file name is looked up among the shipped configs
  (`config_dir`, default `shipped_config_dir()`). Raises FileNotFoundError listing the names when neither exists.
  """
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  name = os.path.basename(path)
  name = name[:-3] if name.endswith(".py") else name
  config_dir = config_dir or shipped_config_dir()
  spelled_as_shipped = os.path.dirname(os.path.normpath(path)) in ("", "configs")  # not some/other/dir/x.py
  if name and config_dir and spelled_as_shipped:
    candidate = os.path.join(config_dir, name + ".py")
    if os.path.isfile(candidate) and not name.startswith("_"):
      return candidate + sep + arg
  names = list_configs(config_dir)
  raise FileNotFoundError(
      f"Config file {path!r} does not exist and is not a shipped config name. "
      + (f"Shipped configs: {', '.join(names)}." if names else "No shipped configs were found (is diffusion_jax "
         "installed with its configs package?)."))


def resolve_argv(argv: Sequence[str], config_dir: Optional[str] = None) -> List[str]:
  """Command-line arguments with the value of `--config` (either spelling) passed through `resolve_config`."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config(a.split("=", 1)[1], config_dir)
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1], config_dir)
  return out
