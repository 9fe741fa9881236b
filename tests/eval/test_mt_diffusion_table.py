"""scripts/mt_diffusion_table.py: the commands it runs, its resume rule, and the table it collects from fake run
directories (numbers computed here from the fake inputs; missing runs named)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from scripts import mt_diffusion_table as T  # noqa: E402


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _fake(root, variant, seed, step=800, **metrics):
  wd = T.workdir(root, variant, seed)
  _write(os.path.join(wd, "eval_results.json"), {"step": step, "num_samples": 256.0,
                                                 "pr_features": "shapes_fd", **metrics})
  _write(os.path.join(wd, "wall.json"), {"wall_s": 100.0 + seed, "cpu_s": 150.0, "load_before": "2.00 1.00 0.50",
                                         "load_after": "3.00 2.00 1.00", "steps": step})


def _row(out, experiment, metric_label):
  rows = [ln for ln in out.splitlines() if ln.startswith(f"| {experiment} | {metric_label} |")]
  assert len(rows) == 1, (experiment, metric_label, rows)
  return [c.strip() for c in rows[0].split("|")[1:-1]]


def test_commands():
  cmd = T.train_command("/r", "label", 1, 800, net="/n.safetensors")
  assert cmd[cmd.index("--config") + 1] == "configs/mt_diffusion_shapes.py:label,seed1"
  assert cmd[cmd.index("--workdir") + 1] == "/r/label_s1"
  assert "--config.train.num_steps=800" in cmd and "--config.eval.shapes_fd_path=/n.safetensors" in cmd
  assert not any(c.startswith("--config.stages") for c in cmd)
  clip = T.train_command("/r", "clip", 0, 300)
  assert "--config.stages.clip.path=/r/clip" in clip and not any("shapes_fd_path" in c for c in clip)
  assert "--config.stages.clip.path=/c" in T.train_command("/r", "clip", 0, 300, clip="/c")
  assert T.clip_command("/r")[-3:] == ["configs/clip_shapes.py", "--workdir", "/r/clip"]
  assert T.net_command("/n")[-4:] == ["--out", "/n", "--image_size", "16"]


def test_resume_skips_runs_evaluated_at_the_step(tmp_path, monkeypatch):
  root = str(tmp_path)
  _fake(root, "label", 0, step=800)
  _fake(root, "image", 0, step=200)  # evaluated at another step: rerun
  ran = []
  monkeypatch.setattr(T, "_run_cmd", lambda cmd, log: ran.append(cmd[cmd.index("--workdir") + 1]) or {})
  T.run_all(root, [0], 800, variants=("label", "image"))
  assert ran == [os.path.join(root, "image_s0")]
  assert T.is_done(root, "label", 0, 800) and not T.is_done(root, "image", 0, 800)
  ran.clear()
  T.run_all(root, [0, 1], 800, variants=("label", "inpaint_recon", "image"))  # seed-major, baseline first
  assert [os.path.basename(p) for p in ran] == ["image_s0", "inpaint_recon_s0", "image_s1", "inpaint_recon_s1",
                                               "label_s1"]  # image_s0 again: the fake run wrote no evaluation


def test_table_means_stds_baselines_and_missing_runs(tmp_path):
  root = str(tmp_path)
  for s, (agree, prec, fd) in enumerate(((0.5, 0.9, 10.0), (0.7, 0.7, 14.0))):
    _fake(root, "label", s, label_image_agreement=agree, label_to_image_accuracy=0.4, image_to_label_accuracy=0.3,
          precision=prec, recall=0.5, shapes_fd=fd)
  for s, (prec, fd) in enumerate(((0.8, 20.0), (0.6, 24.0))):
    _fake(root, "image", s, precision=prec, recall=0.4, shapes_fd=fd)
  for s, mse in enumerate((0.8, 0.6)):
    _fake(root, "inpaint", s, inpaint_mse=mse, inpaint_mse_outside=0.3, inpaint_class_accuracy=0.1,
          precision=0.9, recall=0.6, shapes_fd=12.0)
  for s, mse in enumerate((0.1, 0.2)):
    _fake(root, "inpaint_recon", s, inpaint_mse=mse, inpaint_mse_outside=0.001, inpaint_class_accuracy=0.9)
  _fake(root, "segmentation", 0, seg_image_iou=0.6, seg_to_image_iou=0.5, image_to_seg_iou=0.4, precision=0.9,
        recall=0.5, shapes_fd=11.0)
  os.makedirs(T.workdir(root, "segmentation", 1))  # unfinished: no eval_results.json
  _write(os.path.join(root, "floor.json"), {"rows": [
      {"seed": 0, "n": 128, "shapes_fd": 1.0, "precision": 0.9, "recall": 1.0},
      {"seed": 1, "n": 128, "shapes_fd": 3.0, "precision": 0.7, "recall": 1.0},
      {"seed": 2, "n": 128, "shapes_fd": 99.0, "precision": 0.0, "recall": 0.0}]})  # not a seed asked for
  out = T.table(root, seeds=[0, 1])
  assert ("real vs real (the reference set against the next test images, same n = 128; seeds 0,1): "
          "precision 0.8 ± 0.14, recall 1 ± 0, shapes_fd 2 ± 1.4") in out

  # (a): mean +- sample std (ddof 1) over the two seeds, next to the image-only baseline for the image metrics
  assert _row(out, "(a) image + label", "label / image agreement (parser) ↑")[2:5] == ["0.6 ± 0.14", "0,1", "—"]
  c = _row(out, "(a) image + label", "precision of joint samples ↑")
  assert c[2:] == ["0.8 ± 0.14", "0,1", "image-only baseline (1 modality)", "0.7 ± 0.14", "0,1"]
  c = _row(out, "(a) image + label", "shapes FD of joint samples ↓")
  assert c[2] == "12 ± 2.8" and c[5] == "22 ± 2.8"
  # (b): one seed finished -> no std, its seed shown; the other reported missing
  assert _row(out, "(b) image + segmentation", "mask / image IoU (parser) ↑")[2:4] == ["0.6", "0"]
  assert "missing runs (no eval_results.json): segmentation_s1, clip_s0, clip_s1" in out
  # (c): the reconstruction baseline next to the joint model, and the per-seed ratio baseline / joint
  c = _row(out, "(c) inpainting", "masked-region MSE ↓")
  assert c[2] == "0.7 ± 0.14" and c[4] == "reconstruction-only baseline" and c[5] == "0.15 ± 0.071"
  ratio = [0.1 / 0.8, 0.2 / 0.6]  # 0.125, 0.333: mean 0.229, std 0.147
  assert f"baseline / joint (> 1: the joint model is better; the paper: ~10): {T._ms(ratio)} over seeds 0,1" in out
  assert T._ms(ratio) == "0.229 ± 0.15"
  # (d) has no run at all
  assert _row(out, "(d) image + CLIP embedding", "cos(generated embedding, CLIP(generated image)) ↑")[2] == "missing"
  assert "precision / recall features: shapes_fd" in out
  # per-run rows with wall / CPU time and load
  assert "| label | 1 | 800 | 0.7 | 0.5 | 14 | label_image_agreement 0.7, label_to_image_accuracy 0.4, " \
         "image_to_label_accuracy 0.3 | 101.0 | 150.0 | 2.00 1.00 0.50 / 3.00 2.00 1.00 |" in out
  assert "WARNING" not in out
  # a metric that no finished run measured has no row
  assert "| (b) image + segmentation | mask given" in out
  _fake(root, "label", 0, label_image_agreement=0.5, precision=123.4)  # conditional metrics off; large value
  out = T.table(root, seeds=[0])
  assert "label given -> parser class" not in out and "| label | 0 | 800 | 123 |" in out


def test_table_flags_runs_at_different_steps(tmp_path):
  root = str(tmp_path)
  _fake(root, "image", 0, step=800, precision=0.5, recall=0.5)
  _fake(root, "image", 1, step=400, precision=0.5, recall=0.5)
  out = T.table(root)
  assert "WARNING: runs at different steps: [400, 800]" in out
  assert "label_s0" in out.split("missing runs")[-1]


@pytest.mark.parametrize("seeds", [None, [0]])
def test_table_of_an_empty_root(tmp_path, seeds):
  out = T.table(str(tmp_path), seeds)
  assert "missing" in _row(out, "(c) inpainting", "masked-region MSE ↓")[2]
