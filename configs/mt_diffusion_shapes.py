"""MT-Diffusion on the shapes world: the four experiments of the paper as config variants, with their baselines.

    python -m diffusion_jax.main --config configs/mt_diffusion_shapes.py:label --workdir runs/mt_label
    python -m diffusion_jax.main --config configs/mt_diffusion_shapes.py:image --workdir runs/mt_image
    python -m diffusion_jax.main --config configs/mt_diffusion_shapes.py:inpaint --workdir runs/mt_inpaint
    python -m diffusion_jax.main --config configs/mt_diffusion_shapes.py:inpaint_recon --workdir runs/mt_recon

(`--mode sample` / `--mode eval` with the same --workdir: sample sheets / the metrics of a trained run.)

Variants (the experiment, then optional modifiers, comma separated):
  "label" (default, ""): (a) joint image + class label (35 classes = 5 shapes x 7 colours);
  "segmentation": (b) joint image + segmentation mask (background + 5 shape classes, per pixel);
  "inpaint":      (c) image + masked image (masked image + mask as one modality): generation and inpainting
                  (sampling the image with the masked image held fixed) in one model;
  "inpaint_recon": (c)'s reconstruction-only baseline: the same network maps the masked image's code to the
                  image's code in one pass (MSE on the image, no diffusion), same batch and steps;
  "clip":         (d) joint image + CLIP image embedding; the shapes CLIP (configs/clip_shapes.py) is stage
                  `clip` (trained in WORKDIR/clip first, or `--config.stages.clip.path=runs/eclipse/clip`);
  "image":        the single-task baseline of (a), (b) and (d): image-only diffusion with the same network,
                  code space, schedule, batch and steps (one modality, weight 1).
Modifiers: "tiny" (seconds, for tests), "unet" (the SD UNet port as the shared backbone instead of DiffiT),
"seedN" (config.seed = N).

Setup (choices of this project; the paper's are not public): 16x16 images with one object (as
configs/diffit_shapes.py, where the parser is exact), code space Z = 16 x 16 x 4 (the image's identity code
on channels 0-2), constant modality weights 1/N, a 100-step cosine schedule, min-SNR-5 weighting of the ELBO's
posterior-matching term on the predicted codes, the per-modality code-matching term (weight 1), restoration
weight 1, the image-space DiffiT (channels 32/64,
window 8) as the shared backbone with 32 feature channels, Adam 2e-3, batch 32, 2000 steps, EMA 0.995.
Measured results (the four experiments against their baselines, two seeds; scripts/mt_diffusion_table.py):
docs/mt_diffusion.md.
"""

from __future__ import annotations

import ml_collections

from configs import _base, clip_shapes

EXPERIMENTS = {
    "label": ("image", "label"),
    "segmentation": ("image", "segmentation"),
    "inpaint": ("image", "masked_image"),
    "inpaint_recon": ("image", "masked_image"),
    "clip": ("image", "embedding"),
    "image": ("image",),
}
MODIFIERS = ("tiny", "unet")


def parse_variant(arg: str | None):
  """'label,tiny,seed1' -> ('label', {'tiny', ...}, 1)."""
  parts = [p for p in (arg or "").split(",") if p]
  seed, mods, exp = 0, set(), None
  for p in parts:
    if p.startswith("seed") and p[4:].isdigit():
      seed = int(p[4:])
    elif p in MODIFIERS:
      mods.add(p)
    elif p in EXPERIMENTS and exp is None:
      exp = p
    else:
      raise ValueError(f"Unknown mt_diffusion_shapes variant part {p!r} in {arg!r}. Experiments: "
                       f"{', '.join(EXPERIMENTS)}; modifiers: {', '.join(MODIFIERS)}, seedN.")
  return exp or "label", mods, seed


