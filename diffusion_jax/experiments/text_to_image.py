"""Text-to-image latent (or pixel) diffusion: the Stable-Diffusion-style base model (experiment "text_to_image").

A `UNet2DConditionModel` (`models/unet.py`) cross-attends to the per-token states of a CLIP text encoder
(`last_hidden_state`, as diffusers' `StableDiffusionPipeline` uses it: no attention mask, padded to the
encoder's context), optionally in the latent space of a frozen `AutoencoderKL` (`models/vae.py`). The loss is
the plain diffusion MSE in the parameterisation of `config.diffusion.prediction_type` ("epsilon": SD-1.x,
"v_prediction": SD-2.x 768-v); captions are replaced by the empty caption with probability
`config.data.caption_drop` so that sampling can use classifier-free guidance.

Where the pieces come from (frozen weights are loaded on the host in `load_frozen`, never inside `init`):

* stage `pipeline` (kind "sd_pipeline"): a local diffusers directory in the `model_index.json` layout
  (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`). Its text encoder, tokenizer and VAE are the
  frozen weights, its `scheduler/scheduler_config.json` gives the noise schedule and the prediction type, and
  its UNet is the initial params (`load_params`, fine-tuning); `--mode sample|eval` without a checkpoint use it as
  it is (`pretrained_source`).
* otherwise stage `clip` (kind "hf_clip"): a transformers CLIP (e.g. the shapes CLIP of `configs/clip_shapes.py`);
  its text tower is the frozen text encoder, the UNet is trained from scratch (`config.model.unet`) in pixel
  space, with the schedule of `config.diffusion`.

Data (`config.data.name`: "shapes", "image_folder", "tfds" as in `data/clip_cache.py`, or "prompts" for
sampling only: `config.data.prompts`) is read once into a cache directory (`config.data.cache_dir` or
`WORKDIR/cache/t2i_<split>_<num>`): token ids, the images (uint8), the shapes scenes, and, when
`config.data.cache_text` / `config.data.cache_latents` are set, the text states (float16) and the VAE posterior
moments (float16) computed once with the frozen weights. Otherwise they are computed inside the jitted step.

Sampling (`sample`, `evaluate`, `sample_images`): one jitted function per (sampler, steps, guided, shape) runs
the text encoder, the whole sampler loop (`core/samplers`, lax.scan; conditional and unconditional halves in
one batched UNet call) and the VAE decoder. `config.sample.sampler` is one of `SAMPLER_NAMES` (ddim, dpmpp_2m,
dpmpp, euler, euler_ancestral, heun, unipc, ddpm); the pipeline's scheduler config (or `config.diffusion`),
overridden by `config.sample.options` (diffusers scheduler-config keys), is read by
`core.scheduler_config.from_diffusers_config` for that sampler's diffusers class, so the result matches
`StableDiffusionPipeline` with `scheduler=<Class>.from_config(pipe.scheduler.config)`.

Pixel space can put `config.model.pixel_patch` (p) pixels on channels (space-to-depth: the UNet sees
[H/p, W/p, 3 p^2]); the diffusion is unchanged (a permutation of the pixels) but the convolutions run at 1/p^2
of the positions. The export records p in `model_index.json` (`"_pixel_patch"`, a key diffusers skips).

`export` writes a diffusers pipeline directory (export kind "sd_pipeline"): `unet/` (`diffusers_io.save_unet`),
`text_encoder/`, `tokenizer/`, `scheduler/`, `vae/` when latent, and `model_index.json`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.experiments.base import EXPERIMENTS, EXPORT_KINDS, Experiment, require_files
from diffusion_jax.registry import check_choice

PREDICTION_TYPES = ("epsilon", "v_prediction")
# Sampler name -> the diffusers scheduler class it mirrors (its options are read from a scheduler config by
# `core.scheduler_config.from_diffusers_config`, as `<Class>.from_config(pipe.scheduler.config)` would).
DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                        "dpmpp": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
                        "euler_ancestral": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                        "unipc": "UniPCMultistepScheduler", "ddpm": "DDPMScheduler"}
SAMPLER_NAMES = tuple(DIFFUSERS_SCHEDULERS)
STOCHASTIC_SAMPLERS = ("euler_ancestral", "ddpm")
DATA_SOURCES = ("shapes", "image_folder", "tfds", "prompts")
# model_index.json key of a pixel-space pipeline whose UNet runs on space-to-depth patches (private to this project:
# diffusers skips keys that start with "_").
PIXEL_PATCH_KEY = "_pixel_patch"
_SCHEDULE_KEYS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "prediction_type": "epsilon", "rescale_betas_zero_snr": False}


# ------------------------------------------------------------------------------------------- export kinds


@EXPORT_KINDS.register("sd_pipeline")
def check_sd_pipeline(path: str) -> None:
  require_files(path, ["model_index.json", "unet/config.json", "text_encoder/config.json", "tokenizer",
                       "scheduler/scheduler_config.json"],
                "a diffusers Stable Diffusion pipeline directory (model_index.json, unet/, text_encoder/, "
                "tokenizer/, scheduler/, optionally vae/)")


# ------------------------------------------------------------------------------------------- schedules


def scheduler_settings(scheduler_config: Dict[str, Any], sampler: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """A diffusers `scheduler_config.json` dict -> (schedule settings, sampler keyword options) for `sampler`.

  The options are those `core.scheduler_config.from_diffusers_config(config, class_name=<sampler's class>)`
  reads: the keys the config has, the others at the defaults of that diffusers class, keys of other schedulers
  dropped (as `<Scheduler>.from_config(config)` does), unsupported values reported in one error."""
  from diffusion_jax.core.scheduler_config import from_diffusers_config
  check_choice("sampler (config.sample.sampler)", sampler, SAMPLER_NAMES)
  d = dict(scheduler_config)
  if d.get("trained_betas") is not None:
    raise ValueError("scheduler_config.json sets trained_betas, which this pipeline does not read; remove it or "
                     "use a config with beta_schedule / beta_start / beta_end.")
  sched = {k: d.get(k, v) for k, v in _SCHEDULE_KEYS.items()}
  check_choice("prediction_type (scheduler config)", sched["prediction_type"], PREDICTION_TYPES)
  d.setdefault("_class_name", "DDIMScheduler")
  opts = dict(from_diffusers_config(d, class_name=DIFFUSERS_SCHEDULERS[sampler]).options)
  opts.pop("prediction_type", None)
  if sampler == "dpmpp_2m":
    if opts.pop("solver_order", 2) != 2:
      raise ValueError(f"scheduler_config.json has solver_order={d['solver_order']}; the 'dpmpp_2m' sampler is "
                       "second order. Set solver_order to 2, or use config.sample.sampler='dpmpp' (any order).")
  return sched, opts


def make_schedule_from(settings: Dict[str, Any]):
  from diffusion_jax.core.schedules import make_schedule
  kw = {}
  if settings.get("rescale_betas_zero_snr"):
    kw["rescale_zero_snr"] = True
  return make_schedule(str(settings["beta_schedule"]), int(settings["num_train_timesteps"]),
                       float(settings["beta_start"]), float(settings["beta_end"]), **kw)


def _config_schedule(dc) -> Dict[str, Any]:
  return {"num_train_timesteps": int(dc.get("num_train_timesteps", 1000)),
          "beta_start": float(dc.get("beta_start", 0.00085)), "beta_end": float(dc.get("beta_end", 0.012)),
          "beta_schedule": str(dc.get("beta_schedule", "scaled_linear")),
          "prediction_type": str(dc.get("prediction_type", "epsilon") or "epsilon"),
          "rescale_betas_zero_snr": bool(dc.get("rescale_betas_zero_snr", False))}


# ------------------------------------------------------------------------------------------- tokenizer


def _pad_token_name(tok_dir: str) -> Optional[str]:
  """The pad token a transformers tokenizer directory names ("<|endoftext|>" for SD-1, "!" for SD-2)."""
  for f in ("special_tokens_map.json", "tokenizer_config.json"):
    p = os.path.join(tok_dir, f)
    if os.path.exists(p):
      with open(p) as fh:
        v = json.load(fh).get("pad_token")
      if isinstance(v, dict):
        v = v.get("content")
      if v:
        return str(v)
  return None


def load_tokenizer(tok_dir: Optional[str], max_length: int):
  """The CLIP tokenizer of a transformers tokenizer directory (vocab.json + merges.txt, or tokenizer.json),
  padding with the id of its pad token, like the pipeline's; else the packaged CLIP vocabulary."""
  from diffusion_jax.data import clip_cache
  from diffusion_jax.data import tokenizer as tok_lib
  if tok_dir and any(os.path.exists(os.path.join(tok_dir, f)) for f in ("vocab.json", "tokenizer.json")):
    tok = tok_lib.CLIPTokenizer(tok_dir, max_length)
    name = _pad_token_name(tok_dir)
    if name is not None:
      pad = tok._tok.convert_tokens_to_ids(name)
      if pad is None or (pad == tok._tok.unk_token_id and name != tok._tok.unk_token):
        raise ValueError(f"Tokenizer {tok_dir}: pad_token {name!r} is not in its vocabulary.")
      tok.pad_token_id = int(pad)
    return clip_cache.WordCachedTokenizer(tok)
  return clip_cache.load_tokenizer(tok_dir or "")


