"""Latent DiffiT-XL/2 on ImageNet-512 (DiffiT App. I.2; released `slurm_sample_512.sh`), class-conditional.

    python -m diffusion_jax.main --config configs/diffit_imagenet512.py --workdir runs/diffit_in512 \
        --config.data.data_dir=/path/to/tfds --config.latent.vae_path=/path/to/sd-vae-ft-ema

As diffit_imagenet256.py with latents 64x64x4 (1024 tokens, global TMSA with a 63x63 relative bias table),
lr 1e-4, batch 512, EMA 0.9999, and *constant* guidance 1.49 on eps channels 0-2 (the power-cosine ramp "did
not result in significant improvements" at 512); DDPM 250 steps.

Variants: "" (paper), "tiny" (seconds; tests).
"""

from __future__ import annotations

import ml_collections

from configs import diffit_imagenet256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown diffit_imagenet512 variant {arg!r}. Valid variants: '' (paper), 'tiny'.")
  c = diffit_imagenet256.latent_base(512, lr=1e-4, batch=512)
  c.sample.update(guidance_scale=1.49, guidance_schedule="constant")
  c.remat = "dots"
  return diffit_imagenet256.tiny_latent(c) if arg == "tiny" else c
