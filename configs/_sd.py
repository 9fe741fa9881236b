"""Shared builder of the Stable Diffusion configs (`configs/sd15.py`, `configs/sd21.py`): sampling a local diffusers
pipeline directory, or fine-tuning its UNet on a captioned image folder / TFDS set (experiment "text_to_image")."""

from __future__ import annotations

import ml_collections

from configs import _base

VARIANTS = ("", "finetune", "tiny", "tiny_finetune")
DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolour painting of a lighthouse at dusk",
                   "a red cube on top of a blue sphere", "a corgi wearing sunglasses on a beach")


def sd_config(arg: str, *, name: str, prediction_type: str, image_size: int, guidance: float
              ) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"Unknown {name} variant {arg!r}. Valid variants: " + ", ".join(repr(v) for v in VARIANTS) + ".")
  tiny, finetune = arg.startswith("tiny"), arg.endswith("finetune")
  c = _base.base_config()
  c.experiment = "text_to_image"
  c.seed = 0
  # A local diffusers directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/):
  # --config.stages.pipeline.path=/path/to/stable-diffusion-...
  c.stages.pipeline = _base.stage(path="", kind="sd_pipeline")

  c.data.image_size = 16 if tiny else image_size
  c.data.cache_dir = ""
  c.data.caption_drop = 0.1
  c.data.encode_batch_size = 4 if tiny else 16
  c.data.seed = 0
  if finetune:
    # A folder of images with captions.jsonl / captions.tsv / .txt side files (or name="tfds" + tfds_name).
    c.data.name = "image_folder"
    c.data.data_dir = ""
    c.data.num_train = 0          # 0 = every image
    c.data.num_test = 4
    c.data.cache_text = True      # text states and VAE latent moments computed once, before training
    c.data.cache_latents = True
    c.data.batch_size = 4 if tiny else 32
  else:
    c.data.name = "prompts"
    c.data.prompts = list(DEFAULT_PROMPTS)
    c.data.prompts_file = ""
    c.data.num_train = 0
    c.data.num_test = 0
    c.data.cache_text = False
    c.data.cache_latents = False
    c.data.batch_size = 4

  c.text = ml_collections.ConfigDict()
  c.text.max_length = 0           # the text encoder's context (77)
  c.model.name = "sd_unet"
  c.model.unet = ""               # the pipeline's unet/config.json; its weights are the initial params
  c.model.use_vae = True
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.prediction_type = prediction_type   # overrides the pipeline scheduler's when set
  c.diffusion.snr_gamma = 0.0
  c.diffusion.change_prediction_type = False  # True: fine-tune into another parameterisation than the pipeline's

  # ddim | dpmpp_2m | dpmpp | euler | euler_ancestral | heun | unipc | ddpm; options from the pipeline's scheduler
  # config, overridden by config.sample.options (diffusers scheduler-config keys, e.g. use_karras_sigmas=True).
  c.sample.sampler = "dpmpp_2m"
  c.sample.steps = 4 if tiny else 25
  c.sample.guidance = guidance
  c.sample.eta = 0.0
  c.sample.options = ml_collections.ConfigDict()

  c.optim.name = "adamw"
  c.optim.lr = 1e-5
  c.optim.weight_decay = 1e-2
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 1.0
  c.remat = "none" if tiny else "full"
  c.train.num_steps = (2 if tiny else 15000) if finetune else 0   # 0: --mode sample / eval use the pipeline's UNet
  c.train.log_every = 1 if tiny else 50
  c.train.ckpt_every = 2 if tiny else 1000
  c.train.sample_every = 0 if tiny else (1000 if finetune else 0)
  c.train.num_samples = 4
  c.train.eval_every = 0
  if finetune:
    _base.set_ema(c, ema=0.9999)
  else:
    _base.set_ema(c)
  return c
