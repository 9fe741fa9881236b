"""Latent DiffiT-XL/2 on ImageNet-256 (DiffiT §3.2 "Latent Space", App. H.2 / I.2; released code), class-conditional.

    python -m diffusion_jax.main --config configs/diffit_imagenet256.py --workdir runs/diffit_in256 \
        --config.data.data_dir=/path/to/tfds --config.latent.vae_path=/path/to/sd-vae-ft-ema

Model: patch 2, depth 28 (the released constructor and the 561M of Table 9; App. H.2's text says 30), width
1152, 16 heads, MLP ratio 4, global TMSA with a full-grid relative position bias, label embedding (1000 + null)
added to the time embedding, learned sigma (8 output channels). VAE: SD `sd-vae-ft-ema` (latent 32x32x4,
scale 0.18215), latents cached once (`latent.cache`). Objective: ADM (1000-step linear betas 1e-4..0.02, eps +
learned-range variance, hybrid loss), label dropout 0.1. Optimiser: lr 3e-4, batch 256, EMA 0.9999 (App. I.2);
AdamW without weight decay and 400k steps are our choice (the paper states neither). Sampling: DDPM ancestral,
250 respaced steps, classifier-free guidance on eps channels 0-2 only, power-cosine ramp p = 4, scale 4.4 (the
released script; the paper text says 4.6: --config.sample.guidance_scale=4.6).

To sample from the released checkpoint: `--config.init_from=/path/to/diffit_256.safetensors --mode sample`
(see diffusion_jax/pretrained/diffit.py).

Variants: "" (paper), "tiny" (shapes world through a parameter-free space-to-depth "VAE", seconds; tests).
"""

from __future__ import annotations

import ml_collections

from configs import _base


def latent_base(image_size: int, lr: float, batch: int) -> ml_collections.ConfigDict:
  c = _base.base_config()
  c.experiment = "generation"
  c.init_from = ""
  c.data.name = "tfds"
  c.data.tfds_name = "imagenet2012"
  c.data.splits = ml_collections.ConfigDict(dict(train="train", test="validation"))
  c.data.image_size = image_size
  c.data.batch_size = batch
  c.data.num_workers = 16
  c.model = ml_collections.ConfigDict(dict(
      name="diffit_latent", input_size=image_size // 8, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
      num_heads=16, mlp_ratio=4.0, num_classes=1000, learn_sigma=True))
  c.diffusion = ml_collections.ConfigDict(dict(objective="adm", beta_schedule="linear", num_train_timesteps=1000,
                                               beta_start=1e-4, beta_end=0.02, lambda_vlb=1.0))
  c.cond = ml_collections.ConfigDict(dict(label_dropout=0.1))
  c.latent = ml_collections.ConfigDict(dict(vae="sd", vae_path="", scale_factor=0.18215, cache=True, cache_dir=""))
  c.optim.update(name="adamw", lr=lr, weight_decay=0.0, schedule="constant", warmup_steps=0, grad_clip=0.0)
  c.train.update(num_steps=400_000, log_every=100, ckpt_every=10_000, sample_every=10_000, num_samples=32)
  _base.set_ema(c, ema=0.9999)
  c.dtype = "bfloat16"
  c.sample = ml_collections.ConfigDict(dict(sampler="ddpm", num_steps=250, timestep_spacing="linspace",
                                            guidance_scale=4.4, guidance_schedule="power_cosine",
                                            guidance_power=4.0, guidance_channels=3))
  c.eval = ml_collections.ConfigDict(dict(num_samples=50_000, batch_size=250, fid_feature="none"))
  return c


def tiny_latent(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Same pipeline (latent mode, ADM loss, DDPM + guidance), shapes data, seconds on a CPU."""
  c.data = ml_collections.ConfigDict(dict(name="shapes", image_size=16, batch_size=4, num_train=16, num_test=8,
                                          num_workers=0, prefetch=2,
                                          shapes=dict(min_objects=1, max_objects=1, small_frac=0.375,
                                                      large_frac=0.5)))
  c.latent = ml_collections.ConfigDict(dict(vae="space_to_depth", factor=2, scale_factor=1.0, cache=True,
                                            cache_dir=""))
  c.model.update(input_size=8, in_channels=12, hidden_size=32, depth=2, num_heads=2, num_classes=35)
  c.dtype = "float32"
  c.train.update(num_steps=2, log_every=1, ckpt_every=0, sample_every=0, num_samples=4, progress_bar=False)
  c.sample.num_steps = 3
  c.eval.update(num_samples=4, batch_size=4, fid_feature="random_conv")
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown diffit_imagenet256 variant {arg!r}. Valid variants: '' (paper), 'tiny'.")
  c = latent_base(256, lr=3e-4, batch=256)
  return tiny_latent(c) if arg == "tiny" else c
