"""Test set-up: 4 simulated CPU devices, absl flags parsed (grain workers need it), and a persistent XLA
compilation cache shared by the test processes.

Many tests compile the same programs (the tiny UNet / CLIP / VAE of the text-to-image, CoDi and ECLIPSE tests,
the CLI runs in subprocesses), and on 2 CPU cores most of the suite's time is XLA compilation. JAX's persistent
cache (keyed by the program, the jax/jaxlib version, the backend and the flags) lets each distinct program
compile once per machine: `DIFFUSION_JAX_TEST_COMPILE_CACHE=on` (`<repo>/.cache/jax_tests`) or `=<dir>`; off by
default (see below). The environment variables are set before jax is imported, so the
subprocesses the tests start use the same cache.
"""

import os

# Off by default: with the cache on, two of three fresh-clone runs lost an xdist worker to a C++ abort inside a
# jitted ECLIPSE train step (tests/experiments/test_eclipse_flow.py::test_paper_configs_tiny_with_local_hf_clip),
# cause not yet established. `DIFFUSION_JAX_TEST_COMPILE_CACHE=on` (or a directory) turns it on.
_CACHE = os.environ.get("DIFFUSION_JAX_TEST_COMPILE_CACHE", "off")
if _CACHE == "on":
  _CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax_tests")
if _CACHE != "off":
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))  # bytes, least recently used evicted

# The suite is dominated by XLA:CPU compilation of tiny programs, not by running them. LLVM's optimisation level
# 0 without its expensive passes cuts the CPU time of a compile-heavy file by ~45% (tests/models/test_unet.py +
# test_diffit.py: 191 s -> 106 s user time). Only code generation changes (HLO passes, numerics flags and
# fusion decisions are the same). DIFFUSION_JAX_TEST_XLA_OPT=full restores XLA's default (-O2) code generation.
_FAST_COMPILE = "" if os.environ.get("DIFFUSION_JAX_TEST_XLA_OPT") == "full" else (
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4" + _FAST_COMPILE)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import contextlib  # noqa: E402

import pytest  # noqa: E402


class CompileCounter:
  """Counts the executables XLA builds inside `with counter:` blocks: backend compilations and loads from the
  persistent compilation cache (a program served from the cache was still a new program for this process)."""

  EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")

  def __init__(self):
    self.count = 0
    self._on = False
    from jax import monitoring
    monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if self._on and event in self.EVENTS:
      self.count += 1

  @contextlib.contextmanager
  def __call__(self):
    """`with compiles() as c: ...` then `c.count`."""
    self.count, self._on = 0, True
    try:
      yield self
    finally:
      self._on = False


_COUNTER = None


@pytest.fixture
def compiles():
  global _COUNTER
  if _COUNTER is None:
    _COUNTER = CompileCounter()
  return _COUNTER


# ------------------------------------------------------------------ tiny stages trained once per test session
# The tiny shapes CLIP (configs/clip_shapes.py:tiny, ~30 s of CPU) is the `clip` stage of the ECLIPSE, unCLIP
# decoder, sd_shapes and MT-Diffusion tiny configs; the tiny sd_shapes pipeline (CLIP stage + UNet, ~90 s) is
# the `pipeline` stage of the CoDi and Prompt Diffusion tiny configs and their notebooks, and the run of
# tests/experiments/test_text_to_image.py. Each is trained once per session, through the real stage runner,
# into a directory shared by the xdist workers (a file lock makes a second worker wait for the first); each user
# gets its own copy (`copy_to`), so no test can change another's files.


def _session_shared_dir(tmp_path_factory) -> str:
  """A directory shared by every xdist worker of this run (and by nothing else)."""
  base = tmp_path_factory.getbasetemp()
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  root = os.path.join(str(base.parent), f"shared-{uid}") if uid else os.path.join(str(base), "shared")
  os.makedirs(root, exist_ok=True)
  return root


class SharedStage:
  """A finished stage directory trained once per session: `.dir` (read only: other tests use it too), and
  `.copy_to(workdir)`, which copies it to WORKDIR/<name> where the stage runner reuses it (same fingerprint)."""

  def __init__(self, stage_dir: str, name: str):
    self.dir, self.name = stage_dir, name

  def copy_to(self, workdir: str) -> str:
    import shutil
    dest = os.path.join(workdir, self.name)
    shutil.copytree(self.dir, dest)
    return dest


def _shared_stage(tmp_path_factory, key: str, name: str, stage_config, kind: str, before=None) -> SharedStage:
  """Trains `stage_config` as stage `name` in the session's shared directory `key/` unless it is finished there;
  `before(stage_dir)` runs first (e.g. copies finished sub-stages in)."""
  import sys
  import filelock
  import ml_collections
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if repo not in sys.path:
    sys.path.insert(0, repo)
  from configs import _base
  from diffusion_jax import stages
  root = os.path.join(_session_shared_dir(tmp_path_factory), key)
  os.makedirs(root, exist_ok=True)
  stage_dir = os.path.join(root, name)
  with filelock.FileLock(root + ".lock"):
    record = stages.read_record(stage_dir)
    if not (record and record.get("complete")):
      if before is not None and record is None:
        before(stage_dir)
      config = ml_collections.ConfigDict()
      config.stages = ml_collections.ConfigDict()
      config.stages[name] = _base.stage(stage_config(), kind=kind)
      stages.resolve(config, root)
  return SharedStage(stage_dir, name)


@pytest.fixture(scope="session")
def clip_shapes_tiny_stage(tmp_path_factory) -> SharedStage:
  """A finished `clip` stage of configs/clip_shapes.py:tiny (stage.json, export/ in the transformers layout)."""
  def config():
    from configs import clip_shapes
    return clip_shapes.get_config("tiny")
  return _shared_stage(tmp_path_factory, "clip_shapes_tiny", "clip", config, "hf_clip")


@pytest.fixture(scope="session")
def sd_shapes_tiny_stage(tmp_path_factory, clip_shapes_tiny_stage) -> SharedStage:
  """A finished `pipeline` stage of configs/sd_shapes.py:tiny: stage.json, the clip/ sub-stage (the session's
  tiny CLIP, reused), cache/, checkpoints/ and export/."""
  def config():
    from configs import sd_shapes
    return sd_shapes.get_config("tiny")
  return _shared_stage(tmp_path_factory, "sd_shapes_tiny", "pipeline", config, "sd_pipeline",
                       before=lambda d: clip_shapes_tiny_stage.copy_to(d))
