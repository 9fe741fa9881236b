"""DiT-XL/2 (adaLN-Zero) on ImageNet-256 latents: the baseline of DiffiT's TMSA-vs-adaLN comparison (§5.9).

    python -m diffusion_jax.main --config configs/dit_imagenet256.py --workdir runs/dit_in256 \
        --config.data.data_dir=/path/to/tfds --config.latent.vae_path=/path/to/sd-vae-ft-ema

DiT-XL/2 (depth 28, width 1152, 16 heads, patch 2; 675M), the same data, VAE, ADM objective (learned sigma)
as diffit_imagenet256.py; DiT's recipe: AdamW lr 1e-4, no weight decay, batch 256, EMA 0.9999; sampling DDPM
250 steps with constant guidance 1.5 on eps channels 0-2 (DiT-XL/2-G). Other sizes:
--config.model.depth/hidden_size/num_heads/patch_size (see `diffusion_jax.models.dit.dit_kwargs`).

Variants: "" (paper), "tiny" (seconds; tests).
"""

from __future__ import annotations

import ml_collections

from configs import diffit_imagenet256
from diffusion_jax.models.dit import dit_kwargs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown dit_imagenet256 variant {arg!r}. Valid variants: '' (paper), 'tiny'.")
  c = diffit_imagenet256.latent_base(256, lr=1e-4, batch=256)
  c.model = ml_collections.ConfigDict(dict(name="dit", input_size=32, in_channels=4, mlp_ratio=4.0,
                                           num_classes=1000, learn_sigma=True, **dit_kwargs("XL/2")))
  c.sample.update(guidance_scale=1.5, guidance_schedule="constant")
  return diffit_imagenet256.tiny_latent(c) if arg == "tiny" else c
