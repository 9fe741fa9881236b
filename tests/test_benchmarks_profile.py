"""benchmarks/unet_step_profile.py: self times from nested XLA:CPU trace events (the loop body is attention)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("benchmarks_unet_step_profile",
                                               os.path.join(ROOT, "benchmarks", "unet_step_profile.py"))
prof = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prof)


def _ev(name, ts, dur, tid=1):
  return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid}


def test_self_times_resolve_nesting_and_loops():
  events = [
      _ev("ynn_fusion.3", 0, 100), _ev("transpose_copy_fusion.1", 100, 20),
      _ev("while.2", 200, 500), _ev("ynn_fusion.9", 210, 300), _ev("subtract_exponential_fusion", 520, 100),
      _ev("ThunkExecutor::Execute (wait for completion)", 0, 1000),   # wrapper events are ignored
      _ev("broadcast_multiply_fusion.4", 0, 50, tid=2),                # another thread
  ]
  out = prof.jax_self_times(events, runs=2)
  got = {k: round(v, 6) for k, v in out.items()}
  assert got == {("convolutions + matmuls", "ynn_fusion"): 0.05,        # 100 us / 2 runs, in ms
                 ("copies / layout / transposes", "transpose_copy_fusion"): 0.01,
                 ("attention", "while"): 0.05,                          # 500 - 300 - 100 self
                 ("attention", "ynn_fusion"): 0.15,
                 ("attention", "subtract_exponential_fusion"): 0.05,
                 ("elementwise + norms + reductions", "broadcast_multiply_fusion"): 0.025}
  # a fusion is layout work only if every op it is named after moves data
  assert prof._jax_class("bitcast_pad_fusion", False) == "copies / layout / transposes"
  assert prof._jax_class("copy", False) == "copies / layout / transposes"
  assert prof._jax_class("add_bitcast_fusion", False) == "elementwise + norms + reductions"
  assert prof._jax_class("copy_add_fusion", False) == "elementwise + norms + reductions"
  assert prof._torch_class("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
  assert prof._torch_class("aten::convolution_backward") == "convolutions + matmuls"
  assert prof._torch_class("aten::copy_") == "copies / layout / transposes"
