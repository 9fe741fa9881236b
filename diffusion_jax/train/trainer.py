"""The one generic trainer: `train(config, workdir)`, plus `sample` / `evaluate` from the latest checkpoint.

It knows nothing of any method: an `Experiment` (diffusion_jax/experiments/base.py) supplies the data, the
initial params (+ frozen arrays), the loss, sampling and evaluation. Per run:

1. validate the config (names, divisibility, data dirs, EMA names, optimiser groups) and build the experiment
   (with its stages' export directories) and its data pipeline — the train split for `train`, only the test
   split for `sample` / `evaluate`: a wrong name or a missing directory fails here, before anything is
   compiled;
2. mesh from `config.mesh`; shardings of params and frozen weights from `config.param_sharding`
   (train/mesh.py);
3. frozen / pretrained weights: `experiment.load_frozen()` on the host, placed on the mesh by the same rule,
   passed to every jitted function as an argument (never a constant of a compiled program, never
   checkpointed);
4. `TrainState` (step, params, opt_state, named ema, rng) created by a jitted `init(rng, batch, frozen)` with
   out_shardings, or restored from the latest checkpoint against its abstract tree (so it lands on the
   current mesh);
5. the train step `(state, frozen, batch) -> (state, metrics)` is jitted with in/out shardings and the
   state donated, compiled ahead of time;
6. loop: metrics (clu Average; `lr` the current value) -> DIR/metrics.jsonl + TensorBoard + console every
   `log_every` (`steps_per_sec` of train steps only; sampling / evaluation in `sample_sec` / `eval_sec` rows); checkpoint
   every `ckpt_every` (state + grain iterator + config); sample sheets of a fixed eval batch every
   `sample_every` (DIR/samples/); evaluation every `eval_every`; at the end the export (DIR/export, what a
   stage hands on), evaluation (DIR/eval_results.json) and a last sample sheet.

Exact resume: the RNG of step s is `fold_in(state.rng, s)` and the data iterator position is checkpointed,
so an interrupted and resumed run computes the same steps as an uninterrupted one.
SIGTERM: the run saves a checkpoint at the step reached and returns. A non-finite loss raises
`FloatingPointError` before anything is saved, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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

from diffusion_jax import host_memory, paths
from diffusion_jax.experiments.base import Experiment, get_experiment
from diffusion_jax.registry import check_choice
from diffusion_jax.train import mesh as mesh_lib
from diffusion_jax.train.checkpoint import Checkpointer
from diffusion_jax.train.config_loading import flatten
from diffusion_jax.images import sample_sheet, save_png
from diffusion_jax.train.metrics import Accumulator, MetricWriter
from diffusion_jax.train.optim import OPTIMIZERS, SCHEDULES, check_groups, make_optimizer
from diffusion_jax.train.remat import REMAT_POLICIES

PyTree = Any
DTYPES = ("float32", "bfloat16", "float16")


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data iterator and config.

  step: int32 scalar (number of optimiser updates done); params: trainable pytree (fp32);
  opt_state: optax state (nothing for frozen groups); ema: dict of named EMA copies of params
  (`config.train.ema`); rng: base PRNG key; step s uses `jax.random.fold_in(rng, s)`. Frozen weights are not
  part of it: they come from `Experiment.load_frozen()` at every start.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  ema: Dict[str, PyTree]
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
  if int(_get(config, "data.batch_size")) <= 0:
    raise ValueError(f"config.data.batch_size must be positive, got {_get(config, 'data.batch_size')}.")
  if int(_get(config, "train.num_steps")) < 0:  # 0: nothing to train (sample / evaluate released weights)
    raise ValueError(f"config.train.num_steps must be >= 0, got {_get(config, 'train.num_steps')}.")
  if int(_get(config, "train.log_every", 1)) <= 0:
    raise ValueError("config.train.log_every must be positive.")
  accum = int(_get(config, "optim.grad_accum", 1))
  if accum < 1:
    raise ValueError(f"config.optim.grad_accum must be >= 1, got {accum}.")
  for old in ("ema_decays", "sample_with_ema"):
    if "train" in config and old in config.train:
      raise ValueError(f"config.train.{old} was replaced by named EMAs: config.train.ema = {{'ema': 0.9999}} "
                       "(name -> decay, {} for none) and config.train.sample_with = 'ema' (an EMA name or "
                       "'params').")
  emas = ema_decays(config)
  for name, d in emas.items():
    if not 0.0 <= d < 1.0:
      raise ValueError(f"config.train.ema.{name} = {d}: an EMA decay must lie in [0, 1).")
  with_ = str(_get(config, "train.sample_with", "params"))
  if with_ != "params" and with_ not in emas:
    raise ValueError(f"config.train.sample_with = {with_!r} names no EMA. Valid: 'params', "
                     f"{', '.join(repr(n) for n in emas) or '(no EMA configured: config.train.ema is empty)'}.")
  for key, value in (config.data.items() if "data" in config else []):
    if isinstance(value, str) and value and key == "data_dir":  # (cache dirs etc. may be created by the run)
      if not paths.exists(value):
        raise FileNotFoundError(
            f"config.data.{key} = {value!r} does not exist. Point it at the prepared data "
            f"(--config.data.{key}=/path/to/data) or build the data set there first.")


def ema_decays(config: ml_collections.ConfigDict) -> Dict[str, float]:
  """config.train.ema (name -> decay) as a plain dict, in config order."""
  emas = _get(config, "train.ema", None)
  if not emas:
    return {}
  if not hasattr(emas, "items"):
    raise ValueError(f"config.train.ema must map names to decays (e.g. {{'ema': 0.9999}}), got {emas!r}.")
  return {str(k): float(v) for k, v in emas.items()}


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


def place(tree: PyTree, shardings: PyTree) -> PyTree:
  """Host arrays (numpy or jax) -> global arrays with `shardings`; works on one host and on several (every
  process holds the same full host value, e.g. weights read from the same file)."""
  def put(x, s):
    if isinstance(x, jax.Array) and jax.process_count() == 1:
      return jax.device_put(x, s)
    a = np.asarray(x)
    return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
  return jax.tree.map(put, tree, shardings)


def _all_finite(*trees) -> bool:
  """Whether every float array of `trees` is finite (one device reduction, one host sync)."""
  leaves = [x for t in trees for x in jax.tree.leaves(t)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return True
  return bool(jax.device_get(_finite_fn(leaves)))


@jax.jit
def _finite_fn(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_writable(*dirs: str) -> None:
  """Creates each directory and writes a probe file in it: an output path that cannot be written fails here,
  before anything is trained, instead of in a background checkpoint save."""
  for d in dirs:
    try:
      paths.makedirs(d)  # local, or a gs:// (fsspec) URL
      probe = paths.join(d, f".write_probe_{os.getpid()}")
      with paths.open(probe, "w") as f:
        f.write("ok")
      paths.remove(probe)
    except OSError as e:
      raise ValueError(f"Cannot write to {d} ({type(e).__name__}: {e}). Choose a writable --workdir or fix the "
                       "directory's permissions / free space.") from e


def _tree_mb(tree: PyTree) -> float:
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)) / 2 ** 20


class _Run:
  """Experiment, mesh, data iterator, frozen weights, optimiser and shardings shared by train / sample /
  evaluate. `mode="train"` reads the train split; any other mode only the test split."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mode: str = "train",
               stages: Optional[Dict[str, str]] = None):
    validate_config(config)
    self.config = config
    self.workdir = workdir
    self.mode = mode
    self.experiment: Experiment = get_experiment(config, stages)  # unknown experiment -> lists valid names.
    # The run directory, for experiments with on-disk caches and evaluation dumps; for a URL work dir
    # (gs://...) a local directory on each host (paths.local_mirror), since experiments write local files.
    self.local_workdir = paths.local_mirror(workdir)
    if self.local_workdir != workdir:
      logging.info("Work dir %s is remote: experiment side files (caches, evaluation dumps) go to %s.", workdir,
                   self.local_workdir)
    self.experiment.workdir = self.local_workdir
    self.mesh = mesh_lib.make_mesh(config.get("mesh"))
    validate_mesh(config, self.mesh)
    self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self.repl = mesh_lib.replicated(self.mesh)
    self.rule = config.get("param_sharding", "replicated")
    self.min_size = int(_get(config, "mesh.fsdp_min_size", mesh_lib.DEFAULT_FSDP_MIN_SIZE))
    self.num_steps = int(config.train.num_steps)
    self.ema_decays = ema_decays(config)
    self.sample_with = str(_get(config, "train.sample_with", "params"))
    self.tx, self.schedule = make_optimizer(config.optim, max(self.num_steps, 1))  # 0 steps: sample / eval
    self._sample_batch = None

    pi, pc = jax.process_index(), jax.process_count()
    split = "train" if mode == "train" else "test"
    dataset = self.experiment.make_dataset(split, seed=int(config.seed), shard_index=pi, shard_count=pc)
    self.iterator = iter(dataset)
    self.first_batch = next(self.iterator)  # the batch of step 1 on a fresh start (train); shapes (others).
    host = _numeric(self.first_batch)
    want = int(config.data.batch_size) // pc
    if mode == "train":
      for path, v in jax.tree_util.tree_leaves_with_path(host):
        if v.ndim == 0 or v.shape[0] != want:
          raise ValueError(f"Batch entry {jax.tree_util.keystr(path)} has shape {v.shape}; expected a leading "
                           f"axis of {want} (= data.batch_size // hosts). Check the experiment's make_dataset.")
    self.batch_shardings = jax.tree.map(lambda _: self.batch_sharding, host)
    self.abstract_batch = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct((v.shape[0] * pc,) + v.shape[1:], v.dtype, sharding=self.batch_sharding),
        host)

    # Frozen / pretrained weights: loaded on the host, placed by the params' rule, passed as arguments.
    t0 = time.time()
    frozen_host = self.experiment.load_frozen() or {}
    self.frozen_shardings = mesh_lib.tree_shardings(frozen_host, self.mesh, self.rule, self.min_size)
    self.frozen = place(frozen_host, self.frozen_shardings)
    del frozen_host
    self.abstract_frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        self.frozen, self.frozen_shardings)
    if jax.tree.leaves(self.frozen):
      logging.info("Frozen weights: %.1f MB placed on the mesh in %.2f s.", _tree_mb(self.frozen), time.time() - t0)

    self.init_fn = self._make_init()
    rng = jax.random.PRNGKey(int(config.seed))
    abstract = jax.eval_shape(self.init_fn, rng, self.abstract_batch, self.abstract_frozen)
    self.group_counts = check_groups(config.optim, abstract.params)
    self.state_shardings = mesh_lib.tree_shardings(abstract, self.mesh, self.rule, self.min_size)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings)

  def to_device(self, host_batch: Dict[str, Any]) -> Dict[str, jax.Array]:
    host = _numeric(host_batch)
    if jax.process_count() == 1:  # one batched transfer; cheaper than assembling per-array.
      return jax.device_put(host, self.batch_shardings)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(self.batch_sharding, v), host)

  def _make_init(self):
    experiment, tx, names = self.experiment, self.tx, tuple(self.ema_decays)

    def state_from(params, state_rng):
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                        ema={n: jax.tree.map(jnp.copy, params) for n in names}, rng=state_rng)

    def init(rng, batch, frozen):
      init_rng, state_rng = jax.random.split(rng)
      params = experiment.init(init_rng, batch, frozen)
      if not isinstance(params, dict):
        raise TypeError(f"{type(experiment).__name__}.init must return the params pytree (a dict), got "
                        f"{type(params).__name__}.")
      return state_from(params, state_rng)

    def init_with(rng, params):  # params read on the host by `experiment.load_params`
      return state_from(params, jax.random.split(rng)[1])

    self.init_with_fn = init_with
    return init

  def init_state(self) -> TrainState:
    rng = jax.random.PRNGKey(int(self.config.seed))
    pretrained = self.experiment.load_params(self.abstract_state.params)
    with jax.set_mesh(self.mesh):
      if pretrained is not None:
        params = place(pretrained, self.state_shardings.params)
        return jax.jit(self.init_with_fn, out_shardings=self.state_shardings)(rng, params)
      batch = self.to_device(self.first_batch)
      return jax.jit(self.init_fn, out_shardings=self.state_shardings)(rng, batch, self.frozen)

  def step_fn(self):
    return _make_step(self.experiment, self.tx, self.schedule, self.ema_decays,
                      int(self.config.optim.get("grad_accum", 1)))

  def lower_step(self):
    """The train step lowered for this run's shapes and shardings (`.compile()` it, or read `.as_text()`)."""
    jitted = jax.jit(self.step_fn(), in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_shardings),
                     out_shardings=(self.state_shardings, self.repl), donate_argnums=(0,))
    with jax.set_mesh(self.mesh):
      return jitted.lower(self.abstract_state, self.abstract_frozen, self.abstract_batch)

  def lower_init(self):
    jitted = jax.jit(self.init_fn, out_shardings=self.state_shardings)
    with jax.set_mesh(self.mesh):
      return jitted.lower(jax.random.PRNGKey(0), self.abstract_batch, self.abstract_frozen)

  def eval_params(self, state: TrainState):
    return state.params if self.sample_with == "params" else state.ema[self.sample_with]

  def sample_batch(self, num: int) -> Dict[str, Any]:
    """The first `num` examples of the test split (host arrays), the same at every call: the conditions
    of every sample sheet of a run."""
    if self._sample_batch is None or _batch_len(self._sample_batch) < num:
      if self.mode != "train":
        it, first = self.iterator, self.first_batch
      else:
        ds = self.experiment.make_dataset("test", seed=int(self.config.seed), shard_index=jax.process_index(),
                                          shard_count=jax.process_count())
        it = iter(ds)
        first = next(it)
      parts, n = [first], _batch_len(first)
      while n < num:
        try:
          b = next(it)
        except StopIteration:
          break
        parts.append(b)
        n += _batch_len(b)
      self._sample_batch = _concat_batches(parts)
      if it is not self.iterator:
        _close(it)
    return _slice_batch(self._sample_batch, num)

  def close(self):
    _close(self.iterator)


