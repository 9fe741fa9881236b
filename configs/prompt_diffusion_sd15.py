"""Prompt Diffusion at paper scale on Stable Diffusion 1.5 (experiment "prompt_diffusion"; facts B2-B6 of
shared/papers/prompt_diffusion.md).

    python -m diffusion_jax.main --config configs/prompt_diffusion_sd15.py --workdir runs/pd_sd15 \
        --config.stages.pipeline.path=/path/to/stable-diffusion-v1-5
    # evaluate / sample the released checkpoint, converted to diffusers' PromptDiffusionControlNetModel layout:
    python -m diffusion_jax.main --config configs/prompt_diffusion_sd15.py --workdir runs/pd_release --mode eval \
        --config.stages.pipeline.path=/path/to/stable-diffusion-v1-5 \
        --config.prompt.pretrained_controlnet=/path/to/prompt-diffusion-diffusers/controlnet

The base is a local diffusers SD-1.5 directory (stage `pipeline`, kind sd_pipeline: its scheduler config gives the
scaled-linear schedule 0.00085 -> 0.012, T = 1000, epsilon prediction; its VAE the latent space, scale 0.18215).
The ControlNet copies the SD-1.5 encoder and mid block (13 residuals), with a 6-channel pair and a 3-channel query
hint encoder (widths 16, 32, 96, 256; 8x down to the latent), 256 px training (B4).

Hyper-parameters (B5): AdamW lr 1e-4 constant, no warmup; effective batch 1024 = 256 x 4 accumulation (the author's
account in issue #7; the released config would give 2048): data.batch_size = 1024 with optim.grad_accum = 4
micro-batches of 256; 5000 steps; sd_locked=False (the release's script trains the SD decoder too, B3); fp32 in
the release, bf16 compute + full remat here (params stay fp32); weight decay 1e-2 (torch AdamW's default; the
facts do not say the release changes it). Evaluation (B6): DDIM 100 steps, eta 0, CFG 9; hints in [-1, 1] (the
release's training range; diffusers' port feeds [0, 1], see pretrained/prompt_diffusion.py).

Data: the paper trains on InstructPix2Pix images annotated by HED / Uniformer / MiDaS (B4); neither the data nor the
annotators are available here, so this config renders the same six tasks from the shapes world at 256 px (the
only source of the tasks wired in). Variants: "" (the above), "tiny" (tests: a tiny pipeline given by path, 16 px).
"""

from __future__ import annotations

import ml_collections

from configs import _base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  from diffusion_jax.experiments.prompt_diffusion import SEEN_TASKS, UNSEEN_TASKS
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown prompt_diffusion_sd15 variant {arg!r}. Valid variants: '' (paper scale), 'tiny'.")
  tiny = arg == "tiny"
  c = _base.base_config()
  c.experiment = "prompt_diffusion"
  c.seed = 0
  c.stages.pipeline = _base.stage(path="", kind="sd_pipeline")   # --config.stages.pipeline.path=/path/to/sd15
  c.dtype = "float32" if tiny else "bfloat16"
  c.remat = "none" if tiny else "full"

  c.data.name = "shapes"
  c.data.image_size = 16 if tiny else 256
  c.data.batch_size = 8 if tiny else 1024
  c.data.num_train = 16 if tiny else 20000
  c.data.num_test = 8 if tiny else 500
  c.data.seed = 0
  c.data.cache_dir = ""
  c.data.cache_text = True
  c.data.cache_latents = False     # targets change per prompt: encoded in the step
  c.data.encode_batch_size = 8 if tiny else 64

  c.text = ml_collections.ConfigDict()
  c.text.max_length = 0            # the CLIP's context (77)
  c.model.name = "prompt_diffusion"
  c.model.unet = ""
  c.model.use_vae = True
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.prediction_type = ""  # the pipeline's (epsilon for SD-1.5)

  c.prompt = ml_collections.ConfigDict(dict(
      sd_locked=False, conditioning_scale=1.0, dropout=(0.05, 0.05, 0.05), tasks=list(SEEN_TASKS), repeats=8,
      example_pair=True, pretrained_controlnet=""))

  c.sample.sampler = "ddim"
  c.sample.steps = 2 if tiny else 100
  c.sample.guidance = 9.0
  c.sample.eta = 0.0
  c.sample.options = ml_collections.ConfigDict()

  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-2
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0          # the release does not clip
  c.optim.grad_accum = 1 if tiny else 4
  c.optim.groups = ml_collections.ConfigDict({"controlnet": {"match": "^controlnet/", "lr": c.optim.lr},
                                              "decoder": {"match": "^decoder/", "lr": c.optim.lr}})
  c.optim.train_unmatched = False

  c.train.num_steps = 2 if tiny else 5000
  c.train.log_every = 1 if tiny else 50
  c.train.ckpt_every = 2 if tiny else 1000   # the release checkpoints every 1000 steps
  c.train.sample_every = 0
  c.train.eval_every = 0
  c.train.num_samples = 4 if tiny else 12
  _base.set_ema(c)                 # the release samples the raw weights (no EMA)

  c.eval.num_examples = 4 if tiny else 500
  c.eval.batch_size = 4 if tiny else 50
  c.eval.guidance = None
  c.eval.steps = None
  c.eval.unseen = list(UNSEEN_TASKS)
  c.eval.incontext = True
  c.eval.shapes_fd_path = ""
  return c
