"""The experiment interface: how a method plugs into the one generic trainer.

The trainer (`diffusion_jax/train/`) knows nothing of any method, and an experiment knows nothing of the
trainer: it never imports `train/`, never starts a run and never reads flags. The trainer asks it for

* `make_dataset(split, seed, shard_index, shard_count)` -> a grain dataset (or anything iterable with
  grain's checkpointable iterator) of *host* batches: dicts of numpy arrays (strings allowed; they stay on the
  host) with a leading batch axis of `config.data.batch_size // shard_count` examples. `split` is "train" or
  "test"; `--mode sample|eval` only ever asks for "test".
* `load_frozen()` -> a pytree of frozen, non-trained arrays (a teacher UNet, a VAE, a CLIP, cached null
  embeddings; `{}` if none), loaded on the *host*. The trainer places it on the mesh with the same sharding
  rule as the params and passes it to every jitted function as an argument, so it is never a constant of a
  compiled program and never written to a checkpoint (it is reloaded from its source at every start).
* `init(rng, batch, frozen)` -> the trainable params pytree. Run under `jax.jit` with the params' shardings
  as `out_shardings`; `frozen` is an argument (e.g. a ControlNet initialised from the frozen UNet's encoder).
  `load_params(abstract_params)` may instead return pretrained initial params read on the host (e.g. a
  released checkpoint to fine-tune); the trainer places them by the same rule (default: None, use `init`).
* `loss(params, frozen, ema, batch, rng, step)` -> `(scalar fp32 loss, dict of scalar metrics)`; `ema` is
  a dict of named EMA copies of `params` (`config.train.ema`, e.g. `{"ema": 0.9999, "target": 0.95}`), so
  a method with an EMA target (CoDi) reads `ema["target"]`. Must be pure and jittable.
* `sample(params, frozen, batch, rng)` -> a dict of named outputs for the examples of `batch` (an eval-split
  batch: its conditions, example pairs, masks): images `[B, H, W, C]` float in `[0, 1]`, maps, labels,
  embeddings, or `None` for a method without sample outputs. The trainer renders every image-like output
  next to the batch's image-like conditions (`train/metrics.sample_sheet`).
* `evaluate(params, frozen, rng, workdir)` -> dict of metrics (host side; jitted code compiled once).
* `export(params, frozen, directory)`: writes the run's product (a transformers CLIP, a diffusers prior, a
  decoder) into `directory`; a run used as a *stage* of another hands this directory on. `export_kind` names
  what it writes (a key of `EXPORT_KINDS`, whose checker validates stages given as paths).

`params` in `sample` / `evaluate` / `export` are the ones `config.train.sample_with` names ("params" or an
EMA name). Stages: a config may declare runs it needs (`config.stages`, see `diffusion_jax/stages.py`);
`diffusion_jax.main` runs them first and the experiment receives their export directories as
`self.stages[name]` (constructor argument `stages`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_collections

from diffusion_jax.registry import Registry

PyTree = Any

EXPERIMENTS = Registry("experiment")


class Experiment:
  """Base class; subclasses are registered with `@EXPERIMENTS.register(name)`."""

  #: What `export` writes (a name of `EXPORT_KINDS`); None if the experiment exports nothing a stage can use.
  export_kind: Optional[str] = None

  def __init__(self, config: ml_collections.ConfigDict, stages: Optional[Mapping[str, str]] = None):
    self.config = config
    self.stages: Dict[str, str] = dict(stages or {})
    # The run directory, set by the trainer before `make_dataset` (for on-disk caches); None outside a run.
    self.workdir: Optional[str] = None

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Checks of the experiment's own keys that need no stage, data or device; the stage runner calls it before
    any stage trains, so a bad value fails in seconds, not after a stage. Raises ValueError naming the fix."""
    del config

  def stage(self, name: str) -> str:
    """The export directory of stage `name` (raises naming the config key when the stage was not given)."""
    if name not in self.stages:
      raise ValueError(
          f"Experiment {self.config.experiment!r} needs stage {name!r}, which was not given. Declare it in the "
          f"config (config.stages.{name}.config = <the run's config>, or config.stages.{name}.path = an existing "
          "run / pretrained directory) and run through `python -m diffusion_jax.main`, or pass "
          f"stages={{{name!r}: path}} to the experiment.")
    return self.stages[name]

  # -- the trainer interface ---------------------------------------------------------------------------

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    raise NotImplementedError

  def load_frozen(self) -> PyTree:
    return {}

  def init(self, rng, batch: Dict[str, Any], frozen: PyTree) -> PyTree:
    raise NotImplementedError

  def load_params(self, abstract_params: PyTree) -> Optional[PyTree]:
    return None

  def pretrained_source(self) -> Optional[str]:
    """Where `load_params` reads released weights from (a path), or None when it returns None. Cheap (no loading):
    `--mode sample|eval` without a checkpoint use those weights (step 0) when this is set."""
    return None

  def loss(self, params, frozen, ema: Mapping[str, PyTree], batch, rng, step) -> Tuple[Any, Dict[str, Any]]:
    raise NotImplementedError

  def sample(self, params, frozen, batch: Dict[str, Any], rng) -> Optional[Dict[str, Any]]:
    return None

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    return {}

  def export(self, params, frozen, directory: str) -> None:
    """Writes the run's product into `directory` (created by the caller, renamed into place when done)."""


# What a stage's export directory holds: kind -> checker(path) raising FileNotFoundError with the fix.
EXPORT_KINDS = Registry("export kind")


def require_files(path: str, files, what: str) -> None:
  """Raises a FileNotFoundError unless every name of `files` exists in directory `path`."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is not a directory (expected {what}).")
  missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
  if missing:
    raise FileNotFoundError(f"{path!r} does not hold {what}: missing {', '.join(missing)}.")


def get_experiment(config: ml_collections.ConfigDict, stages: Optional[Mapping[str, str]] = None) -> Experiment:
  # Import the method modules so that they register themselves.
  from diffusion_jax import experiments as _pkg  # noqa: F401
  _pkg.import_all()
  return EXPERIMENTS.get(config.experiment)(config, stages=stages)


def experiment_class(name: str):
  from diffusion_jax import experiments as _pkg  # noqa: F401
  _pkg.import_all()
  return EXPERIMENTS.get(name)