def _close(it):
  close = getattr(it, "close", None)
  if close is not None:
    try:
      close()
    except Exception:  # pragma: no cover
      pass


def _batch_len(batch) -> int:
  for v in jax.tree.leaves(batch):
    if np.ndim(v):
      return int(np.shape(v)[0])
  return 0


def _concat_batches(parts):
  if len(parts) == 1:
    return parts[0]
  return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *parts)


def _slice_batch(batch, num: int):
  return jax.tree.map(lambda v: v[:num] if np.ndim(v) else v, batch)


def _make_step(experiment: Experiment, tx, schedule, ema_decays: Dict[str, float], accum: int):
  """The pure train step (state, frozen, batch) -> (state, metrics)."""

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
    ema = {name: jax.tree.map(lambda e, p, d=ema_decays[name]: d * e + (1.0 - d) * p, e_tree, params)
           for name, e_tree in state.ema.items()}
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

EXPORT_SUBDIR = "export"


def export_dir(workdir: str) -> str:
  """Where a finished run's `Experiment.export` output lives (what a stage hands on)."""
  return paths.join(workdir, EXPORT_SUBDIR)


def train(config: ml_collections.ConfigDict, workdir: str, stages: Optional[Dict[str, str]] = None
          ) -> Dict[str, Any]:
  """Trains (or resumes) `config.experiment` in `workdir`; returns the last logged metrics.

  `stages` maps the names of `config.stages` to their export directories (`diffusion_jax.stages` resolves
  them; call `diffusion_jax.stages.run` to have them trained first). The returned dict holds the last train
  metrics (`step`, `loss`, ...), the evaluation results under "eval/<name>", `preempted=True` when a SIGTERM
  stopped the run early, and `export` (the export directory, or None).
  """
  if int(config.train.num_steps) == 0:
    raise ValueError("config.train.num_steps=0: there is nothing to train. To sample or evaluate released weights "
                     "(e.g. a diffusers pipeline's UNet) without training, run with --mode sample or --mode eval; "
                     "to fine-tune, set --config.train.num_steps=N.")
  check_writable(workdir, paths.join(workdir, "checkpoints"))
  is_main = jax.process_index() == 0
  run = _Run(config, workdir, "train", stages)
  tc = config.train
  ckpt = Checkpointer(paths.join(workdir, "checkpoints"), keep=int(tc.get("keep_ckpts", 3)),
                      use_async=bool(tc.get("async_ckpt", True)))
  writer = MetricWriter(workdir, enabled=is_main)
  try:
    return _train_loop(run, ckpt, writer, config, workdir, is_main)
  finally:
    ckpt.close()  # waits for the last async save to be committed.
    writer.close()
    run.close()


