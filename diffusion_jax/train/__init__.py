"""The one generic trainer (see trainer.py). Public API:

  train(config, workdir, stages=None) -> dict      run or resume training (stages: name -> export dir;
                                                   `diffusion_jax.stages.run` resolves and trains them)
  sample(config, workdir, num, stages) -> dict     sample sheet + arrays from the latest checkpoint
  evaluate(config, workdir, stages) -> dict        evaluation of the latest checkpoint
  TrainState                            the checkpointed state layout
  remat_policy(name), maybe_remat(cls, name)   activation checkpointing from config.remat
  load_config("file.py:arg", overrides)        config files outside absl (tests, notebooks)
"""

from diffusion_jax.train.config_loading import load_config
from diffusion_jax.train.remat import maybe_remat, remat_policy
from diffusion_jax.train.trainer import TrainState, evaluate, sample, train, validate_config

__all__ = ["train", "sample", "evaluate", "TrainState", "remat_policy", "maybe_remat", "load_config",
           "validate_config"]
