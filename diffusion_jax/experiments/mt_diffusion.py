"""MT-Diffusion (Chen et al., ICLR 2024): several modalities generated jointly in one shared diffusion space.

Registered as experiment "mt_diffusion". The pieces:

* `models/mt_diffusion.py`: modality encoders E_i into Z = `[H, W, C]` (`config.mt.code_channels` = C), one
  shared backbone (`config.model`: any registered network, e.g. `diffit_image` or `sd_unet`, with `F` output
  channels) + one 1x1-conv code head per modality, and decoders D_i with their restoration losses.
* `core/mt_diffusion.py`: the weighted multi-modal forward process, its closed-form marginal / posterior, the
  multi-term ELBO (`elbo_terms`) and ancestral sampling of all modalities at once or some given others
  (`mt_sample`, their codes held fixed).

Modalities (`config.mt.modalities`, a tuple of kinds; the order is the codes' leading axis): "image", "label"
(the shapes world's 35 classes, or a data set's labels), "segmentation" (the shapes world's semantic map),
"masked_image" (masked image + mask: the inpainting input) and "embedding" (the CLIP image embedding of the
image, computed in the step by the frozen CLIP of stage `clip`: the shapes CLIP, `configs/clip_shapes.py`).
Weights w_t^(i): `config.mt.weights` (constant), or linear from `weights` (t = 0) to `weights_end` (t = T).

Loss (`config.mt.mode="joint"`): the core's ELBO estimate (`config.diffusion.weighting`: "kl" = L_T + T * L_t
(L_0 at t = 1), "simple" = DDPM's eps-equivalent weighting, "min_snr" = "simple" times min(SNR_t, gamma) /
SNR_t (Hang et al. 2023), gamma = `config.diffusion.snr_gamma`) plus the restoration term L_rec =
sum_i rec_weight_i * loss_i(D_i(E_i(x_i)), x_i) (`config.mt.rec_weights`). The decoders are trained on the
clean codes; at sampling they read the codes predicted at the last step.

`config.mt.mode="reconstruction"`: the reconstruction-only baseline of experiment (c): the same network maps
the masked image's code (backbone at t = 0) to the image's code, trained by the MSE on the image only (no
diffusion); it needs the modalities "image" and "masked_image".

Sampler (`config.sample`, used by `generate`, `inpaint`, `sample` and `evaluate`): `sampler` "ancestral" (the
default: all T steps, `core.mt_diffusion.mt_sample`) or "ddim" (strided DDIM-style, `mt_ddim_sample`:
`num_steps` grid times, 0 = T; `eta` 0 = deterministic, 1 with num_steps = T = the ancestral path;
`timestep_spacing` "linspace" (default: t = T to 1), "trailing" or "leading"). `generate(..., num_steps=, eta=)` overrides
them for one call (num_steps alone switches to "ddim").

`sample()` (sample sheets, `--mode sample`): jointly generated modalities (image | segmentation | label as
text), and each modality's conditional results (the image generated given the batch's label / segmentation /
masked image (inpainting) / embedding). `evaluate()` (host side, the sampler compiled once):

* every run with an image: precision / recall (Kynkaenniemi et al.) of jointly generated images against test
  images on ShapesNet features (`config.eval.shapes_fd_path`, `eval/shapes_fd.py`) or, when no weights are
  given, on the fixed random conv features of `experiments/generation.py` (`pr_features` says which); with
  ShapesNet weights also `shapes_fd`, the Frechet distance of those features (generated vs the same test images,
  `shapes_fd_net_sha256` names the weights: distances compare only under one weights file);
* label: `label_image_agreement` (the parser's class of the generated image equals the generated label), and
  `label_to_image_accuracy` / `image_to_label_accuracy` (one modality given);
* segmentation: `seg_image_iou` (the parser's segmentation of the generated image against the generated mask,
  mean IoU over classes) and `seg_to_image_iou` / `image_to_seg_iou`;
* masked_image: inpainting of test images: `inpaint_mse` (mean squared error over the masked pixels, images
  in [-1, 1]), `inpaint_mse_outside`, `inpaint_class_accuracy` (the parser's class of the inpainted image);
* embedding: `emb_image_cosine` (cosine between the generated embedding and the CLIP embedding of the
  generated image), its chance level `emb_image_cosine_shuffled` (against another sample's image), and
  `emb_to_image_cosine` (image generated from a test embedding).
  `config.eval.conditional=False` skips the one-modality-given metrics (`*_to_*`: a sampling pass each) and keeps
  the joint ones (and inpainting), for short budgets.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.core import mt_diffusion as mt
from diffusion_jax.core.schedules import make_schedule
from diffusion_jax.experiments.base import EXPERIMENTS, Experiment
from diffusion_jax.models import build_model
from diffusion_jax.models import mt_diffusion as M
from diffusion_jax.registry import check_choice

MODES = ("joint", "reconstruction")
WEIGHTINGS = ("kl", "simple", "min_snr")
SEGMENT_COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                            [245, 130, 48], [145, 30, 180], [70, 240, 240]], np.float32) / 255.0
SAMPLE_KEYS = ("sampler", "num_steps", "eta", "timestep_spacing")
MT_KEYS = ("modalities", "mode", "code_channels", "code_scale", "weights", "weights_end", "rec_weights",
           "code_weight", "num_classes", "embed_dim", "encoders")


def _get(cfg, key, default):
  return cfg[key] if (cfg is not None and key in cfg) else default


# ------------------------------------------------------------------------------- module-level callables
# (module-level + one functools.partial per experiment: the jitted sampler sees the same function every call)


def _predict(net, time_scale, params, z, k, cond):
  del cond
  return net.apply({"params": params}, z, k * time_scale, method="predict")


def _encode(net, params, inputs):
  return net.apply({"params": params}, inputs, method="encode")


def _decode(net, params, codes):
  dec = net.apply({"params": params}, codes, method="decode")
  return {m.kind: M.ModalityDecoder.readout(m, dec[m.kind]) for m in net.modalities}


def _reconstruct(net, masked_index, image_index, params, inputs):
  """Reconstruction-only baseline: code of the masked image -> backbone (t = 0) -> the image's code head."""
  code = net.apply({"params": params}, masked_index, inputs["masked_image"], inputs["mask"], method="encode_one")
  t = jnp.zeros((code.shape[0],), jnp.float32)
  pred = net.apply({"params": params}, code, t, method="predict")
  return net.apply({"params": params}, image_index, pred[image_index], method="decode_one")