def write_samples(run: _Run, params, rng, num: int, path: str, writer: Optional[MetricWriter] = None,
                  step: int = 0, save_arrays: bool = False) -> Optional[Dict[str, Any]]:
  """`experiment.sample` on the run's fixed eval batch -> a sample sheet PNG at `path` (+ an .npz of every
  numeric output when `save_arrays`); returns the host outputs (None when the method has none)."""
  batch = run.sample_batch(num)
  out = run.experiment.sample(params, run.frozen, batch, rng)
  if not out:
    return None
  out = jax.device_get(out)
  if jax.process_index() == 0:
    sheet = sample_sheet(batch, out)
    if sheet is not None:
      save_png(path, sheet)
      if writer is not None:
        writer.write_image(step, "samples", sheet)
    if save_arrays:
      arrays = {k: np.asarray(v) for k, v in out.items() if np.asarray(v).dtype.kind in "biuf"}
      with paths.open(os.path.splitext(path)[0] + ".npz", "wb") as f:
        np.savez(f, **arrays)
  return out


def write_export(run: _Run, params, workdir: str) -> Optional[str]:
  """Runs `experiment.export` into DIR/export (written under a temporary name, renamed when complete);
  returns the directory, or None when the experiment exported nothing."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  final = export_dir(workdir)
  if jax.process_index() != 0:
    return final
  remote = paths.is_url(final)  # a URL: export locally (loaders write local files), then upload the directory
  tmp = paths.join(run.local_workdir, EXPORT_SUBDIR + ".tmp") if remote else final + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  run.experiment.export(params, run.frozen, tmp)
  if not os.listdir(tmp):
    os.rmdir(tmp)
    return None
  if remote:
    paths.put_dir(tmp, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final
  old = final + ".old"
  if os.path.exists(final):
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
  os.replace(tmp, final)
  shutil.rmtree(old, ignore_errors=True)
  return final


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

  first_batch = run.first_batch
  diffs = {}

  def config_diff(step):
    saved_flat, cur_flat = flatten(ckpt.read_config(step)), flatten(config_dict)
    diffs[step] = sorted(k for k in set(saved_flat) | set(cur_flat) if saved_flat.get(k) != cur_flat.get(k))
    return diffs[step]

  latest, state, damaged = ckpt.restore_newest(run.abstract_state, run.iterator, config_diff)
  if latest is not None:
    first_batch = None  # the iterator now points at the batch after `latest`.
    if diffs.get(latest):
      logging.warning("Resuming with a config that differs from the checkpoint's in: %s", ", ".join(diffs[latest]))
    logging.info("Resumed from %s at step %d.", ckpt.directory, latest)
    writer.truncate_after(latest)
  else:
    writer.truncate_after(0)  # rows of an earlier attempt killed before its first checkpoint
    state = run.init_state()
  exact_resume = latest is None or ckpt.data_restored is not False
  start = int(jax.device_get(state.step))

  n_params, table = _param_overview(state.params)
  n_frozen = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(run.frozen))
  groups = ", ".join(f"{g}: {c[1]:,}" for g, c in sorted(run.group_counts.items()))
  logging.info("Parameters: %s in params (%s) + %s frozen weights\n%s", f"{n_params:,}", groups,
               f"{n_frozen:,}", table)
  if is_main:
    try:
      from clu import parameter_overview
      with paths.open(paths.join(workdir, "param_overview.txt"), "w") as f:
        f.write(table + "\n\n" + parameter_overview.get_parameter_overview(state.params, include_stats=False))
    except Exception as e:  # pragma: no cover - overview is informational.
      logging.warning("Parameter overview failed: %s", e)

  frozen = run.frozen
  t0 = time.time()
  compiled = run.lower_step().compile()
  compile_s = time.time() - t0
  released = host_memory.release()  # the compiler's freed heap, which glibc would keep resident for the run
  step_flops = compiled_flops(compiled)
  logging.info("Compiled the train step in %.2f s%s%s.", compile_s,
               f"; {step_flops / 1e9:.3g} GFLOP per step (XLA cost analysis)" if step_flops else "",
               f" ({released / 2 ** 20:.0f} MiB of freed compile memory returned to the OS)" if released else "")
  if is_main:
    with paths.open(paths.join(workdir, "run_info.json"), "w") as f:
      json.dump({"num_params": n_params, "num_frozen": n_frozen, "param_groups": run.group_counts,
                 "compile_time_s": compile_s, "step_flops": step_flops, "mesh": dict(run.mesh.shape),
                 "num_devices": jax.device_count(), "num_processes": jax.process_count(),
                 "platform": jax.devices()[0].platform, "jax_version": jax.__version__,
                 "start_step": start, "exact_resume": exact_resume,
                 "damaged_checkpoints": damaged}, f, indent=1)

  acc = Accumulator()
  last_saved = latest
  last_metrics: Dict[str, Any] = {}
  results: Dict[str, Any] = {}
  sample_rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x5A4D)

  def check_finite(step: int, whole_state: bool = False):
    bad = acc.first_non_finite()
    if bad is None and whole_state and not _all_finite(state.params, state.opt_state):
      bad = (step, float("nan"), "params / optimizer state")
    if bad is not None:
      ckpt.wait()
      good = ckpt.latest_step()
      raise FloatingPointError(
          f"Non-finite {bad[2]} ({bad[1]}) at step {bad[0]}; training stopped. Nothing was saved after it: the "
          f"last good checkpoint is step {good} in {ckpt.directory}. Fix: lower config.optim.lr, enable "
          "config.optim.grad_clip, add warmup (config.optim.warmup_steps), or train in float32 "
          "(config.dtype), then rerun to resume from that checkpoint.")

  def save(step: int):
    nonlocal last_saved
    if last_saved == step:
      return
    check_finite(step, whole_state=True)  # a checkpoint is only written from a finite state
    ckpt.save(step, state, run.iterator, config_dict)
    last_saved = step

  paused = 0.0  # seconds of the current log window spent outside train steps (checkpoints, samples, evaluation)

  def do_eval(step: int):
    nonlocal paused
    t0 = time.time()
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0xE7A1)
    res = run.experiment.evaluate(run.eval_params(state), frozen, rng, run.local_workdir) or {}
    res = {k: float(v) if np.ndim(v) == 0 and not isinstance(v, str) else v for k, v in res.items()}
    eval_sec = time.time() - t0
    paused += eval_sec
    if is_main:
      scalars = {f"eval/{k}": v for k, v in res.items() if isinstance(v, float)}
      writer.write(step, {**scalars, "eval_sec": eval_sec})
      with paths.open(paths.join(workdir, "eval_results.json"), "w") as f:
        json.dump({"step": step, **{k: v for k, v in res.items() if isinstance(v, (float, int, str))}}, f, indent=1)
    return res

  def do_sample(step: int):
    nonlocal paused
    t0 = time.time()
    write_samples(run, run.eval_params(state), jax.random.fold_in(sample_rng, step), num_samples,
                  paths.join(workdir, "samples", f"step_{step:07d}.png"), writer, step)
    sample_sec = time.time() - t0
    paused += sample_sec
    if is_main:
      writer.write(step, {"sample_sec": sample_sec}, console=False)

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
      state, metrics = compiled(state, frozen, batch)
      step += 1
      acc.update(step, metrics)
      bar.update(1)
      if step % log_every == 0 or step == num_steps:
        check_finite(step)
        scalars = acc.compute()
        now = time.time()
        # Train steps only: checkpoint saves, sample sheets and evaluations in the window are taken out (they
        # are logged as sample_sec / eval_sec rows of their own).
        sps = (step - step_log) / max(now - t_log - paused, 1e-9)
        scalars.update(steps_per_sec=sps, examples_per_sec=sps * global_batch)
        writer.write(step, scalars, console=True)
        bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4g}")
        last_metrics = {"step": step, **scalars}
        acc.reset()
        t_log, step_log, paused = time.time(), step, 0.0
      if ckpt_every and step % ckpt_every == 0:
        t0 = time.time()
        save(step)
        paused += time.time() - t0
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
      return {**last_metrics, "step": step, "preempted": True, "export": None, "exact_resume": exact_resume}

  save(step)
  ckpt.wait()
  exported = write_export(run, run.eval_params(state), workdir)
  res = do_eval(step)
  results.update({f"eval/{k}": v for k, v in res.items()})
  if sample_every and step % sample_every:
    do_sample(step)
  writer.flush()
  return {**last_metrics, **results, "step": step, "preempted": False, "export": exported,
          "exact_resume": exact_resume}


def compiled_flops(compiled) -> Optional[float]:
  """XLA's cost-analysis FLOP count of one call of a compiled program (per device: the program each device
  runs), or None where the backend gives none. Counts what XLA will execute (rematerialised forwards included),
  so MFU from it is "hardware" FLOPs, not the model's analytic count."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backends without cost analysis
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops > 0 else None


