"""MT-Diffusion at paper scale: joint image + label generation on ImageNet-64 (the scale the paper's reviewers
report), read TF-free from a TFDS array_record build of `imagenet_resized/64x64`.

    python -m diffusion_jax.main --config configs/mt_diffusion_imagenet64.py --workdir runs/mt_in64 \
        --config.data.data_dir=/path/to/tensorflow_datasets

The paper's network, schedule and training budget are not public. This config takes the image-space DiffiT of
the 64x64 DiffiT config (configs/diffit_ffhq64.py: 4 stages at 64/32/16/8, channels 128/256/256/256, blocks
1/2/2/2, window 8, time token 512) as the shared backbone with 128 feature channels, a code space of
64 x 64 x 4 (the image's identity code on channels 0-2), the 1000-class label encoder (embedding 256 -> an
8 x 8 x 4 map -> upsampling) and decoder, constant weights 1/2, a 1000-step cosine schedule (improved DDPM's
ImageNet-64 choice), min-SNR-5 weighting, batch 256, Adam 1e-4, 400k steps, EMA 0.9999: 28.7M parameters
(28,729,524; the paper's count is not public), checked by the tests (tests/experiments/test_mt_diffusion_experiment.py).
Sampling runs all 1000 ancestral steps (`core.mt_diffusion.mt_sample` has no respacing yet).

Variants: "" (the paper-scale run).
"""

from __future__ import annotations

import ml_collections

from configs import _base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"Unknown mt_diffusion_imagenet64 variant {arg!r}. Valid variants: '' (the paper-scale run).")
  c = _base.base_config()
  c.experiment = "mt_diffusion"
  c.seed = 0
  c.dtype = "bfloat16"
  c.data = ml_collections.ConfigDict(dict(
      name="tfds", tfds_name="imagenet_resized/64x64", data_dir="",
      splits=ml_collections.ConfigDict(dict(train="train", test="validation")),
      image_key="image", label_key="label", image_size=64, batch_size=256, num_workers=8, prefetch=2))

  c.mt = ml_collections.ConfigDict()
  c.mt.modalities = ("image", "label")
  c.mt.mode = "joint"
  c.mt.code_channels = 4
  c.mt.code_scale = 1.0
  c.mt.weights = (0.5, 0.5)
  c.mt.weights_end = ()
  c.mt.rec_weights = (1.0, 1.0)
  c.mt.code_weight = 1.0
  c.mt.num_classes = 1000
  c.mt.embed_dim = 0
  c.mt.encoders = ml_collections.ConfigDict(dict(image=dict(encoder="identity"),
                                                 label=dict(hidden=256, grid=8)))

  c.model = ml_collections.ConfigDict(dict(
      name="diffit_image", out_channels=128, channels=(128, 256, 256, 256), num_blocks=(1, 2, 2, 2), num_heads=4,
      mlp_ratio=4.0, window_size=8, gn_groups=32, time_embed_dim=512, time_freq_dim=128, num_classes=0,
      skip_merge="concat", resample="conv"))

  c.diffusion = ml_collections.ConfigDict(dict(
      num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=1e-4, beta_end=0.02,
      weighting="min_snr", snr_gamma=5.0, variance_type="fixed_small"))

  c.optim.name = "adam"
  c.optim.lr = 1e-4
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 5000
  c.optim.min_lr_ratio = 0.1
  c.optim.grad_clip = 1.0

  c.train.num_steps = 400_000
  c.train.log_every = 100
  c.train.ckpt_every = 5000
  c.train.sample_every = 10000
  c.train.num_samples = 16
  _base.set_ema(c, ema=0.9999)
  c.train.progress_bar = False

  c.mesh.data = -1
  c.eval = ml_collections.ConfigDict(dict(num_samples=10000, batch_size=250, shapes_fd_path="", pr_k=3))
  return c
