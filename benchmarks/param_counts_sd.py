"""Parameter counts of the Stable Diffusion ports, built abstractly with `jax.eval_shape` (no weights allocated).

  python benchmarks/param_counts_sd.py

Prints name, count, millions, and the published figure it should match.
"""

from __future__ import annotations

from diffusion_jax.models.controlnet import abstract_controlnet_params, sd15_controlnet_config
from diffusion_jax.models.unet import abstract_unet_params, count_params, sd15_unet_config, sd21_unet_config
from diffusion_jax.models.vae import abstract_vae_params, sd_vae_config


def rows():
  vae = abstract_vae_params(sd_vae_config())
  enc = count_params(vae["encoder"]) + count_params(vae["quant_conv"])
  dec = count_params(vae["decoder"]) + count_params(vae["post_quant_conv"])
  return [
      ("SD-1.5 UNet2DConditionModel", count_params(abstract_unet_params(sd15_unet_config())), "859.5M"),
      ("SD-2.1 UNet2DConditionModel", count_params(abstract_unet_params(sd21_unet_config())), "865.9M"),
      ("SD VAE AutoencoderKL (KL-f8)", count_params(vae), "83.7M"),
      ("  encoder + quant_conv", enc, "-"),
      ("  decoder + post_quant_conv", dec, "-"),
      ("SD-1.5 ControlNet", count_params(abstract_controlnet_params(sd15_controlnet_config())), "361.3M"),
  ]


def main():
  print(f"| {'model':<32} | {'parameters':>12} | {'M':>7} | {'reference':>9} |")
  print(f"|{'-' * 34}|{'-' * 14}|{'-' * 9}|{'-' * 11}|")
  for name, n, ref in rows():
    print(f"| {name:<32} | {n:>12,} | {n / 1e6:>7.1f} | {ref:>9} |")


if __name__ == "__main__":
  main()
