"""Class-conditional / unconditional image generation (DiffiT, DiT or any registered denoiser).

Registered as experiment "generation". Two regimes, picked by `config.diffusion.objective`:

* "edm" (DiffiT image space, App. I.1: "strictly followed EDM"): the network F is preconditioned,
  D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, y), c_noise = ln(sigma) / 4, sigma_data = 0.5; training
  ln sigma ~ N(-1.2, 1.2^2) with EDM's lambda(sigma) weighting (`core.losses.edm_loss`); sampling with EDM's
  deterministic Heun sampler (`core.samplers.edm_sample`, 18 steps CIFAR-10, 40 FFHQ-64).
* "adm" (DiffiT latent space, App. I.2: "same diffusion hyper-parameters as ADM"): 1000-step linear-beta DDPM,
  eps prediction with learned variance trained by ADM's hybrid loss L_simple + L_vlb (`core.losses.hybrid_loss`;
  plain eps-MSE when the model has no variance output), DDPM ancestral sampling with learned-range variance
  (250 respaced steps for ImageNet).

Latent mode (`config.latent.vae`): "none" (pixels), "sd" (the Stable Diffusion AutoencoderKL from
`config.latent.vae_path`, a diffusers directory; latents = z * scale_factor, 0.18215), or "space_to_depth" (an
exact, parameter-free f x f pixel-unshuffle "VAE" for tests / tiny configs). The VAE's weights are frozen
weights (`load_frozen`): read on the host, placed on the mesh, arguments of the jitted step, never constants
of it. `config.latent.cache=True` encodes the training set once (jitted encoder, one compilation; posterior
moments kept in memory and saved to `config.latent.cache_dir` when set) and samples z ~ N(mean, std^2) per
step. `config.init_from` (released latent DiffiT weights) is read on the host and placed as the initial
params (`load_params`), not loaded inside the jitted init.

Conditioning: `config.model.num_classes` > 0 makes the run class-conditional; labels are dropped to the null
class (index num_classes) with probability `config.cond.label_dropout` (0.1, DiT/DiffiT) so that
classifier-free guidance works. Guidance (`config.sample`): `guidance_scale` (1 = off), `guidance_schedule`
"constant" (IN-512: 1.49) or "power_cosine" (IN-256: 4.4 in the released script / 4.6 in the paper, p = 4),
`guidance_channels` (3 for the latent model: only eps channels 0-2 are guided).

Batches: {"image": float32 [B, H, W, 3] in [-1, 1], "label": int32 [B]} (or {"moments", "label"} with cached
latents). `evaluate()`: shapes-parser class accuracy (and colour / shape accuracy of the main object) of class-conditional
samples on the shapes world, and a
Frechet distance between feature statistics of samples and real images when `config.eval.fid_feature` names a
feature function (`FEATURES`; "random_conv" is a fixed random conv net: only a *relative* number, not FID).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.core import losses as losses_lib
from diffusion_jax.core import samplers as samplers_lib
from diffusion_jax.core.schedules import make_schedule
from diffusion_jax.eval.fid import frechet_distance  # noqa: F401  (re-exported: generation.frechet_distance)
from diffusion_jax.experiments.base import EXPERIMENTS, EXPORT_KINDS, Experiment, require_files
from diffusion_jax.models import build_model
from diffusion_jax.registry import Registry, check_choice

OBJECTIVES = ("edm", "adm")
# The sampler each objective runs (config.sample.sampler names it; anything else is an error at start-up).
SAMPLERS = {"edm": ("edm_heun",), "adm": ("ddpm",)}
SAMPLE_KEYS = {"edm": ("sampler", "num_steps", "guidance_scale", "guidance_schedule", "guidance_power",
                       "guidance_channels", "sigma_min", "sigma_max", "rho", "S_churn"),
               "adm": ("sampler", "num_steps", "guidance_scale", "guidance_schedule", "guidance_power",
                       "guidance_channels", "timestep_spacing", "clip_sample")}
VAES = ("none", "sd", "space_to_depth")
FEATURES = Registry("feature function")


# --------------------------------------------------------------------------------------------- helpers


def _get(cfg, key, default):
  return cfg[key] if (cfg is not None and key in cfg) else default


def space_to_depth(x, f: int):
  b, h, w, c = x.shape
  return x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // f, w // f, f * f * c)


def depth_to_space(z, f: int):
  b, h, w, cc = z.shape
  c = cc // (f * f)
  return z.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * f, w * f, c)


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


@FEATURES.register("random_conv")
def random_conv_features(images, seed: int = 0, width: int = 64):
  """A fixed random 3-layer conv net (stride 2, ReLU) + global average pool: [B, H, W, 3] in [-1, 1] -> [B, 2w].

  Only useful for *relative* comparisons between models on the same data (e.g. the shapes ablation); it is not
  Inception-FID. Pass your own feature function (`GenerationExperiment(config, feature_fn=...)`) for real FID.
  """
  return np.asarray(_random_conv(jnp.asarray(images, jnp.float32), seed, width))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_conv(x, seed, width):
  keys = jax.random.split(jax.random.key(seed), 3)
  h = x
  feats = []
  for i, k in enumerate(keys):
    cin = h.shape[-1]
    w = jax.random.normal(k, (3, 3, cin, width), jnp.float32) / np.sqrt(9 * cin)
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, w, (2, 2), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
    if i >= 1:
      feats.append(h.mean((1, 2)))
  return jnp.concatenate(feats, -1)


# ------------------------------------------------------------------------------- module-level callables
# (module-level so that samplers / jit see the same function object every call: no re-tracing)


def _apply_model(model, time_scale, variables, x, t, y):
  return model.apply(variables, x, t * time_scale, y)


def _vae_decode(vae, params, z):
  return vae.apply({"params": params}, z, method="decode")


def _vae_encode(vae, params, x):
  return vae.apply({"params": params}, x, method="encode")


@functools.partial(jax.jit, static_argnums=(1,))
def _s2d_encode(images, f):
  z = space_to_depth(images, f)
  return jnp.concatenate([z, jnp.full_like(z, -30.0)], -1)


# ---------------------------------------------------------------------------------------- experiment


@EXPORT_KINDS.register("generation_model")
def check_generation_export(path: str) -> None:
  require_files(path, ["config.json", "model.safetensors"], "an exported generation run (DiffiT / DiT)")


@EXPERIMENTS.register("generation")
class GenerationExperiment(Experiment):
  """See the module docstring. `feature_fn(images [B, H, W, 3] in [-1, 1]) -> [B, F]` overrides
  `config.eval.fid_feature` (e.g. an Inception network) for the Frechet distance in `evaluate()`.

  `export` (end of training, DIR/export; `config.eval.export=False` skips it): the sampling params
  (`config.train.sample_with`) as a safetensors directory, read back by `pretrained.diffit.load_trained`."""
  export_kind = "generation_model"

  def __init__(self, config: ml_collections.ConfigDict, stages=None, feature_fn: Optional[Callable] = None):
    super().__init__(config, stages)
    c = config
    self.objective = check_choice("diffusion objective (config.diffusion.objective)",
                                  _get(c.get("diffusion"), "objective", "edm"), OBJECTIVES)
    lat = c.get("latent") or ml_collections.ConfigDict()
    self.vae_kind = check_choice("VAE (config.latent.vae)", _get(lat, "vae", "none"), VAES)
    from diffusion_jax.data import IMAGE_SOURCES
    self.data_name = check_choice("dataset (config.data.name)", c.data.name, IMAGE_SOURCES.names())
    self.image_size = int(_get(c.data, "image_size", 32))
    self.num_classes = int(_get(c.model, "num_classes", 0))
    self.label_dropout = float(_get(c.get("cond"), "label_dropout", 0.1 if self.num_classes else 0.0))
    self.model = build_model(c.model, dtype=c.get("dtype", "float32"), remat=c.get("remat", "none"))
    d = c.get("diffusion") or ml_collections.ConfigDict()
    self.sigma_data = float(_get(d, "sigma_data", 0.5))
    self.time_scale = float(_get(d, "time_scale", 1.0))
    self.schedule = make_schedule(_get(d, "beta_schedule", "linear"), int(_get(d, "num_train_timesteps", 1000)),
                                  float(_get(d, "beta_start", 1e-4)), float(_get(d, "beta_end", 0.02)))
    self.scale_factor = float(_get(lat, "scale_factor", 0.18215 if self.vae_kind == "sd" else 1.0))
    self.s2d = int(_get(lat, "factor", 2))
    self.cache_latents = bool(_get(lat, "cache", False))
    self._vae = None
    self.feature_fn = feature_fn
    self._apply_fn = functools.partial(_apply_model, self.model, self.time_scale)
    self._check_sample_config(c.get("sample") or {})
    ec = c.get("eval") or ml_collections.ConfigDict()
    self._fid = None  # Inception FID (eval/fid.py): weights file, resize and sample count checked here
    if _get(ec, "inception_path", "") or _get(ec, "fid_feature", "") == "inception":
      from diffusion_jax.eval import fid as fid_lib
      self._fid = fid_lib.FIDEvaluator(ec, int(_get(ec, "num_samples", 256)))
    self._shapes_fd = None
    if _get(ec, "fid_feature", "") == "shapes_fd":  # loads (and checks) the net's weights file at start-up
      from diffusion_jax.eval.shapes_fd import ShapesFD
      self._shapes_fd = ShapesFD(str(_get(ec, "shapes_fd_path", "")))
    if self.vae_kind == "sd" and not _get(lat, "vae_path", ""):
      raise ValueError("config.latent.vae='sd' needs config.latent.vae_path: a diffusers AutoencoderKL directory "
                       "(e.g. a local copy of stabilityai/sd-vae-ft-ema).")

  def _check_sample_config(self, sc) -> None:
    """Every key of config.sample is read by this objective's sampler and every name is valid — checked
    here, at start-up, not after training."""
    from diffusion_jax.core.guidance import GUIDANCE_SCHEDULES
    from diffusion_jax.core.schedules import SPACINGS
    valid = SAMPLE_KEYS[self.objective]
    unknown = sorted(set(sc.keys()) - set(valid))
    if unknown:
      raise ValueError(f"config.sample has keys {unknown} that the {self.objective!r} objective's sampler does not "
                       f"read. Valid keys: {', '.join(valid)}.")
    check_choice(f"sampler for objective {self.objective!r} (config.sample.sampler)",
                 sc.get("sampler", SAMPLERS[self.objective][0]), SAMPLERS[self.objective])
    check_choice("guidance schedule (config.sample.guidance_schedule)", sc.get("guidance_schedule", "constant"),
                 GUIDANCE_SCHEDULES)
    if self.objective == "adm":
      check_choice("timestep spacing (config.sample.timestep_spacing)", sc.get("timestep_spacing", "linspace"),
                   SPACINGS)

  # ------------------------------------------------------------------ latent space
  @property
  def learn_sigma(self) -> bool:
    return bool(getattr(self.model, "learn_sigma", False))

  def _load_vae(self):
    """(module, host params, jitted encode, jitted decode) of the SD VAE, read once."""
    if self._vae is None:
      from diffusion_jax.models.vae import AutoencoderKL
      from diffusion_jax.pretrained.diffusers_io import load_vae
      cfg, params = load_vae(self.config.latent.vae_path)
      vae = AutoencoderKL(cfg)
      self._vae = (vae, params, jax.jit(functools.partial(_vae_encode, vae)),
                   jax.jit(functools.partial(_vae_decode, vae)))
    return self._vae

  def load_frozen(self):
    return {"vae": self._load_vae()[1]} if self.vae_kind == "sd" else {}

  def latent_shape(self) -> Tuple[int, int, int]:
    s = self.image_size
    if self.vae_kind == "none":
      return (s, s, 3)
    if self.vae_kind == "space_to_depth":
      return (s // self.s2d, s // self.s2d, 3 * self.s2d ** 2)
    vae = self._load_vae()[0]
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return (s // f, s // f, vae.config.latent_channels)

  def encode_moments(self, frozen, images):
    """Images [-1, 1] -> posterior moments [mean, logvar] (last axis), unscaled (traceable)."""
    if self.vae_kind == "space_to_depth":
      z = space_to_depth(images, self.s2d)
      return jnp.concatenate([z, jnp.full_like(z, -30.0)], -1)
    return _vae_encode(self._load_vae()[0], frozen["vae"], images)

  def to_latent(self, frozen, batch, rng):
    if self.vae_kind == "none":
      return batch["image"]
    moments = batch["moments"] if "moments" in batch else self.encode_moments(frozen, batch["image"])
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    z = mean + jnp.exp(0.5 * jnp.clip(logvar, -30, 20)) * jax.random.normal(rng, mean.shape)
    return z * self.scale_factor

  def decode(self, frozen, z):
    """Latents -> pixels; the SD VAE decoder is jitted once per experiment (and per latent shape)."""
    if self.vae_kind == "none":
      return z
    z = z / self.scale_factor
    if self.vae_kind == "space_to_depth":
      return depth_to_space(z, self.s2d)
    return self._load_vae()[3](frozen["vae"], z)

  # ------------------------------------------------------------------ data
  def _source(self, split: str, seed: int):
    """The image source of `config.data` ("shapes" | "tfds" | "folder", `data.make_image_source`)."""
    from diffusion_jax.data import make_image_source
    return make_image_source(self.config.data, split, seed)

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    from diffusion_jax.data.pipeline import ResizeCrop, SelectKeys, ToFloatImage, make_pipeline
    dc = self.config.data
    source = self._source(split, int(self.config.seed))
    transforms = [ResizeCrop(self.image_size), ToFloatImage("image"), _EnsureLabel(self.num_classes),
                  SelectKeys(("image", "label"))]
    if self.vae_kind != "none" and self.cache_latents:
      source = self._cached_source(source, transforms, split)
      transforms = []
    return make_pipeline(source, transforms, batch_size=int(dc.batch_size) // shard_count, seed=seed,
                         shuffle=split == "train", num_epochs=None if split == "train" else 1,
                         num_workers=int(_get(dc, "num_workers", 0)), prefetch=int(_get(dc, "prefetch", 2)),
                         shard_index=shard_index, shard_count=shard_count, drop_remainder=split == "train")

  def _cached_source(self, source, transforms, split):
    lat = self.config.latent
    cache_dir = _get(lat, "cache_dir", "")
    path = os.path.join(cache_dir, f"latents_{split}.npz") if cache_dir else ""
    if path and os.path.exists(path):
      data = dict(np.load(path))
      if len(data["label"]) != len(source):
        raise ValueError(f"Latent cache {path} holds {len(data['label'])} examples but the data set has "
                         f"{len(source)}; delete the cache or point config.latent.cache_dir elsewhere.")
      return _ArraySource(data)
    bs = int(_get(lat, "encode_batch_size", 64))
    if self.vae_kind == "sd":
      _, vae_params, encode, _ = self._load_vae()
    else:
      vae_params, encode = None, _s2d_encode
    moments, labels = [], []
    for start in range(0, len(source), bs):
      exs = [functools.reduce(lambda e, t: t.map(e), transforms, source[i])
             for i in range(start, min(start + bs, len(source)))]
      imgs = np.stack([e["image"] for e in exs])
      n = len(imgs)
      if n < bs:  # pad the last batch: one compiled encoder for every batch
        imgs = np.concatenate([imgs, np.repeat(imgs[-1:], bs - n, 0)])
      m = encode(vae_params, imgs) if vae_params is not None else encode(imgs, self.s2d)
      moments.append(np.asarray(m, np.float32)[:n])
      labels.append(np.asarray([e["label"] for e in exs], np.int32))
    data = {"moments": np.concatenate(moments), "label": np.concatenate(labels)}
    if path:
      os.makedirs(cache_dir, exist_ok=True)
      np.savez(path, **data)
    return _ArraySource(data)

  # ------------------------------------------------------------------ model
  def init(self, rng, batch, frozen):
    shape = self.latent_shape()
    b = 1
    x = jnp.zeros((b,) + shape, jnp.float32)
    t = jnp.zeros((b,), jnp.float32)
    y = jnp.zeros((b,), jnp.int32) if self.num_classes else None
    return self.model.init(rng, x, t, y)["params"]

  def pretrained_source(self):
    return self.config.get("init_from", "") or None

  def load_params(self, like):
    """`config.init_from`: released latent DiffiT weights (NVlabs safetensors layout), read on the host and
    checked against `like` (the abstract params); None without init_from."""
    path = self.config.get("init_from", "")
    if not path:
      return None
    from diffusion_jax.pretrained import diffit as pretrained_diffit
    from diffusion_jax.pretrained import io
    # the released layout is per block; a `model.scan_blocks=True` run gets the blocks stacked
    _, params = pretrained_diffit.load_diffit(path, scan_blocks=bool(getattr(self.model, "scan_blocks", False)))
    got, want = io.flatten(params), io.flatten(like)
    io.check_names(want, got, f"checkpoint {path} (config.init_from)")
    for k in want:
      io.check_shape(k, np.shape(got[k]), want[k].shape)
    return jax.tree.map(lambda a, b: np.asarray(a, b.dtype), params, like)

  def denoiser(self, params) -> Partial:
    """`fn(x, t, y)` for the core samplers / losses (a `Partial`, so new params do not re-trace)."""
    return Partial(self._apply_fn, {"params": params})

  def _labels(self, batch, rng):
    if not self.num_classes:
      return None
    y = batch["label"].astype(jnp.int32)
    if self.label_dropout > 0:
      drop = jax.random.uniform(rng, y.shape) < self.label_dropout
      y = jnp.where(drop, self.num_classes, y)
    return y

  def loss(self, params, frozen, ema, batch, rng, step):
    k_lat, k_lab, k_loss = jax.random.split(rng, 3)
    x0 = self.to_latent(frozen, batch, k_lat)
    y = self._labels(batch, k_lab)
    fn = self.denoiser(params)
    if self.objective == "edm":
      d = self.config.get("diffusion") or {}
      loss, terms = losses_lib.edm_loss(fn, x0, k_loss, cond=y, sigma_data=self.sigma_data,
                                        p_mean=float(_get(d, "p_mean", -1.2)), p_std=float(_get(d, "p_std", 1.2)))
      metrics = {"mse": terms["mse"].mean()}
    elif self.learn_sigma:
      loss, terms = losses_lib.hybrid_loss(fn, x0, k_loss, schedule=self.schedule, cond=y,
                                           lambda_vlb=float(_get(self.config.get("diffusion"), "lambda_vlb", 1.0)))
      metrics = {"mse": terms["mse"].mean(), "vlb": terms["vlb"].mean()}
    else:
      loss, terms = losses_lib.diffusion_loss(fn, x0, k_loss, schedule=self.schedule, cond=y)
      metrics = {"mse": terms["mse"].mean()}
    return loss.mean(), metrics

  # ------------------------------------------------------------------ sampling
  def sample_latents(self, params, rng, labels=None, num: Optional[int] = None, **overrides):
    """Runs the configured sampler; returns latents [num, h, w, c] (pixels in [-1, 1] without a VAE)."""
    sc = dict(self.config.get("sample") or {})
    sc.update(overrides)
    if labels is None and self.num_classes:
      labels = jnp.arange(num) % self.num_classes
    num = int(num if num is not None else len(labels))
    k_noise, k_samp = jax.random.split(rng)
    x_T = jax.random.normal(k_noise, (num,) + self.latent_shape(), jnp.float32)
    cond = None if labels is None else jnp.asarray(labels, jnp.int32)
    gscale = float(sc.get("guidance_scale", 1.0))
    uncond = None
    if cond is not None and gscale != 1.0:
      uncond = jnp.full_like(cond, self.num_classes)
    kw = dict(cond=cond, uncond=uncond, guidance_scale=gscale if uncond is not None else None,
              guidance_schedule=sc.get("guidance_schedule", "constant"),
              guidance_power=float(sc.get("guidance_power", 4.0)),
              guidance_channels=sc.get("guidance_channels", None), rng=k_samp)
    fn = self.denoiser(params)
    if self.objective == "edm":
      return samplers_lib.edm_sample(fn, x_T, num_steps=int(sc.get("num_steps", 18)), prediction_type="edm",
                                     sigma_data=self.sigma_data, sigma_min=float(sc.get("sigma_min", 0.002)),
                                     sigma_max=float(sc.get("sigma_max", 80.0)), rho=float(sc.get("rho", 7.0)),
                                     S_churn=float(sc.get("S_churn", 0.0)), **kw)
    return samplers_lib.ddpm_sample(fn, x_T, num_steps=int(sc.get("num_steps", 250)), schedule=self.schedule,
                                    prediction_type="epsilon",
                                    variance_type="learned_range" if self.learn_sigma else "fixed_small",
                                    timestep_spacing=sc.get("timestep_spacing", "linspace"),
                                    clip_sample=sc.get("clip_sample", None), **kw)

  def generate(self, params, frozen, rng, labels=None, num=None, **overrides):
    """Images [num, H, W, 3] in [-1, 1] (decoded through the VAE in latent mode)."""
    z = self.sample_latents(params, rng, labels, num, **overrides)
    return jnp.clip(self.decode(frozen, z), -1.0, 1.0)

  def sample(self, params, frozen, batch, rng):
    """Class-conditional: one image per label of `batch`; unconditional: one per example of `batch`."""
    num = len(batch["label"])
    labels = np.asarray(batch["label"], np.int32) if self.num_classes else None
    imgs = self.generate(params, frozen, rng, labels, num=num)
    out = {"image": np.asarray((imgs + 1.0) / 2.0)}
    if labels is not None:
      out["label"] = labels
    return out

  # ------------------------------------------------------------------ export
  def export(self, params, frozen, directory: str) -> None:
    if not bool(_get(self.config.get("eval"), "export", True)):
      return
    from diffusion_jax.pretrained import diffit as pretrained_diffit
    c = self.config
    extra = {"experiment": "generation", "objective": self.objective, "image_size": self.image_size,
             "latent_shape": list(self.latent_shape()), "num_classes": self.num_classes,
             "diffusion": c.get("diffusion") or {}, "latent": c.get("latent") or {},
             "sample": c.get("sample") or {}}
    pretrained_diffit.save_trained(directory, params, c.model, extra, model=self.model)

  # ------------------------------------------------------------------ evaluation
  def _features(self, images):
    if self.feature_fn is not None:
      return np.asarray(self.feature_fn(images))
    name = _get(self.config.get("eval"), "fid_feature", "random_conv" if self.data_name == "shapes" else "none")
    if name in ("none", "inception"):  # "inception": FIDEvaluator, on uint8 samples
      return None
    if name == "shapes_fd":  # eval/shapes_fd.py: a net trained on the shapes world (config.eval.shapes_fd_path)
      return self._shapes_fd.features(images)
    return FEATURES.get(name)(images)

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    ec = self.config.get("eval") or ml_collections.ConfigDict()
    n = int(_get(ec, "num_samples", 256))
    bs = int(_get(ec, "batch_size", 128))
    labels = (np.arange(n) % self.num_classes).astype(np.int32) if self.num_classes else None
    from diffusion_jax.eval.fid import check_images
    # float samples only where the parser / a feature function reads them; uint8 (the .npz, FID) always
    feature = _get(ec, "fid_feature", "random_conv" if self.data_name == "shapes" else "none")
    keep_float = self.data_name == "shapes" or self.feature_fn is not None or feature not in ("none", "inception")
    imgs, imgs_u8 = [], []
    for i, start in enumerate(range(0, n, bs)):
      k = min(bs, n - start)
      lab = None
      if labels is not None:  # pad the last batch: every batch runs the same compiled sampler
        lab = np.concatenate([labels[start:start + k], np.zeros(bs - k, np.int32)])
      batch = np.asarray(self.generate(params, frozen, jax.random.fold_in(rng, i), lab, num=bs))[:k]
      imgs_u8.append(check_images(batch, "-1,1"))
      if keep_float:
        imgs.append(batch)
    imgs_u8 = np.concatenate(imgs_u8)
    imgs = np.concatenate(imgs) if keep_float else None
    out: Dict[str, float] = {"num_samples": float(n)}
    out.update(self._dump_and_fid(imgs_u8, labels, workdir, bs))
    if self.data_name == "shapes" and self.num_classes:
      from diffusion_jax.data import shapes as S
      from diffusion_jax.eval import shapes_parser as P
      cfg = S.ShapesConfig.from_dict(dict(_get(self.config.data, "shapes", {}) or {}), image_size=self.image_size)
      parsed = P.parse_batch(imgs, cfg=cfg, value_range="-1,1")
      out["class_accuracy"] = float(P.class_accuracy_parsed(parsed, labels))
      mains = [P.main_object(objs) for objs in parsed]
      # Which attribute fails: colour / shape of the main object against the label's (shape * 7 + colour).
      ncol = len(S.COLOUR_NAMES)
      out["colour_accuracy"] = float(np.mean([m is not None and m.colour == S.COLOUR_NAMES[l % ncol]
                                              for m, l in zip(mains, labels)]))
      out["shape_accuracy"] = float(np.mean([m is not None and m.shape == S.SHAPES[l // ncol]
                                             for m, l in zip(mains, labels)]))
    feats = self._features(imgs)
    if feats is not None:
      ref = self._reference_images(n)
      key = "shapes_fd" if self._shapes_fd is not None and self.feature_fn is None else "frechet_distance"
      out[key] = frechet_distance(*feature_statistics(feats), *feature_statistics(self._features(ref)))
    return out

  def _dump_and_fid(self, imgs_u8, labels, workdir, bs) -> Dict[str, object]:
    """Samples -> DIR/eval/samples_<N>x<H>x<W>x3.npz (uint8 NHWC `arr_0`, labels `arr_1`: the ADM evaluator's
    layout; config.eval.save_npz=False skips it) and, with Inception weights, FID against cached reference
    statistics of the data set's test split."""
    ec = self.config.get("eval") or ml_collections.ConfigDict()
    out: Dict[str, object] = {}
    edir = os.path.join(workdir, "eval") if workdir else None
    if edir and bool(_get(ec, "save_npz", True)) and jax.process_index() == 0:
      os.makedirs(edir, exist_ok=True)
      path = os.path.join(edir, "samples_{}x{}x{}x{}.npz".format(*imgs_u8.shape))
      arrays = {"arr_0": imgs_u8} if labels is None else {"arr_0": imgs_u8, "arr_1": labels}
      np.savez(path, **arrays)
      out["samples_npz"] = path
    if self._fid is None:
      if self.data_name != "shapes":
        out["fid_status"] = ("not measured: no Inception weights (set config.eval.inception_path to the "
                             "safetensors made by scripts/convert_inception.py; docs/eval.md)")
      return out
    n_ref = int(_get(ec, "reference_num_samples", len(imgs_u8)))
    fake, fake_feats = self._fid.features_and_stats(imgs_u8[i:i + bs] for i in range(0, len(imgs_u8), bs))
    meta = {"data": self.data_name, "data_config": json.dumps(self.config.data.to_dict(), sort_keys=True,
                                                             default=str),
            "split": "test", "image_size": self.image_size, "num": n_ref}
    default = os.path.join(edir or ".", f"reference_stats_{self.data_name}_test_{n_ref}_{self._fid.resize}.npz")
    ref = self._fid.reference(lambda: self._reference_batches(n_ref, bs), meta, default)
    out.update(self._fid.score(fake, fake_feats, ref))
    return out

  def _reference_batches(self, n: int, bs: int):
    """uint8 NHWC batches of the first n test examples, resized like training data (streamed)."""
    from diffusion_jax.data.pipeline import ResizeCrop
    from diffusion_jax.eval.fid import check_images
    src = self._source("test", int(self.config.seed))
    n = min(n, len(src))
    rc = ResizeCrop(self.image_size)
    for start in range(0, n, bs):
      chunk = [np.asarray(rc.map(src[i])["image"]) for i in range(start, min(n, start + bs))]
      chunk = np.stack(chunk)
      yield chunk if chunk.dtype == np.uint8 else check_images(chunk, "-1,1")  # float sources: [-1, 1]

  def _reference_images(self, n: int) -> np.ndarray:
    from diffusion_jax.data.pipeline import ResizeCrop, ToFloatImage
    src = self._source("test", int(self.config.seed))
    n = min(n, len(src))
    tr = [ResizeCrop(self.image_size), ToFloatImage("image")]
    return np.stack([functools.reduce(lambda e, t: t.map(e), tr, src[i])["image"] for i in range(n)])


class _EnsureLabel:
  """Adds label 0 to unlabelled examples (unconditional data sets), picklable."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes

  def map(self, example):
    example = dict(example)
    if "label" not in example:
      if self.num_classes:
        raise KeyError("Class-conditional training (config.model.num_classes > 0) needs a 'label' in every "
                       "example; set num_classes=0 for an unconditional run.")
      example["label"] = np.int32(0)
    example["label"] = np.int32(example["label"])
    return example

  __call__ = map


class _ArraySource:
  """Random-access source over a dict of equal-length arrays (the cached latents)."""

  def __init__(self, data: Dict[str, np.ndarray]):
    self.data = data
    self.n = len(next(iter(data.values())))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {k: v[int(i)] for k, v in self.data.items()}
