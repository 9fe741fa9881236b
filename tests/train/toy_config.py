"""Config for the trainer tests' toy experiment.

python -m diffusion_jax.main --config tests/train/toy_config.py --workdir workdirs/toy
python -m diffusion_jax.main --config tests/train/toy_config.py:distill --workdir workdirs/toy_distill

"distill": the same model trained with a frozen teacher, a toy run declared as stage "teacher".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_experiment  # noqa: E402  (registers "toy_mlp")


def get_config(arg=None):
  if arg not in (None, "", "distill"):
    raise ValueError(f"Unknown toy variant {arg!r}. Valid variants: '' (default), 'distill'.")
  c = toy_experiment.toy_config()
  if arg == "distill":
    from configs import _base
    c.stages.teacher = _base.stage(toy_experiment.toy_config(**{"train.num_steps": 6, "train.ckpt_every": 2}))
  return c
