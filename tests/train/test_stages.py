"""Stages (`diffusion_jax/stages.py`): a toy teacher run as stage "teacher" of a toy distillation run.

Killing the process inside the stage and rerunning resumes the stage; a finished stage is reused; a changed
stage config is an error naming the keys (or retrained with --restage); a stage given as a path must exist
and hold the right kind of run; `--mode eval` never trains a stage."""

import json
import os
import signal
import subprocess

import numpy as np
import pytest

import toy_config
import toy_experiment as toy
from diffusion_jax import stages
from diffusion_jax.pretrained import io


def _distill(**overrides):
  c = toy_config.get_config("distill")
  c.mesh.num_devices = 1
  c.stages.teacher.config.mesh.num_devices = 1
  return toy.set_keys(c, overrides)


def _cmd(workdir, *overrides, mode="train", extra=()):
  import sys
  return [sys.executable, "-m", "diffusion_jax.main", f"--config={toy.CONFIG}:distill", f"--workdir={workdir}",
          f"--mode={mode}", *[f"--config.{k}={v}" for k, v in overrides], *extra]


def test_kill_inside_a_stage_then_rerun_resumes_it(tmp_path):
  wd = str(tmp_path / "run")
  teacher = os.path.join(wd, "teacher")
  slow = ("stages.teacher.config.toy.step_delay", 0.4)
  proc = subprocess.Popen(_cmd(wd, slow), env=toy.subprocess_env(1), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    assert toy.wait_for(lambda: 2 in toy.finished_checkpoints(teacher), proc), "the teacher saved no checkpoint"
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
  record = stages.read_record(teacher)
  assert record["complete"] is False  # a killed stage is never taken as finished
  assert not os.path.exists(os.path.join(wd, "checkpoints"))  # the main run never started
  # The same command again: the stage's fingerprint matches its record, so it resumes.
  r = subprocess.run(_cmd(wd, slow), env=toy.subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  record = stages.read_record(teacher)
  assert record["complete"] and record["kind"] == "toy_params" and record["step"] == 6
  info = json.load(open(os.path.join(teacher, "run_info.json")))
  assert info["start_step"] >= 2  # resumed from the checkpoint, not restarted
  assert sorted(toy.read_metrics(teacher)) == list(range(1, 7))
  rows = toy.read_metrics(wd)
  assert sorted(rows) == list(range(1, 9)) and all(np.isfinite(r["distill"]) for r in rows.values())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("stages") / "run")
  out = stages.run(_distill(), wd)
  return wd, out


def test_stage_output_reaches_the_experiment_as_frozen_weights(finished):
  wd, out = finished
  assert out["step"] == 8 and np.isfinite(out["distill"])
  teacher = io.load_state_dict(os.path.join(wd, "teacher", "export", "params.safetensors"))
  own = io.load_state_dict(os.path.join(wd, "export", "params.safetensors"))
  assert set(teacher) == set(own) and any(not np.array_equal(teacher[k], own[k]) for k in own)
  # Not checkpointed: the main run's checkpoint holds params / opt_state / ema / rng / step only.
  from diffusion_jax.train import trainer
  run, state, _ = trainer._restore_latest(_distill(), wd, stages.resolve(_distill(), wd, train_missing=False))
  run.close()
  import dataclasses
  names = {f.name for f in dataclasses.fields(state)}
  assert names == {"step", "params", "opt_state", "ema", "rng"}


def test_finished_stage_is_reused_and_a_changed_one_is_an_error(finished, tmp_path):
  wd, _ = finished
  export = os.path.join(wd, "teacher", "export", "params.safetensors")
  before = os.path.getmtime(export)
  assert stages.resolve(_distill(), wd) == {"teacher": os.path.join(wd, "teacher", "export")}
  assert os.path.getmtime(export) == before
  # Operational keys do not change what a stage trains: still reused.
  assert stages.resolve(_distill(**{"stages.teacher.config.train.log_every": 3}), wd)
  changed = _distill(**{"stages.teacher.config.optim.lr": 1e-2})
  with pytest.raises(ValueError, match=r"Stage 'teacher'.*optim\.lr.*--restage=teacher"):
    stages.resolve(changed, wd)
  with pytest.raises(ValueError, match="not stages of this config"):
    stages.run(changed, wd, restage=("teachr",))


def test_restage_moves_the_old_run_aside_and_trains_again(tmp_path):
  wd = str(tmp_path / "run")
  stages.resolve(_distill(), wd)
  changed = _distill(**{"stages.teacher.config.optim.lr": 1e-2})
  got = stages.resolve(changed, wd, restage=("teacher",))
  assert os.path.isdir(os.path.join(wd, "teacher.previous", "checkpoints"))
  assert stages.read_record(os.path.join(wd, "teacher"))["complete"]
  assert got["teacher"] == os.path.join(wd, "teacher", "export")


def test_stage_paths_are_checked_at_start_up(finished, tmp_path):
  wd, _ = finished
  # A finished stage run as the path: its export is used, nothing is trained.
  c = _distill(**{"stages.teacher.path": os.path.join(wd, "teacher")})
  assert stages.resolve(c, str(tmp_path / "a")) == {"teacher": os.path.join(wd, "teacher", "export")}
  assert not os.path.exists(tmp_path / "a" / "teacher")
  # A plain finished run (not a stage) works too: its export directory.
  c.stages.teacher.path = wd
  assert stages.resolve(c, str(tmp_path / "a")) == {"teacher": os.path.join(wd, "export")}
  c.stages.teacher.path = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=r"Stage 'teacher'.*does not exist"):
    stages.resolve(c, str(tmp_path / "b"))
  (tmp_path / "empty").mkdir()
  c.stages.teacher.path = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"Stage 'teacher'.*params\.safetensors.*toy_params"):
    stages.resolve(c, str(tmp_path / "b"))
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  (unfinished / stages.STAGE_RECORD).write_text(json.dumps({"complete": False, "fingerprint": "x"}))
  c.stages.teacher.path = str(unfinished)
  with pytest.raises(ValueError, match=r"Stage 'teacher'.*not finished"):
    stages.resolve(c, str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b")


def test_eval_mode_never_trains_a_stage(tmp_path):
  wd = str(tmp_path / "run")
  r = subprocess.run(_cmd(wd, mode="eval"), env=toy.subprocess_env(1), capture_output=True, text=True, timeout=180)
  assert r.returncode == 2
  assert "FATAL" in r.stderr and "Stage 'teacher' has not finished" in r.stderr and "--mode train" in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(os.path.join(wd, "teacher", "checkpoints"))


def test_random_kills_across_a_stage_and_the_main_run_then_identical_metrics(tmp_path):
  """SIGKILL the whole process group at random moments (in the teacher stage, its checkpoint writes and export,
  the main run), rerun the same command after each kill; the final metrics equal an uninterrupted run's."""
  ref = str(tmp_path / "ref")
  stages.run(_distill(), ref)
  wd = str(tmp_path / "killed")
  slow = (("stages.teacher.config.toy.step_delay", 0.15), ("toy.step_delay", 0.15), ("mesh.num_devices", 1),
          ("stages.teacher.config.mesh.num_devices", 1))
  rng = np.random.default_rng(0)
  kills = 0
  for attempt in range(6):
    proc = subprocess.Popen(_cmd(wd, *slow), env=toy.subprocess_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
      proc.wait(timeout=float(rng.uniform(4.0, 9.0)))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(30)
      kills += 1
    if proc.returncode == 0:
      break
  assert kills >= 2, "the run finished before it was killed twice; lengthen the step delay"
  r = subprocess.run(_cmd(wd, *slow), env=toy.subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  for sub in ("teacher", ""):
    got, want = toy.read_metrics(os.path.join(wd, sub)), toy.read_metrics(os.path.join(ref, sub))
    assert sorted(got) == sorted(want)
    for step in want:
      for k in ("loss", "mse", "grad_norm"):
        assert got[step][k] == want[step][k], (sub, step, k)
  assert stages.read_record(os.path.join(wd, "teacher"))["complete"]
