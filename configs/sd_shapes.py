"""A small Stable-Diffusion-style text-to-image model on the shapes world (experiment "text_to_image").

    python -m diffusion_jax.main --config configs/sd_shapes.py --workdir runs/sd_shapes

Trains the shapes CLIP first (stage `clip`, `configs/clip_shapes.py`, WORKDIR/clip; or give an existing one with
`--config.stages.clip.path=runs/eclipse/clip`), then a pixel-space UNet2DConditionModel (diffusers layout, two
levels, 64/128 channels, 4.24M parameters, cross-attention at 8x8, 4x4 and in the mid block to the CLIP text
tower's 24 per-token states) on 32x32 images seen as 8x8 grids of 4x4 pixel patches (`model.pixel_patch`),
v-prediction, cosine schedule, captions dropped 10% of the time, batch 64, 800 steps. The text states are
computed once (`data.cache_text`). Evaluation: 25 DDIM steps ("trailing", x0 clipped), the shapes parser on 200
held-out captions with classifier-free guidance 3 and without (`nocfg_*`). Export: a diffusers pipeline
directory (WORKDIR/export; `"_pixel_patch": 4` in model_index.json).

Scores and times: docs/text_to_image.md ("The shapes base").
Variants: "" (default), "tiny" (seconds, tests).
"""

from __future__ import annotations

import ml_collections

from configs import _base, clip_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown sd_shapes variant {arg!r}. Valid variants: '' (default), 'tiny'.")
  tiny = arg == "tiny"
  c = _base.base_config()
  c.experiment = "text_to_image"
  c.seed = 0
  c.stages.clip = _base.stage(clip_shapes.get_config("tiny" if tiny else None), kind="hf_clip")

  c.data.name = "shapes"
  c.data.image_size = 16 if tiny else 32
  c.data.batch_size = 8 if tiny else 64
  c.data.num_train = 32 if tiny else 20000
  c.data.num_test = 8 if tiny else 200
  c.data.seed = 0
  c.data.cache_dir = ""              # default WORKDIR/cache
  c.data.cache_text = True
  c.data.cache_latents = False
  c.data.caption_drop = 0.1
  c.data.encode_batch_size = 32 if tiny else 250

  c.text = ml_collections.ConfigDict()
  c.text.max_length = 0              # the CLIP's context (24 tokens)

  c.model.name = "sd_unet"
  c.model.use_vae = False            # pixel space
  # The UNet sees 4x4 pixel patches stacked on channels (space-to-depth, 32x32x3 -> 8x8x48): the diffusion is
  # still in pixel space (space-to-depth permutes pixels), but every conv runs at 8x8 with 64-128 channels,
  # which a CPU runs ~2x faster per image than 16-64 channels at 32x32 (measured in the README).
  c.model.pixel_patch = 2 if tiny else 4
  p = c.model.pixel_patch
  c.model.unet = ml_collections.ConfigDict(dict(
      sample_size=c.data.image_size // p, in_channels=3 * p * p, out_channels=3 * p * p,
      block_out_channels=(16,) if tiny else (64, 128),
      # Cross-attention to the caption at 8x8, 4x4 and in the mid block.
      down_block_types=("CrossAttnDownBlock2D",) if tiny else ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D",) if tiny else ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      layers_per_block=1, norm_num_groups=8 if tiny else 16, cross_attention_dim=32 if tiny else 64,
      attention_head_dim=2 if tiny else 4))

  c.diffusion = ml_collections.ConfigDict()
  # Pixel space: the cosine schedule (improved DDPM's choice for 32x32 pixels; SD's scaled-linear schedule is
  # made for latents and leaves pixels nearly clean at small t) with v-prediction (well-posed at t = T, where the
  # cosine schedule's alpha is ~0) and the plain v loss: min-SNR-5 weighting (Hang et al. 2023) scored the same
  # or lower on the parser after 800 steps (README), so it is off.
  c.diffusion.prediction_type = "v_prediction"
  c.diffusion.beta_schedule = "squaredcos_cap_v2"
  c.diffusion.beta_start = 0.0001
  c.diffusion.beta_end = 0.02
  c.diffusion.num_train_timesteps = 1000
  c.diffusion.snr_gamma = 0.0

  c.sample.sampler = "ddim"
  c.sample.steps = 2 if tiny else 25
  c.sample.guidance = 3.0
  c.sample.eta = 0.0
  # DDIM options (diffusers DDIMScheduler names): "trailing" spacing (the first step at t = 999, pure noise under
  # the cosine schedule), x0 clipped to the pixel range [-1, 1], final step to alpha = 1.
  c.sample.options = ml_collections.ConfigDict(dict(timestep_spacing="trailing", set_alpha_to_one=True,
                                                    clip_sample=True, clip_sample_range=1.0))

  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 2 if tiny else 100
  c.optim.grad_clip = 1.0

  c.train.num_steps = 4 if tiny else 800
  c.train.log_every = 2 if tiny else 50
  c.train.ckpt_every = 4 if tiny else 200
  c.train.sample_every = 0
  c.train.eval_every = 0
  c.train.num_samples = 4 if tiny else 16
  _base.set_ema(c, ema=0.99 if tiny else 0.995)

  c.eval.num_examples = 4 if tiny else 200
  c.eval.batch_size = 4 if tiny else 100
  return c
