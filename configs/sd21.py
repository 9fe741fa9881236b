"""Stable Diffusion 2.1 (768-v: v-prediction, 768x768): sampling and fine-tuning a local diffusers pipeline.

    python -m diffusion_jax.main --config configs/sd21.py --workdir runs/sd21 --mode sample \
        --config.stages.pipeline.path=/path/to/stable-diffusion-2-1 [--config.dtype=bfloat16]
    python -m diffusion_jax.main --config configs/sd21.py:finetune --workdir runs/sd21_ft \
        --config.stages.pipeline.path=/path/to/stable-diffusion-2-1 --config.data.data_dir=/path/to/images

As `configs/sd15.py` with v-prediction, 768x768 and guidance 7.5. Paper-scale components (diffusers
stabilityai/stable-diffusion-2-1): UNet `models/unet.sd21_unet_config()` (865.91M, linear projections, 64-wide
heads), OpenCLIP ViT-H/14 text encoder as a transformers CLIPTextModel (23 layers, 1024 wide, GELU: 340.39M),
KL-f8 VAE. Variants: "" (sampling), "finetune", "tiny" / "tiny_finetune" (tests).
"""

from __future__ import annotations

from configs import _sd


def reference_components():
  """(UNetConfig, CLIPTextConfig) of the released SD-2.1."""
  from diffusion_jax.models import clip, unet
  return unet.sd21_unet_config(), clip.CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                                      num_attention_heads=16, hidden_act="gelu", projection_dim=512)


def get_config(arg=None):
  return _sd.sd_config(arg, name="sd21", prediction_type="v_prediction", image_size=768, guidance=7.5)
