"""Test set-up: 4 simulated CPU devices, absl flags parsed (grain workers need it)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
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
  """Counts XLA backend compilations (jax.monitoring's compile event) inside `with counter:` blocks."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0
    self._on = False
    from jax import monitoring
    monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if self._on and event == self.EVENT:
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
