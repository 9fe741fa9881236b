"""Image-space DiffiT on CIFAR-10 (DiffiT App. H.1 / I.1), unconditional, EDM objective and Heun sampler.

    python -m diffusion_jax.main --config configs/diffit_cifar10.py --workdir runs/diffit_cifar10 \
        --config.data.data_dir=/path/to/tfds

Paper hyper-parameters: 3 stages at 32/16/8 with channels 128/256/256, window 4, time-token dim 512 (Table 3),
positional time embedding (Table 8), 2 DiffiT ResBlocks per stage (App. I.1; App. H.1 says 4: set
--config.model.num_blocks='(4,4,4)'), Adam, batch 512, lr 1e-3, 200k iterations, EDM preconditioning
(sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2)), 18-step Heun sampler (35 NFE), FID-50K against the training set.
Not in the paper (our defaults, config keys): 4 heads, MLP ratio 4, 32 GN groups, concat skips, EDM's EMA
half-life of 0.5 Mimg (decay 0.9993 per step at batch 512) and its 10 Mimg learning-rate warm-up; EDM's
dropout and augmentation pipeline are not implemented.

Variants: "" (paper), "tiny" (the same pipeline on the shapes world, a few steps; run in the tests).
"""

from __future__ import annotations

import ml_collections

from configs import _base


def tiny_image_space(c: ml_collections.ConfigDict, stages: int = 2) -> ml_collections.ConfigDict:
  """Shrinks an image-space config to seconds on a CPU (shapes data, 2-stage U-net, 2 steps)."""
  c.data = ml_collections.ConfigDict(dict(name="shapes", image_size=16, batch_size=4, num_train=16, num_test=8,
                                          num_workers=0, prefetch=2,
                                          shapes=dict(min_objects=1, max_objects=1, small_frac=0.375,
                                                      large_frac=0.5)))
  c.model.update(channels=(8, 16, 16)[:stages], num_blocks=(1,) * stages, num_heads=2, window_size=4, gn_groups=4,
                 time_embed_dim=16, time_freq_dim=8)
  c.optim.warmup_steps = 0
  c.train.update(num_steps=2, log_every=1, ckpt_every=0, num_samples=4, progress_bar=False)
  c.sample.num_steps = 3
  c.eval.update(num_samples=4, batch_size=4, fid_feature="random_conv")
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown diffit_cifar10 variant {arg!r}. Valid variants: '' (paper), 'tiny'.")
  c = _base.base_config()
  c.experiment = "generation"
  c.data.name = "tfds"
  c.data.tfds_name = "cifar10"
  c.data.image_size = 32
  c.data.batch_size = 512
  c.data.num_workers = 8
  c.model = ml_collections.ConfigDict(dict(
      name="diffit_image", out_channels=3, channels=(128, 256, 256), num_blocks=(2, 2, 2), num_heads=4,
      mlp_ratio=4.0, window_size=4, gn_groups=32, time_embed_dim=512, time_freq_dim=128, num_classes=0,
      skip_merge="concat", resample="conv"))
  c.diffusion = ml_collections.ConfigDict(dict(objective="edm", sigma_data=0.5, p_mean=-1.2, p_std=1.2,
                                               time_scale=1.0))
  c.cond = ml_collections.ConfigDict(dict(label_dropout=0.0))
  c.latent = ml_collections.ConfigDict(dict(vae="none"))
  c.optim.update(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, schedule="constant",
                 warmup_steps=19531, grad_clip=0.0)
  c.train.update(num_steps=200_000, log_every=100, ckpt_every=5000, sample_every=5000, num_samples=64,
                 eval_every=0)
  _base.set_ema(c, ema=0.9993)
  c.sample = ml_collections.ConfigDict(dict(sampler="edm_heun", num_steps=18, guidance_scale=1.0,
                                            guidance_schedule="constant"))
  c.eval = ml_collections.ConfigDict(dict(num_samples=50_000, batch_size=500, fid_feature="none"))
  if arg == "tiny":
    tiny_image_space(c, stages=3)
  return c
