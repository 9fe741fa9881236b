"""One module per method. Each registers an `Experiment` subclass in `base.EXPERIMENTS`."""

import importlib

_MODULES = ("generation", "eclipse", "clip_pretrain", "unclip_decoder", "text_to_image", "codi", "prompt_diffusion",
            "mt_diffusion")


def import_all():
  for name in _MODULES:
    try:
      importlib.import_module(f"diffusion_jax.experiments.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"diffusion_jax.experiments.{name}":
        raise
