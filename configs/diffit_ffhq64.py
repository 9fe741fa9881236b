"""Image-space DiffiT on FFHQ-64 (DiffiT App. H.1 / I.1, Tables S.2/S.3), unconditional, EDM + Heun.

    python -m diffusion_jax.main --config configs/diffit_ffhq64.py --workdir runs/diffit_ffhq64 \
        --config.data.data_dir=/path/to/ffhq64_images

Paper hyper-parameters: 4 stages at 64/32/16/8, channels 128/256/256/256, window 8, blocks 1/2/2/2 (App. I.1;
H.1 says 4/4/4/4), time-token dim 512, Adam, batch 256, lr 2e-4, 200k iterations, EDM preconditioning,
40-step Heun sampler (79 NFE). Data: an image folder (FFHQ at 64x64). Open choices as in diffit_cifar10.py;
EMA: EDM's 0.5 Mimg half-life at batch 256 (decay 0.99965).

Variants: "" (paper), "tiny" (shapes world, seconds; run in the tests).
"""

from __future__ import annotations

import ml_collections

from configs import _base, diffit_cifar10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown diffit_ffhq64 variant {arg!r}. Valid variants: '' (paper), 'tiny'.")
  c = diffit_cifar10.get_config()
  c.data = ml_collections.ConfigDict(dict(name="folder", data_dir="", image_size=64, batch_size=256, num_workers=8,
                                          prefetch=2, captions="none"))
  c.model.update(channels=(128, 256, 256, 256), num_blocks=(1, 2, 2, 2), window_size=8)
  c.optim.update(lr=2e-4, warmup_steps=39062)
  _base.set_ema(c, ema=0.99965)
  c.sample.num_steps = 40
  if arg == "tiny":
    diffit_cifar10.tiny_image_space(c, stages=2)
    c.model.window_size = 8    # 16x16 -> 8x8: window 8 tiles stage 0 in 4 windows, is global at stage 1
  return c
