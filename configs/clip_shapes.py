"""A small CLIP trained on the shapes world (symmetric InfoNCE), the CLIP of the built-in ECLIPSE run.

    python -m diffusion_jax.main --config configs/clip_shapes.py --workdir runs/eclipse/clip

`configs/eclipse_prior.py` declares it as stage `clip` (trained in WORKDIR/clip, reused when finished) unless
a local CLIP is given as `--config.stages.clip.path`. The model is a transformers-layout CLIPModel: a ViT on 32x32 images
(patch 8) and a causal text transformer over the real CLIP BPE tokens with a 24-token context (the longest
shapes caption is 18 tokens with start/end). It is exported (transformers layout) to WORKDIR/export at the end of training.

Variants: "" (default, a few minutes on a 2-core CPU; images with nuisance, `NUISANCE`), "clean" (the same
without nuisance), "tiny" (seconds, for tests; no nuisance).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from configs import _base


# Image content the captions do not describe (`data/shapes.py` nuisance options): a random dark background
# colour, background texture noise, and box sizes jittered within their size word. On in the default variant
# (see docs/eclipse.md, "A CLIP with a modality gap"); off in "tiny" and in the "clean" variant (the world
# without nuisance, the CLIP of the earlier measurements).
NUISANCE = dict(background_jitter=96, texture_noise=24.0, size_jitter=2)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny", "clean"):
    raise ValueError(f"Unknown clip_shapes variant {arg!r}. Valid variants: '' (default), 'tiny', 'clean'.")
  tiny = arg == "tiny"
  c = _base.base_config()
  c.experiment = "clip_pretrain"
  c.seed = 0
  c.data.name = "shapes"
  c.data.image_size = 32
  c.data.batch_size = 16 if tiny else 128
  c.data.num_train = 256 if tiny else 20000
  c.data.num_test = 64 if tiny else 500
  c.data.num_workers = 0
  c.data.shapes = ml_collections.ConfigDict(dict(NUISANCE) if arg == "" else {})

  width = 32 if tiny else 64
  c.model.name = "clip"
  c.model.projection_dim = 32 if tiny else 64
  # The temperature: learned as in CLIP and clipped at 100; the default variant starts it at 100, the value
  # CLIP's learned scale ends at (ours moves from 1/0.07 only to about 22 in 800 steps), which is what keeps
  # a modality gap open (docs/eclipse.md). tiny / clean: None, CLIP's initial log(1/0.07).
  c.model.logit_scale_init = float(np.log(100.0)) if arg == "" else None
  # Extra negatives per caption (NegCLIP-style): its own scene with objects 0 and 1 swapped in "colour" /
  # "position". Random batches almost never hold such a pair, so without them the CLIP has no reason to encode
  # relations (position binding at chance).
  c.model.hard_negatives = ("colour", "position") if arg == "" else ()
  c.model.text = ml_collections.ConfigDict(dict(
      vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1 if tiny else 2,
      num_attention_heads=2 if tiny else 4, max_position_embeddings=24, hidden_act="quick_gelu",
      eos_token_id=49407))
  c.model.vision = ml_collections.ConfigDict(dict(
      image_size=32, patch_size=8, num_channels=3, hidden_size=width, intermediate_size=4 * width,
      num_hidden_layers=1 if tiny else 2, num_attention_heads=2 if tiny else 4, hidden_act="quick_gelu"))

  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 5 if tiny else 100
  c.optim.grad_clip = 1.0

  c.train.num_steps = 10 if tiny else 800
  c.train.log_every = 5 if tiny else 100
  c.train.ckpt_every = 10 if tiny else 400
  c.train.eval_every = 0          # retrieval evaluation at the end only
  c.train.sample_every = 0
  _base.set_ema(c)  # no EMA: sample / export the raw params

  c.eval.num_examples = 64 if tiny else 500
  return c
