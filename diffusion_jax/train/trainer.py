"""The one generic trainer: `train(config, workdir)`, plus `sample` / `evaluate` from the latest checkpoint.

It knows nothing of any method: an `Experiment` (diffusion_jax/experiments/base.py) supplies the data, the
initial params (+ frozen arrays), the loss, sampling and evaluation. Per run:

1. validate the config (names, divisibility, data dirs) and build the experiment and its data pipeline: a
   wrong name or a missing directory fails here, before anything is compiled;
2. mesh from `config.mesh`; state shardings from `config.param_sharding` (train/mesh.py);
3. `TrainState` (step, params, frozen, opt_state, ema, rng) created by a jitted init with out_shardings, or
   restored from the latest checkpoint against its abstract tree (so it lands on the current mesh);
4. the train step is jitted with in/out shardings and the state donated, compiled ahead of time;
5. loop: metrics (clu Average) -> DIR/metrics.jsonl + TensorBoard + console every `log_every`; checkpoint
   every `ckpt_every` (state + grain iterator + config); PNG sample grids every `sample_every`; evaluation
   every `eval_every` and at the end (DIR/eval_results.json).

Exact resume: the RNG of step s is `fold_in(state.rng, s)` and the data iterator position is checkpointed,
so an interrupted and resumed run computes the same steps as an uninterrupted one.
SIGTERM: the run saves a checkpoint at the step reached and returns. A non-finite loss raises
`FloatingPointError` before anything is saved, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from diffusion_jax.experiments.base import Experiment, get_experiment
from diffusion_jax.registry import check_choice
from diffusion_jax.train import mesh as mesh_lib
from diffusion_jax.train.checkpoint import Checkpointer
from diffusion_jax.train.metrics import Accumulator, MetricWriter, image_grid, save_png
from diffusion_jax.train.optim import OPTIMIZERS, SCHEDULES, make_optimizer
from diffusion_jax.train.remat import REMAT_POLICIES

PyTree = Any
DTYPES = ("float32", "bfloat16", "float16")


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data iterator and config.

  step: int32 scalar (number of optimiser updates done); params: trainable pytree (fp32);
  frozen: non-trained arrays from `Experiment.init` (never differentiated, never donated);
  opt_state: optax state; ema: tuple of EMA copies of params, one per `config.train.ema_decays`;
  rng: base PRNG key; step s uses `jax.random.fold_in(rng, s)`.
  """
  step: jax.Array
  params: PyTree
  frozen: PyTree
  opt_state: PyTree
  ema: Tuple[PyTree, ...]
  rng: jax.Array


# ------------------------------------------------------------------------------------------------ config