@functools.lru_cache(maxsize=None)
def _functions(net, time_scale: float):
  """The jitted / sampler-facing functions of one network, shared by every experiment with an equal network
  (Flax modules compare by value): a second run in the same process (`--mode sample` after training, tests)
  reuses the compiled sampler instead of tracing it again."""
  out = {"predict": functools.partial(_predict, net, time_scale),
         "encode": jax.jit(functools.partial(_encode, net)),
         "decode": jax.jit(functools.partial(_decode, net))}
  kinds = [m.kind for m in net.modalities]
  if "masked_image" in kinds and "image" in kinds:
    out["reconstruct"] = jax.jit(functools.partial(_reconstruct, net, kinds.index("masked_image"),
                                                   kinds.index("image")))
  return out


def _clip_embed(vision, size, params, images):
  """Images [-1, 1] -> L2-normalised CLIP image embeddings (bicubic resize to the CLIP's input size, CLIP's
  pixel statistics), traceable."""
  from diffusion_jax.data.clip_cache import CLIP_MEAN, CLIP_STD
  x = (jnp.asarray(images, jnp.float32) + 1.0) / 2.0
  if x.shape[1] != size:
    x = jnp.clip(jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic"), 0.0, 1.0)
  x = (x - CLIP_MEAN) / CLIP_STD
  e = vision.apply({"params": params}, x)["image_embeds"].astype(jnp.float32)
  return e / (jnp.linalg.norm(e, axis=-1, keepdims=True) + 1e-8)


def build_backbone(config):
  """The shared denoiser from `config.model`: any registered network (`build_model`); for the SD UNet
  (`name="sd_unet"`) the diffusers-style block config is `config.model.unet` (in_channels = the code channels,
  out_channels = the feature channels F the code heads read)."""
  mc = config.model
  if mc.get("name", "") == "sd_unet":
    from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig
    extra = sorted(set(mc.keys()) - {"name", "unet"})
    if extra:
      raise ValueError(f"config.model for the SD UNet backbone takes `unet` (a diffusers UNet config dict) only; "
                       f"got also {extra}.")
    spec = mc.get("unet")
    if not spec:
      raise ValueError("config.model.name='sd_unet' needs config.model.unet (diffusers-style block config).")
    return UNet2DConditionModel(UNetConfig.from_diffusers(spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)),
                                dtype=config.get("dtype", "float32"), remat=config.get("remat", "none"))
  return build_model(mc, dtype=config.get("dtype", "float32"), remat=config.get("remat", "none"))


