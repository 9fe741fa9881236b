"""Config errors stop at start-up with a clear message; optimiser schedules; the CLI modes."""

import json
import os
import subprocess

import numpy as np
import pytest

import toy_experiment as toy
from diffusion_jax.train import optim, remat, trainer
from diffusion_jax.train.config_loading import load_config


@pytest.mark.parametrize("over,exc,pattern", [
    ({"experiment": "nope"}, ValueError, r"Unknown experiment 'nope'.*toy_mlp"),
    ({"model.name": "resnet"}, ValueError, r"Unknown model 'resnet'.*mlp"),
    ({"data.name": "imagenet"}, ValueError, r"Unknown dataset 'imagenet'.*toy"),
    ({"optim.name": "lion"}, ValueError, r"optimizer.*'lion'.*adamw"),
    ({"optim.schedule": "linear"}, ValueError, r"schedule.*cosine_restarts"),
    ({"remat": "some"}, ValueError, r"remat.*dots"),
    ({"param_sharding": "zero"}, ValueError, r"fsdp"),
    ({"data.batch_size": 6}, ValueError, r"batch_size=6 is not divisible.*4"),
    ({"data.batch_size": 8, "optim.grad_accum": 4}, ValueError, r"grad_accum"),
    ({"data.data_dir": "/nonexistent/data"}, FileNotFoundError, r"data_dir.*does not exist"),
    ({"mesh.data": 3}, ValueError, r"needs 3 devices"),
])
def test_bad_config_fails_before_training(tmp_path, over, exc, pattern):
  with pytest.raises(exc, match=pattern):
    trainer.train(toy.toy_config(**over), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "0")
  assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


def test_cli_unknown_override_key_lists_valid_keys(tmp_path):
  r = subprocess.run(toy.main_cmd(str(tmp_path / "w"), ("train.num_stepz", 3)), env=toy.subprocess_env(1),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "num_stepz" in r.stderr and "num_steps" in r.stderr and "log_every" in r.stderr


def test_cli_train_sample_eval(tmp_path):
  w = str(tmp_path / "w")
  env = toy.subprocess_env(1)
  r = subprocess.run(toy.main_cmd(w, ("train.num_steps", 2), ("train.sample_every", 2)), env=env,
                     capture_output=True, text=True, timeout=180)
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.exists(os.path.join(w, "samples", "step_0000002.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(w))
  rows = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  assert {"step", "loss", "steps_per_sec"} <= set(rows[0])
  r = subprocess.run(toy.main_cmd(w, mode="sample"), env=env, capture_output=True, text=True, timeout=180)
  assert r.returncode == 0, r.stderr[-3000:]
  out = np.load(os.path.join(w, "samples", "final_0000002.npz"))
  imgs = out["image"]
  assert imgs.shape == (16, 2, 2, 3) and imgs.min() >= 0 and imgs.max() <= 1
  assert set(np.unique(out["label"])) <= {0, 1} and len(out["label"]) == 16
  from PIL import Image
  sheet = np.asarray(Image.open(os.path.join(w, "samples", "final_0000002.png")))
  # one row per example (16), each cell upscaled to >= 64 px, a caption line ("label k") under each cell
  assert sheet.shape[1] >= 64 and sheet.shape[0] >= 16 * 64
  os.remove(os.path.join(w, "eval_results.json"))
  out = trainer.evaluate(toy.toy_config(**{"mesh.num_devices": 1}), w)  # --mode eval, in-process.
  assert out["step"] == 2
  res = json.load(open(os.path.join(w, "eval_results.json")))
  assert res["step"] == 2 and np.isfinite(res["eval_loss"])


def test_sample_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint.*Train first"):
    trainer.sample(toy.toy_config(), str(tmp_path / "empty"))


def test_schedules():
  c = toy.toy_config(**{"optim.lr": 1.0, "optim.warmup_steps": 10, "optim.schedule": "warmup_cosine"})
  s = optim.make_schedule(c.optim, 100)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6 and float(s(100)) < 1e-6
  c.optim.schedule = "cosine_restarts"
  c.optim.restart_period = 50
  c.optim.warmup_steps = 0
  s = optim.make_schedule(c.optim, 100)
  assert abs(float(s(0)) - 1.0) < 1e-6 and float(s(49)) < 0.01 and abs(float(s(50)) - 1.0) < 1e-6
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 4
  s = optim.make_schedule(c.optim, 100)
  assert abs(float(s(2)) - 0.5) < 1e-6 and float(s(50)) == 1.0


def test_remat_policy_names():
  assert remat.remat_policy("none") is None
  assert remat.remat_policy("dots") is not None
  with pytest.raises(ValueError, match="full"):
    remat.remat_policy("all")


def test_load_config_overrides():
  c = load_config(toy.CONFIG, {"train.num_steps": 5})
  assert c.train.num_steps == 5
  with pytest.raises(KeyError, match="num_stepz"):
    load_config(toy.CONFIG, {"train.num_stepz": 5})


def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
  w = str(tmp_path / "w")
  trainer.train(toy.toy_config(**{"train.num_steps": 1, "mesh.num_devices": 1}), w)
  with pytest.raises(ValueError, match=r"does not match.*model\.width"):
    trainer.train(toy.toy_config(**{"train.num_steps": 2, "mesh.num_devices": 1, "model.width": 16}), w)
