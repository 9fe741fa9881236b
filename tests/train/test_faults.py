"""Fault injection on the toy run: a divergence with a finite loss, a damaged latest checkpoint, a half-written
metrics line, an output path that cannot be written. Each ends with a clear message before expensive work, or
recovers with a warning; nothing good is lost or overwritten."""

import json
import os

import jax
import numpy as np
import pytest

import toy_experiment as toy
from diffusion_jax.train import trainer


def _cfg(**kw):
  return toy.toy_config(**{"mesh.num_devices": 1, "train.log_every": 1, "train.ckpt_every": 2, **kw})


def test_finite_loss_with_infinite_gradients_is_stopped_and_never_saved(tmp_path):
  wd = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match=r"Non-finite grad_norm.*step 5.*last good checkpoint is step 4"):
    trainer.train(_cfg(**{"toy.inf_grad_at_step": 4}), wd)
  assert toy.finished_checkpoints(wd) == [2, 4]
  assert sorted(toy.read_metrics(wd)) == [1, 2, 3, 4]  # the diverged step is neither logged nor saved
  run, state, step = trainer._restore_latest(_cfg(), wd)
  run.close()
  assert step == 4 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def _damage(wd, step, how):
  d = os.path.join(wd, "checkpoints", str(step))
  if how == "truncate":
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "state", "d")) for f in fs]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
      f.truncate(os.path.getsize(big) // 2)
  elif how == "manifest":
    os.remove(os.path.join(d, "state", "manifest.ocdbt"))
  elif how == "metadata":
    os.remove(os.path.join(d, "state", "_METADATA"))
  else:
    os.remove(os.path.join(d, "config", "metadata"))


@pytest.mark.parametrize("how", ["truncate", "manifest", "metadata", "config"])
def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(tmp_path, how):
  wd = str(tmp_path / "run")
  ref = trainer.train(_cfg(**{"train.num_steps": 6}), str(tmp_path / "ref"))
  trainer.train(_cfg(**{"train.num_steps": 4}), wd)
  assert toy.finished_checkpoints(wd) == [2, 4]
  _damage(wd, 4, how)
  out = trainer.train(_cfg(**{"train.num_steps": 6}), wd)
  assert out["step"] == 6
  moved = [n for n in os.listdir(os.path.join(wd, "checkpoints")) if n.startswith("4.damaged-")]
  assert len(moved) == 1  # kept, not deleted
  info = json.load(open(os.path.join(wd, "run_info.json")))
  assert info["start_step"] == 2
  # Resumed exactly from step 2: the same metrics as the uninterrupted reference run.
  got, want = toy.read_metrics(wd), toy.read_metrics(str(tmp_path / "ref"))
  assert got[6]["loss"] == want[6]["loss"] and ref["step"] == 6


def test_half_written_metrics_line_does_not_block_resume(tmp_path):
  wd = str(tmp_path / "run")
  trainer.train(_cfg(**{"train.num_steps": 4}), wd)
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "lo')  # killed mid-write
  out = trainer.train(_cfg(**{"train.num_steps": 6}), wd)
  assert out["step"] == 6
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]  # every line parses
  train_steps = [r["step"] for r in rows if "loss" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]  # one training row per step, the broken one dropped


def test_unwritable_checkpoint_path_fails_before_training(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "checkpoints").write_text("not a directory")
  with pytest.raises(ValueError, match=r"Cannot write to .*checkpoints.*writable --workdir"):
    trainer.train(_cfg(), str(wd))
  assert not (wd / "metrics.jsonl").exists()


def test_lost_data_iterator_state_is_reported_as_an_inexact_resume(tmp_path):
  wd = str(tmp_path / "run")
  out = trainer.train(_cfg(**{"train.num_steps": 4}), wd)
  assert out["exact_resume"] is True
  os.remove(os.path.join(wd, "checkpoints", "4", "data", "process_0-of-1.json"))
  out = trainer.train(_cfg(**{"train.num_steps": 6}), wd)
  assert out["step"] == 6 and out["exact_resume"] is False
  assert json.load(open(os.path.join(wd, "run_info.json")))["exact_resume"] is False


def test_rows_of_a_run_killed_before_its_first_checkpoint_are_not_duplicated(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')  # no checkpoint
  trainer.train(_cfg(**{"train.num_steps": 3}), str(wd))
  rows = [r for r in map(json.loads, open(wd / "metrics.jsonl")) if "loss" in r]  # training rows
  assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] != 9.0 for r in rows)
