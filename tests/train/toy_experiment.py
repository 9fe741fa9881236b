"""A tiny experiment for testing the trainer: an MLP epsilon-prediction denoiser on 12-d vectors drawn from a
fixed two-cluster mixture (each vector is also shown as a 2x2 RGB image). Registered as "toy_mlp".

With a stage named "teacher" (a finished toy_mlp run), the teacher's exported params are loaded as frozen
weights and the loss adds `toy.distill` x the MSE to the teacher's prediction (a CoDi-like pattern)."""

from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.data.pipeline import make_pipeline
from diffusion_jax.experiments.base import EXPERIMENTS, EXPORT_KINDS, Experiment, require_files
from diffusion_jax.train.remat import maybe_remat

DIM = 12


class ToySource:
  """Random-access source: example i is a deterministic function of (seed, i)."""

  def __init__(self, n: int = 64, seed: int = 0):
    self.n, self.seed = n, seed

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng([self.seed, int(i)])
    label = int(i) % 2
    centre = np.linspace(-1, 1, DIM, dtype=np.float32) * (1 if label else -1)
    x = centre + 0.1 * rng.standard_normal(DIM).astype(np.float32)
    return {"x": x.astype(np.float32), "label": np.int32(label), "index": np.int32(i)}


def add_one_hot(example):
  example = dict(example)
  # nested conditioning dict + a string entry: the trainer keeps nested numeric arrays, drops strings.
  example["cond"] = {"onehot": np.eye(2, dtype=np.float32)[example["label"]], "name": f"class {example['label']}"}
  return example


class Block(nn.Module):
  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    return h + nn.Dense(self.width, dtype=self.dtype)(nn.gelu(nn.Dense(self.width, dtype=self.dtype)(h)))


class Denoiser(nn.Module):
  width: int = 32
  depth: int = 2
  remat: str = "none"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, onehot):
    h = jnp.concatenate([x, t[:, None], onehot], axis=-1).astype(self.dtype)
    h = nn.Dense(self.width, dtype=self.dtype)(h)
    block = maybe_remat(Block, self.remat)
    for i in range(self.depth):
      h = block(self.width, dtype=self.dtype, name=f"block_{i}")(h)
    return nn.Dense(DIM, dtype=self.dtype)(h).astype(jnp.float32)


@EXPORT_KINDS.register("toy_params")
def _check_toy_export(path):
  require_files(path, ["params.safetensors"], "a toy_mlp export")


