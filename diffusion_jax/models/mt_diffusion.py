"""MT-Diffusion networks (Flax linen): modality encoders E_i into one shared diffusion space Z, one shared backbone
denoiser with per-modality code heads, and per-modality decoder heads D_i with their restoration losses.

The diffusion space Z is `[H, W, C]` (`code_channels` = C). Every modality kind has an encoder into Z and a
decoder from Z:

=============  ===========================================  ===============================================  ========
kind           input x_i                                    encoder E_i -> Z                                 D_i loss
=============  ===========================================  ===============================================  ========
image          float [B, H, W, 3] in [-1, 1]                "identity": pixels on channels 0-2, zeros on     MSE
                                                            the rest (exact, no parameters); "conv": a
                                                            learned conv net
label          int [B] in [0, num_classes)                  embedding -> Dense -> a `grid` x `grid` x C map  cross-
                                                            -> nearest upsampling to H x W                   entropy
segmentation   int [B, H, W] in [0, num_segments)           one-hot -> conv net                              MSE on the
                                                                                                             one-hot
                                                                                                             (or CE)
masked_image   float [B, H, W, 3] in [-1, 1] + mask         [masked image, 2 mask - 1] -> conv net           MSE
               float [B, H, W] in {0, 1}
embedding      float [B, E] (e.g. a CLIP image embedding)   Dense -> a `grid` x `grid` x C map -> upsampling  cosine
                                                                                                             (or MSE)
=============  ===========================================  ===============================================  ========

Learned encoders end with a per-example RMS normalisation to `code_scale` (default 1: about the RMS of a
shapes-world image in [-1, 1]). Without it the joint objective has a trivial optimum: the diffusion terms and
the prior term all shrink with the codes' scale, so the encoders would collapse their codes towards 0 (a
choice of this project, not a statement of the paper).

`MTDiffusionNet` holds the encoders, the shared backbone (any registered network from `models/`, built by the
experiment: `diffit_image`, `sd_unet`, ...), one 1x1-conv code head per modality on the backbone's features
(predicting that modality's code E^_i from z_t) and the decoders. Methods (`nn.Module.apply(..., method=...)`):

* `encode(inputs)` -> codes `[N, B, H, W, C]` (inputs: kind -> array(s));
* `predict(z_t, t)` -> predicted codes `[N, B, H, W, C]` (t: the backbone's time input, `[B]` float);
* `decode(codes)` -> kind -> decoded output (logits for labels / segmentations, images, embeddings);
* `restoration(codes, inputs)` -> kind -> per-example loss `[B]` (`None` where D_i is exact);
* `__call__(inputs, z_t, t)` touches every submodule (for `init`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.registry import check_choice

KINDS = ("image", "label", "segmentation", "masked_image", "embedding")
IMAGE_ENCODERS = ("identity", "conv")
LOSSES = {"image": ("mse",), "label": ("ce",), "segmentation": ("mse", "ce"), "masked_image": ("mse",),
          "embedding": ("cosine", "mse")}
DEFAULT_LOSS = {"image": "mse", "label": "ce", "segmentation": "mse", "masked_image": "mse",
                "embedding": "cosine"}


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
  """One modality: its kind (a name of `KINDS`) and what its encoder / decoder need.

  num_classes: label kind (classes) or segmentation kind (segment ids, background included).
  embed_dim: embedding kind (E).
  encoder: image kind: "identity" or "conv".
  loss: the decoder's restoration loss (a name of `LOSSES[kind]`; "" = the default of the kind).
  hidden: width of the learned encoders / decoders.
  grid: label / embedding kinds: side of the coarse map the vector is projected to before upsampling.
  """
  kind: str
  num_classes: int = 0
  embed_dim: int = 0
  encoder: str = "identity"
  loss: str = ""
  hidden: int = 32
  grid: int = 4

  def __post_init__(self):
    check_choice("modality kind", self.kind, KINDS)
    if self.kind in ("label", "segmentation") and self.num_classes < 2:
      raise ValueError(f"modality {self.kind!r} needs num_classes >= 2, got {self.num_classes}.")
    if self.kind == "embedding" and self.embed_dim < 1:
      raise ValueError(f"modality 'embedding' needs embed_dim >= 1, got {self.embed_dim}.")
    if self.kind == "image":
      check_choice("image encoder", self.encoder, IMAGE_ENCODERS)
    check_choice(f"restoration loss of modality {self.kind!r}", self.loss_name, LOSSES[self.kind])
    if self.grid < 1 or self.hidden < 1:
      raise ValueError(f"modality {self.kind!r}: grid and hidden must be >= 1, got {self.grid}, {self.hidden}.")

  @property
  def loss_name(self) -> str:
    return self.loss or DEFAULT_LOSS[self.kind]


def _rms_normalise(x, scale: float, eps: float = 1e-6):
  axes = tuple(range(1, x.ndim))
  return scale * x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + eps)


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _conv(features, name, k=3, zero=False):
  return nn.Conv(features, (k, k), padding=k // 2, name=name,
                 kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal())


def _pool_to(x, g: int):
  """[B, H, W, C] -> [B, g, g, C] by average pooling (H, W divisible by g)."""
  b, h, w, c = x.shape
  return x.reshape(b, g, h // g, g, w // g, c).mean((2, 4))


class _ConvNet(nn.Module):
  """conv3x3 -> SiLU -> conv3x3 -> SiLU -> conv3x3 (out)."""
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_conv(self.hidden, "conv_0")(x))
    h = nn.silu(_conv(self.hidden, "conv_1")(h))
    return _conv(self.out, "conv_out")(h)


class ModalityEncoder(nn.Module):
  """E_i: one modality's input -> its code `[B, H, W, C]` in Z."""
  spec: ModalitySpec
  code_shape: Tuple[int, int, int]
  code_scale: float = 1.0

  @nn.compact
  def __call__(self, x, mask=None):
    s, (H, W, C) = self.spec, self.code_shape
    if s.kind == "image":
      x = jnp.asarray(x, jnp.float32)
      if s.encoder == "identity":
        if C < 3:
          raise ValueError(f"the identity image encoder needs code_channels >= 3, got {C}.")
        return jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (C - 3,), x.dtype)], -1)
      return _rms_normalise(_ConvNet(s.hidden, C, name="net")(x), self.code_scale)
    if s.kind == "masked_image":
      if mask is None:
        raise ValueError("the masked_image encoder needs the mask (float [B, H, W] in {0, 1}).")
      inp = jnp.concatenate([jnp.asarray(x, jnp.float32), 2.0 * jnp.asarray(mask, jnp.float32)[..., None] - 1.0],
                            -1)
      return _rms_normalise(_ConvNet(s.hidden, C, name="net")(inp), self.code_scale)
    if s.kind == "segmentation":
      oh = jax.nn.one_hot(jnp.asarray(x, jnp.int32), s.num_classes)
      return _rms_normalise(_ConvNet(s.hidden, C, name="net")(oh), self.code_scale)
    g = s.grid
    if H % g or W % g:
      raise ValueError(f"modality {s.kind!r}: the code size {H}x{W} must be divisible by grid={g}.")
    if s.kind == "label":
      v = nn.Embed(s.num_classes, s.hidden, name="embed")(jnp.asarray(x, jnp.int32))
    else:
      v = nn.silu(nn.Dense(s.hidden, name="embed")(jnp.asarray(x, jnp.float32)))
    m = nn.Dense(g * g * C, name="to_map")(v).reshape((-1, g, g, C))
    m = jnp.repeat(jnp.repeat(m, H // g, axis=1), W // g, axis=2)
    return _rms_normalise(_conv(C, "smooth")(m), self.code_scale)


class ModalityDecoder(nn.Module):
  """D_i: a code `[B, H, W, C]` -> the modality (images, logits, embeddings); `loss` gives -log p(x_i | code)."""
  spec: ModalitySpec
  code_shape: Tuple[int, int, int]

  @property
  def exact(self) -> bool:
    """True when D_i is the exact inverse of E_i (the identity image code): no restoration loss."""
    return self.spec.kind == "image" and self.spec.encoder == "identity"

  @nn.compact
  def __call__(self, code):
    s = self.spec
    if s.kind == "image":
      if s.encoder == "identity":
        return code[..., :3]
      return _ConvNet(s.hidden, 3, name="net")(code)
    if s.kind == "masked_image":
      return _ConvNet(s.hidden, 4, name="net")(code)
    if s.kind == "segmentation":
      return _ConvNet(s.hidden, s.num_classes, name="net")(code)
    h = nn.silu(_conv(s.hidden, "conv_0")(code))
    h = _pool_to(h, s.grid).reshape((code.shape[0], -1))
    h = nn.silu(nn.Dense(s.hidden, name="dense_0")(h))
    out = s.num_classes if s.kind == "label" else s.embed_dim
    return nn.Dense(out, name="out")(h)

  def loss(self, decoded, target, mask=None):
    """Per-example restoration loss `[B]` of decoded output against the modality's input."""
    s = self.spec
    name = s.loss_name
    if s.kind == "label":
      logp = jax.nn.log_softmax(decoded.astype(jnp.float32), -1)
      return -jnp.take_along_axis(logp, jnp.asarray(target, jnp.int32)[:, None], -1)[:, 0]
    if s.kind == "segmentation":
      oh = jax.nn.one_hot(jnp.asarray(target, jnp.int32), s.num_classes)
      if name == "ce":
        return _mean_flat(-jnp.sum(oh * jax.nn.log_softmax(decoded, -1), -1))
      return _mean_flat(jnp.square(decoded - oh))
    if s.kind == "masked_image":
      tgt = jnp.concatenate([target, 2.0 * jnp.asarray(mask, jnp.float32)[..., None] - 1.0], -1)
      return _mean_flat(jnp.square(decoded - tgt))
    if s.kind == "embedding":
      if name == "cosine":
        return 1.0 - cosine(decoded, target)
      return _mean_flat(jnp.square(decoded - target))
    return _mean_flat(jnp.square(decoded - target))

  @staticmethod
  def readout(spec: ModalitySpec, decoded):
    """Decoded output -> the modality's values: labels / segment ids (argmax), images clipped to [-1, 1],
    masked image + mask, embeddings."""
    if spec.kind in ("label", "segmentation"):
      return jnp.argmax(decoded, -1).astype(jnp.int32)
    if spec.kind == "image":
      return jnp.clip(decoded, -1.0, 1.0)
    if spec.kind == "masked_image":
      return {"masked_image": jnp.clip(decoded[..., :3], -1.0, 1.0), "mask": (decoded[..., 3] > 0).astype(jnp.float32)}
    return decoded


def cosine(a, b, eps: float = 1e-8):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)


def call_backbone(backbone: nn.Module, z, t):
  """The shared denoiser on z_t `[B, H, W, C]` at time `t` `[B]` -> features `[B, H, W, F]`. The SD UNet gets an
  all-zero one-token context (no text: its cross-attention sees nothing); every other registered backbone is
  called as `backbone(x, t)` (unconditional)."""
  from diffusion_jax.models.unet import UNet2DConditionModel
  if isinstance(backbone, UNet2DConditionModel):
    from diffusion_jax.models.unet import resolve_unet_config
    ctx = jnp.zeros((z.shape[0], 1, resolve_unet_config(backbone.config).cross_attention_dim), z.dtype)
    return backbone(z, t, ctx)
  return backbone(z, t)


class MTDiffusionNet(nn.Module):
  """Encoders + shared backbone + per-modality code heads + decoders (see the module docstring).

  modalities: one `ModalitySpec` per modality, in the order of the codes' leading axis.
  backbone: an unbound network from `models/` mapping `[B, H, W, C]` (+ time) to `[B, H, W, F]` features.
  code_shape: (H, W, C) of Z.
  """
  modalities: Tuple[ModalitySpec, ...]
  backbone: nn.Module
  code_shape: Tuple[int, int, int]
  code_scale: float = 1.0

  def setup(self):
    kinds = [m.kind for m in self.modalities]
    if len(set(kinds)) != len(kinds) or not kinds:
      raise ValueError(f"MTDiffusionNet needs one or more distinct modality kinds, got {kinds}.")
    self.encoders = [ModalityEncoder(m, tuple(self.code_shape), self.code_scale, name=f"enc_{m.kind}")
                     for m in self.modalities]
    self.heads = [nn.Conv(self.code_shape[-1], (1, 1), name=f"head_{m.kind}") for m in self.modalities]
    self.decoders = [ModalityDecoder(m, tuple(self.code_shape), name=f"dec_{m.kind}") for m in self.modalities]

  @property
  def kinds(self) -> Tuple[str, ...]:
    return tuple(m.kind for m in self.modalities)

  def encode(self, inputs: Dict[str, Any]):
    """kind -> input (masked_image also reads inputs["mask"]) -> codes `[N, B, H, W, C]`."""
    codes = []
    for m, enc in zip(self.modalities, self.encoders):
      if m.kind not in inputs:
        raise KeyError(f"MT-Diffusion: no input for modality {m.kind!r}; inputs hold {sorted(inputs)}.")
      codes.append(enc(inputs[m.kind], inputs.get("mask") if m.kind == "masked_image" else None))
    return jnp.stack(codes).astype(jnp.float32)

  def encode_one(self, index: int, x, mask=None):
    return self.encoders[index](x, mask).astype(jnp.float32)

  def features(self, z, t):
    return call_backbone(self.backbone, z, t).astype(jnp.float32)

  def predict(self, z, t):
    """Predicted codes E^_i(z_t) `[N, B, H, W, C]` from the shared backbone's features."""
    h = nn.silu(self.features(z, t))
    return jnp.stack([head(h) for head in self.heads]).astype(jnp.float32)

  def predict_from_features(self, h):
    h = nn.silu(h)
    return jnp.stack([head(h) for head in self.heads]).astype(jnp.float32)

  def decode(self, codes):
    """codes `[N, B, ...]` -> kind -> decoded output of D_i."""
    return {m.kind: dec(codes[i]) for i, (m, dec) in enumerate(zip(self.modalities, self.decoders))}

  def decode_one(self, index: int, code):
    return self.decoders[index](code)

  def restoration(self, codes, inputs):
    """kind -> per-example restoration loss `[B]` of D_i(codes[i]) against the input (None where D_i is
    exact)."""
    out = {}
    for i, (m, dec) in enumerate(zip(self.modalities, self.decoders)):
      if dec.exact:
        out[m.kind] = None
        continue
      out[m.kind] = dec.loss(dec(codes[i]), inputs[m.kind], inputs.get("mask") if m.kind == "masked_image" else None)
    return out

  def __call__(self, inputs, z, t):
    codes = self.encode(inputs)
    pred = self.predict(z, t)
    self.decode(codes)
    return codes, pred
