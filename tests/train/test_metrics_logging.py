"""What the trainer logs: the current learning rate (not a window mean), steps_per_sec of train steps only
(sampling / evaluation timed in sample_sec / eval_sec rows), TensorBoard tags without tensorboardX renaming,
and a metrics.jsonl row for `--mode eval`."""

import glob
import json
import logging
import os
import time

import numpy as np

import toy_experiment as toy

from diffusion_jax.train import trainer
from diffusion_jax.train.metrics import Accumulator, MetricWriter, tensorboard_tag
from diffusion_jax.train.optim import make_optimizer


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_accumulator_lr_is_the_last_value_other_metrics_the_mean():
  acc = Accumulator()
  for step, (loss, lr) in enumerate([(1.0, 0.1), (2.0, 0.2), (6.0, 0.3)], start=1):
    acc.update(step, {"loss": np.float32(loss), "lr": np.float32(lr)})
  out = acc.compute()
  assert out["loss"] == 3.0
  assert abs(out["lr"] - 0.3) < 1e-7


def test_logged_lr_is_the_schedule_at_the_logged_step(tmp_path):
  """Warmup + cosine: every row's lr is the learning rate of that row's last update (step s updates with
  schedule(s - 1)), which a window mean would miss by far during warmup."""
  cfg = toy.toy_config(**{"train.num_steps": 12, "train.log_every": 4, "train.ckpt_every": 0,
                          "optim.schedule": "warmup_cosine", "optim.warmup_steps": 8})
  wd = str(tmp_path)
  trainer.train(cfg, wd)
  _, schedule = make_optimizer(cfg.optim, cfg.train.num_steps)
  rows = toy.read_metrics(wd)
  assert sorted(rows) == [4, 8, 12]
  for step, row in rows.items():
    want = float(schedule(step - 1))
    assert abs(row["lr"] - want) <= 1e-6 * max(1.0, abs(want)), (step, row["lr"], want)
  mean_4 = np.mean([float(schedule(s)) for s in range(4)])
  assert abs(rows[4]["lr"] - mean_4) > 1e-5  # (the old window mean)


def test_steps_per_sec_leaves_out_sampling_and_evaluation(tmp_path, monkeypatch):
  """A sample sheet and an evaluation that each take >= 1.5 s inside every 4-step window: steps_per_sec stays
  the (fast) train-step rate; the time shows up as sample_sec / eval_sec rows."""
  pause = 1.5
  exp_cls = type(trainer.get_experiment(toy.toy_config()))
  sample, evaluate = exp_cls.sample, exp_cls.evaluate

  def slow_sample(self, *a, **k):
    time.sleep(pause)
    return sample(self, *a, **k)

  def slow_evaluate(self, *a, **k):
    time.sleep(pause)
    return evaluate(self, *a, **k)

  monkeypatch.setattr(exp_cls, "sample", slow_sample)
  monkeypatch.setattr(exp_cls, "evaluate", slow_evaluate)
  cfg = toy.toy_config(**{"train.num_steps": 12, "train.log_every": 4, "train.ckpt_every": 0,
                          "train.sample_every": 4, "train.eval_every": 4, "train.num_samples": 4})
  wd = str(tmp_path)
  trainer.train(cfg, wd)
  rows = _rows(wd)
  train_rows = [r for r in rows if "loss" in r]
  # 4 steps per window with >= 3 s of sampling + evaluation in it: counting them would give < 4 / 3 steps/s.
  assert all(r["steps_per_sec"] > 4.0 for r in train_rows[1:]), [r["steps_per_sec"] for r in train_rows]
  samples = [r for r in rows if "sample_sec" in r]
  evals = [r for r in rows if "eval_sec" in r]
  assert [r["step"] for r in samples] == [4, 8, 12] and all(r["sample_sec"] >= pause for r in samples)
  assert [r["step"] for r in evals] == [4, 8, 12] and all(r["eval_sec"] >= pause for r in evals)
  assert all("eval/eval_loss" in r for r in evals)


def test_tensorboard_tags_are_legal_without_renaming(tmp_path, caplog):
  assert tensorboard_tag("eval/R@1") == "eval/R_at_1"
  assert tensorboard_tag("eval/e2e_binding") == "eval/e2e_binding"
  assert tensorboard_tag("a b(c)") == "a_b_c_"
  writer = MetricWriter(str(tmp_path))
  with caplog.at_level(logging.DEBUG, logger="tensorboardX"):
    writer.write(3, {"eval/R@1": 0.5, "eval/clip_text_R@5": 0.25, "loss": 1.0}, console=False)
    writer.close()
  assert not [r for r in caplog.records if "illegal" in r.getMessage()]
  events = open(glob.glob(str(tmp_path / "events.out.tfevents.*"))[0], "rb").read()
  assert b"eval/R_at_1" in events and b"eval/clip_text_R_at_5" in events and b"R@1" not in events
  assert _rows(str(tmp_path))[-1] == {"step": 3, "eval/R@1": 0.5, "eval/clip_text_R@5": 0.25, "loss": 1.0}


def test_mode_eval_appends_a_metrics_row(tmp_path):
  cfg = toy.toy_config(**{"train.num_steps": 4, "train.log_every": 2, "train.ckpt_every": 4})
  wd = str(tmp_path)
  trainer.train(cfg, wd)
  before = _rows(wd)
  out = trainer.evaluate(cfg, wd)
  rows = _rows(wd)
  assert len(rows) == len(before) + 1
  row = rows[-1]
  assert row["mode"] == "eval" and row["step"] == 4 and row["eval_sec"] > 0
  assert row["eval/eval_loss"] == out["eval_loss"]


def test_compiled_flops_is_xla_count_of_the_program():
  import jax
  import jax.numpy as jnp
  c = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  assert trainer.compiled_flops(c) == 2 * 64 * 32 * 16

  class NoCount:
    def cost_analysis(self):
      return [{}]
  assert trainer.compiled_flops(NoCount()) is None


def test_run_info_records_the_train_steps_flops(tmp_path):
  """run_info.json's step_flops is the compiled train step's count per device (the batch is split over the
  test's 4 simulated devices): each extra example on a device costs a dense forward + backward, 4-12 x params
  (6 x for matmuls alone), on top of a batch-independent optimizer update."""
  flops, per_device = {}, {}
  for batch in (8, 32):
    wd = str(tmp_path / f"b{batch}")
    trainer.train(toy.toy_config(**{"train.num_steps": 1, "train.ckpt_every": 0, "data.batch_size": batch}), wd)
    info = json.load(open(os.path.join(wd, "run_info.json")))
    flops[batch], per_device[batch], n_params = info["step_flops"], batch / info["num_devices"], info["num_params"]
  per_example = (flops[32] - flops[8]) / (per_device[32] - per_device[8])
  assert 4 * n_params <= per_example <= 12 * n_params, (per_example, n_params)
  assert flops[8] > 2 * n_params * per_device[8]
