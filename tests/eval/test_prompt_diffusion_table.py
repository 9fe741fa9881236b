"""scripts/prompt_diffusion_table.py: the commands it runs, its resume rule and checks, and the table it
collects from fake run directories (expected numbers computed here from the fake inputs)."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from scripts import prompt_diffusion_table as T  # noqa: E402


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _fake(root, variant, seed, step=600, **metrics):
  wd = T.workdir(root, variant, seed)
  _write(os.path.join(wd, "eval_results.json"), {"step": step, **{k.replace("__", "/"): v for k, v in metrics.items()}})
  _write(os.path.join(wd, "wall.json"), {"wall_s": 60.0 + seed, "cpu_s": 90.0, "load_before": "1.00 1.00 1.00",
                                         "load_after": "2.00 2.00 2.00"})


def _row(out, first, second):
  rows = [ln for ln in out.splitlines() if ln.startswith(f"| {first} | {second} |")]
  assert len(rows) == 1, (first, second, rows)
  return [c.strip() for c in rows[0].split("|")[1:-1]]


def test_commands():
  cmd = T.train_command("/r", "pd", 1, 600, "/base", net="/n.safetensors")
  assert cmd[cmd.index("--config") + 1] == "configs/prompt_diffusion_shapes.py"
  assert cmd[cmd.index("--workdir") + 1] == "/r/pd_s1"
  for flag in ("--config.seed=1", "--config.train.num_steps=600", "--config.stages.pipeline.path=/base",
               "--config.eval.shapes_fd_path=/n.safetensors", "--config.data.num_train=4000"):
    assert flag in cmd, flag
  cn = T.train_command("/r", "cnft_inv_edge", 0, 300, "/base", overrides=())
  assert cn[cn.index("--config") + 1] == "configs/prompt_diffusion_shapes.py:cnft,inv_edge"
  assert not any("shapes_fd_path" in c or "num_train" in c for c in cn)
  with pytest.raises(ValueError, match="Unknown run"):
    T.train_command("/r", "cnft_colour_perm", 0, 300, "/base")  # unseen tasks have no CN-FT


def test_run_order_resume_and_bad_inputs(tmp_path, monkeypatch):
  root, base = str(tmp_path / "runs"), str(tmp_path / "base")
  os.makedirs(base)
  _fake(root, "pd", 0, step=600)
  _fake(root, "cnft_depth", 0, step=300)  # another step: rerun
  ran = []
  monkeypatch.setattr(T, "_run_cmd", lambda cmd, log: ran.append(os.path.basename(cmd[cmd.index("--workdir") + 1]))
                      or {})
  T.run_all(root, [0, 1], 600, base, cnft=("depth", "inv_seg"))
  assert ran == ["cnft_inv_seg_s0", "cnft_depth_s0", "pd_s1", "cnft_inv_seg_s1", "cnft_depth_s1"]
  with pytest.raises(SystemExit, match="not a directory"):
    T.run_all(root, [0], 600, str(tmp_path / "nope"))
  with pytest.raises(SystemExit, match="does not exist"):
    T.run_all(root, [0], 600, base, net=str(tmp_path / "net.safetensors"))
  with pytest.raises(SystemExit, match="not seen tasks"):
    T.run_all(root, [0], 600, base, cnft=("inv_blob",))


def test_table(tmp_path):
  root = str(tmp_path)
  pd = [dict(inv_depth__shapes_fd=100.0, inv_depth__map_agreement=0.3, inv_depth__class_accuracy=0.2,
             inv_depth__rmse=0.28, depth__rmse=0.20, inv_blob__rmse=0.3, inv_blob__class_accuracy=0.1,
             incontext_notext__correct=0.33, incontext_notext__rmse_own=0.26, incontext_notext__rmse_other=0.27,
             incontext_notext__spread=1e-4, mismatch_inv_depth__rmse=0.30, mismatch_inv_depth__map_agreement=0.25,
             **{"mismatch__inv_depth_pixel_change": 0.001}),
        dict(inv_depth__shapes_fd=140.0, inv_depth__map_agreement=0.5, inv_depth__class_accuracy=0.2,
             inv_depth__rmse=0.26, depth__rmse=0.22, inv_blob__rmse=0.5, inv_blob__class_accuracy=0.3,
             incontext_notext__correct=0.5, incontext_notext__rmse_own=0.2, incontext_notext__rmse_other=0.3,
             incontext_notext__spread=0.1, mismatch_inv_depth__rmse=0.36, mismatch_inv_depth__map_agreement=0.5,
             **{"mismatch__inv_depth_pixel_change": 0.003})]
  for s, m in enumerate(pd):
    _fake(root, "pd", s, **m)
  for s, fd in enumerate((50.0, 70.0)):
    _fake(root, "cnft_inv_depth", s, inv_depth__shapes_fd=fd, inv_depth__map_agreement=0.6,
          inv_depth__class_accuracy=0.4, inv_depth__rmse=0.2)
  _fake(root, "cnft_depth", 0, depth__rmse=0.1)
  os.makedirs(T.workdir(root, "cnft_depth", 1))  # unfinished
  out = T.table(root, seeds=[0, 1])
  # seen: mean +- sample std (ddof 1) and the seeds, Prompt Diffusion next to its CN-FT
  assert _row(out, "inv_depth", "shapes FD to the true images ↓")[2:] == ["120 ± 28 (0,1)", "60 ± 14 (0,1)"]
  assert _row(out, "inv_depth", "agreement with the query map ↑")[2:] == ["0.4 ± 0.14 (0,1)", "0.6 ± 0 (0,1)"]
  assert _row(out, "depth", "RMSE to the true map [0, 1] ↓")[2:] == ["0.21 ± 0.014 (0,1)", "0.1 (0)"]
  assert "| edge |" not in out  # measured by no run
  assert not any(ln.startswith("| depth | shapes FD") for ln in out.splitlines())  # forward: RMSE only
  # unseen, with how far they are from the training tasks
  assert _row(out, "inv_blob", "far")[2:4] == ["0.4 ± 0.14 (0,1)", "0.2 ± 0.14 (0,1)"]
  assert "| inv_lowres |" not in out  # not evaluated
  # in-context test (empty text)
  r = _row(out, "notext", f"{T._ms([0.33, 0.5])} (0,1)")
  assert r[2] == T._ms([0.26, 0.2]) + " (0,1)" and r[4] == T._ms([1e-4, 0.1]) + " (0,1)"
  # mismatch: the per-seed difference mismatched - matched
  r = _row(out, "inv_depth", f"{T._ms([0.001, 0.003])} (0,1)")
  assert r[2] == T._ms([0.30 - 0.28, 0.36 - 0.26]) and r[3] == T._ms([0.25 - 0.3, 0.5 - 0.5]) and r[4] == "—"
  assert np.isclose(float(r[2].split(" ± ")[0]), 0.06)
  assert "| pd | 1 | 600 | 61.0 | 90.0 | 1.00 1.00 1.00 / 2.00 2.00 2.00 |" in out
  missing = out.split("missing runs (no eval_results.json): ")[1].split(", ")
  assert "cnft_depth_s1" in missing and "cnft_edge_s0" in missing and not any(m.startswith("pd") for m in missing)
  assert "cnft_depth_s0" not in missing and "cnft_inv_depth_s1" not in missing
  assert "WARNING" not in out
  _fake(root, "cnft_depth", 1, step=300, depth__rmse=0.1)
  assert "WARNING: the runs are at different steps [300, 600]" in T.table(root, seeds=[0, 1])