# ------------------------------------------------------------------------------------------- networks

_SAMPLE_FNS: Dict[Any, Any] = {}


def to_model_space(images, patch: int):
  """Pixels [B, H, W, 3] -> what a pixel-space UNet with `pixel_patch` sees: [B, H/p, W/p, 3 p^2]."""
  if patch == 1:
    return images
  from diffusion_jax.experiments.generation import space_to_depth
  return space_to_depth(images, patch)


def from_model_space(x, patch: int):
  if patch == 1:
    return x
  from diffusion_jax.experiments.generation import depth_to_space
  return depth_to_space(x, patch)


def _text_states(module, params, ids):
  return module.apply({"params": params}, ids)["last_hidden_state"]


def _unet_fn(module, params, x, t, ctx):
  return module.apply({"params": params}, x, t, ctx)


class _Host:
  """The frozen parts read on the host: text encoder, tokenizer, VAE (optional), pipeline settings."""

  def __init__(self, exp: "TextToImageExperiment"):
    from diffusion_jax.pretrained import clip as clip_io
    from diffusion_jax.pretrained import diffusers_io
    c = exp.config
    dtype = jnp.dtype(c.get("dtype", "float32"))
    self.pipeline_dir = exp.stages.get("pipeline")
    if self.pipeline_dir:
      te_dir, tok_dir = os.path.join(self.pipeline_dir, "text_encoder"), os.path.join(self.pipeline_dir, "tokenizer")
      _, tparams, tcfg = clip_io.load_clip(te_dir, kind="text")
    else:
      te_dir = exp.stage("clip")  # a CLIPModel or CLIPTextModel directory: its text tower
      tok_dir = te_dir
      _, tparams, tcfg = clip_io.load_clip(te_dir, kind="text")
    self.text_config = tcfg
    self.text_params = {"text_model": tparams["text_model"]}
    self.max_length = int(c.get("text", {}).get("max_length", 0) or tcfg.max_position_embeddings)
    if self.max_length > tcfg.max_position_embeddings:
      raise ValueError(f"config.text.max_length={self.max_length} exceeds the text encoder's context "
                       f"{tcfg.max_position_embeddings}; lower it or set 0 (the encoder's context).")
    self.tokenizer = load_tokenizer(tok_dir, self.max_length)
    from diffusion_jax.models import clip as clip_lib
    self.text_module = clip_lib.CLIPTextModel(tcfg, with_projection=False, dtype=dtype)
    self.vae_config, self.vae_params = None, None
    use_vae = bool(c.model.get("use_vae", bool(self.pipeline_dir)))
    if use_vae:
      if not self.pipeline_dir or not os.path.isdir(os.path.join(self.pipeline_dir, "vae")):
        raise ValueError("config.model.use_vae=True needs a pipeline stage with a vae/ folder "
                         "(config.stages.pipeline.path); set use_vae=False for pixel space.")
      self.vae_config, self.vae_params = diffusers_io.load_vae(self.pipeline_dir, subfolder="vae")
    self.scheduler_config = None
    self.pixel_patch = int(c.model.get("pixel_patch", 1) or 1)
    if self.pipeline_dir:
      p = os.path.join(self.pipeline_dir, "scheduler", "scheduler_config.json")
      with open(p) as fh:
        self.scheduler_config = json.load(fh)
      with open(os.path.join(self.pipeline_dir, "model_index.json")) as fh:
        patch = int(json.load(fh).get(PIXEL_PATCH_KEY, 1))
      if "pixel_patch" in c.model and int(c.model.pixel_patch) != patch:
        raise ValueError(f"config.model.pixel_patch={c.model.pixel_patch} but the pipeline {self.pipeline_dir} was "
                         f"trained with pixel patch {patch} (model_index.json {PIXEL_PATCH_KEY!r}); drop the "
                         "override.")
      self.pixel_patch = patch
    if self.pixel_patch < 1:
      raise ValueError(f"config.model.pixel_patch={self.pixel_patch} must be >= 1 (1: plain pixels).")
    if self.pixel_patch > 1 and use_vae:
      raise ValueError("config.model.pixel_patch > 1 is for pixel space; it cannot be combined with a VAE "
                       "(config.model.use_vae=True).")
    self._encode = jax.jit(functools.partial(_text_states, self.text_module))

  def tokenize(self, captions: Sequence[str]) -> np.ndarray:
    from diffusion_jax.data import clip_cache
    return clip_cache.tokenize(self.tokenizer, captions, self.max_length)[0]

  def encode(self, ids: np.ndarray) -> np.ndarray:
    return np.asarray(self._encode(self.text_params, jnp.asarray(ids)), np.float32)


