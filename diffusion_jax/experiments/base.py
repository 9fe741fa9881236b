"""The experiment interface: how a method plugs into the one generic trainer.

The trainer (`diffusion_jax/train/`) knows nothing of any method. It asks the experiment for

* `make_dataset(split, seed, shard_index, shard_count)` -> a grain dataset (or anything iterable with
  grain's checkpointable iterator) of *host* batches: dicts of numpy arrays with a leading batch axis of
  `config.data.batch_size // shard_count` examples;
* `init(rng, batch)` -> `ExperimentState(params=..., frozen=...)`: the trainable params pytree and a pytree
  of frozen, non-trained arrays (a teacher, a pretrained encoder; may be `{}`);
* `loss(params, frozen, ema, batch, rng, step)` -> `(scalar fp32 loss, dict of scalar metrics)`; `ema` is a
  tuple of EMA copies of `params` (one per `config.train.ema_decays`), so that methods with an EMA target
  (CoDi) read it from the state instead of special-casing the loop. Must be pure and jittable.
* `sample(params, frozen, rng, num)` -> images `[num, H, W, 3]` float in `[0, 1]` (numpy), or `None` when
  the method has no image output; used for periodic PNG grids.
* `evaluate(params, frozen, rng, workdir)` -> dict of scalar metrics (host side, may run jitted code).

Before `make_dataset`, the trainer sets `experiment.workdir` to the run directory, for experiments with
on-disk stages or caches (e.g. ECLIPSE's CLIP stage and embedding cache); it is `None` outside a run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import ml_collections

from diffusion_jax.registry import Registry

PyTree = Any

EXPERIMENTS = Registry("experiment")


@dataclasses.dataclass
class ExperimentState:
  params: PyTree
  frozen: PyTree = dataclasses.field(default_factory=dict)


class Experiment:
  """Base class; subclasses are registered with `@EXPERIMENTS.register(name)`."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.workdir: Optional[str] = None

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    raise NotImplementedError

  def init(self, rng, batch: Dict[str, Any]) -> ExperimentState:
    raise NotImplementedError

  def loss(self, params, frozen, ema: Tuple[PyTree, ...], batch, rng, step) -> Tuple[Any, Dict[str, Any]]:
    raise NotImplementedError

  def sample(self, params, frozen, rng, num: int) -> Optional[Any]:
    return None

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    return {}


def get_experiment(config: ml_collections.ConfigDict) -> Experiment:
  # Import the method modules so that they register themselves.
  from diffusion_jax import experiments as _pkg  # noqa: F401
  _pkg.import_all()
  return EXPERIMENTS.get(config.experiment)(config)