def segment_colours(seg) -> np.ndarray:
  """int [B, H, W] segment ids -> float [B, H, W, 3] colours in [0, 1] (for sample sheets)."""
  seg = np.asarray(seg, np.int64)
  return SEGMENT_COLOURS[np.clip(seg, 0, len(SEGMENT_COLOURS) - 1)]


def segmentation_iou(pred, target) -> float:
  """Mean over images of the mean IoU over the classes (> 0) present in either map (1 for two empty maps): the
  parser's `segmentation_ious` (the segmentation branch of `map_consistency`), on two maps."""
  from diffusion_jax.eval.shapes_parser import segmentation_ious
  return float(np.mean(segmentation_ious(pred, target)))


# ---------------------------------------------------------------------------------------- experiment


@EXPERIMENTS.register("mt_diffusion")
class MTDiffusionExperiment(Experiment):
  """See the module docstring."""

  def __init__(self, config: ml_collections.ConfigDict, stages=None):
    super().__init__(config, stages)
    c = config
    mc = c.get("mt")
    if mc is None:
      raise ValueError("experiment 'mt_diffusion' needs config.mt (modalities, weights, ...); see "
                       "configs/mt_diffusion_shapes.py.")
    unknown = sorted(set(mc.keys()) - set(MT_KEYS))
    if unknown:
      raise ValueError(f"config.mt has unknown keys {unknown}. Valid keys: {', '.join(MT_KEYS)}.")
    self.kinds: Tuple[str, ...] = tuple(mc.modalities)
    if not self.kinds:
      raise ValueError("config.mt.modalities is empty; name one or more of " + ", ".join(M.KINDS) + ".")
    for k in self.kinds:
      check_choice("modality (config.mt.modalities)", k, M.KINDS)
    if len(set(self.kinds)) != len(self.kinds):
      raise ValueError(f"config.mt.modalities {self.kinds} names a modality twice.")
    self.mode = check_choice("MT-Diffusion mode (config.mt.mode)", _get(mc, "mode", "joint"), MODES)
    if self.mode == "reconstruction" and not {"image", "masked_image"} <= set(self.kinds):
      raise ValueError("config.mt.mode='reconstruction' (the inpainting baseline) needs the modalities 'image' "
                       f"and 'masked_image'; got {self.kinds}.")
    from diffusion_jax.data import IMAGE_SOURCES
    self.data_name = check_choice("dataset (config.data.name)", c.data.name, IMAGE_SOURCES.names())
    if self.data_name != "shapes" and set(self.kinds) - {"image", "label", "embedding"}:
      raise ValueError(f"modalities {sorted(set(self.kinds) - {'image', 'label', 'embedding'})} come from the "
                       f"shapes world (config.data.name='shapes'); data set {self.data_name!r} has images and "
                       "labels only.")
    self.image_size = int(_get(c.data, "image_size", 16))
    C = int(_get(mc, "code_channels", 4))
    self.code_shape = (self.image_size, self.image_size, C)
    from diffusion_jax.data import shapes as S
    enc = mc.get("encoders") or ml_collections.ConfigDict()
    specs = []
    for k in self.kinds:
      opts = dict(enc.get(k) or {})
      if k == "label":
        opts.setdefault("num_classes", int(_get(mc, "num_classes", S.NUM_CLASSES)))
      elif k == "segmentation":
        opts.setdefault("num_classes", len(S.SHAPES) + 1)
      elif k == "embedding":
        opts.setdefault("embed_dim", int(_get(mc, "embed_dim", 0)))
      try:
        specs.append(M.ModalitySpec(kind=k, **opts))
      except TypeError as e:
        raise ValueError(f"config.mt.encoders.{k}: {e}. Valid keys: num_classes, embed_dim, encoder, loss, "
                         "hidden, grid.") from None
    self.specs = tuple(specs)
    self.index = {k: i for i, k in enumerate(self.kinds)}
    N = len(self.kinds)

    d = c.get("diffusion") or ml_collections.ConfigDict()
    T = int(_get(d, "num_train_timesteps", 100))
    self.schedule = make_schedule(_get(d, "beta_schedule", "squaredcos_cap_v2"), T,
                                  float(_get(d, "beta_start", 1e-4)), float(_get(d, "beta_end", 0.02)))
    self.time_scale = float(_get(d, "time_scale", 1000.0 / T))
    self.weighting = check_choice("weighting (config.diffusion.weighting)", _get(d, "weighting", "min_snr"),
                                  WEIGHTINGS)
    self.snr_gamma = float(_get(d, "snr_gamma", 5.0))
    self.variance_type = check_choice("variance type (config.diffusion.variance_type)",
                                      _get(d, "variance_type", "fixed_small"), mt.VARIANCE_TYPES)
    w0 = list(_get(mc, "weights", [1.0 / N] * N))
    w1 = list(_get(mc, "weights_end", []) or [])
    if len(w0) != N or (w1 and len(w1) != N):
      raise ValueError(f"config.mt.weights (and weights_end) need one weight per modality ({N}: {self.kinds}); "
                       f"got {w0} and {w1 or '(none)'}.")
    self.weights = mt.linear_weights(w0, w1, T) if w1 else mt.constant_weights(w0, T)
    self.sampler, self.num_steps, self.eta, self.timestep_spacing = self._sampler_config(c.get("sample"))
    rw = list(_get(mc, "rec_weights", [1.0] * N))
    if len(rw) != N:
      raise ValueError(f"config.mt.rec_weights needs one weight per modality ({N}: {self.kinds}), got {rw}.")
    self.rec_weights = [float(v) for v in rw]
    self.code_weight = float(_get(mc, "code_weight", 1.0))
    tab = mt.tables(self.schedule)
    snr = tab["abar"][1:] / (1.0 - tab["abar"][1:])
    # min-SNR factor per paper time t = 1..T (index 0 unused), and min(SNR_t, gamma) for the code term.
    self._msnr = np.concatenate([[1.0], np.minimum(snr, self.snr_gamma) / snr]).astype(np.float32)
    self._code_w = np.concatenate([[0.0], np.minimum(snr, self.snr_gamma)]).astype(np.float32)

    if "embedding" in self.kinds:
      self._check_clip_dim()
    backbone = build_backbone(c)
    self.net = M.MTDiffusionNet(self.specs, backbone, self.code_shape, float(_get(mc, "code_scale", 1.0)))
    fns = _functions(self.net, self.time_scale)
    self._predict_fn, self._encode_jit, self._decode_jit = fns["predict"], fns["encode"], fns["decode"]
    if self.mode == "reconstruction":
      self._recon_jit = fns["reconstruct"]
    self._clip = None
    ec = c.get("eval") or ml_collections.ConfigDict()
    self._shapes_fd = None
    if _get(ec, "shapes_fd_path", ""):  # loads (and checks) the net's weights at start-up
      from diffusion_jax.eval.shapes_fd import ShapesFD
      self._shapes_fd = ShapesFD(str(ec.shapes_fd_path))

  def _sampler_config(self, sc):
    """config.sample -> (sampler, num_steps, eta, timestep_spacing), checked at start-up."""
    from diffusion_jax.core.schedules import SPACINGS
    sc = sc if sc is not None else ml_collections.ConfigDict()
    unknown = sorted(set(sc.keys()) - set(SAMPLE_KEYS))
    if unknown:
      raise ValueError(f"config.sample has unknown keys {unknown} for experiment 'mt_diffusion'. Valid keys: "
                       f"{', '.join(SAMPLE_KEYS)}.")
    T = self.schedule.num_train_timesteps
    sampler = check_choice("MT-Diffusion sampler (config.sample.sampler)", _get(sc, "sampler", "ancestral"),
                           mt.MT_SAMPLERS)
    n = int(_get(sc, "num_steps", 0) or 0)
    if not 0 <= n <= T:
      raise ValueError(f"config.sample.num_steps={n}: the strided sampler takes 1..T = 1..{T} steps (0 = T).")
    if sampler == "ancestral" and n not in (0, T):
      raise ValueError(f"config.sample.num_steps={n} with sampler 'ancestral', which always runs all T = {T} "
                       "steps; set config.sample.sampler='ddim' for a strided sampler.")
    eta = float(_get(sc, "eta", 0.0))
    if not eta >= 0:
      raise ValueError(f"config.sample.eta={eta} must be >= 0 (0 = deterministic DDIM, 1 = ancestral noise).")
    spacing = check_choice("timestep spacing (config.sample.timestep_spacing)",
                           _get(sc, "timestep_spacing", "linspace"), SPACINGS)
    return sampler, (n or T), eta, spacing

  # ------------------------------------------------------------------ CLIP (embedding modality)
  def _check_clip_dim(self):
    spec = self.specs[self.index["embedding"]]
    if "clip" not in self.stages:
      return  # checked when the CLIP is loaded
    from diffusion_jax.pretrained import io
    cfg = io.read_json(os.path.join(self.stages["clip"], "config.json"))
    dim = int(cfg.get("projection_dim", 0))
    if dim and dim != spec.embed_dim:
      raise ValueError(f"config.mt.embed_dim={spec.embed_dim} but the CLIP of stage 'clip' "
                       f"({self.stages['clip']}) has projection_dim={dim}; set config.mt.embed_dim={dim}.")

  def _load_clip(self):
    if self._clip is None:
      from diffusion_jax.models.clip import CLIPVisionModel
      from diffusion_jax.pretrained import clip as clip_io
      _, params, cfg = clip_io.load_clip(self.stage("clip"), kind="clip")
      if int(cfg.projection_dim) != self.specs[self.index["embedding"]].embed_dim:
        raise ValueError(f"config.mt.embed_dim={self.specs[self.index['embedding']].embed_dim} but the CLIP has "
                         f"projection_dim={cfg.projection_dim}.")
      vision = CLIPVisionModel(cfg.vision, with_projection=True)
      vparams = {"vision_model": params["vision_model"], "visual_projection": params["visual_projection"]}
      fn = functools.partial(_clip_embed, vision, int(cfg.vision.image_size))
      self._clip = (vparams, fn, jax.jit(fn))
    return self._clip

  def load_frozen(self):
    return {"clip": self._load_clip()[0]} if "embedding" in self.kinds else {}

  def clip_embed(self, frozen, images):
    """Host helper: images [-1, 1] -> L2-normalised CLIP image embeddings (jitted once)."""
    return np.asarray(self._load_clip()[2](frozen["clip"], jnp.asarray(images, jnp.float32)))

  # ------------------------------------------------------------------ data
  def _source(self, split: str):
    from diffusion_jax.data import make_image_source
    return make_image_source(self.config.data, split, int(self.config.seed))

  def _transforms(self):
    from diffusion_jax.data.pipeline import ResizeCrop
    tr = [] if self.data_name == "shapes" else [ResizeCrop(self.image_size)]
    return tr + [_MTExample(self.kinds)]

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    from diffusion_jax.data.pipeline import make_pipeline
    dc = self.config.data
    return make_pipeline(self._source(split), self._transforms(), batch_size=int(dc.batch_size) // shard_count,
                         seed=seed, shuffle=split == "train", num_epochs=None if split == "train" else 1,
                         num_workers=int(_get(dc, "num_workers", 0)), prefetch=int(_get(dc, "prefetch", 2)),
                         shard_index=shard_index, shard_count=shard_count, drop_remainder=split == "train")

  def _inputs(self, frozen, batch):
    """Batch -> the encoders' inputs (kind -> array; the embedding from the frozen CLIP), traceable."""
    inp = {}
    for k in self.kinds:
      if k == "embedding":
        inp[k] = self._load_clip()[1](frozen["clip"], batch["image"])
      elif k == "masked_image":
        inp[k] = jnp.asarray(batch["masked_image"], jnp.float32)
        inp["mask"] = jnp.asarray(batch["mask"], jnp.float32)
      elif k in ("label", "segmentation"):
        inp[k] = jnp.asarray(batch[k], jnp.int32)
      else:
        inp[k] = jnp.asarray(batch[k], jnp.float32)
    return inp

  def test_batches(self, num: int, batch_size: int):
    """Host batches of the first `num` test examples, each of exactly `batch_size` rows (the last one padded
    by repeating its last example): yields (batch, number of real rows)."""
    import functools as ft
    src = self._source("test")
    num = min(int(num), len(src))
    tr = self._transforms()
    for start in range(0, num, batch_size):
      exs = [ft.reduce(lambda e, t: t.map(e), tr, src[i]) for i in range(start, min(num, start + batch_size))]
      k = len(exs)
      exs = exs + [exs[-1]] * (batch_size - k)
      yield {key: np.stack([e[key] for e in exs]) for key in exs[0]}, k

  # ------------------------------------------------------------------ model
  def init(self, rng, batch, frozen):
    b = 1
    sl = {k: v[:b] for k, v in batch.items() if hasattr(v, "dtype") and v.dtype.kind in "biuf"}
    inputs = self._inputs(frozen, sl)
    z = jnp.zeros((b,) + self.code_shape, jnp.float32)
    return self.net.init(rng, inputs, z, jnp.zeros((b,), jnp.float32))["params"]

  def predictor(self, params) -> Partial:
    """`predict_fn(z_t, k, cond) -> codes [N, B, H, W, C]` for `core.mt_diffusion` (a `Partial`: new params do not
    re-trace the sampler)."""
    return Partial(self._predict_fn, params)

  def loss(self, params, frozen, ema, batch, rng, step):
    inputs = self._inputs(frozen, batch)
    apply = lambda method, *a, **kw: self.net.apply({"params": params}, *a, method=method, **kw)
    if self.mode == "reconstruction":
      x = _reconstruct(self.net, self.index["masked_image"], self.index["image"], params, inputs)
      err = jnp.mean(jnp.square(x - inputs["image"]), axis=(1, 2, 3))
      m = inputs["mask"][..., None]
      masked = jnp.sum(jnp.square(x - inputs["image"]) * m, axis=(1, 2, 3)) / (3 * jnp.sum(m, axis=(1, 2, 3)) + 1e-8)
      return err.mean(), {"mse": err.mean(), "mse_masked": masked.mean()}
    codes = apply("encode", inputs)
    weighting = "kl" if self.weighting == "kl" else "simple"
    loss, terms = mt.elbo_terms(self.predictor(params), codes, rng, schedule=self.schedule, weights=self.weights,
                                weighting=weighting)
    if self.weighting == "min_snr":
      loss = loss * jnp.asarray(self._msnr)[terms["t"].astype(jnp.int32)]
    metrics = {"loss_diffusion": loss.mean(), "L_T": terms["L_T"].mean(),
               "code_rms": jnp.sqrt(jnp.mean(jnp.square(codes)))}
    # Per-modality code matching: the ELBO's terms see the codes only through their weighted sums m_t (with
    # constant weights, any split of m^_t among the modalities has the same loss), so the heads' individual
    # codes are not identified by them; this term (ours) makes each head predict its own modality's code.
    code_se = jnp.mean(jnp.square(codes - terms["codes_hat"]), axis=tuple(range(2, codes.ndim)))  # [N, B]
    for i, k in enumerate(self.kinds):
      metrics[f"code_mse_{k}"] = code_se[i].mean()
    if self.code_weight:
      loss = loss + self.code_weight * jnp.asarray(self._code_w)[terms["t"].astype(jnp.int32)] * code_se.sum(0)
    rec = apply("restoration", codes, inputs)
    total = loss
    for k, w in zip(self.kinds, self.rec_weights):
      if rec[k] is None:
        continue
      metrics[f"rec_{k}"] = rec[k].mean()
      if w:
        total = total + w * rec[k]
    return total.mean(), metrics

  # ------------------------------------------------------------------ sampling
  def generate(self, params, frozen, rng, batch=None, known: Sequence[str] = (), num: Optional[int] = None,
               return_codes: bool = False, num_steps: Optional[int] = None, eta: Optional[float] = None):
    """Samples every modality with the configured sampler (`config.sample`: ancestral `mt_sample`, T steps, or
    strided `mt_ddim_sample`), the modalities named in `known` held fixed at their codes from `batch`.
    `num_steps` / `eta` override the config for this call (either one selects the strided sampler). Returns
    kind -> values (host numpy): images in [-1, 1], labels / segment ids (int), masked_image ->
    {masked_image, mask}, embeddings (and the final codes `[N, B, H, W, C]` with `return_codes`)."""
    known = tuple(known)
    for k in known:
      check_choice("known modality", k, self.kinds)
    if self.mode == "reconstruction":
      raise ValueError("generate(): the reconstruction-only baseline has no sampler; use inpaint().")
    if batch is not None:
      num = len(next(v for v in batch.values() if np.ndim(v) >= 1))
    if num is None:
      raise ValueError("generate() needs a batch or num.")
    N = len(self.kinds)
    mask = np.array([k in known for k in self.kinds], bool)
    if known:
      if batch is None:
        raise ValueError(f"generate(known={known}) needs the batch holding those modalities.")
      known_codes = self._encode_jit(params, self._inputs(frozen, batch))
    else:
      known_codes = jnp.zeros((N, num) + self.code_shape, jnp.float32)
    k_z, k_s = jax.random.split(rng)
    z_T = jax.random.normal(k_z, (num,) + self.code_shape, jnp.float32)
    strided = self.sampler == "ddim" or num_steps is not None or eta is not None
    if strided:
      _, codes = mt.mt_ddim_sample(
          self.predictor(params), z_T, schedule=self.schedule, weights=self.weights,
          num_steps=int(self.num_steps if num_steps is None else num_steps),
          eta=float(self.eta if eta is None else eta), timestep_spacing=self.timestep_spacing, rng=k_s,
          known_codes=known_codes, known_mask=mask)
    else:
      _, codes = mt.mt_sample(self.predictor(params), z_T, schedule=self.schedule, weights=self.weights, rng=k_s,
                              known_codes=known_codes, known_mask=mask, variance_type=self.variance_type)
    out = jax.tree.map(np.asarray, self._decode_jit(params, codes))
    return (out, np.asarray(codes)) if return_codes else out

  def inpaint(self, params, frozen, rng, batch, **sampler) -> np.ndarray:
    """Images [-1, 1] filled in from the batch's masked image + mask: the joint model samples the image with the
    masked image held fixed; the reconstruction-only baseline predicts it in one pass."""
    if self.mode == "reconstruction":
      return np.clip(np.asarray(self._recon_jit(params, self._inputs(frozen, batch))), -1.0, 1.0)
    return self.generate(params, frozen, rng, batch, known=("masked_image",), **sampler)["image"]

  def sample(self, params, frozen, batch, rng):
    from diffusion_jax.data import shapes as S
    batch = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
    out: Dict[str, Any] = {}
    if self.mode == "reconstruction":
      out["inpainted"] = (self.inpaint(params, frozen, rng, batch) + 1.0) / 2.0
      return out
    joint = self.generate(params, frozen, jax.random.fold_in(rng, 0), batch)
    texts = None
    if "image" in joint:
      out["image"] = (joint["image"] + 1.0) / 2.0
    if "segmentation" in joint:
      out["segmentation"] = segment_colours(joint["segmentation"])
    if "label" in joint:
      out["label"] = joint["label"]
      if self.data_name == "shapes":
        texts = [f"gen: {S.label_name(int(v))}" for v in joint["label"]]
    if "image" in self.kinds:
      for j, k in enumerate(m for m in self.kinds if m != "image"):
        res = self.generate(params, frozen, jax.random.fold_in(rng, j + 1), batch, known=(k,))
        name = "inpainted" if k == "masked_image" else f"image_given_{k}"
        out[name] = (res["image"] + 1.0) / 2.0
        if k == "label" and texts is not None:
          texts = [f"{t} | given: {S.label_name(int(v))}" for t, v in zip(texts, batch["label"])]
    if texts is not None:
      out["caption"] = texts
    return out

  # ------------------------------------------------------------------ evaluation
  def _features(self, images) -> Tuple[np.ndarray, str]:
    if self._shapes_fd is not None:
      return self._shapes_fd.features(images), "shapes_fd"
    from diffusion_jax.experiments.generation import random_conv_features
    return random_conv_features(images), "random_conv"

  def _parse_cfg(self):
    from diffusion_jax.data import shapes as S
    return S.ShapesConfig.from_dict(dict(_get(self.config.data, "shapes", {}) or {}), image_size=self.image_size)

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, Any]:
    ec = self.config.get("eval") or ml_collections.ConfigDict()
    n = int(_get(ec, "num_samples", 256))
    bs = int(_get(ec, "batch_size", 64))
    batches = list(self.test_batches(n, bs))
    n = sum(k for _, k in batches)
    cat = lambda parts: jax.tree.map(lambda *a: np.concatenate(a), *parts)
    real = cat([{k: v[:m] for k, v in b.items()} for b, m in batches])
    out: Dict[str, Any] = {"num_samples": float(n)}
    shapes = self.data_name == "shapes"
    if "masked_image" in self.kinds:
      filled = np.concatenate([self.inpaint(params, frozen, jax.random.fold_in(rng, 100 + i), b)[:m]
                               for i, (b, m) in enumerate(batches)])
      msk = real["mask"].astype(np.float32)[..., None]
      se = np.square(filled - real["image"])
      out["inpaint_mse"] = float(np.mean(np.sum(se * msk, (1, 2, 3)) / (3 * np.sum(msk, (1, 2, 3)))))
      out["inpaint_mse_outside"] = float(np.mean(np.sum(se * (1 - msk), (1, 2, 3))
                                                 / (3 * np.maximum(np.sum(1 - msk, (1, 2, 3)), 1))))
      if shapes:
        from diffusion_jax.eval import shapes_parser as P
        out["inpaint_class_accuracy"] = P.class_accuracy(filled, real["label"], self._parse_cfg(), "-1,1")
      if self.mode == "reconstruction":
        return out
    parts = [self.generate(params, frozen, jax.random.fold_in(rng, i), b) for i, (b, _) in enumerate(batches)]
    joint = cat([jax.tree.map(lambda a, m=m: a[:m], p) for p, (_, m) in zip(parts, batches)])

    def given(kind, seed):
      ps = [self.generate(params, frozen, jax.random.fold_in(rng, seed + i), b, known=(kind,))
            for i, (b, _) in enumerate(batches)]
      return cat([jax.tree.map(lambda a, m=m: a[:m], p) for p, (_, m) in zip(ps, batches)])

    if "image" in self.kinds:
      from diffusion_jax.eval.fid import precision_recall
      fake, name = self._features(joint["image"])
      ref, _ = self._features(real["image"])
      out.update(precision_recall(ref, fake, k=int(_get(ec, "pr_k", 3))))
      if name == "shapes_fd":  # the shapes FD of the joint samples against the same test images (same features)
        from diffusion_jax.experiments.generation import feature_statistics, frechet_distance
        out["shapes_fd"] = float(frechet_distance(*feature_statistics(fake), *feature_statistics(ref)))
        out["shapes_fd_net_sha256"] = self._shapes_fd.sha256
      out["pr_features"] = name if name == "shapes_fd" else (
          "random_conv (no ShapesNet weights given: set config.eval.shapes_fd_path for shapes-FD features)")
    img = "image" in self.kinds
    cond = bool(_get(ec, "conditional", True))  # False: joint metrics only (no one-modality-given sampling)
    if shapes and img:
      from diffusion_jax.eval import shapes_parser as P
      cfg = self._parse_cfg()
      if "label" in self.kinds:
        parsed = P.parse_batch(joint["image"], cfg=cfg, value_range="-1,1")
        out["label_image_agreement"] = P.class_accuracy_parsed(parsed, joint["label"])
      if "label" in self.kinds and cond:
        g = given("label", 1000)
        out["label_to_image_accuracy"] = P.class_accuracy(g["image"], real["label"], cfg, "-1,1")
        g = given("image", 2000)
        out["image_to_label_accuracy"] = float(np.mean(g["label"] == real["label"]))
      if "segmentation" in self.kinds:
        out["seg_image_iou"] = P.map_consistency(joint["image"], joint["segmentation"], "segmentation", cfg, "-1,1")
      if "segmentation" in self.kinds and cond:
        g = given("segmentation", 3000)
        out["seg_to_image_iou"] = P.map_consistency(g["image"], real["segmentation"], "segmentation", cfg, "-1,1")
        g = given("image", 4000)
        out["image_to_seg_iou"] = segmentation_iou(g["segmentation"], real["segmentation"])
    elif "label" in self.kinds and img and cond:
      g = given("image", 2000)
      out["image_to_label_accuracy"] = float(np.mean(g["label"] == real["label"]))
    if "embedding" in self.kinds and img:
      from diffusion_jax.models.mt_diffusion import cosine
      e_img = self.clip_embed(frozen, joint["image"])
      out["emb_image_cosine"] = float(np.mean(np.asarray(cosine(joint["embedding"], e_img))))
      out["emb_image_cosine_shuffled"] = float(np.mean(np.asarray(cosine(joint["embedding"],
                                                                         np.roll(e_img, 1, axis=0)))))
    if "embedding" in self.kinds and img and cond:
      g = given("embedding", 5000)
      e_true = self.clip_embed(frozen, real["image"])
      out["emb_to_image_cosine"] = float(np.mean(np.asarray(cosine(self.clip_embed(frozen, g["image"]), e_true))))
    return out


class _MTExample:
  """A shapes-world (or image data set) example -> the keys MT-Diffusion reads: image float [-1, 1], label
  int32, segmentation int32 [H, W], masked_image float [-1, 1], mask float32 [H, W] (picklable)."""

  def __init__(self, kinds: Sequence[str]):
    self.kinds = tuple(kinds)

  def map(self, ex):
    out = {"image": np.asarray(ex["image"], np.float32) / 127.5 - 1.0 if np.asarray(ex["image"]).dtype == np.uint8
           else np.asarray(ex["image"], np.float32)}
    if "label" in ex:
      out["label"] = np.int32(ex["label"])
    elif "label" in self.kinds:
      raise KeyError("modality 'label' needs a 'label' in every example; this data set has none.")
    if "segmentation" in ex:
      out["segmentation"] = np.asarray(ex["segmentation"], np.int32)
    if "masked_image" in ex:
      out["masked_image"] = np.asarray(ex["masked_image"], np.float32) / 127.5 - 1.0
      out["mask"] = np.asarray(ex["mask"], np.float32)
    return out

  __call__ = map
