"""config.compilation_cache_dir: JAX's persistent compilation cache for a run (diffusion_jax/compile_cache.py),
set by the CLI before the first compilation; a second process with the same key loads from it."""

import json
import os
import re
import subprocess

import pytest

import toy_experiment as toy
from configs import _base
from diffusion_jax import compile_cache, stages


def test_keys_default_off_operational_and_checked(tmp_path):
  c = _base.base_config()
  assert c.compilation_cache_dir == "" and compile_cache.configure(c) == ""
  d = _base.base_config()
  d.compilation_cache_dir, d.compilation_cache_min_compile_secs = str(tmp_path / "c"), 0.0
  assert stages.config_fingerprint(c)[0] == stages.config_fingerprint(d)[0]  # operational: same stage
  d.compilation_cache_min_compile_secs = -1.0
  with pytest.raises(ValueError, match="min_compile_secs"):
    compile_cache.configure(d)


def _run(workdir, cache):
  r = subprocess.run(toy.main_cmd(workdir, ("train.num_steps", 1), ("train.sample_every", 0),
                                  ("compilation_cache_dir", cache), ("compilation_cache_min_compile_secs", 0)),
                     env=toy.subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  m = re.search(r"Compilation cache: (\d+) of (\d+) compilations loaded from (\S+) ", r.stderr)
  assert m, r.stderr[-3000:]
  return int(m.group(1)), int(m.group(2)), m.group(3)


def test_second_process_compiles_from_the_cache(tmp_path):
  cache = str(tmp_path / "xla_cache")
  hits, requests, where = _run(str(tmp_path / "a"), cache)
  assert hits == 0 and requests > 0 and where == cache
  entries = [f for f in os.listdir(cache) if f.endswith("-cache")]
  assert len(entries) >= 1 and any(f.startswith("jit_") for f in entries)
  meta = json.load(open(os.path.join(tmp_path, "a", "checkpoints", "1", "config", "metadata")))
  assert meta["compilation_cache_dir"] == cache and meta["compilation_cache_min_compile_secs"] == 0  # recorded
  hits2, requests2, _ = _run(str(tmp_path / "b"), cache)  # another run, same programs: all loaded
  assert requests2 == requests and hits2 == requests2
