"""Prompt Diffusion on the shapes world (experiment "prompt_diffusion"): a ControlNet with two hint encoders (the
example pair, 6 channels, and the query, 3 channels) over the text-to-image base of `configs/sd_shapes.py`,
trained on the six seen tasks (forward / inverse depth, edge, segmentation), tested on unseen ones.

    python -m diffusion_jax.main --config configs/prompt_diffusion_shapes.py --workdir runs/pd_shapes
    # an existing base (a finished sd_shapes run or its export dir) instead of training one as a stage:
    python -m diffusion_jax.main --config configs/prompt_diffusion_shapes.py --workdir runs/pd_shapes \
        --config.stages.pipeline.path=runs/sd_shapes/export
    # with the shapes FD of the image outputs (a network trained by scripts/shapes_fd.py train):
    ...  --config.eval.shapes_fd_path=runs/shapes_fd/net32.safetensors
    python -m diffusion_jax.main --config configs/prompt_diffusion_shapes.py --workdir runs/pd_shapes --mode sample

Variant = comma-separated words:
  "tiny"       seconds (tests): the tiny sd_shapes base, 16x16 images, 2 train steps, 2 DDIM steps;
  "locked"     sd_locked=True: only the ControlNet trains (the base UNet's decoder stays frozen);
  "cnft"       the CN-FT baseline of the paper's Table 1: a plain ControlNet on the query only (no example pair),
               fine-tuned on ONE task, given as a further word (e.g. "cnft,inv_depth"), same steps and batch.
Examples: "", "tiny", "locked", "cnft,depth", "tiny,cnft,inv_seg".

Choices (paper / release where known, B-keys of shared/papers/prompt_diffusion.md; else ours):
sd_locked=False (the released script, B3: the base decoder trains too, optim group "decoder"); AdamW lr 1e-4
constant (B5), no weight decay (ours; the facts do not give it), clip 1.0 (ours); CFG dropout 5/5/5 % (B4);
hints in [-1, 1] (B2); tasks drawn uniformly per example (B4); example pair from a different scene (B4).
Shapes scale (ours): 32x32 images, the sd_shapes base (4x4 pixel patches, 8x8x48 UNet input, so the hint
encoders downsample 4x: widths 16, 32, 96), batch 32, 2000 steps, EMA 0.99; sampling DDIM 25 steps ("trailing",
x0 clipped, as the base) with CFG 3 (the base's); evaluation on 100 held-out scenes per task.
"""

from __future__ import annotations

import ml_collections

from configs import _base, sd_shapes

FLAGS = ("tiny", "locked", "cnft")


def parse_variant(arg):
  from diffusion_jax.experiments.prompt_diffusion import TASKS
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  bad = [w for w in words if w not in FLAGS + TASKS]
  if bad:
    raise ValueError(f"Unknown prompt_diffusion_shapes variant word(s) {bad}. Valid: flags {FLAGS}, tasks (for "
                     f"cnft) {TASKS} (comma-separated, e.g. 'tiny' or 'cnft,inv_depth').")
  flags = set(w for w in words if w in FLAGS)
  tasks = [w for w in words if w in TASKS]
  if "cnft" in flags and len(tasks) != 1:
    raise ValueError(f"The cnft variant needs exactly one task word (e.g. 'cnft,inv_depth'); got {tasks}.")
  if tasks and "cnft" not in flags:
    raise ValueError(f"A task word ({tasks}) is only valid with 'cnft' (Prompt Diffusion trains on all six).")
  return flags, (tasks[0] if tasks else None)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  from diffusion_jax.experiments.prompt_diffusion import SEEN_TASKS, UNSEEN_TASKS
  flags, cnft_task = parse_variant(arg)
  tiny = "tiny" in flags
  c = _base.base_config()
  c.experiment = "prompt_diffusion"
  c.seed = 0
  c.stages.pipeline = _base.stage(sd_shapes.get_config("tiny" if tiny else None), kind="sd_pipeline")

  c.data.name = "shapes"
  c.data.image_size = 16 if tiny else 32
  c.data.batch_size = 8 if tiny else 32
  c.data.num_train = 16 if tiny else 10000
  c.data.num_test = 8 if tiny else 100
  c.data.seed = 0
  c.data.cache_dir = ""
  c.data.cache_text = True
  c.data.cache_latents = False
  c.data.encode_batch_size = 32 if tiny else 250

  c.text = ml_collections.ConfigDict()
  c.text.max_length = 0
  c.model.name = "prompt_diffusion"
  c.model.unet = ""                # the base pipeline's UNet
  c.model.use_vae = False          # the shapes base is pixel-space
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.prediction_type = ""  # the base's (scheduler_config.json)

  c.prompt = ml_collections.ConfigDict(dict(
      sd_locked="locked" in flags,
      conditioning_scale=1.0,
      dropout=(0.05, 0.05, 0.05),   # text only, text + pair, pair only (B4)
      tasks=[cnft_task] if cnft_task else list(SEEN_TASKS),
      repeats=8,
      example_pair="cnft" not in flags,
      pretrained_controlnet=""))

  c.sample.sampler = "ddim"
  c.sample.steps = 2 if tiny else 25
  c.sample.guidance = 3.0
  c.sample.options = ml_collections.ConfigDict(dict(timestep_spacing="trailing", set_alpha_to_one=True,
                                                    clip_sample=True, clip_sample_range=1.0))

  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.weight_decay = 0.0
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 1.0
  groups = {"controlnet": {"match": "^controlnet/", "lr": c.optim.lr}}
  if "locked" not in flags:
    groups["decoder"] = {"match": "^decoder/", "lr": c.optim.lr}
  c.optim.groups = ml_collections.ConfigDict(groups)
  c.optim.train_unmatched = False

  c.train.num_steps = 2 if tiny else 2000
  c.train.log_every = 1 if tiny else 100
  c.train.ckpt_every = 2 if tiny else 500
  c.train.sample_every = 0
  c.train.eval_every = 0
  c.train.num_samples = 6 if tiny else 12
  _base.set_ema(c, ema=0.9 if tiny else 0.99)

  c.eval.num_examples = 4 if tiny else 100
  c.eval.batch_size = 4 if tiny else 100
  c.eval.guidance = None            # config.sample.guidance
  c.eval.steps = None               # config.sample.steps
  c.eval.unseen = list(UNSEEN_TASKS)
  c.eval.incontext = True
  c.eval.shapes_fd_path = ""        # a shapes-FD network (scripts/shapes_fd.py train); "" = no FD
  return c