def backbone(tiny: bool, unet: bool, code_channels: int, features: int) -> ml_collections.ConfigDict:
  if unet:
    return ml_collections.ConfigDict(dict(name="sd_unet", unet=ml_collections.ConfigDict(dict(
        sample_size=16, in_channels=code_channels, out_channels=features,
        block_out_channels=(16, 32) if tiny else (32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=8, attention_head_dim=2 if tiny else 4))))
  return ml_collections.ConfigDict(dict(
      name="diffit_image", out_channels=features, channels=(16,) if tiny else (32, 64),
      num_blocks=(1,) if tiny else (1, 1),
      num_heads=2 if tiny else 4, mlp_ratio=2.0 if tiny else 4.0, window_size=8, gn_groups=8,
      time_embed_dim=32 if tiny else 128, time_freq_dim=16 if tiny else 32, num_classes=0,
      skip_merge="concat", resample="conv"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  exp, mods, seed = parse_variant(arg)
  tiny = "tiny" in mods
  c = _base.base_config()
  c.experiment = "mt_diffusion"
  c.seed = seed
  c.data.name = "shapes"
  c.data.image_size = 16
  c.data.shapes = ml_collections.ConfigDict(dict(min_objects=1, max_objects=1, small_frac=0.375, large_frac=0.5))
  c.data.batch_size = 8 if tiny else 32
  c.data.num_train = 64 if tiny else 50000
  c.data.num_test = 16 if tiny else 1000

  kinds = EXPERIMENTS[exp]
  n = len(kinds)
  c.mt = ml_collections.ConfigDict()
  c.mt.modalities = kinds
  c.mt.mode = "reconstruction" if exp == "inpaint_recon" else "joint"
  c.mt.code_channels = 4
  c.mt.code_scale = 1.0
  c.mt.weights = tuple([1.0 / n] * n)
  c.mt.weights_end = ()
  c.mt.rec_weights = tuple([1.0] * n)
  c.mt.code_weight = 1.0  # per-modality code matching (the ELBO alone only sees the weighted sum of the codes)
  c.mt.num_classes = 35
  c.mt.embed_dim = 0
  c.mt.encoders = ml_collections.ConfigDict(dict(image=dict(encoder="identity")))
  if exp == "clip":
    clip_cfg = clip_shapes.get_config("tiny" if tiny else None)
    c.mt.embed_dim = int(clip_cfg.model.projection_dim)
    c.stages.clip = _base.stage(clip_cfg, kind="hf_clip")
  features = 16 if tiny else 32
  c.model = backbone(tiny, "unet" in mods, c.mt.code_channels, features)

  c.diffusion = ml_collections.ConfigDict(dict(
      num_train_timesteps=10 if tiny else 100, beta_schedule="squaredcos_cap_v2", beta_start=1e-4, beta_end=0.02,
      weighting="min_snr", snr_gamma=5.0, variance_type="fixed_small"))

  c.optim.name = "adam"
  c.optim.lr = 1e-3 if tiny else 2e-3
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 0 if tiny else 100
  c.optim.min_lr_ratio = 0.05
  c.optim.grad_clip = 1.0

  c.train.num_steps = 3 if tiny else 2000
  c.train.log_every = 1 if tiny else 100
  c.train.ckpt_every = 3 if tiny else 1000
  c.train.sample_every = 0
  c.train.num_samples = 4 if tiny else 16
  _base.set_ema(c, ema=0.9 if tiny else 0.995)
  c.train.progress_bar = False

  # Sampler: "ancestral" (all T steps) or "ddim" (strided: num_steps grid times, 0 = T; eta 0 = deterministic,
  # eta 1 with num_steps = T = the ancestral path), e.g. --config.sample.sampler=ddim --config.sample.num_steps=25.
  c.sample = ml_collections.ConfigDict(dict(sampler="ancestral", num_steps=0, eta=0.0, timestep_spacing="linspace"))
  c.eval = ml_collections.ConfigDict(dict(num_samples=8 if tiny else 256, batch_size=8 if tiny else 128,
                                          shapes_fd_path="", pr_k=3,
                                          # False: joint metrics only (skips the one-modality-given sampling)
                                          conditional=True))
  return c
