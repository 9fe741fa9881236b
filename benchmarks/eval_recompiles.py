"""Sampling / evaluation wall time and XLA compilations of the generation experiment in latent mode with an SD
VAE (a small random AutoencoderKL written in the diffusers layout), and of the shapes CLIP's evaluation.

    python benchmarks/eval_recompiles.py [--num-samples 40] [--batch 16] [--steps 4]

Times three calls of `GenerationExperiment.evaluate` (class-conditional DiffiT, 16x16 images -> 8x8x4
latents, `--num-samples` samples in batches of `--batch`, the last one short) and two of
`ClipPretrain.evaluate`, counting backend compilations with jax.monitoring. A call that compiles nothing
measures the steady-state cost; extra compilations are the cost of re-jitting per call or per batch shape.
The script also runs on the code before the stages/interface change (it adapts to the old `init` signature),
which gives the "before" column of the README table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import monitoring  # noqa: E402

COMPILES = [0]


def _on_event(event, duration, **kw):
  if event == "/jax/core/compile/backend_compile_duration":
    COMPILES[0] += 1


def _init(exp, rng, batch):
  """Params (and frozen) under the current interface or the one before it."""
  try:
    frozen = jax.tree.map(jnp.asarray, exp.load_frozen())
    return jax.jit(exp.init)(rng, batch, frozen), frozen
  except (TypeError, AttributeError):
    es = exp.init(rng, batch)
    return es.params, es.frozen


def _timed(fn, n):
  rows = []
  for _ in range(n):
    COMPILES[0] = 0
    t0 = time.perf_counter()
    fn()
    rows.append((time.perf_counter() - t0, COMPILES[0]))
  return rows


def _tiny_vae(directory: str) -> None:
  from diffusion_jax.models.vae import AutoencoderKL, VAEConfig
  from diffusion_jax.pretrained.diffusers_io import save_vae
  cfg = VAEConfig(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                  sample_size=16)
  params = AutoencoderKL(cfg).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  save_vae(directory, cfg, params)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--num-samples", type=int, default=40)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--steps", type=int, default=4)
  args = ap.parse_args(argv)
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  monitoring.register_event_duration_secs_listener(_on_event)
  from diffusion_jax.experiments.base import get_experiment

  tmp = tempfile.mkdtemp()
  _tiny_vae(os.path.join(tmp, "vae"))
  cfg = importlib.import_module("configs.diffit_imagenet256").get_config("tiny")
  cfg.latent.vae, cfg.latent.vae_path, cfg.latent.cache = "sd", os.path.join(tmp, "vae"), False
  cfg.data.image_size, cfg.model.input_size, cfg.model.in_channels = 16, 8, 4
  cfg.eval.num_samples, cfg.eval.batch_size, cfg.eval.fid_feature = args.num_samples, args.batch, "none"
  cfg.sample.num_steps = args.steps
  exp = get_experiment(cfg)
  batch = next(iter(exp.make_dataset("train", seed=0)))
  params, frozen = _init(exp, jax.random.key(0), batch)
  gen = _timed(lambda: exp.evaluate(params, frozen, jax.random.key(1), tmp), 3)

  ccfg = importlib.import_module("configs.clip_shapes").get_config("tiny")
  ccfg.eval.num_examples = 100
  cexp = get_experiment(ccfg)
  cbatch = next(iter(cexp.make_dataset("train", seed=0)))
  cparams, cfrozen = _init(cexp, jax.random.key(0), cbatch)
  clip = _timed(lambda: cexp.evaluate(cparams, cfrozen, jax.random.key(1), tmp), 2)

  print(f"\nJAX {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or platform.machine()}; "
        f"generation: {args.num_samples} samples in batches of {args.batch}, {args.steps} DDPM steps, SD-VAE "
        "decode; clip: 100 held-out pairs.\n")
  print("| call | wall time (s) | XLA compilations |")
  print("|---|---|---|")
  for i, (s, c) in enumerate(gen, 1):
    print(f"| generation evaluate #{i} | {s:.2f} | {c} |")
  for i, (s, c) in enumerate(clip, 1):
    print(f"| clip_pretrain evaluate #{i} | {s:.2f} | {c} |")


if __name__ == "__main__":
  main()
