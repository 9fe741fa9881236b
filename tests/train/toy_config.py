"""Config for the trainer tests' toy experiment.

python -m diffusion_jax.main --config tests/train/toy_config.py --workdir workdirs/toy
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_experiment  # noqa: E402  (registers "toy_mlp")


def get_config(arg=None):
  del arg
  return toy_experiment.toy_config()
