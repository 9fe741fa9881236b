"""scripts/diffit_ablation_table.py: the commands it runs and the table it collects, on fake run directories."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from scripts import diffit_ablation_table as T  # noqa: E402


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _fake_run(root, model, seed, fd1, acc1, fd3, acc3):
  wd = os.path.join(root, f"{model}_s{seed}")
  for g, fd, acc in ((1, fd1, acc1), (3, fd3, acc3)):
    _write(os.path.join(wd, f"eval_guidance{g}.json"),
           {"step": 600, "num_samples": 350.0, "shapes_fd": fd, "class_accuracy": acc, "colour_accuracy": 2 * acc,
            "shape_accuracy": acc + 0.1})
  _write(os.path.join(wd, "wall.json"), {"train_s": 300.0 + seed, "eval_guided_s": 40.0})


def test_commands_use_the_shapes_fd_and_the_guided_protocol():
  train, ev = T.commands("tmsa", 1, "/w", "/net.safetensors")
  assert train[train.index("--config") + 1] == "configs/diffit_shapes.py:tmsa,seed1"
  assert "--config.eval.fid_feature=shapes_fd" in train and "--config.eval.shapes_fd_path=/net.safetensors" in train
  assert "--mode" not in train
  assert ev[ev.index("--mode") + 1] == "eval" and "--config.sample.guidance_scale=3.0" in ev
  assert T.config_spec("dit", 0) == "configs/dit_shapes.py:seed0"
  assert T.config_spec("unet", 2) == "configs/diffit_shapes.py:seed2"


def test_table_means_stds_floor_and_ranking(tmp_path):
  root = str(tmp_path)
  _fake_run(root, "tmsa", 0, 10.0, 0.12, 20.0, 0.22)
  _fake_run(root, "tmsa", 1, 14.0, 0.10, 24.0, 0.20)
  _fake_run(root, "dit", 0, 30.0, 0.03, 40.0, 0.04)
  _fake_run(root, "dit", 1, 34.0, 0.01, 44.0, 0.02)
  os.makedirs(os.path.join(root, "unet_s0"))  # unfinished: no evaluation files -> left out
  _write(os.path.join(root, "tmsa_s2", "eval_guidance1.json"), {"shapes_fd": 1.0})  # half-finished -> left out
  _write(os.path.join(root, "floor.json"), {"rows": [{"seed": 0, "n": 350, "shapes_fd": 2.0, "class_accuracy": 1.0},
                                                      {"seed": 1, "n": 350, "shapes_fd": 4.0, "class_accuracy": 1.0}]})
  res = T.collect(root)
  assert sorted(res) == ["dit", "tmsa"] and res["tmsa"]["seeds"] == [0, 1]
  out = T.table(root)
  rows = [ln for ln in out.split("\n\n")[0].splitlines() if ln.startswith("| DiffiT (TMSA")]  # the summary table
  assert len(rows) == 2
  cells = [c.strip() for c in rows[0].split("|")[1:-1]]
  # mean +- sample std (ddof 1): FD 12 +- 2.8, floor 3 +- 1.4, class accuracy 11.0 +- 1.4 %
  assert cells[1] == "1" and cells[2].startswith("0,1 (n=350)")
  assert cells[3] == "12 ± 2.8" and cells[4] == "3 ± 1.4" and cells[5] == "11.0 ± 1.4%"
  assert "Spearman(shapes FD, -class_accuracy) over 4 runs = 1.00" in out
  assert "by mean FD ['tmsa', 'dit'], by mean class accuracy ['tmsa', 'dit']" in out
  assert "tmsa s1: train+eval 301.0 s" in out
  assert "| DiffiT (TMSA, patch transformer) | 1 | 3 | 24 | 20.0% | 40.0% | 30.0% |" in out  # per-run rows
  assert T._ms([1000.0, 1400.0]) == "1200 ± 283"


def test_spearman_detects_a_reversed_order():
  assert T.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
