"""Data-parallel and FSDP runs on 4 simulated devices match a 1-device run; remat and grad accumulation."""

import json
import os

import jax
import numpy as np

import toy_experiment as toy
from diffusion_jax.train import trainer

KEYS = ("loss", "grad_norm", "ema_gap")


def _run(tmp_path, name, **over):
  cfg = toy.toy_config(**{"train.num_steps": 3, "train.ckpt_every": 0, **over})
  trainer.train(cfg, str(tmp_path / name))
  return toy.read_metrics(str(tmp_path / name))


def test_data_parallel_and_fsdp_match_single_device(tmp_path):
  assert jax.device_count() >= 4
  one = _run(tmp_path, "one", **{"mesh.num_devices": 1})
  dp = _run(tmp_path, "dp", **{"mesh.data": 4})
  fsdp = _run(tmp_path, "fsdp", **{"mesh.data": 1, "mesh.fsdp": 4, "param_sharding": "fsdp",
                                   "mesh.fsdp_min_size": 64, "remat": "full"})
  assert sorted(one) == [1, 2, 3]
  for other in (dp, fsdp):
    for step in one:
      for k in KEYS:
        np.testing.assert_allclose(other[step][k], one[step][k], rtol=2e-5, atol=1e-6, err_msg=f"{k}@{step}")
  # the params did change between steps (otherwise equal losses would prove little).
  assert one[1]["loss"] != one[3]["loss"]


def test_grad_accumulation_bf16_eval_samples_keep_last(tmp_path):
  m = _run(tmp_path, "accum", **{"optim.grad_accum": 2, "dtype": "bfloat16", "remat": "dots",
                                 "train.eval_every": 2, "train.sample_every": 2, "train.ckpt_every": 1,
                                 "train.keep_ckpts": 2})
  assert sorted(m) == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in m.values())
  w = str(tmp_path / "accum")
  rows = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "eval/eval_loss" in r] == [2, 3]  # every 2 steps and at the end
  assert sorted(os.listdir(os.path.join(w, "samples"))) == ["step_0000002.png", "step_0000003.png"]
  assert toy.finished_checkpoints(w) == [2, 3]  # keep_ckpts=2
  assert json.load(open(os.path.join(w, "eval_results.json")))["step"] == 3
