"""scripts/eclipse_compute.py: the FLOP / train-seconds axes it reads from a run's records, the equal-compute and
equal-quality rows, and its argument checks, on fake run directories (expected numbers computed here)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from scripts import eclipse_compute as C  # noqa: E402


def _fake_run(wd, r1_by_step, *, step_flops=1e9, devices=2, sps=4.0, log_every=50):
  """A run evaluated at the steps of `r1_by_step`, logging every `log_every` steps at `sps` steps/s."""
  os.makedirs(wd, exist_ok=True)
  with open(os.path.join(wd, "run_info.json"), "w") as f:
    json.dump({"step_flops": step_flops, "num_devices": devices}, f)
  last = max(r1_by_step)
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    for s in range(1, last + 1):
      if s % log_every == 0:
        f.write(json.dumps({"step": s, "loss": 1.0, "steps_per_sec": sps}) + "\n")
      if s in r1_by_step:
        f.write(json.dumps({"step": s, "eval/R@1": r1_by_step[s], "eval/R@5": 0.5, "eval/cosine": 0.9,
                            "eval/binding_colour": 0.9, "eval/binding_position": 0.5, "eval_sec": 3.0}) + "\n")
  return wd


def test_read_curve_counts_flops_on_every_device_and_train_seconds_only(tmp_path):
  wd = _fake_run(str(tmp_path / "r"), {100: 0.1, 200: 0.3}, step_flops=2e9, devices=4, sps=5.0)
  curve = C.read_curve(wd)
  assert [p["step"] for p in curve] == [100, 200]
  assert curve[1]["train_flops"] == 200 * 2e9 * 4
  assert curve[0]["train_s"] == pytest.approx(100 / 5.0) and curve[1]["train_s"] == pytest.approx(200 / 5.0)
  assert curve[1]["R@1"] == 0.3 and curve[0]["eval_s"] == 3.0


def test_read_curve_refuses_runs_it_cannot_place_on_the_axes(tmp_path):
  wd = _fake_run(str(tmp_path / "a"), {100: 0.1}, log_every=30)  # no log row at step 100
  with pytest.raises(ValueError, match="log_every must divide"):
    C.read_curve(wd)
  wd = _fake_run(str(tmp_path / "b"), {100: 0.1}, step_flops=None)
  with pytest.raises(ValueError, match="no step_flops"):
    C.read_curve(wd)


def test_equal_compute_and_equal_quality(tmp_path):
  # ECLIPSE: cheap steps, good early; diffusion: 2x the FLOPs per step, slow to improve.
  e = {100: 0.20, 200: 0.30}
  d0 = {100: 0.05, 200: 0.10, 300: 0.15, 400: 0.25}
  d1 = {100: 0.05, 200: 0.12, 300: 0.20, 400: 0.27}
  curves = {"eclipse": {0: C.read_curve(_fake_run(str(tmp_path / "e0"), e)),
                        1: C.read_curve(_fake_run(str(tmp_path / "e1"), e))},
            "diffusion": {0: C.read_curve(_fake_run(str(tmp_path / "d0"), d0, step_flops=2e9, sps=2.0)),
                          1: C.read_curve(_fake_run(str(tmp_path / "d1"), d1, step_flops=2e9, sps=2.0))}}
  s = C.summarize(curves, text_r1=0.32)
  # Budget: the smaller final compute, ECLIPSE's 200 steps x 1e9 x 2 devices = 4e11 = diffusion's step 100.
  assert s["flops_budget"] == 4e11
  assert s["equal_compute"]["diffusion"]["step"] == [100, 100]
  assert s["equal_compute"]["diffusion"]["R@1"] == [0.05, 0.05]
  assert s["equal_compute"]["eclipse"]["R@1"] == [0.30, 0.30]
  # Target: 0.95 x the lower best mean R@1 (diffusion's (0.25 + 0.27) / 2 = 0.26).
  assert s["target"] == pytest.approx(0.95 * 0.26)
  q = s["equal_quality"]
  assert q["eclipse"]["step"] == [200, 200] and q["eclipse"]["train_s"] == [pytest.approx(50.0)] * 2
  assert q["diffusion"]["step"] == [400, 400] and q["diffusion"]["train_s"] == [pytest.approx(200.0)] * 2
  assert q["diffusion"]["train_flops"] == [400 * 2e9 * 2] * 2
  # An explicit target one seed never reaches.
  s2 = C.summarize(curves, target=0.26)
  assert s2["equal_quality"]["diffusion"]["reached"] == 1 and s2["equal_quality"]["diffusion"]["step"] == [None, 400]
  text = C.write_outputs(str(tmp_path), curves, s, plot=str(tmp_path / "c.png"))
  assert "| Diffusion-Baseline | 2/2 | 400 ± 0 |" in text and os.path.getsize(tmp_path / "c.png") > 0
  assert json.load(open(tmp_path / "compute.json"))["flops_budget"] == 4e11


def test_bad_steps_are_refused_before_any_work(tmp_path, capsys):
  with pytest.raises(SystemExit):
    C.main(["--workdir", str(tmp_path), "--steps", "eclipse=250", "--eval-every", "100"])
  assert "multiple of --eval-every" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    C.main(["--workdir", str(tmp_path), "--steps", "eclipse"])
  assert "is not objective=steps" in capsys.readouterr().err
  assert not os.listdir(tmp_path)