# ------------------------------------------------------------------------------------------- the cache


def _prompt_pairs(dc, num: Optional[int]):
  prompts = list(dc.get("prompts", ()) or ())
  f = dc.get("prompts_file", "")
  if f:
    if not os.path.exists(f):
      raise FileNotFoundError(f"config.data.prompts_file={f!r} does not exist (one prompt per line).")
    with open(f) as fh:
      prompts += [ln.strip() for ln in fh if ln.strip()]
  if not prompts:
    raise ValueError("config.data.name='prompts' needs config.data.prompts (a list of strings) or "
                     "config.data.prompts_file (one prompt per line).")
  n = int(num or len(prompts))
  return [{"caption": prompts[i % len(prompts)]} for i in range(n)]


@EXPERIMENTS.register("text_to_image")
class TextToImageExperiment(Experiment):
  """UNet2DCondition + CLIP text encoder (+ frozen AutoencoderKL): see the module docstring."""
  export_kind = "sd_pipeline"

  def __init__(self, config: ml_collections.ConfigDict, stages=None):
    super().__init__(config, stages)
    c = config
    check_choice("text-to-image data source (config.data.name)", c.data.name, DATA_SOURCES)
    check_choice("sampler (config.sample.sampler)", c.sample.get("sampler", "ddim"), SAMPLER_NAMES)
    if "pipeline" not in self.stages and "clip" not in self.stages:
      raise ValueError("text_to_image needs a text encoder: stage 'pipeline' (a diffusers SD directory, "
                       "config.stages.pipeline.path) or stage 'clip' (a transformers CLIP, e.g. configs/clip_shapes.py).")
    self.dtype = jnp.dtype(c.get("dtype", "float32"))
    self._host_memo: Optional[_Host] = None
    self._unet_module = None
    self._unet_config = None
    self._dirs: Dict[str, str] = {}

  # -- host-side pieces ------------------------------------------------------------------------------

  @property
  def host(self) -> _Host:
    if self._host_memo is None:
      self._host_memo = _Host(self)
    return self._host_memo

  @property
  def unet_config(self):
    if self._unet_config is None:
      from diffusion_jax.models.unet import UNetConfig, resolve_unet_config
      spec = self.config.model.get("unet", "")
      if self.stages.get("pipeline") and not spec:
        from diffusion_jax.pretrained.io import read_json
        self._unet_config = UNetConfig.from_diffusers(read_json(os.path.join(self.stages["pipeline"], "unet",
                                                                             "config.json")))
      elif isinstance(spec, str):
        if not spec:
          raise ValueError("config.model.unet is empty and there is no pipeline stage to read the UNet from; give "
                           "a preset name ('tiny', 'sd15', 'sd21') or a dict of UNet2DConditionModel config keys.")
        self._unet_config = resolve_unet_config(spec)
      else:
        self._unet_config = UNetConfig.from_diffusers(spec.to_dict() if hasattr(spec, "to_dict") else dict(spec))
    return self._unet_config

  @property
  def unet(self):
    if self._unet_module is None:
      from diffusion_jax.models.unet import UNet2DConditionModel
      self._unet_module = UNet2DConditionModel(self.unet_config, dtype=self.dtype,
                                               remat=str(self.config.get("remat", "none")))
    return self._unet_module

  @property
  def latent(self) -> bool:
    return self.host.vae_config is not None

  def schedule_settings(self, sampler: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    sampler = sampler or str(self.config.sample.get("sampler", "ddim"))
    base = (dict(self.host.scheduler_config) if self.host.scheduler_config is not None
            else _config_schedule(self.config.diffusion))
    # config.sample.options: diffusers scheduler-config keys (timestep_spacing, clip_sample, use_karras_sigmas,
    # ...) that override the pipeline's (or config.diffusion's) before they are read.
    overrides = dict(self.config.sample.get("options", None) or {})
    bad = sorted(set(overrides) & set(_SCHEDULE_KEYS))
    if bad:
      raise ValueError(f"config.sample.options sets {bad}: those define the noise schedule the model was trained "
                       "on; set them in config.diffusion (or the pipeline's scheduler config), not at sampling.")
    sched, opts = scheduler_settings({**base, **overrides}, sampler)
    pt = str(self.config.diffusion.get("prediction_type", "") or "")
    if pt:
      check_choice("config.diffusion.prediction_type", pt, PREDICTION_TYPES)
      if (self.host.scheduler_config is not None and pt != sched["prediction_type"]
          and not bool(self.config.diffusion.get("change_prediction_type", False))):
        raise ValueError(
            f"config.diffusion.prediction_type={pt!r} but the pipeline {self.host.pipeline_dir} was trained with "
            f"{sched['prediction_type']!r} (scheduler/scheduler_config.json): sampling it as {pt!r} gives noise. "
            "Use the config of that model (configs/sd15.py: epsilon, configs/sd21.py: v_prediction), set "
            "config.diffusion.prediction_type='' to take the pipeline's, or set "
            "config.diffusion.change_prediction_type=True to fine-tune it into the other parameterisation.")
      sched["prediction_type"] = pt
    return sched, opts

  @functools.cached_property
  def schedule(self):
    return make_schedule_from(self.schedule_settings()[0])

  @property
  def prediction_type(self) -> str:
    return self.schedule_settings()[0]["prediction_type"]

  @property
  def image_size(self) -> int:
    return int(self.config.data.get("image_size", 32))

  @property
  def latent_shape(self) -> Tuple[int, int, int]:
    s = self.image_size
    if self.latent:
      f = 2 ** (len(self.host.vae_config.block_out_channels) - 1)
      if s % f:
        raise ValueError(f"config.data.image_size={s} must be divisible by the VAE's downsampling factor {f}.")
      return (s // f, s // f, int(self.unet_config.in_channels))
    p = self.pixel_patch
    if s % p:
      raise ValueError(f"config.data.image_size={s} must be divisible by config.model.pixel_patch={p}.")
    if int(self.unet_config.in_channels) != 3 * p * p or int(self.unet_config.out_channels) != 3 * p * p:
      raise ValueError(f"config.model.pixel_patch={p} puts {3 * p * p} channels (3 x {p} x {p}) into the UNet, but "
                       f"its in/out channels are {self.unet_config.in_channels}/{self.unet_config.out_channels}; "
                       f"set config.model.unet.in_channels = out_channels = {3 * p * p}.")
    return (s // p, s // p, int(self.unet_config.in_channels))

  @property
  def pixel_patch(self) -> int:
    """Space-to-depth factor of a pixel-space model (1: the UNet sees pixels; p: p x p pixel patches on channels).
    The diffusion itself is unchanged (space-to-depth is a permutation of the pixels)."""
    return 1 if self.latent else self.host.pixel_patch

  # -- data ------------------------------------------------------------------------------------------

  def _cache_dir(self, split: str) -> str:
    d = self.config.data
    num = int(d.get(f"num_{split}", 0) or 0) or None
    root = d.get("cache_dir", "") or (os.path.join(self.workdir, "cache") if self.workdir else "")
    if not root:
      raise ValueError("No place for the text-to-image cache: set config.data.cache_dir, or run through "
                       "`python -m diffusion_jax.main --workdir DIR` (the cache goes to DIR/cache).")
    return os.path.join(root, f"t2i_{split}_{num or 'all'}")

  def _request(self, split: str) -> Dict[str, Any]:
    d = self.config.data
    return {"source": str(d.name), "split": split, "num": int(d.get(f"num_{split}", 0) or 0),
            "seed": int(d.get("seed", 0)), "image_size": self.image_size,
            "data_dir": str(d.get("data_dir", "")), "tfds_name": str(d.get("tfds_name", "")),
            "prompts": list(d.get("prompts", ()) or ()), "prompts_file": str(d.get("prompts_file", "")),
            "text_dir": os.path.abspath(self.stages.get("pipeline") or self.stages.get("clip")),
            "max_length": self.host.max_length, "cache_text": bool(d.get("cache_text", False)),
            "cache_latents": bool(d.get("cache_latents", False)) and self.latent}

  def cache(self, split: str) -> str:
    if split in self._dirs:
      return self._dirs[split]
    path = self._cache_dir(split)
    req = self._request(split)
    meta_p = os.path.join(path, "meta.json")
    if os.path.exists(meta_p):
      with open(meta_p) as fh:
        meta = json.load(fh)
      if meta.get("complete") and meta.get("request") == json.loads(json.dumps(req)):
        self._dirs[split] = path
        return path
    self._build_cache(split, path, req)
    self._dirs[split] = path
    return path

  def _pairs(self, split: str, num: Optional[int]):
    from diffusion_jax.data import clip_cache
    d = self.config.data
    if d.name == "prompts":
      return _prompt_pairs(d, num)
    if d.name != "shapes" and not num:
      num = None
    return clip_cache.pairs_from_config(d, split, seed=int(d.get("seed", 0)), num=num, image_size=self.image_size)

  def _build_cache(self, split: str, path: str, req: Dict[str, Any]) -> None:
    from diffusion_jax.data.clip_cache import _run_batched
    d = self.config.data
    num = int(d.get(f"num_{split}", 0) or 0) or None
    if d.name == "prompts" and split == "train":
      raise ValueError("config.data.name='prompts' has no images to train on; use it with --mode sample, or "
                       "train on 'image_folder' / 'tfds' / 'shapes'.")
    bs = int(d.get("encode_batch_size", 64))
    captions, images, objects = [], [], []
    for p in self._pairs(split, num):
      captions.append(p["caption"])
      if "image" in p:
        images.append(np.asarray(p["image"], np.uint8))
      if "objects" in p:
        objects.append(np.asarray(p["objects"], np.int32))
    if not captions:
      raise ValueError(f"No (caption, image) pairs for split {split!r} of config.data.name={d.name!r}.")
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
      ids = self.host.tokenize(captions)
      arrays = {"ids": ids}
      if images:
        arrays["image"] = np.stack(images)
      if objects:
        arrays["objects"] = np.stack(objects)
      if req["cache_text"]:
        arrays["text_hidden"] = _run_batched(self.host.encode, (ids,), bs)[0].astype(np.float16)
      if req["cache_latents"] and images:
        from diffusion_jax.models.vae import AutoencoderKL
        cfg = self.host.vae_config
        enc = jax.jit(lambda p, x: AutoencoderKL(cfg).apply({"params": p}, x, method="encode"))
        px = arrays.pop("image")
        arrays["latent_moments"] = _run_batched(
            lambda x: enc(self.host.vae_params, jnp.asarray(x, jnp.float32) / 127.5 - 1.0), (px,), bs)[0].astype(
                np.float16)
      for k, v in arrays.items():
        np.save(os.path.join(tmp, f"{k}.npy"), v)
      with open(os.path.join(tmp, "captions.json"), "w") as fh:
        json.dump(captions, fh)
      with open(os.path.join(tmp, "meta.json"), "w") as fh:
        json.dump({"complete": True, "num": len(captions), "keys": sorted(arrays), "request": req}, fh, indent=1)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    from diffusion_jax.data.pipeline import make_pipeline
    d = self.config.data
    src = _CacheSource(self.cache(split))
    bs = int(d.batch_size) // shard_count
    if split != "train" and len(src) < bs:
      bs = len(src)
    return make_pipeline(src, [], batch_size=bs, seed=seed, shuffle=split == "train",
                         num_epochs=None if split == "train" else 1, num_workers=int(d.get("num_workers", 0)),
                         prefetch=int(d.get("prefetch", 2)), shard_index=shard_index, shard_count=shard_count,
                         drop_remainder=split == "train")

  # -- frozen weights --------------------------------------------------------------------------------

  def load_frozen(self):
    h = self.host
    null_ids = h.tokenize([""])
    frozen = {"text": h.text_params, "null_ids": null_ids.astype(np.int32),
              "null_text": h.encode(null_ids)}
    if h.vae_params is not None:
      frozen["vae"] = h.vae_params
    return frozen

  def pretrained_source(self):
    if not self.stages.get("pipeline") or self.config.model.get("unet", ""):
      return None
    return os.path.join(self.stages["pipeline"], "unet")

  def load_params(self, abstract_params):
    if self.pretrained_source() is None:
      return None
    from diffusion_jax.pretrained import diffusers_io
    _, params = diffusers_io.load_unet(self.stages["pipeline"], subfolder="unet")
    return params

  # -- the step --------------------------------------------------------------------------------------

  def init(self, rng, batch, frozen):
    h, w, ch = self.latent_shape
    x = jnp.zeros((1, h, w, ch), self.dtype)
    ctx = jnp.zeros((1, self.host.max_length, self.unet_config.cross_attention_dim), jnp.float32)
    return self.unet.init(rng, x, jnp.zeros((1,), jnp.float32), ctx)["params"]

  def _context(self, frozen, batch, drop=None):
    if "text_hidden" in batch:
      ctx = jnp.asarray(batch["text_hidden"], jnp.float32)
      if drop is not None:
        ctx = jnp.where(drop[:, None, None], jnp.asarray(frozen["null_text"], jnp.float32), ctx)
      return ctx
    ids = jnp.asarray(batch["ids"], jnp.int32)
    if drop is not None:
      ids = jnp.where(drop[:, None], jnp.asarray(frozen["null_ids"], jnp.int32), ids)
    return _text_states(self.host.text_module, frozen["text"], ids).astype(jnp.float32)

  def _x0(self, frozen, batch, rng):
    from diffusion_jax.models.vae import DiagonalGaussian, encode_to_latents
    if "latent_moments" in batch:
      z = DiagonalGaussian(jnp.asarray(batch["latent_moments"], jnp.float32)).sample(rng)
      cfg = self.host.vae_config
      if cfg.shift_factor is not None:
        z = z - cfg.shift_factor
      return z * cfg.scaling_factor
    x = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1.0
    if self.latent:
      return encode_to_latents(frozen["vae"], self.host.vae_config, x, rng, dtype=self.dtype)
    return to_model_space(x, self.pixel_patch)

  def loss(self, params, frozen, ema, batch, rng, step):
    from diffusion_jax.core.losses import diffusion_loss
    k_drop, k_lat, k_loss = jax.random.split(rng, 3)
    b = batch["ids"].shape[0]
    drop = jax.random.bernoulli(k_drop, float(self.config.data.get("caption_drop", 0.1)), (b,))
    ctx = jax.lax.stop_gradient(self._context(frozen, batch, drop))
    x0 = jax.lax.stop_gradient(self._x0(frozen, batch, k_lat)).astype(jnp.float32)
    fn = functools.partial(_unet_fn, self.unet, params)
    gamma = self.config.diffusion.get("snr_gamma", 0.0)
    per_ex, aux = diffusion_loss(fn, x0, k_loss, schedule=self.schedule, prediction_type=self.prediction_type,
                                 cond=ctx, snr_gamma=float(gamma) if gamma else None)
    return jnp.mean(per_ex), {"mse": jnp.mean(aux["mse"]), "caption_drop": jnp.mean(drop.astype(jnp.float32))}

  # -- sampling --------------------------------------------------------------------------------------

  def sample_fn(self, sampler: str, steps: int, guided: bool, eta: float = 0.0):
    """The jitted `(unet_params, frozen, ids, x_T, guidance, rng) -> images [B, H, W, 3] in [0, 1]`."""
    from diffusion_jax.core import samplers
    sched_settings, opts = self.schedule_settings(sampler)
    # One compiled function per network / schedule / sampler setting, shared by every experiment instance.
    key = (self.host.text_module, self.unet, self.host.vae_config, self.pixel_patch, sampler, int(steps),
           bool(guided), float(eta),
           json.dumps(sched_settings, sort_keys=True), json.dumps(dict(opts), sort_keys=True, default=str))
    if key in _SAMPLE_FNS:
      return _SAMPLE_FNS[key]
    schedule = make_schedule_from(sched_settings)
    pt = sched_settings["prediction_type"]
    if sampler == "ddim" and eta:
      opts["eta"] = float(eta)
    text_module, unet, latent = self.host.text_module, self.unet, self.latent
    vae_cfg = self.host.vae_config
    dtype = self.dtype
    patch = self.pixel_patch

    def fn(unet_params, frozen, ids, x_T, guidance, rng):
      from diffusion_jax.models.vae import decode_latents
      ctx = _text_states(text_module, frozen["text"], ids).astype(jnp.float32)
      kw = dict(num_steps=int(steps), schedule=schedule, prediction_type=pt, cond=ctx, **opts)
      if ((sampler == "ddim" and eta) or sampler in STOCHASTIC_SAMPLERS
          or str(opts.get("algorithm_type", "")).startswith("sde")):
        kw["rng"] = rng
      if guided:
        kw["uncond"] = jnp.broadcast_to(jnp.asarray(frozen["null_text"], jnp.float32), ctx.shape)
        kw["guidance_scale"] = guidance
      x = samplers.sample(sampler, jax.tree_util.Partial(functools.partial(_unet_fn, unet), unet_params), x_T, **kw)
      if latent:
        x = decode_latents(frozen["vae"], vae_cfg, x.astype(dtype), dtype=dtype)
      else:
        x = from_model_space(x, patch)
      return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    _SAMPLE_FNS[key] = jax.jit(fn)
    return _SAMPLE_FNS[key]

  def sample_images(self, params, frozen, ids, rng, *, x_T=None, sampler: Optional[str] = None,
                    steps: Optional[int] = None, guidance: Optional[float] = None, eta: Optional[float] = None):
    """Images [B, H, W, 3] float in [0, 1] for token ids [B, L]; `x_T` (standard normal, latent shape)
    defaults to a draw from `rng`."""
    s = self.config.sample
    sampler = sampler or str(s.get("sampler", "ddim"))
    steps = int(steps or s.get("steps", 25))
    guidance = float(s.get("guidance", 7.5) if guidance is None else guidance)
    eta = float(s.get("eta", 0.0) if eta is None else eta)
    ids = jnp.asarray(ids, jnp.int32)
    if x_T is None:
      x_T = jax.random.normal(jax.random.fold_in(rng, 1), (ids.shape[0],) + self.latent_shape, jnp.float32)
    fn = self.sample_fn(sampler, steps, guidance != 1.0, eta)
    return fn(params, frozen, ids, jnp.asarray(x_T, jnp.float32), jnp.float32(guidance), rng)

  def sample(self, params, frozen, batch, rng):
    imgs = self.sample_images(params, frozen, batch["ids"], rng)
    return {"image": np.asarray(imgs)}

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    """Shapes world: parser scores of images generated from held-out captions, at config.sample.guidance and
    without guidance (`nocfg_*`). Other data: nothing (FID / CLIP score are not wired here)."""
    if self.config.data.name != "shapes":
      return {}
    from diffusion_jax.eval import shapes_parser
    from diffusion_jax.images import save_grid
    arr = _CacheSource(self.cache("test")).arrays()
    num = min(int(self.config.eval.get("num_examples", 200)), len(arr["ids"]))
    bs = min(int(self.config.eval.get("batch_size", 100)), num)
    out: Dict[str, float] = {}
    for tag, g in (("", None), ("nocfg_", 1.0)):
      imgs = []
      for i, start in enumerate(range(0, num, bs)):
        ids = np.asarray(arr["ids"][start:start + bs])
        k = len(ids)
        if k < bs:
          ids = np.concatenate([ids, np.repeat(ids[-1:], bs - k, 0)])
        imgs.append(np.asarray(self.sample_images(params, frozen, ids, jax.random.fold_in(rng, i), guidance=g))[:k])
      imgs = np.round(np.concatenate(imgs) * 255).astype(np.uint8)
      scores = shapes_parser.score_all(imgs, np.asarray(arr["objects"][:num]))
      out.update({f"{tag}{k}": float(v) for k, v in scores.items()})
      if workdir:
        save_grid(os.path.join(workdir, "samples", f"eval_{tag or 'cfg_'}grid.png"), imgs[:64])
    return out

  # -- export ----------------------------------------------------------------------------------------

  def export(self, params, frozen, directory: str) -> None:
    export_pipeline(self, params, directory)


def export_pipeline(exp: TextToImageExperiment, params, directory: str) -> None:
  """Writes a diffusers pipeline directory: unet/ (our params), text_encoder/, tokenizer/, scheduler/, vae/."""
  from diffusion_jax.pretrained import clip as clip_io
  from diffusion_jax.pretrained import diffusers_io
  from diffusion_jax.pretrained.io import write_json
  h = exp.host
  os.makedirs(directory, exist_ok=True)
  diffusers_io.save_unet(os.path.join(directory, "unet"), exp.unet_config, jax.device_get(params))
  clip_io.save_clip(os.path.join(directory, "text_encoder"), jax.device_get(h.text_params), h.text_config, kind="text")
  tok_out = os.path.join(directory, "tokenizer")
  src = os.path.join(h.pipeline_dir, "tokenizer") if h.pipeline_dir else None
  if src and os.path.isdir(src):
    shutil.copytree(src, tok_out, dirs_exist_ok=True)
  else:
    import transformers
    from diffusion_jax.data import tokenizer as tok_lib
    vocab, merges = tok_lib.clip_vocab_and_merges()
    t = transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=h.max_length,
                                   pad_token=tok_lib.EOS)
    t.save_pretrained(tok_out)
  sched, _ = exp.schedule_settings("ddim")
  if h.scheduler_config is not None:
    sched_cfg = dict(h.scheduler_config)
    sched_cfg["prediction_type"] = sched["prediction_type"]
  else:
    sched_cfg = {"_class_name": "DDIMScheduler", **sched, "clip_sample": False, "set_alpha_to_one": False,
                 "steps_offset": 1, "timestep_spacing": "leading"}
  write_json(sched_cfg, os.path.join(directory, "scheduler", "scheduler_config.json"))
  index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
           "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
           "tokenizer": ["transformers", "CLIPTokenizer"],
           "scheduler": ["diffusers", str(sched_cfg.get("_class_name", "DDIMScheduler"))],
           "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
  if exp.pixel_patch > 1:
    index[PIXEL_PATCH_KEY] = exp.pixel_patch
  if h.vae_params is not None:
    diffusers_io.save_vae(os.path.join(directory, "vae"), h.vae_config, h.vae_params)
    index["vae"] = ["diffusers", "AutoencoderKL"]
  write_json(index, os.path.join(directory, "model_index.json"))


class _CacheSource:
  """grain source over a text-to-image cache: `[i]` -> {"ids", and "image" / "text_hidden" /
  "latent_moments" / "objects" when cached} (float16 come back as float32)."""

  def __init__(self, path: str):
    with open(os.path.join(path, "meta.json")) as fh:
      self.meta = json.load(fh)
    self.path = path
    self._arrays = None

  def arrays(self) -> Dict[str, np.ndarray]:
    if self._arrays is None:
      self._arrays = {k: np.load(os.path.join(self.path, f"{k}.npy"), mmap_mode="r") for k in self.meta["keys"]}
    return self._arrays

  def __len__(self) -> int:
    return int(self.meta["num"])

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_arrays"] = None
    return d

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    out = {}
    for k, v in self.arrays().items():
      x = np.asarray(v[int(index)])
      out[k] = x.astype(np.float32) if x.dtype == np.float16 else x
    return out


def sample_to_dir(config: ml_collections.ConfigDict, stages: Dict[str, str], out_dir: str,
                  num: Optional[int] = None, params=None) -> Dict[str, Any]:
  """Samples the test split's captions (the prompts of a "prompts" config) with the pipeline's own UNet (or
  `params`) without a checkpoint: `out_dir/<i>.png` per image, `out_dir/samples.npz` (images float [0, 1],
  token ids, initial noise) and `out_dir/prompts.json`. Used by `scripts/sd_sample.py`."""
  from diffusion_jax.images import save_png
  exp = get_text_to_image(config, stages)
  exp.workdir = out_dir
  os.makedirs(out_dir, exist_ok=True)
  frozen = jax.tree.map(jnp.asarray, exp.load_frozen())
  if params is None:
    params = exp.load_params(None)
    if params is None:
      raise ValueError("sample_to_dir without params needs a pipeline stage whose UNet it samples "
                       "(config.stages.pipeline.path) and config.model.unet empty.")
  params = jax.tree.map(jnp.asarray, params)
  src = _CacheSource(exp.cache("test"))
  with open(os.path.join(exp.cache("test"), "captions.json")) as fh:
    captions = json.load(fh)
  n = min(int(num or len(src)), len(src))
  bs = min(int(config.data.batch_size), n)
  rng = jax.random.PRNGKey(int(config.seed))
  images, noises = [], []
  ids_all = np.asarray(src.arrays()["ids"][:n])
  for i, start in enumerate(range(0, n, bs)):
    ids = ids_all[start:start + bs]
    k = len(ids)
    if k < bs:
      ids = np.concatenate([ids, np.repeat(ids[-1:], bs - k, 0)])
    key = jax.random.fold_in(rng, i)
    x_T = jax.random.normal(key, (bs,) + exp.latent_shape, jnp.float32)
    images.append(np.asarray(exp.sample_images(params, frozen, ids, key, x_T=x_T))[:k])
    noises.append(np.asarray(x_T)[:k])
  images = np.concatenate(images)
  for j, im in enumerate(images):
    save_png(os.path.join(out_dir, f"{j:04d}.png"), np.round(im * 255).astype(np.uint8))
  np.savez(os.path.join(out_dir, "samples.npz"), image=images, ids=ids_all, x_T=np.concatenate(noises))
  with open(os.path.join(out_dir, "prompts.json"), "w") as fh:
    json.dump(captions[:n], fh, indent=1)
  return {"num": n, "dir": out_dir, "shape": list(images.shape)}


def get_text_to_image(config, stages) -> TextToImageExperiment:
  if config.experiment != "text_to_image":
    raise ValueError(f"config.experiment is {config.experiment!r}; this needs a text_to_image config "
                     "(configs/sd15.py, configs/sd21.py, configs/sd_shapes.py).")
  return TextToImageExperiment(config, stages=stages)