@EXPERIMENTS.register("toy_mlp")
class ToyExperiment(Experiment):
  export_kind = "toy_params"

  def __init__(self, config, stages=None):
    super().__init__(config, stages)
    if config.model.name != "mlp":
      from diffusion_jax.registry import check_choice
      check_choice("model", config.model.name, ["mlp"])
    self.model = Denoiser(width=config.model.width, depth=config.model.depth, remat=config.remat,
                          dtype=jnp.dtype(config.dtype))

  def make_dataset(self, split, *, seed, shard_index=0, shard_count=1):
    self.splits_requested = getattr(self, "splits_requested", []) + [split]
    d = self.config.data
    if d.name != "toy":
      from diffusion_jax.registry import check_choice
      check_choice("dataset", d.name, ["toy"])
    return make_pipeline(ToySource(d.num_examples, seed=0), [add_one_hot],
                         batch_size=d.batch_size // shard_count, seed=seed, num_workers=d.num_workers,
                         prefetch=d.prefetch, shard_index=shard_index, shard_count=shard_count)

  def load_frozen(self):
    frozen = {"scale": np.full((DIM,), 0.5, np.float32)}
    big = int(self.config.toy.get("frozen_mb", 0.0) * 2 ** 20 / 4)
    if big:  # a large frozen array (program-size tests): used in the loss, so it cannot be pruned.
      frozen["big"] = np.random.default_rng(0).standard_normal(big).astype(np.float32)
    if "teacher" in self.stages:
      from diffusion_jax.pretrained import io
      frozen["teacher"] = io.unflatten(io.load_state_dict(os.path.join(self.stage("teacher"), "params.safetensors")))
    return frozen

  def init(self, rng, batch, frozen):
    b = batch["x"].shape[0]
    return self.model.init(rng, jnp.zeros((b, DIM)), jnp.zeros((b,)), jnp.zeros((b, 2)))

  def export(self, params, frozen, directory):
    from diffusion_jax.pretrained import io
    io.save_state_dict(io.flatten(jax.tree.map(np.asarray, params)), os.path.join(directory, "params.safetensors"))

  def loss(self, params, frozen, ema, batch, rng, step):
    x = batch["x"] * frozen["scale"] * 2.0
    k1, k2 = jax.random.split(rng)
    t = jax.random.uniform(k1, (x.shape[0],))
    eps = jax.random.normal(k2, x.shape)
    a, s = jnp.cos(0.5 * jnp.pi * t)[:, None], jnp.sin(0.5 * jnp.pi * t)[:, None]
    assert "name" not in batch["cond"]
    xt = a * x + s * eps
    pred = self.model.apply(params, xt, t, batch["cond"]["onehot"])
    loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - eps))
    metrics = {}
    if "big" in frozen:
      loss = loss + 0.0 * jnp.mean(frozen["big"])
    if "teacher" in frozen:
      teacher = self.model.apply(frozen["teacher"], xt, t, batch["cond"]["onehot"])
      metrics["distill"] = jnp.mean(jnp.square(pred - jax.lax.stop_gradient(teacher)))
      loss = loss + float(self.config.toy.get("distill", 1.0)) * metrics["distill"]
    delay = float(self.config.toy.step_delay)
    if delay > 0:  # slows the run down so that tests can signal it mid-way.
      jax.debug.callback(lambda: time.sleep(delay))
    nan_at = self.config.toy.nan_at_step
    if nan_at >= 0:
      loss = jnp.where(step >= nan_at, jnp.nan, loss)
    inf_at = int(self.config.toy.get("inf_grad_at_step", -1))
    if inf_at >= 0:  # a finite loss whose gradient is infinite (d sqrt(u) / du at u = 0): a silent divergence
      leaf = jax.tree.leaves(params)[0]
      on = step >= inf_at
      u = jnp.where(on, jnp.maximum(leaf - jax.lax.stop_gradient(leaf), 0.0), 1.0)  # (1: a finite gradient)
      loss = loss + jnp.where(on, jnp.sum(jnp.sqrt(u)), 0.0)
    first = next(iter(ema.values())) if ema else None
    ema_gap = jnp.mean(jnp.square(jax.tree.leaves(first)[0] - jax.tree.leaves(params)[0])) if ema else 0.0
    return loss, {"mse": loss, "ema_gap": ema_gap, **metrics}

  def sample(self, params, frozen, batch, rng):
    num = len(batch["x"])
    x = jax.random.normal(rng, (num, DIM))
    onehot = jnp.asarray(batch["cond"]["onehot"])
    for t in (1.0, 0.5):
      tt = jnp.full((num,), t)
      eps = self.model.apply(params, x, tt, onehot)
      a, s = jnp.cos(0.5 * jnp.pi * t), jnp.sin(0.5 * jnp.pi * t)
      x0 = (x - s * eps) / jnp.maximum(a, 1e-3)
      x = x0 if t == 0.5 else jnp.cos(0.25 * jnp.pi) * x0 + jnp.sin(0.25 * jnp.pi) * eps
    return {"image": np.asarray(jax.nn.sigmoid(x)).reshape(num, 2, 2, 3), "label": np.asarray(batch["label"])}

  def evaluate(self, params, frozen, rng, workdir):
    ex = [add_one_hot(ToySource(8)[i]) for i in range(8)]
    batch = {"x": np.stack([e["x"] for e in ex]), "cond": {"onehot": np.stack([e["cond"]["onehot"] for e in ex])}}
    loss, _ = self.loss(params, frozen, {}, batch, rng, 0)
    return {"eval_loss": float(loss), "num": 8}


def toy_config(**overrides) -> ml_collections.ConfigDict:
  import sys, os
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if root not in sys.path:
    sys.path.insert(0, root)
  from configs import _base
  c = _base.base_config()
  c.experiment = "toy_mlp"
  c.data.name = "toy"
  c.data.batch_size = 8
  c.data.num_examples = 64
  c.model.name = "mlp"
  c.model.width = 32
  c.model.depth = 2
  c.optim.lr = 3e-3
  c.optim.grad_clip = 1.0
  c.train.num_steps = 8
  c.train.log_every = 1
  c.train.ckpt_every = 4
  c.train.ema = ml_collections.ConfigDict({"ema": 0.9, "slow": 0.99})
  c.train.sample_with = "ema"
  c.train.progress_bar = False
  c.toy = ml_collections.ConfigDict({"nan_at_step": -1, "step_delay": 0.0, "frozen_mb": 0.0, "distill": 1.0,
                                      "inf_grad_at_step": -1})
  return set_keys(c, overrides)


def set_keys(c, overrides):
  """Sets dotted keys ("train.num_steps") of config `c` in place; returns `c`."""
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return c


def wait_for(pred, proc, timeout=120.0):
  """Polls `pred()` until it holds, the process `proc` ends or `timeout` seconds pass; returns pred()."""
  import time as _time
  t0 = _time.time()
  while _time.time() - t0 < timeout:
    if pred():
      return True
    if proc.poll() is not None:
      return pred()
    _time.sleep(0.1)
  return False


# ------------------------------------------------------------------------------------------- test helpers

REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__))))
CONFIG = __import__("os").path.join(REPO, "tests", "train", "toy_config.py")


def main_cmd(workdir, *overrides, mode="train"):
  import sys
  return [sys.executable, "-m", "diffusion_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
          f"--mode={mode}", *[f"--config.{k}={v}" for k, v in overrides]]


def subprocess_env(num_devices=4):
  import os
  env = dict(os.environ)
  import re
  other = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={num_devices}"] + other)
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def read_metrics(workdir):
  """step -> row of metrics.jsonl (training rows only)."""
  import json, os
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        rows[r["step"]] = r
  return rows


def finished_checkpoints(workdir):
  import os
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()
                and os.path.exists(os.path.join(d, n, "_CHECKPOINT_METADATA")))