def _get(config, dotted: str, default=None):
  node = config
  for part in dotted.split("."):
    if node is None or part not in node:
      return default
    node = node[part]
  return node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked without devices or data; raises ValueError/FileNotFoundError naming the fix."""
  required = ("experiment", "seed", "data.batch_size", "optim.lr", "train.num_steps")
  missing = [k for k in required if _get(config, k) is None]
  if missing:
    raise ValueError(f"Config is missing keys {missing}. Start config files from configs/_base.py "
                     "(`base_config()`), which defines every key the trainer reads.")
  if not config.experiment:
    raise ValueError("config.experiment is empty; set it to a registered experiment name.")
  check_choice("dtype (config.dtype)", config.get("dtype", "float32"), DTYPES)
  check_choice("remat policy (config.remat)", config.get("remat", "none"), REMAT_POLICIES)
  check_choice("param_sharding rule (config.param_sharding)", config.get("param_sharding", "replicated"),
               mesh_lib.PARAM_SHARDINGS)
  check_choice("optimizer (config.optim.name)", config.optim.get("name", "adamw"), OPTIMIZERS)
  check_choice("learning-rate schedule (config.optim.schedule)", config.optim.get("schedule", "constant"),
               SCHEDULES)
  for key in ("data.batch_size", "train.num_steps"):
    if int(_get(config, key)) <= 0:
      raise ValueError(f"config.{key} must be positive, got {_get(config, key)}.")
  if int(_get(config, "train.log_every", 1)) <= 0:
    raise ValueError("config.train.log_every must be positive.")
  accum = int(_get(config, "optim.grad_accum", 1))
  if accum < 1:
    raise ValueError(f"config.optim.grad_accum must be >= 1, got {accum}.")
  for d in _get(config, "train.ema_decays", ()) or ():
    if not 0.0 <= float(d) < 1.0:
      raise ValueError(f"config.train.ema_decays must lie in [0, 1); got {d}.")
  for key, value in (config.data.items() if "data" in config else []):
    if isinstance(value, str) and value and key == "data_dir":  # (cache dirs etc. may be created by the run)
      if not os.path.exists(value):
        raise FileNotFoundError(
            f"config.data.{key} = {value!r} does not exist. Point it at the prepared data "
            f"(--config.data.{key}=/path/to/data) or build the data set there first.")


def validate_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  """Batch-size divisibility against the mesh and the number of hosts."""
  batch = int(config.data.batch_size)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  accum = int(config.optim.get("grad_accum", 1))
  pc = jax.process_count()
  if batch % pc:
    raise ValueError(f"config.data.batch_size={batch} is not divisible by the {pc} hosts; use a multiple of {pc}.")
  if batch % (dp * accum):
    raise ValueError(
        f"config.data.batch_size={batch} is not divisible by data-parallel devices x grad_accum = "
        f"{dp} x {accum} (mesh data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}). Use a multiple of "
        f"{dp * accum} or change config.mesh / config.optim.grad_accum.")


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


# ------------------------------------------------------------------------------------------------ setup


def _numeric(batch: Dict[str, Any]) -> Dict[str, Any]:
  """Only numeric/bool arrays go to the devices; strings (e.g. raw captions) stay on the host. Nested dicts
  are kept as nested dicts."""
  out = {}
  for k, v in batch.items():
    if isinstance(v, dict):
      sub = _numeric(v)
      if sub:
        out[k] = sub
      continue
    a = np.asarray(v)
    if a.dtype.kind in "biuf":
      out[k] = a
  return out


class _Run:
  """Experiment, mesh, data iterator, optimiser and shardings shared by train / sample / evaluate."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate_config(config)
    self.config = config
    self.workdir = workdir
    self.experiment: Experiment = get_experiment(config)  # unknown experiment -> lists valid names.
    self.experiment.workdir = workdir  # the run directory, for experiments with on-disk stages or caches.
    self.mesh = mesh_lib.make_mesh(config.get("mesh"))
    validate_mesh(config, self.mesh)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self.repl = mesh_lib.replicated(self.mesh)
    self.rule = config.get("param_sharding", "replicated")
    self.min_size = int(_get(config, "mesh.fsdp_min_size", mesh_lib.DEFAULT_FSDP_MIN_SIZE))
    self.num_steps = int(config.train.num_steps)
    self.ema_decays = tuple(float(d) for d in (_get(config, "train.ema_decays", ()) or ()))
    self.tx, self.schedule = make_optimizer(config.optim, self.num_steps)

    pi, pc = jax.process_index(), jax.process_count()
    dataset = self.experiment.make_dataset("train", seed=int(config.seed), shard_index=pi, shard_count=pc)
    self.iterator = iter(dataset)
    self.first_batch = next(self.iterator)  # used as the batch of step 1 on a fresh start.
    host = _numeric(self.first_batch)
    want = int(config.data.batch_size) // pc
    for path, v in jax.tree_util.tree_leaves_with_path(host):
      if v.ndim == 0 or v.shape[0] != want:
        raise ValueError(f"Batch entry {jax.tree_util.keystr(path)} has shape {v.shape}; expected a leading axis "
                         f"of {want} (= data.batch_size // hosts). Check the experiment's make_dataset.")
    self.batch_shardings = jax.tree.map(lambda _: self.batch_sharding, host)
    self.abstract_batch = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct((v.shape[0] * pc,) + v.shape[1:], v.dtype, sharding=self.batch_sharding),
        host)

    self.init_fn = self._make_init()
    rng = jax.random.PRNGKey(int(config.seed))
    abstract = jax.eval_shape(self.init_fn, rng, self.abstract_batch)
    self.state_shardings = mesh_lib.tree_shardings(abstract, self.mesh, self.rule, self.min_size)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings)

  def to_device(self, host_batch: Dict[str, Any]) -> Dict[str, jax.Array]:
    host = _numeric(host_batch)
    if jax.process_count() == 1:  # one batched transfer; cheaper than assembling per-array.
      return jax.device_put(host, self.batch_shardings)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(self.batch_sharding, v), host)

  def _make_init(self):
    experiment, tx, n_ema = self.experiment, self.tx, len(self.ema_decays)

    def init(rng, batch):
      init_rng, state_rng = jax.random.split(rng)
      es = experiment.init(init_rng, batch)
      params = es.params
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=es.frozen,
                        opt_state=tx.init(params),
                        ema=tuple(jax.tree.map(jnp.copy, params) for _ in range(n_ema)), rng=state_rng)
    return init

  def init_state(self) -> TrainState:
    rng = jax.random.PRNGKey(int(self.config.seed))
    batch = self.to_device(self.first_batch)
    with jax.set_mesh(self.mesh):
      return jax.jit(self.init_fn, out_shardings=self.state_shardings)(rng, batch)

  def close(self):
    close = getattr(self.iterator, "close", None)
    if close is not None:
      try:
        close()
      except Exception:  # pragma: no cover
        pass