# ------------------------------------------------------------------------------------------------ modes


def _restore_latest(config, workdir: str, stages: Optional[Dict[str, str]] = None):
  """The test-split run and the latest checkpoint's state (never trains). Without a checkpoint, the released
  weights of the experiment's `pretrained_source()` (e.g. a diffusers pipeline's UNet) at step 0; with neither,
  fails before loading anything heavy."""
  ckpt_dir = paths.join(workdir, "checkpoints")
  ckpt = Checkpointer(ckpt_dir, keep=int(config.train.get("keep_ckpts", 3)), use_async=False)
  if ckpt.latest_step() is None:
    ckpt.close()
    source = get_experiment(config, stages).pretrained_source()
    if source is None:
      raise FileNotFoundError(f"No checkpoint in {ckpt.directory}. Train first: "
                              f"python -m diffusion_jax.main --config ... --workdir {workdir} --mode train")
    run = _Run(config, workdir, "eval", stages)
    try:
      state = run.init_state()
    except Exception:
      run.close()
      raise
    logging.info("No checkpoint in %s: using the released weights of %s (step 0).", ckpt.directory, source)
    return run, state, 0
  run = _Run(config, workdir, "eval", stages)
  try:
    step, state, _ = ckpt.restore_newest(run.abstract_state)
  except Exception:
    run.close()
    raise
  finally:
    ckpt.close()
  return run, state, step


