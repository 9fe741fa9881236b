"""CoDi at paper scale on Stable Diffusion 1.5 (epsilon prediction, 512 px), experiment "codi".

    python -m diffusion_jax.main --config configs/codi_sd15.py:sr --workdir runs/codi_sd15_sr \
        --config.stages.pipeline.path=/path/to/stable-diffusion-v1-5 --config.data.data_dir=/path/to/images
    # PE-CoDi (ControlNet over the frozen SD-1.5, as the released code trains), inpainting, a TFDS set:
    python -m diffusion_jax.main --config configs/codi_sd15.py:inpaint,pe --workdir runs/codi_sd15_inpaint \
        --config.stages.pipeline.path=/path/to/stable-diffusion-v1-5 --config.data.name=tfds \
        --config.data.tfds_name=coco_captions --config.data.data_dir=/path/to/tfds

The base is a local diffusers directory (stage `pipeline`, kind sd_pipeline); its scheduler_config.json gives the
schedule and the parameterisation (epsilon here; `configs/codi_sd21.py` is the v-prediction SD-2.1 twin). Data: a
captioned image folder (captions.jsonl / .tsv / .txt side files) or TFDS; the condition is computed from each
image (`experiments/codi.image_condition`): "sr" (4x box-downsampled), "inpaint" (grey box + mask), "edge"
(gradient-magnitude edges, a stand-in for the release's Canny). Depth needs a depth estimator: not available at
this scale (the shapes world renders depth: configs/codi_shapes.py:depth).

Hyper-parameters of the released code (codi.md A4 / A7): AdamW lr 1e-5, weight decay 1e-2, global-norm clip 1.0,
constant lr, EMA target 0.999 (checkpoints and samples use it), batch 2 per device (16 = 8 devices; set
--config.data.batch_size=2*devices), 512 px, N = 50, sd = 0.5, k = 10, 4-step sampling, bf16 compute, full remat.
Paper-vs-release choices as in configs/codi_shapes.py (paper: shared t, adapted model's ODE step); the release's
per-example t and frozen-base ODE step are `--config.codi.shared_t=False --config.codi.ode_model=base`.
Parameter counts (tests/experiments/test_codi.py): full CoDi 1,209.3M (paper 1.22B), PE-CoDi ControlNet 361.3M
trainable (paper 364M).

Variants: comma-separated task ("sr" default, "inpaint", "edge"), "pe", "diffusion" (baseline), "tiny" (tests: a
tiny pipeline given by path, the shapes world at 16 px, 2 steps).
"""

from __future__ import annotations

import ml_collections

from configs import _base

TASKS = ("sr", "inpaint", "edge")
FLAGS = ("pe", "diffusion", "tiny")


def codi_sd_config(arg, *, name: str, prediction_type: str, image_size: int) -> ml_collections.ConfigDict:
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  bad = [w for w in words if w not in TASKS + FLAGS]
  if bad:
    raise ValueError(f"Unknown {name} variant word(s) {bad}. Valid: tasks {TASKS}, flags {FLAGS} (comma-separated).")
  tasks = [w for w in words if w in TASKS]
  if len(tasks) > 1:
    raise ValueError(f"{name} variant names several tasks {tasks}; give one.")
  task, flags = (tasks[0] if tasks else "sr"), set(words) - set(TASKS)
  tiny, diffusion = "tiny" in flags, "diffusion" in flags
  c = _base.base_config()
  c.experiment = "codi"
  c.seed = 0
  c.stages.pipeline = _base.stage(path="", kind="sd_pipeline")   # --config.stages.pipeline.path=/path/to/sd

  c.data.name = "shapes" if tiny else "image_folder"
  c.data.data_dir = ""
  c.data.task = task
  c.data.lowres_factor = 4
  c.data.image_size = 16 if tiny else image_size
  c.data.num_train = 16 if tiny else 0
  c.data.num_test = 8 if tiny else 16
  c.data.batch_size = 8 if tiny else 16
  c.data.seed = 0
  c.data.cache_dir = ""
  c.data.cache_text = True
  c.data.cache_latents = True
  c.data.caption_drop = 0.1
  c.data.encode_batch_size = 8 if tiny else 16

  c.text = ml_collections.ConfigDict()
  c.text.max_length = 0
  c.model.name = "codi"
  c.model.unet = ""
  c.model.use_vae = True
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.prediction_type = prediction_type
  c.dtype = "float32" if tiny else "bfloat16"
  c.remat = "none" if tiny else "full"

  c.codi = ml_collections.ConfigDict(dict(
      adapter="pe_codi" if "pe" in flags else "codi", objective="diffusion" if diffusion else "codi",
      grid_size=50, sigma_data=0.5, timestep_scaling=10.0, ode_model="online", ode_noise="model",
      consistency_space="x", consistency_weight=1.0, guidance_weight=1.0, shared_t=True, timesteps="grid",
      snr_gamma=0.0, cfg_aware=False, cfg_min=2, cfg_max=14, cfg_ode=False, conditioning_scale=1.0))

  c.sample.sampler = "ddim" if diffusion else "consistency"
  c.sample.steps = 2 if tiny else (50 if diffusion else 4)
  c.sample.guidance = 1.0
  c.sample.options = ml_collections.ConfigDict()

  c.optim.name = "adamw"
  c.optim.lr = 1e-5
  c.optim.weight_decay = 1e-2
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 1.0
  if "pe" in flags:
    c.optim.groups = ml_collections.ConfigDict({"controlnet": {"match": "^controlnet/", "lr": c.optim.lr}})
    c.optim.train_unmatched = False

  c.train.num_steps = 2 if tiny else 500_000
  c.train.log_every = 1 if tiny else 100
  c.train.ckpt_every = 2 if tiny else 5000
  c.train.sample_every = 0 if tiny else 5000
  c.train.eval_every = 0
  c.train.num_samples = 4 if tiny else 8
  if diffusion:
    _base.set_ema(c, ema=0.999)
  else:
    _base.set_ema(c, target=0.999)   # the release: one EMA, the distillation target, also what is sampled
  c.eval.num_examples = 4 if tiny else 200
  c.eval.batch_size = 4 if tiny else 8
  c.eval.settings = ["consistency:1", "consistency:2"] if tiny and not diffusion else []
  c.eval.guidance = None
  return c


def get_config(arg=None):
  return codi_sd_config(arg, name="codi_sd15", prediction_type="epsilon", image_size=512)
