"""The unCLIP decoder of the shapes-world ECLIPSE evaluation: renders 32x32 images from CLIP image embeddings.

    python -m diffusion_jax.main --config configs/unclip_decoder_shapes.py --workdir runs/unclip_decoder \
        --config.stages.clip.path=runs/eclipse/clip --config.data.embedding_cache=runs/eclipse/cache

Use the CLIP stage and embedding cache of an `eclipse_prior` run (the two keys above); without them it trains
its own shapes CLIP (stage `clip`, WORKDIR/clip) first. Epsilon-prediction DDPM (linear 1000-step schedule), embedding dropped
10% of the time; sampled with 25 DDIM steps and classifier-free guidance 3. `scripts/eclipse_table.py` drives
it with each prior's predicted embeddings. Default: a three-level UNet (16/32/64 channels, 732k parameters),
batch 32, 1200 steps; measured 8 min 47 s of training on a shared 2-core CPU. It is too weak to render clean
shapes (true-embedding colour binding 0.18 on the shapes parser). Variants: "" (default), "tiny" (seconds,
tests).
"""

from __future__ import annotations

import ml_collections

from configs import _base, clip_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown unclip_decoder_shapes variant {arg!r}. Valid variants: '' (default), 'tiny'.")
  tiny = arg == "tiny"
  c = _base.base_config()
  c.experiment = "unclip_decoder"
  c.seed = 0
  c.data.name = "shapes"
  c.data.image_size = 32
  c.data.batch_size = 16 if tiny else 32
  c.data.num_train = 64 if tiny else 20000
  c.data.num_test = 32 if tiny else 1000
  c.data.seed = 0
  c.data.embedding_cache = ""             # default <workdir>/cache; share the eclipse_prior run's cache
  c.data.encode_batch_size = 64 if tiny else 250
  c.data.normalize = True

  c.stages.clip = _base.stage(clip_shapes.get_config("tiny" if tiny else None), kind="hf_clip")
  c.clip = ml_collections.ConfigDict()
  c.clip.max_length = 0

  c.model.name = "unclip_decoder"
  # Three levels (32x32 / 16x16 / 8x8): 16 channels at full resolution keeps a step at ~16 GFLOP (batch 32),
  # against ~44 for the two-level (32, 64) UNet.
  c.model.channels = (16, 32) if tiny else (16, 32, 64)
  c.model.num_res_blocks = 1
  c.model.emb_dim = 32 if tiny else 128

  c.sample.num_timesteps = 1000
  c.sample.beta_schedule = "linear"
  c.sample.cond_drop = 0.1
  c.sample.steps = 2 if tiny else 25
  c.sample.guidance = 3.0

  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 2 if tiny else 100
  c.optim.grad_clip = 1.0

  c.train.num_steps = 6 if tiny else 1200
  c.train.log_every = 3 if tiny else 100
  c.train.ckpt_every = 6 if tiny else 400
  c.train.sample_every = 0
  c.train.eval_every = 0
  _base.set_ema(c, ema=0.99 if tiny else 0.995)

  c.eval.num_examples = 8 if tiny else 200
  return c
