"""Paired image metrics (PSNR, SSIM) and the CLIP score, jitted.

* `psnr(a, b, data_range)`: 10 log10(R^2 / MSE) per image (over H, W, C), [B].
* `ssim(a, b, data_range)`: Wang et al. 2004 with their constants: 11x11 Gaussian window (sigma 1.5), K1 0.01,
  K2 0.03, population (not sample) variances, "valid" windows only, averaged over the map and the channels,
  per image [B]. Equals `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, channel_axis=-1, data_range=R)` (tested).
* `clip_score(...)`: w * max(cos(E_image, E_text), 0) per pair, w = 100 (torchmetrics / most text-to-image
  papers; Hessel et al.'s CLIP-S uses w = 2.5), with the project's Flax CLIP (`models.clip.CLIPModel`) and its
  local weights. `clip_pixels` does CLIP's preprocessing (bicubic resize of the short side, centre crop,
  OpenAI mean / std).

Inputs are NHWC; uint8 or float, `data_range` is the dynamic range (255 for uint8, 1 for [0, 1], 2 for
[-1, 1]); both images must share the layout and range.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pair(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"Paired metrics need two NHWC batches of one shape, got {a.shape} and {b.shape}.")
  return a, b


@functools.partial(jax.jit, static_argnames=("data_range",))
def _psnr(a, b, data_range):
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def psnr(a, b, data_range: float) -> np.ndarray:
  """Per-image PSNR in dB (inf for identical images)."""
  return np.asarray(_psnr(*_pair(a, b), float(data_range)))


def _gaussian_window(size=11, sigma=1.5):
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  return g / g.sum()


def _filter_valid(x, g):
  """Separable valid correlation of [B, H, W, C] with the 1-d window g along H then W (per channel)."""
  c = x.shape[-1]
  k = len(g)
  hp = jax.lax.Precision.HIGHEST
  kh = jnp.tile(jnp.asarray(g, jnp.float32).reshape(k, 1, 1, 1), (1, 1, 1, c))
  kw = jnp.tile(jnp.asarray(g, jnp.float32).reshape(1, k, 1, 1), (1, 1, 1, c))
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                   precision=hp)
  return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                      precision=hp)


@functools.partial(jax.jit, static_argnames=("data_range",))
def _ssim(a, b, data_range):
  g = _gaussian_window()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
  saa = _filter_valid(a * a, g) - mu_a ** 2
  sbb = _filter_valid(b * b, g) - mu_b ** 2
  sab = _filter_valid(a * b, g) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
  return s.mean((1, 2, 3))


def ssim(a, b, data_range: float) -> np.ndarray:
  """Per-image SSIM (images at least 11x11)."""
  a, b = _pair(a, b)
  if min(a.shape[1:3]) < 11:
    raise ValueError(f"SSIM's 11x11 window needs images of at least 11x11, got {a.shape[1:3]}.")
  return np.asarray(_ssim(a, b, float(data_range)))


# ------------------------------------------------------------------------------------------ CLIP score


@functools.partial(jax.jit, static_argnames=("size",))
def clip_pixels(images_u8, size: int = 224):
  """uint8 NHWC -> CLIP pixel values [B, size, size, 3]: bicubic resize of the short side to `size`, centre
  crop, /255, OpenAI mean / std (the CLIPImageProcessor's steps, in float: it resizes uint8 with PIL, which
  rounds between its two passes; within 0.015 of it on smooth images, up to ~0.1 on white noise)."""
  x = images_u8.astype(jnp.float32) / 255.0
  b, h, w, _ = x.shape
  s = size / min(h, w)
  nh, nw = (size, max(size, int(w * s))) if h <= w else (max(size, int(h * s)), size)  # transformers: int()
  x = jnp.clip(jax.image.resize(x, (b, nh, nw, 3), "bicubic"), 0.0, 1.0)
  top, left = (nh - size) // 2, (nw - size) // 2
  x = x[:, top:top + size, left:left + size]
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def clip_score(model, params, pixel_values, input_ids, attention_mask=None, w: float = 100.0) -> np.ndarray:
  """Per-pair CLIP score w * max(cos(image_i, text_i), 0), [B]. `model`: a `models.clip.CLIPModel`;
  `pixel_values` as from `clip_pixels`; `input_ids` [B, L] from the model's tokenizer."""
  return np.asarray(_clip_score(model, params, pixel_values, input_ids, attention_mask, float(w)))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _clip_score(model, params, pixel_values, input_ids, attention_mask, w):
  img = model.apply({"params": params}, pixel_values, method="get_image_features")
  txt = model.apply({"params": params}, input_ids, attention_mask, method="get_text_features")
  img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  return w * jnp.maximum((img * txt).sum(-1), 0.0)
