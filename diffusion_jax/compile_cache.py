"""JAX's persistent compilation cache for runs: `config.compilation_cache_dir` (empty = off).

With a directory set, every XLA program that took at least `config.compilation_cache_min_compile_secs` to
compile (the train step, the sampler loop, the evaluation functions) is written there, and a later process
with the same program, JAX / jaxlib version, backend, devices and XLA flags loads it instead of compiling
again (a resumed run, the second of two runs of a sweep, `--mode sample` after training). On GPU the XLA
autotuning results are kept there too. `configure` must run before the first compilation of the process
(`diffusion_jax/main.py` calls it before any stage runs); `stats()` counts what the cache served.

The cache is trusted code: do not point it at a directory others can write to. It grows without bound
unless `JAX_COMPILATION_CACHE_MAX_SIZE` (bytes) is set. Both keys are operational: they do not change what a
run trains, so a stage's fingerprint does not depend on them (`stages.OPERATIONAL_KEYS`).
"""

from __future__ import annotations

import os
from typing import Dict

import jax

_STATS = {"requests": 0, "hits": 0, "saved_s": 0.0}
_LISTENING = False


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  if event == "/jax/compilation_cache/compile_requests_use_cache":
    _STATS["requests"] += 1
  elif event == "/jax/compilation_cache/cache_hits":
    _STATS["hits"] += 1


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event == "/jax/compilation_cache/compile_time_saved_sec":
    _STATS["saved_s"] += float(duration)


def _listen() -> None:
  global _LISTENING
  if not _LISTENING:
    from jax import monitoring
    monitoring.register_event_listener(_on_event)
    monitoring.register_event_duration_secs_listener(_on_duration)
    _LISTENING = True


def configure(config) -> str:
  """Turns the persistent cache on from a run config's `compilation_cache_dir` (absent or "" = leave JAX as
  it is) and `compilation_cache_min_compile_secs`; returns the directory used ("" when off)."""
  path = str(config.get("compilation_cache_dir", "") or "")
  if not path:
    return ""
  if "://" not in path:  # a local directory (JAX also takes gs:// and other etils paths as they are)
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
  min_secs = float(config.get("compilation_cache_min_compile_secs", 1.0))
  if min_secs < 0:
    raise ValueError(f"config.compilation_cache_min_compile_secs must be >= 0, got {min_secs}.")
  before = jax.config.jax_compilation_cache_dir
  if before != path:
    jax.config.update("jax_compilation_cache_dir", path)
    if before:  # a cache opened on another directory (e.g. JAX_COMPILATION_CACHE_DIR) is closed
      from jax.experimental.compilation_cache import compilation_cache
      compilation_cache.reset_cache()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
  _listen()
  return path


def stats() -> Dict[str, float]:
  """Since this process started listening: compilations that consulted the cache (`requests`), those it
  served (`hits`), and the compile time the hits saved (`saved_s`, as recorded when they were written)."""
  return dict(_STATS)
