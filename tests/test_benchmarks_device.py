"""benchmarks/device.py (the accelerator rows of issue 18): the analytic FLOPs against a hand count and the
jaxpr count, and the --tiny run of every row on the CPU (the same code path as on a GPU)."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, file):
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", file))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return mod


device = _load("benchmarks_device", "device.py")

# N = (4 / 2)^2 = 4 tokens, D = 8, MLP width 16, 2 input channels, learned sigma -> 4 output channels.
TINY = dict(input_size=4, patch_size=2, in_channels=2, hidden_size=8, depth=1, num_heads=2, mlp_ratio=2.0,
            learn_sigma=True, num_classes=3)
# Hand count, 2 FLOPs per multiply-add:
#   patch embed 2*4*(2*2*2)*8 = 512; time embedder 2*(256*8 + 8*8) = 4224;
#   block: qkv 2*4*8*24 = 1536, QK^T 2*4*4*8 = 256, PV 256, proj 2*4*8*8 = 512, MLP 2*4*8*16*2 = 2048;
#   DiT: adaLN 2*8*48 = 768 per block, final adaLN 2*8*16 = 256, final linear 2*4*8*(2*2*4) = 1024;
#   DiffiT: TMSA time-token qkv 2*8*24 = 384 per block, final linear 1024.
HAND = {"dit": 512 + 4224 + (1536 + 256 + 256 + 512 + 2048 + 768) + 256 + 1024,           # 11392
        "diffit_latent": 512 + 4224 + (1536 + 256 + 256 + 512 + 2048 + 384) + 1024}       # 10752


@pytest.mark.parametrize("name", ["dit", "diffit_latent"])
def test_forward_flops_hand_count_and_jaxpr(name):
  assert device.transformer_forward_flops(name, **TINY) == HAND[name]
  from diffusion_jax.models import build_model
  model = build_model(dict(name=name, **TINY))
  x, t, y = jnp.zeros((1, 4, 4, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  params = model.init(jax.random.key(0), x, t, y)
  counted = _load("benchmarks_train_step", "train_step.py").jaxpr_flops(jax.make_jaxpr(model.apply)(params, x, t,
                                                                                                      y).jaxpr)
  assert counted == HAND[name]  # every matmul of the real network is in the formula, nothing else
  # Windows: 4 keys per query instead of N.
  assert (device.transformer_forward_flops(name, **{**TINY, "input_size": 8}) -
          device.transformer_forward_flops(name, **{**TINY, "input_size": 8, "window_size": 2})) == 4 * 16 * 12 * 8


def test_forward_flops_dit_xl2_matches_the_paper():
  from diffusion_jax.models.dit import dit_kwargs
  f = device.transformer_forward_flops("dit", input_size=32, in_channels=4, **dit_kwargs("XL/2"))
  assert abs(f / 2e9 - 118.6) < 0.05  # DiT Table 4: 118.6 Gflops (multiply-adds)
  with pytest.raises(ValueError, match="knows"):
    device.transformer_forward_flops("unet", **TINY)


def test_tiny_runs_every_row_and_prints_the_table(capsys):
  results = device.main(["--tiny", "--in_process", "--dtype", "float32", "--steps", "2", "--warmup", "1"])
  out = capsys.readouterr().out
  assert [r["row"] for r in results] == list(device.ROWS)
  for r in results:
    assert "error" not in r, r
    assert r["images_per_s"] > 0 and r["flops_per_image"] > 0 and r["peak_gib"] > 0 and r["timed"] >= 1
    assert r["label"] in out
  assert "| row | batch | time | images/s | model TFLOP/s | MFU | peak memory | compile s | timed |" in out
  for a in device.ANCHORS:
    assert a["source"] in out
  assert "fast-DiT" in out and "107.52" in out


def test_child_row_time_cap_and_error_rows():
  args = device.parse_args(["--tiny", "--time_cap", "0.5"])
  r = device.run_in_child("dit", args)
  assert r["error"].startswith("stopped at the time cap")
  table = device.format_table([r], float("nan"), "unknown", args)
  assert "stopped at the time cap" in table and "n/a" not in table
  with pytest.raises(SystemExit, match="Unknown --rows"):
    device.main(["--tiny", "--rows", "gpu"])


def test_vs_pytorch_device_flag_dispatches(monkeypatch):
  vs = _load("benchmarks_vs_pytorch", "vs_pytorch.py")
  seen = []
  monkeypatch.setattr(vs, "_device_main", lambda argv: seen.append(argv) or "ok")
  assert vs.main(["--device", "--tiny", "--rows", "dit"]) == "ok"
  assert seen == [["--tiny", "--rows", "dit"]]
