"""Exact resume across SIGKILL, SIGTERM checkpointing, restore on another device count, NaN stop."""

import os
import signal
import subprocess

import jax
import numpy as np
import pytest

import toy_experiment as toy
from diffusion_jax.train import trainer

DETERMINISTIC = ("loss", "mse", "grad_norm", "ema_gap", "lr")


_wait_for = toy.wait_for


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
  n = 8
  cfg = dict(**{"train.num_steps": n, "train.ckpt_every": 4, "train.log_every": 1, "data.num_workers": 1})
  ref_dir = str(tmp_path / "ref")
  trainer.train(toy.toy_config(**cfg), ref_dir)
  ref = toy.read_metrics(ref_dir)
  assert sorted(ref) == list(range(1, n + 1))

  run_dir = str(tmp_path / "killed")
  proc = subprocess.Popen(toy.main_cmd(run_dir, ("train.num_steps", n), ("train.ckpt_every", 4),
                                       ("toy.step_delay", 0.3), ("data.num_workers", 1)),
                          env=toy.subprocess_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  try:
    assert _wait_for(lambda: 4 in toy.finished_checkpoints(run_dir), proc), "no checkpoint at step 4"
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, grain worker included (as a crashed node)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert max(toy.finished_checkpoints(run_dir)) < n

  result = trainer.train(toy.toy_config(**cfg), run_dir)
  assert result["step"] == n
  got = toy.read_metrics(run_dir)
  assert sorted(got) == sorted(ref)
  for step in ref:
    for k in DETERMINISTIC:
      assert got[step][k] == ref[step][k], (step, k, got[step][k], ref[step][k])


def test_sigterm_saves_and_resume_continues(tmp_path):
  """SIGTERM to the whole process group (as SLURM sends it), a grain worker process included."""
  run_dir = str(tmp_path / "run")
  proc = subprocess.Popen(toy.main_cmd(run_dir, ("train.num_steps", 200), ("train.ckpt_every", 1000),
                                       ("toy.step_delay", 0.2), ("data.num_workers", 1)),
                          env=toy.subprocess_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          start_new_session=True)
  try:
    ok = _wait_for(lambda: os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
                   and len(toy.read_metrics(run_dir)) >= 3, proc)
    assert ok, "training did not start"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err.decode()[-2000:]
  reached = max(toy.read_metrics(run_dir))
  assert toy.finished_checkpoints(run_dir) == [reached]
  assert 3 <= reached < 200

  result = trainer.train(toy.toy_config(**{"train.num_steps": reached + 2, "data.num_workers": 1}), run_dir)
  assert result["step"] == reached + 2
  assert sorted(toy.read_metrics(run_dir))[-3:] == [reached, reached + 1, reached + 2]


def _params_of(workdir, **over):
  cfg = toy.toy_config(**over)
  run, state, step = trainer._restore_latest(cfg, workdir)
  run.close()
  return run, state, step


def test_restore_on_different_device_count(tmp_path):
  """Saved FSDP-sharded on 4 devices; restored on a 2-device mesh (same values, new shardings) and
  training continues on 1 device."""
  run_dir = str(tmp_path / "run")
  fsdp = {"mesh.data": 1, "mesh.fsdp": 4, "param_sharding": "fsdp", "mesh.fsdp_min_size": 64}
  trainer.train(toy.toy_config(**{"train.num_steps": 4, **fsdp}), run_dir)
  _, state4, step4 = _params_of(run_dir, **fsdp)
  sharded = [x for x in jax.tree.leaves(state4.params) if not x.sharding.is_fully_replicated]
  assert sharded, "FSDP rule sharded nothing; the test would not exercise resharding"

  two = {"mesh.num_devices": 2, "mesh.data": 1, "mesh.fsdp": 2, "param_sharding": "fsdp",
         "mesh.fsdp_min_size": 64}
  run2, state2, step2 = _params_of(run_dir, **two)
  assert step2 == step4 == 4
  assert len(run2.mesh.devices.flat) == 2
  for a, b in zip(jax.tree.leaves(state4), jax.tree.leaves(state2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(b.sharding.device_set) <= 2

  one = {"mesh.num_devices": 1, "mesh.data": -1, "mesh.fsdp": 1}
  result = trainer.train(toy.toy_config(**{"train.num_steps": 6, **one}), run_dir)
  assert result["step"] == 6 and np.isfinite(result["loss"])
  assert toy.finished_checkpoints(run_dir)[-1] == 6


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
  run_dir = str(tmp_path / "run")
  cfg = toy.toy_config(**{"train.num_steps": 12, "train.ckpt_every": 4, "train.log_every": 3,
                          "toy.nan_at_step": 6})
  with pytest.raises(FloatingPointError, match=r"step 7.*last good checkpoint is step 4"):
    trainer.train(cfg, run_dir)
  assert toy.finished_checkpoints(run_dir) == [4]
  _, state, step = _params_of(run_dir)
  assert step == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
