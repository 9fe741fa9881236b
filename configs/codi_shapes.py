"""CoDi on the shapes world (experiment "codi"): a conditional 1-4 step sampler distilled in one stage from the
text-to-image base of `configs/sd_shapes.py`.

    python -m diffusion_jax.main --config configs/codi_shapes.py:sr --workdir runs/codi_sr
    # an existing base (a finished sd_shapes run or its export dir) instead of training one as a stage:
    python -m diffusion_jax.main --config configs/codi_shapes.py:sr --workdir runs/codi_sr \
        --config.stages.pipeline.path=runs/sd_shapes/export
    python -m diffusion_jax.main --config configs/codi_shapes.py:sr --workdir runs/codi_sr --mode sample

Variant = comma-separated words:
  task      "sr" (4x super-resolution from the low-res image, default), "depth", "edge", "inpaint" (masked image
            + mask); every one text-guided (the caption goes to the base's text encoder);
  adapter   "pe" (PE-CoDi: ControlNet over the frozen base) instead of full CoDi (gated encoder copy, all trains);
  objective "diffusion" (baseline: the same adapter trained as a plain conditional diffusion model, evaluated with
            4 / 50 DDIM and 4 DPM-Solver++ steps);
  ablations "no_consistency" (guidance term only), "true_eps" (the sampled eps instead of the PF-ODE estimate),
            "base_ode" (the frozen base takes the ODE step, as the released code), "per_example_t",
            "eps_space", "cfg_aware";
  "tiny"    (seconds; tests): the tiny sd_shapes base, 16x16 images, 2 steps.
Examples: "depth,pe", "inpaint,diffusion", "sr,no_consistency", "tiny", "tiny,pe,diffusion".

Choices (ours unless marked): AdamW lr 1e-4 (the full-CoDi gate mu: 1e-2, optim.groups.gate), weight decay 1e-2
(release), clip 1.0 (release), constant lr (release),
batch 32, 1500 steps; named EMAs: "target" 0.95 (the distillation target; the release uses 0.999 over 500k steps,
too slow for a 1500-step run) and "ema" 0.99 (sampling); N = 50 grid, sd = 0.5, k = 10 (release);
t shared per batch (paper); the adapted model takes the PF-ODE step (paper); x-space consistency (release);
sampling: 4 consistency steps, no CFG (guidance 1, as the release's validation).
"""

from __future__ import annotations

import ml_collections

from configs import _base, sd_shapes

TASKS = ("sr", "depth", "edge", "inpaint")
FLAGS = ("pe", "diffusion", "no_consistency", "true_eps", "base_ode", "per_example_t", "eps_space", "cfg_aware",
         "tiny")


def parse_variant(arg):
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  bad = [w for w in words if w not in TASKS + FLAGS]
  if bad:
    raise ValueError(f"Unknown codi_shapes variant word(s) {bad}. Valid: tasks {TASKS}, flags {FLAGS} "
                     "(comma-separated, e.g. 'depth,pe').")
  tasks = [w for w in words if w in TASKS]
  if len(tasks) > 1:
    raise ValueError(f"codi_shapes variant names several tasks {tasks}; give one.")
  return (tasks[0] if tasks else "sr"), set(w for w in words if w in FLAGS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  task, flags = parse_variant(arg)
  tiny = "tiny" in flags
  c = _base.base_config()
  c.experiment = "codi"
  c.seed = 0
  # The pretrained text-to-image base, trained first as a stage (WORKDIR/pipeline) unless a path is given.
  c.stages.pipeline = _base.stage(sd_shapes.get_config("tiny" if tiny else None), kind="sd_pipeline")

  c.data.name = "shapes"
  c.data.task = task
  c.data.lowres_factor = 4
  c.data.image_size = 16 if tiny else 32
  c.data.batch_size = 8 if tiny else 32
  c.data.num_train = 16 if tiny else 10000
  c.data.num_test = 8 if tiny else 200
  c.data.seed = 0
  c.data.cache_dir = ""
  c.data.cache_text = True
  c.data.cache_latents = False
  c.data.caption_drop = 0.1
  c.data.encode_batch_size = 32 if tiny else 250

  c.text = ml_collections.ConfigDict()
  c.text.max_length = 0
  c.model.name = "codi"
  c.model.unet = ""                # the base pipeline's UNet
  c.model.use_vae = False          # the shapes base is pixel-space
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.prediction_type = ""  # the base's (scheduler_config.json)

  c.codi = ml_collections.ConfigDict(dict(
      adapter="pe_codi" if "pe" in flags else "codi",
      objective="diffusion" if "diffusion" in flags else "codi",
      grid_size=50, sigma_data=0.5, timestep_scaling=10.0,
      ode_model="base" if "base_ode" in flags else "online",
      ode_noise="true" if "true_eps" in flags else "model",
      consistency_space="epsilon" if "eps_space" in flags else "x",
      consistency_weight=0.0 if "no_consistency" in flags else 1.0,
      guidance_weight=1.0,
      shared_t="per_example_t" not in flags,
      timesteps="grid", snr_gamma=0.0,
      cfg_aware="cfg_aware" in flags, cfg_min=2, cfg_max=14, cfg_ode=False,
      conditioning_scale=1.0))

  diffusion = "diffusion" in flags
  c.sample.sampler = "ddim" if diffusion else "consistency"
  c.sample.steps = (4 if not diffusion else 50) if not tiny else 2
  c.sample.guidance = 1.0
  c.sample.options = ml_collections.ConfigDict()

  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-2
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 1.0
  if "pe" in flags:  # only the ControlNet is a parameter; the group makes that explicit (and checked)
    c.optim.groups = ml_collections.ConfigDict({"controlnet": {"match": "^controlnet/", "lr": c.optim.lr}})
    c.optim.train_unmatched = False
  else:
    # The gate mu is one scalar: Adam moves it by about lr per step, so at lr 1e-4 it could not pass ~0.15 in 1500
    # steps and the condition would barely enter. Its own lr (ours; the paper gives none) lets it open.
    c.optim.groups = ml_collections.ConfigDict({"gate": {"match": "^codi/mu$", "lr": 1e-2}})

  c.train.num_steps = 2 if tiny else 1500
  c.train.log_every = 1 if tiny else 100
  c.train.ckpt_every = 2 if tiny else 500
  c.train.sample_every = 0
  c.train.eval_every = 0
  c.train.num_samples = 4 if tiny else 16
  if diffusion:
    _base.set_ema(c, ema=0.9 if tiny else 0.99)
  else:
    _base.set_ema(c, ema=0.9 if tiny else 0.99, target=0.5 if tiny else 0.95)

  c.eval.num_examples = 4 if tiny else 200
  c.eval.batch_size = 4 if tiny else 100
  # tiny: one setting, the one the sample sheet uses (one compile); else eval_settings' defaults (1/2/4 consistency
  # steps; the diffusion baseline: 4 and 50 DDIM, 4 DPM-Solver++ steps).
  c.eval.settings = (["consistency:2"] if not diffusion else ["ddim:2"]) if tiny else []
  c.eval.guidance = None
  # The shapes FD of the outputs to the ground truth (eval/shapes_fd.py): the ShapesNet weights file made by
  # `python scripts/shapes_fd.py train --out PATH --image_size 32`; empty = not computed (evaluate says so).
  c.eval.shapes_fd_path = ""
  return c