def _make_step(experiment: Experiment, tx, schedule, ema_decays, accum: int):
  """The pure train step (dyn_state, frozen, batch) -> (dyn_state, metrics); dyn_state.frozen is {}."""

  def step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params, mb, r):
      loss, metrics = experiment.loss(params, frozen, state.ema, mb, r, state.step)
      return jnp.asarray(loss, jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, rng)
    else:
      # Micro-batch i holds examples i, i + accum, ...: each device keeps its own slice (no resharding).
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1), batch)
      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, state.params, first, rng))

      def body(carry, xs):
        i, mb = xs
        out = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, out), None

      total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      (loss, metrics), grads = jax.tree.map(lambda x: x / accum, total)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = tuple(jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, e_tree, params)
                for d, e_tree in zip(ema_decays, state.ema))
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads),
           "lr": jnp.asarray(schedule(state.step), jnp.float32), **metrics}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), out

  return step


def _param_overview(params: PyTree) -> Tuple[int, str]:
  """Total parameter count and a table of top-level modules (count, leaf shapes)."""
  tree = params
  if isinstance(tree, dict) and set(tree) == {"params"}:
    tree = tree["params"]
  rows = []
  items = tree.items() if isinstance(tree, dict) else [("params", tree)]
  total = 0
  for name, sub in items:
    leaves = jax.tree.leaves(sub)
    n = sum(int(math.prod(x.shape)) for x in leaves)
    total += n
    shapes = ", ".join(str(tuple(x.shape)) for x in leaves[:4]) + (" ..." if len(leaves) > 4 else "")
    rows.append((str(name), n, shapes))
  w = max([len(r[0]) for r in rows] + [6])
  lines = [f"{'module':<{w}}  {'#params':>12}  shapes", "-" * (w + 40)]
  lines += [f"{r[0]:<{w}}  {r[1]:>12,}  {r[2]}" for r in rows]
  lines.append(f"{'total':<{w}}  {total:>12,}")
  return total, "\n".join(lines)


def _eval_params(config, state: TrainState):
  if bool(_get(config, "train.sample_with_ema", True)) and state.ema:
    return state.ema[0]
  return state.params


