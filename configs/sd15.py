"""Stable Diffusion 1.5 (epsilon prediction, 512x512): sampling and fine-tuning a local diffusers pipeline.

    # sample the released UNet, no training (WORKDIR/samples/final_0000000.png + .npz; --mode eval likewise):
    python -m diffusion_jax.main --config configs/sd15.py --workdir runs/sd15 --mode sample \
        --config.stages.pipeline.path=/path/to/stable-diffusion-v1-5 [--config.dtype=bfloat16]
    # fine-tune the UNet on a captioned image folder (VAE + text encoder frozen, latents cached):
    python -m diffusion_jax.main --config configs/sd15.py:finetune --workdir runs/sd15_ft \
        --config.stages.pipeline.path=/path/to/stable-diffusion-v1-5 --config.data.data_dir=/path/to/images

Sampling: DPM-Solver++(2M), 25 steps, classifier-free guidance 7.5 (`--config.sample.sampler=ddim|euler`); the
schedule and sampler options come from the pipeline's scheduler/scheduler_config.json. The paper-scale
components (diffusers runwayml/stable-diffusion-v1-5): UNet `models/unet.sd15_unet_config()` (859.52M),
CLIP ViT-L/14 text encoder (123.06M), KL-f8 VAE (83.65M); see `reference_components`.
Fine-tuning: AdamW lr 1e-5, weight decay 0.01, batch 32, EMA 0.9999, full remat, 15000 steps (choices of ours).
Variants: "" (sampling), "finetune", "tiny" / "tiny_finetune" (tests: a tiny pipeline, 16x16 images).
"""

from __future__ import annotations

from configs import _sd


def reference_components():
  """(UNetConfig, CLIPTextConfig) of the released SD-1.5."""
  from diffusion_jax.models import clip, unet
  return unet.sd15_unet_config(), clip.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12, projection_dim=768)


def get_config(arg=None):
  return _sd.sd_config(arg, name="sd15", prediction_type="epsilon", image_size=512, guidance=7.5)