def sample(config: ml_collections.ConfigDict, workdir: str, num: Optional[int] = None,
           stages: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
  """Samples for the first `num` (default config.train.num_samples) test examples from the latest checkpoint:
  DIR/samples/final_<step>.png (the sample sheet) + .npz (every numeric output); returns {"step", "path",
  "outputs": {name: shape}}."""
  run, state, step = _restore_latest(config, workdir, stages)
  try:
    num = int(num or config.train.get("num_samples", 16))
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x5A4E)
    path = paths.join(workdir, "samples", f"final_{step:07d}.png")
    out = write_samples(run, run.eval_params(state), rng, num, path, save_arrays=True)
    if out is None:
      logging.warning("Experiment %s has no sample outputs.", config.experiment)
      return {"step": step, "path": None, "outputs": {}}
    logging.info("Wrote samples of %d examples to %s", num, path)
    return {"step": step, "path": path, "outputs": {k: list(np.shape(v)) for k, v in out.items()}}
  finally:
    run.close()


def evaluate(config: ml_collections.ConfigDict, workdir: str, stages: Optional[Dict[str, str]] = None
             ) -> Dict[str, Any]:
  """Evaluates the latest checkpoint; writes DIR/eval_results.json and appends a row to DIR/metrics.jsonl
  ({"step", "eval/<name>": value, "eval_sec", "mode": "eval"}); returns the results."""
  run, state, step = _restore_latest(config, workdir, stages)
  try:
    t0 = time.time()
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0xE7A1)
    res = run.experiment.evaluate(run.eval_params(state), run.frozen, rng, run.local_workdir) or {}
    res = {k: float(v) if np.ndim(v) == 0 and not isinstance(v, str) else v for k, v in res.items()}
    eval_sec = time.time() - t0
    out = {"step": step, **res}
    if jax.process_index() == 0:
      with paths.open(paths.join(workdir, "eval_results.json"), "w") as f:
        json.dump({k: v for k, v in out.items() if isinstance(v, (float, int, str))}, f, indent=1)
      writer = MetricWriter(workdir)
      try:
        writer.write(step, {**{f"eval/{k}": v for k, v in res.items() if isinstance(v, float)},
                            "eval_sec": eval_sec, "mode": "eval"}, console=False)
      finally:
        writer.close()
    logging.info("Evaluation at step %d: %s", step, res)
    return out
  finally:
    run.close()