class _Preemption:
  """SIGTERM -> flag checked after every step (the handler itself does no work)."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# ------------------------------------------------------------------------------------------------ train


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) `config.experiment` in `workdir`; returns the last logged metrics.

  The returned dict holds the last train metrics (`step`, `loss`, ...), the evaluation results under
  "eval/<name>" and `preempted=True` when a SIGTERM stopped the run early.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  run = _Run(config, workdir)
  tc = config.train
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(tc.get("keep_ckpts", 3)),
                      use_async=bool(tc.get("async_ckpt", True)))
  writer = MetricWriter(workdir, enabled=is_main)
  try:
    return _train_loop(run, ckpt, writer, config, workdir, is_main)
  finally:
    ckpt.close()  # waits for the last async save to be committed.
    writer.close()
    run.close()


def _train_loop(run: _Run, ckpt: Checkpointer, writer: MetricWriter, config, workdir: str, is_main: bool):
  tc = config.train
  num_steps = run.num_steps
  log_every = int(tc.get("log_every", 50))
  ckpt_every = int(tc.get("ckpt_every", 0) or 0)
  sample_every = int(tc.get("sample_every", 0) or 0)
  eval_every = int(tc.get("eval_every", 0) or 0)
  num_samples = int(tc.get("num_samples", 16))
  global_batch = int(config.data.batch_size)
  config_dict = _config_json(config)

  latest = ckpt.latest_step()
  first_batch = run.first_batch
  if latest is not None:
    saved_flat, cur_flat = _flat(ckpt.read_config(latest)), _flat(config_dict)
    diff = sorted(k for k in set(saved_flat) | set(cur_flat) if saved_flat.get(k) != cur_flat.get(k))
    state, _ = ckpt.restore(latest, run.abstract_state, run.iterator, config_diff=diff)
    first_batch = None  # the iterator now points at the batch after `latest`.
    if diff:
      logging.warning("Resuming with a config that differs from the checkpoint's in: %s", ", ".join(diff))
    logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
    writer.truncate_after(latest)
  else:
    state = run.init_state()
  start = int(jax.device_get(state.step))

  n_params, table = _param_overview(state.params)
  logging.info("Parameters: %s trainable (+%s frozen)\n%s", f"{n_params:,}",
               f"{sum(int(math.prod(x.shape)) for x in jax.tree.leaves(state.frozen)):,}", table)
  if is_main:
    try:
      from clu import parameter_overview
      with open(os.path.join(workdir, "param_overview.txt"), "w") as f:
        f.write(table + "\n\n" + parameter_overview.get_parameter_overview(state.params, include_stats=False))
    except Exception as e:  # pragma: no cover - overview is informational.
      logging.warning("Parameter overview failed: %s", e)

  frozen = state.frozen
  dyn_state = state.replace(frozen={})
  dyn_shardings = run.state_shardings.replace(frozen={})
  dyn_abstract = run.abstract_state.replace(frozen={})
  step_fn = _make_step(run.experiment, run.tx, run.schedule, run.ema_decays, int(config.optim.get("grad_accum", 1)))
  jitted = jax.jit(step_fn, in_shardings=(dyn_shardings, run.state_shardings.frozen, run.batch_shardings),
                   out_shardings=(dyn_shardings, run.repl), donate_argnums=(0,))
  t0 = time.time()
  with jax.set_mesh(run.mesh):
    compiled = jitted.lower(dyn_abstract, run.abstract_state.frozen, run.abstract_batch).compile()
  compile_s = time.time() - t0
  logging.info("Compiled the train step in %.2f s.", compile_s)
  if is_main:
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
      json.dump({"num_params": n_params, "compile_time_s": compile_s, "mesh": dict(run.mesh.shape),
                 "num_devices": jax.device_count(), "num_processes": jax.process_count(),
                 "platform": jax.devices()[0].platform, "jax_version": jax.__version__,
                 "start_step": start}, f, indent=1)

  def full_state():
    return dyn_state.replace(frozen=frozen)

  acc = Accumulator()
  last_saved = latest
  last_metrics: Dict[str, Any] = {}
  results: Dict[str, Any] = {}
  sample_rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x5A4D)

  def check_finite(step: int):
    bad = acc.first_non_finite()
    if bad is not None:
      ckpt.wait()
      good = ckpt.latest_step()
      raise FloatingPointError(
          f"Non-finite loss ({bad[1]}) at step {bad[0]}; training stopped. Nothing was saved after it: the "
          f"last good checkpoint is step {good} in {ckpt.directory}. Fix: lower config.optim.lr, enable "
          "config.optim.grad_clip, add warmup (config.optim.warmup_steps), or train in float32 "
          "(config.dtype), then rerun to resume from that checkpoint.")

  def save(step: int):
    nonlocal last_saved
    if last_saved == step:
      return
    check_finite(step)
    ckpt.save(step, full_state(), run.iterator, config_dict)
    last_saved = step

  def do_eval(step: int):
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0xE7A1)
    s = full_state()
    res = run.experiment.evaluate(_eval_params(config, s), s.frozen, rng, workdir) or {}
    res = {k: float(v) if np.ndim(v) == 0 else v for k, v in res.items()}
    if is_main:
      scalars = {f"eval/{k}": v for k, v in res.items() if isinstance(v, float)}
      if scalars:
        writer.write(step, scalars)
      with open(os.path.join(workdir, "eval_results.json"), "w") as f:
        json.dump({"step": step, **{k: v for k, v in res.items() if isinstance(v, (float, int, str))}}, f, indent=1)
    return res

  def do_sample(step: int):
    s = full_state()
    imgs = run.experiment.sample(_eval_params(config, s), s.frozen, jax.random.fold_in(sample_rng, step),
                                 num_samples)
    if imgs is not None and is_main:
      grid = image_grid(np.asarray(jax.device_get(imgs)))
      save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), grid)
      writer.write_image(step, "samples", grid)

  from tqdm import tqdm
  bar = tqdm(total=num_steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0,
             disable=not (is_main and bool(tc.get("progress_bar", True))))
  preempted = False
  step = start
  t_log, step_log = time.time(), start
  with _Preemption() as preemption:
    multi = jax.process_count() > 1
    while step < num_steps:
      # One host's SIGTERM flag is not enough on several hosts (they must stop at the same step): there
      # orbax's preemption check syncs through jax.distributed's preemption notifier.
      if (ckpt.manager.reached_preemption(step) if multi else preemption.flag):
        preempted = True
        break
      host_batch = first_batch if first_batch is not None else next(run.iterator)
      first_batch = None
      batch = run.to_device(host_batch)
      dyn_state, metrics = compiled(dyn_state, frozen, batch)
      step += 1
      acc.update(step, metrics)
      bar.update(1)
      if step % log_every == 0 or step == num_steps:
        check_finite(step)
        scalars = acc.compute()
        now = time.time()
        sps = (step - step_log) / max(now - t_log, 1e-9)
        scalars.update(steps_per_sec=sps, examples_per_sec=sps * global_batch)
        writer.write(step, scalars, console=True)
        bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4g}")
        last_metrics = {"step": step, **scalars}
        acc.reset()
        t_log, step_log = time.time(), step
      if ckpt_every and step % ckpt_every == 0:
        save(step)
      if sample_every and step % sample_every == 0:
        do_sample(step)
      if eval_every and step % eval_every == 0 and step != num_steps:
        do_eval(step)
    bar.close()
    if preempted:
      logging.warning("SIGTERM received: saving a checkpoint at step %d and exiting.", step)
      save(step)
      ckpt.wait()
      writer.flush()
      return {**last_metrics, "step": step, "preempted": True}

  save(step)
  if step >= num_steps:
    res = do_eval(step)
    results.update({f"eval/{k}": v for k, v in res.items()})
    if sample_every and step % sample_every:
      do_sample(step)
  writer.flush()
  return {**last_metrics, **results, "step": step, "preempted": False}


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
  else:
    out[prefix[:-1]] = d
  return out


# ------------------------------------------------------------------------------------------------ modes


def _restore_latest(config, workdir: str):
  run = _Run(config, workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.train.get("keep_ckpts", 3)),
                      use_async=False)
  step = ckpt.latest_step()
  if step is None:
    run.close()
    raise FileNotFoundError(f"No checkpoint in {ckpt.directory}. Train first: "
                            f"python -m diffusion_jax.main --config ... --workdir {workdir} --mode train")
  state, _ = ckpt.restore(step, run.abstract_state)
  ckpt.close()
  return run, state, step


def sample(config: ml_collections.ConfigDict, workdir: str, num: Optional[int] = None) -> Dict[str, Any]:
  """Samples `num` (default config.train.num_samples) images from the latest checkpoint into
  DIR/samples/final_<step>.png (+ .npy); returns {"step", "path", "shape"}."""
  run, state, step = _restore_latest(config, workdir)
  try:
    num = int(num or config.train.get("num_samples", 16))
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x5A4E)
    imgs = run.experiment.sample(_eval_params(config, state), state.frozen, rng, num)
    if imgs is None:
      logging.warning("Experiment %s has no image samples.", config.experiment)
      return {"step": step, "path": None}
    imgs = np.asarray(jax.device_get(imgs))
    path = os.path.join(workdir, "samples", f"final_{step:07d}.png")
    if jax.process_index() == 0:
      save_png(path, image_grid(imgs))
      np.save(path[:-4] + ".npy", imgs)
    logging.info("Wrote %d samples to %s", len(imgs), path)
    return {"step": step, "path": path, "shape": list(imgs.shape)}
  finally:
    run.close()


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Evaluates the latest checkpoint; writes DIR/eval_results.json; returns the results."""
  run, state, step = _restore_latest(config, workdir)
  try:
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0xE7A1)
    res = run.experiment.evaluate(_eval_params(config, state), state.frozen, rng, workdir) or {}
    res = {k: float(v) if np.ndim(v) == 0 and not isinstance(v, str) else v for k, v in res.items()}
    out = {"step": step, **res}
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "eval_results.json"), "w") as f:
        json.dump({k: v for k, v in out.items() if isinstance(v, (float, int, str))}, f, indent=1)
    logging.info("Evaluation at step %d: %s", step, res)
    return out
  finally:
    run.close()
