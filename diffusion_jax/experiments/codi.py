"""CoDi: single-stage conditional diffusion distillation (experiment "codi"; facts in shared/papers/codi.md).

A pretrained text-to-image base (stage `pipeline`, kind "sd_pipeline": a diffusers directory, e.g. the export of
`configs/sd_shapes.py` or SD-1.5) is adapted to an image condition c and distilled to 1-4 steps in one stage.

Adapters (`config.codi.adapter`):

* "codi" (full CoDi, A3): the whole base UNet trains, plus a trainable copy of its encoder that reads c, fused by
  a learnable gate mu = 0 at init (`models/codi_adapter.CoDiUNet`): step 0 reproduces the base exactly.
* "pe_codi" (PE-CoDi): a ControlNet (zero convs, encoder copied from the base) over the *frozen* base UNet; only
  the ControlNet is a parameter (the base is a frozen weight, `load_frozen`; `optim.groups` names the ControlNet).

Objective (`config.codi.objective` = "codi"), per example, t > s on the N-point grid (`grid_size` N = 50,
t = k T/N, s = (k-1) T/N, k ~ U{1..N-1}; or "uniform": the official code's t ~ U{0..T-1}, s = max(t - T/N, 0)):

    z_t   = a_t x + s_t eps
    f_on  = c_skip(t) z_t + c_out(t) x_hat_theta(z_t, t, c)                        (online, with gradient)
    z_s   = a_s x_hat(z_t, t) + s_s eps_hat(z_t, t)                                (one DDIM / PF-ODE step)
    f_tgt = sg[c_skip(s) z_s + c_out(s) x_hat_theta-(z_s, s, c)]                   (EMA target, ema["target"])
    L     = consistency_weight * w(t) * |f_on - f_tgt|^2 + guidance_weight * |f_on - x|^2

with the LCM-style boundary condition of the release (c_skip = sd^2/((k t)^2 + sd^2), c_out = k t / sqrt(...),
sd = 0.5, k = 10: `core/parameterization.consistency_scalings`). x_hat / eps_hat come from the base's own
parameterisation (`predict_x0_eps`: epsilon for SD-1.x, v for SD-2.x; the release reads every base as v, which is
wrong for SD-1.x and is not copied). Options (`config.codi.*`):

* `ode_model`: which network takes the PF-ODE step: "online" (the current adapted model, stop-gradient: what the
  paper describes, default, because the consistency target then lies on the *conditional* trajectory the
  student must be consistent along) or "base" (the frozen pretrained text-only UNet: what the released code
  effectively does, its ControlNet copy having zero residuals).
* `ode_noise`: "model" (eps_hat, PF-ODE) or "true" (the sampled eps: the paper's "- distilling PF-ODE" ablation,
  the official `epsilon` mode).
* `consistency_space`: "x" (the release's consistency_x on f) or "epsilon" (the paper's noise-space d_eps between
  eps_hat_theta(z_t, t) and sg eps_hat_theta-(z_s, s)).
* `consistency_weight` 0: the "- noise-consistency" ablation; `guidance_weight`: the conditional-guidance term.
* `shared_t`: one t for the whole batch (the paper's ablation prefers it for 1-4 steps: default) or per example
  (the released code).
* `snr_gamma` > 0: min-SNR weight w(t) on the consistency term (x-space: min(SNR, g); eps-space: min(SNR, g)/SNR).
* `cfg_aware`: CFG-aware distillation (fast-codi): a guidance scale w ~ U{cfg_min..cfg_max-1} per step; online and
  target predictions are CFG-combined from one batched call on [cond; uncond] (conditional half first,
  `core/guidance.guided_call`), out = out_u + w (out_c - out_u). (fast-codi labels its first half "uncond" and so
  computes cond + w (uncond - cond); not copied.) `cfg_ode` also guides the ODE step (off, as released).

`objective` = "diffusion": the same adapter trained as a plain conditional diffusion model (the baselines of the
issue), sampled with DDIM / DPM-Solver++.

Sampling (`sample_images`): text encoder, the whole sampler (`core/samplers`: "consistency" = CoDi's deterministic
rollout, 4 steps at [980, 720, 460, 200] on the 50-grid; "ddim"; "dpmpp_2m"), CFG with the unconditional half
[null text, same image condition], and the VAE decoder in one jit.

Tasks (`config.data.task`), conditions rendered by the shapes world (or computed from the images of other data):
"sr" (4x low-res image, nearest-upsampled), "depth" (depth map), "edge" (edge map), "inpaint" (masked image + mask).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.experiments import text_to_image as t2i
from diffusion_jax.experiments.base import EXPERIMENTS, EXPORT_KINDS, require_files
from diffusion_jax.registry import check_choice

ADAPTERS = ("codi", "pe_codi")
OBJECTIVES = ("codi", "diffusion")
ODE_MODELS = ("online", "base")
ODE_NOISE = ("model", "true")
CONSISTENCY_SPACES = ("x", "epsilon")
TIMESTEP_SAMPLING = ("grid", "uniform")
TASKS = ("sr", "depth", "edge", "inpaint")
TASK_CHANNELS = {"sr": 3, "depth": 1, "edge": 1, "inpaint": 4}
CODI_SAMPLERS = ("consistency", "ddim", "dpmpp_2m")

_SAMPLE_FNS: Dict[Any, Any] = {}

# The defaults of config.codi (see the module docstring).
DEFAULTS = dict(adapter="codi", objective="codi", grid_size=50, sigma_data=0.5, timestep_scaling=10.0,
                ode_model="online", ode_noise="model", consistency_space="x", consistency_weight=1.0,
                guidance_weight=1.0, shared_t=True, timesteps="grid", snr_gamma=0.0, cfg_aware=False, cfg_min=2,
                cfg_max=14, cfg_ode=False, conditioning_scale=1.0)


@EXPORT_KINDS.register("codi_params")
def check_codi_export(path: str) -> None:
  require_files(path, ["codi.json", "params.safetensors"], "a CoDi export (codi.json, params.safetensors)")


# ------------------------------------------------------------------------------------------- conditions


def shapes_condition(task: str, rendered: Dict[str, np.ndarray], lowres_factor: int = 4) -> np.ndarray:
  """The uint8 [H, W, C] condition of a shapes-world `render` dict (C = TASK_CHANNELS[task])."""
  check_choice("CoDi task (config.data.task)", task, TASKS)
  if task == "sr":
    lo = rendered["lowres"]
    f = rendered["image"].shape[0] // lo.shape[0]
    return np.repeat(np.repeat(lo, f, 0), f, 1)
  if task == "depth":
    return np.round(np.clip(rendered["depth"], 0, 1) * 255).astype(np.uint8)[..., None]
  if task == "edge":
    return (rendered["edges"].astype(np.uint8) * 255)[..., None]
  return np.concatenate([rendered["masked_image"], (rendered["mask"] * 255).astype(np.uint8)[..., None]], -1)


def image_condition(task: str, image: np.ndarray, index: int, seed: int = 0, lowres_factor: int = 4) -> np.ndarray:
  """The condition computed from a uint8 [H, W, 3] image of any data set: "sr" box-downsampled by `lowres_factor`
  and nearest-upsampled; "inpaint" a grey box (sides 1/4-1/2, position seeded by (seed, index)) + the mask;
  "edge" a gradient-magnitude edge map (central differences of the luma, threshold at 1/8 of the maximum; not
  Canny). "depth" needs a depth estimator and is only rendered by the shapes world."""
  from diffusion_jax.data import shapes as S
  check_choice("CoDi task (config.data.task)", task, TASKS)
  h, w = image.shape[:2]
  if task == "sr":
    if h % lowres_factor or w % lowres_factor:
      raise ValueError(f"Image size {h}x{w} is not divisible by the super-resolution factor {lowres_factor}.")
    lo = S.downsample(image, lowres_factor)
    return np.repeat(np.repeat(lo, lowres_factor, 0), lowres_factor, 1)
  if task == "inpaint":
    rng = np.random.default_rng([int(seed), int(index), 7])
    mh, mw = (int(v) for v in rng.integers(max(1, h // 4), max(2, h // 2) + 1, size=2))
    my, mx = int(rng.integers(0, h - mh + 1)), int(rng.integers(0, w - mw + 1))
    mask = np.zeros((h, w), np.uint8)
    mask[my:my + mh, mx:mx + mw] = 1
    masked = image.copy()
    masked[mask.astype(bool)] = 128
    return np.concatenate([masked, mask[..., None] * 255], -1)
  if task == "edge":
    y = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    gx = np.zeros_like(y)
    gy = np.zeros_like(y)
    gx[:, 1:-1] = y[:, 2:] - y[:, :-2]
    gy[1:-1] = y[2:] - y[:-2]
    g = np.hypot(gx, gy)
    return ((g > max(g.max() / 8, 1e-6)).astype(np.uint8) * 255)[..., None]
  raise ValueError("config.data.task='depth' needs a depth map per image, which only the shapes world renders "
                   "(config.data.name='shapes'); use task 'sr', 'inpaint' or 'edge' on other data.")


# ------------------------------------------------------------------------------------------- networks


def _model_apply(adapter: str, codi_module, control_module, unet_module, cond_scale: float, params, base_params,
                 x, t, c):
  """The conditional model's prediction (the base's parameterisation): c = {"ctx", "cond"}."""
  if adapter == "codi":
    return codi_module.apply({"params": params["codi"]}, x, t, c["ctx"], c["cond"])
  down, mid = control_module.apply({"params": params["controlnet"]}, x, t, c["ctx"], c["cond"],
                                   conditioning_scale=cond_scale)
  return unet_module.apply({"params": base_params}, x, t, c["ctx"], down_block_additional_residuals=down,
                           mid_block_additional_residual=mid)


def _base_apply(unet_module, base_params, x, t, c):
  return unet_module.apply({"params": base_params}, x, t, c["ctx"])


def cfg_prediction(fn, z, t, cond, uncond, scale):
  """CFG-combined prediction from ONE call of `fn(x, t, c)` on [z; z] with [cond; uncond] (conditional half
  first): out_u + scale (out_c - out_u); `scale` scalar or [B]."""
  from diffusion_jax.core import guidance as G
  return G.guided_call(fn, z, t, cond, uncond, scale)


def consistency_targets(pred_fn, ode_fn, target_fn, x0, eps, t, s, schedule, prediction_type: str, *,
                        sigma_data: float = 0.5, timestep_scaling: float = 10.0, ode_noise: str = "model",
                        consistency_space: str = "x", snr_gamma: float = 0.0):
  """The two per-example CoDi terms [B] (consistency, guidance) for prediction functions `fn(z, t) -> out`
  (`ode_fn` None: the online prediction, stop-gradient, takes the ODE step). Pure math, no networks: the loss
  test compares it with a NumPy computation on a toy denoiser."""
  from diffusion_jax.core import losses as losses_lib
  from diffusion_jax.core import parameterization as P
  f32 = jnp.float32
  a_t, s_t = schedule.gather(t, x0)
  a_s, s_s = schedule.gather(s, x0)
  x0 = x0.astype(f32)
  z_t = a_t * x0 + s_t * eps
  tf, sf = jnp.asarray(t, f32), jnp.asarray(s, f32)
  bc = lambda v: v.reshape(v.shape + (1,) * (x0.ndim - 1))
  out_on = pred_fn(z_t, tf).astype(f32)
  x_on, e_on = P.predict_x0_eps(out_on, z_t, a_t, s_t, prediction_type)
  cs_t, co_t = P.consistency_scalings(tf, sigma_data, timestep_scaling)
  f_on = bc(cs_t) * z_t + bc(co_t) * x_on
  out_ode = jax.lax.stop_gradient(out_on if ode_fn is None else ode_fn(z_t, tf).astype(f32))
  x_ode, e_ode = P.predict_x0_eps(out_ode, z_t, a_t, s_t, prediction_type)
  z_s = jax.lax.stop_gradient(a_s * x_ode + s_s * (e_ode if ode_noise == "model" else eps))
  out_tg = jax.lax.stop_gradient(target_fn(z_s, sf).astype(f32))
  x_tg, e_tg = P.predict_x0_eps(out_tg, z_s, a_s, s_s, prediction_type)
  cs_s, co_s = P.consistency_scalings(sf, sigma_data, timestep_scaling)
  f_tg = bc(cs_s) * z_s + bc(co_s) * x_tg
  mean = lambda v: jnp.mean(v.reshape(v.shape[0], -1), axis=1)
  if consistency_space == "x":
    cons = mean((f_on - f_tg) ** 2)
  else:
    cons = mean((e_on - e_tg) ** 2)
  if snr_gamma:
    ac = jnp.asarray(schedule.alphas_cumprod, f32)[jnp.asarray(t, jnp.int32)]
    cons = cons * losses_lib.min_snr_weight(ac / (1.0 - ac), float(snr_gamma),
                                            "sample" if consistency_space == "x" else "epsilon")
  guide = mean((f_on - x0) ** 2)
  return cons, guide


def codi_timesteps(rng, batch: int, *, num_train_timesteps: int = 1000, grid_size: int = 50, mode: str = "grid",
                   shared: bool = True):
  """(t, s) int32 [B]: "grid": t = k T/N, s = (k-1) T/N, k ~ U{1..N-1}; "uniform": t ~ U{0..T-1},
  s = max(t - T/N, 0). `shared`: one draw for the batch."""
  check_choice("CoDi timestep sampling (config.codi.timesteps)", mode, TIMESTEP_SAMPLING)
  step = num_train_timesteps // grid_size
  n = 1 if shared else batch
  if mode == "grid":
    k = jax.random.randint(rng, (n,), 1, grid_size, dtype=jnp.int32)
    t, s = k * step, (k - 1) * step
  else:
    t = jax.random.randint(rng, (n,), 0, num_train_timesteps, dtype=jnp.int32)
    s = jnp.maximum(t - step, 0)
  return jnp.broadcast_to(t, (batch,)), jnp.broadcast_to(s, (batch,))


@EXPERIMENTS.register("codi")
class CoDiExperiment(t2i.TextToImageExperiment):
  """See the module docstring. Reuses the text-to-image base's host pieces (text encoder, tokenizer, VAE,
  schedule of the pipeline) and its cache, extended with the task's condition."""
  export_kind = "codi_params"

  def __init__(self, config: ml_collections.ConfigDict, stages=None):
    if "pipeline" not in dict(stages or {}):
      raise ValueError("codi needs the pretrained base as stage 'pipeline' (kind sd_pipeline): a diffusers "
                       "directory, e.g. the export of configs/sd_shapes.py (config.stages.pipeline.config) or "
                       "--config.stages.pipeline.path=/path/to/stable-diffusion-v1-5.")
    sampler = str(config.sample.get("sampler", "consistency"))
    check_choice("sampler (config.sample.sampler)", sampler, CODI_SAMPLERS)
    # The text-to-image base checks config.sample.sampler against its own samplers (no "consistency"): show it a
    # DDIM config while it initialises.
    config.sample.sampler = "ddim"
    try:
      super().__init__(config, stages)
    finally:
      config.sample.sampler = sampler
    self._pending = None
    o = self.opts
    check_choice("CoDi adapter (config.codi.adapter)", o["adapter"], ADAPTERS)
    check_choice("CoDi objective (config.codi.objective)", o["objective"], OBJECTIVES)
    check_choice("PF-ODE step network (config.codi.ode_model)", o["ode_model"], ODE_MODELS)
    check_choice("PF-ODE step noise (config.codi.ode_noise)", o["ode_noise"], ODE_NOISE)
    check_choice("consistency space (config.codi.consistency_space)", o["consistency_space"], CONSISTENCY_SPACES)
    check_choice("CoDi timestep sampling (config.codi.timesteps)", o["timesteps"], TIMESTEP_SAMPLING)
    check_choice("CoDi task (config.data.task)", self.task, TASKS)
    if o["objective"] == "codi" and "target" not in dict(config.train.get("ema", {}) or {}):
      raise ValueError("CoDi distillation needs an EMA target network: config.train.ema.target = 0.999 (e.g. "
                       "_base.set_ema(c, target=0.999)).")
    if o["cfg_aware"] and not int(o["cfg_min"]) < int(o["cfg_max"]):
      raise ValueError(f"config.codi.cfg_min={o['cfg_min']} must be < cfg_max={o['cfg_max']} (w ~ U{{min..max-1}}).")
    if config.model.get("unet", ""):
      raise ValueError("codi adapts the base pipeline's UNet; leave config.model.unet empty.")
    self._shapes_fd = self._load_shapes_fd()

  def _load_shapes_fd(self):
    """The shapes-FD network of `config.eval.shapes_fd_path` (eval/shapes_fd.py), loaded and checked at start-up;
    None when the key is unset (evaluate then says the distance is not computed)."""
    path = str(self.config.eval.get("shapes_fd_path", "") or "")
    if not path:
      return None
    size = self.image_size
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"config.eval.shapes_fd_path={path!r} does not exist. Make it once with `python scripts/shapes_fd.py "
          f"train --out {path} --image_size {size}` (docs/eval.md), or leave config.eval.shapes_fd_path empty "
          "to evaluate without the shapes FD.")
    if self.config.data.name != "shapes":
      raise ValueError(f"config.eval.shapes_fd_path is set, but the shapes FD is a distance of the shapes world "
                       f"and the data is {self.config.data.name!r}; leave the key empty.")
    from diffusion_jax.eval.shapes_fd import ShapesFD
    fd = ShapesFD(path, batch_size=int(self.config.eval.get("batch_size", 100)))
    if int(fd.info["image_size"]) != size:
      raise ValueError(f"config.eval.shapes_fd_path={path!r} was trained at {fd.info['image_size']}px; the images "
                       f"are {size}px. Train one with `python scripts/shapes_fd.py train --out PATH "
                       f"--image_size {size}`.")
    return fd

  # -- settings --------------------------------------------------------------------------------------

  @functools.cached_property
  def opts(self) -> Dict[str, Any]:
    o = dict(DEFAULTS)
    given = self.config.get("codi", None) or {}
    unknown = [k for k in given.keys() if k not in DEFAULTS]
    if unknown:
      raise ValueError(f"Unknown config.codi keys {unknown}; valid: {sorted(DEFAULTS)}.")
    o.update({k: given[k] for k in given.keys()})
    return o

  @property
  def task(self) -> str:
    return str(self.config.data.get("task", "sr"))

  @property
  def cond_dim(self) -> int:
    return TASK_CHANNELS[self.task]

  @property
  def cond_factor(self) -> int:
    """Condition resolution / UNet input resolution (the VAE factor in latent space, 1 in pixel space)."""
    return self.image_size // self.latent_shape[0]

  @functools.cached_property
  def codi_module(self):
    from diffusion_jax.models import codi_adapter as A
    return A.CoDiUNet(self.unet_config, A.cond_embedding_channels(self.cond_factor), dtype=self.dtype,
                      remat=str(self.config.get("remat", "none")))

  @functools.cached_property
  def control_config(self):
    from diffusion_jax.models import codi_adapter as A
    return A.pe_controlnet_config(self.unet_config, self.cond_dim, self.cond_factor)

  @functools.cached_property
  def control_module(self):
    from diffusion_jax.models.controlnet import ControlNetModel
    return ControlNetModel(self.control_config, dtype=self.dtype, remat=str(self.config.get("remat", "none")))

  def model_fn(self):
    """`f(params, base_params, x, t, c)` of the conditional model (a module-level function + static modules)."""
    o = self.opts
    return functools.partial(_model_apply, o["adapter"], self.codi_module if o["adapter"] == "codi" else None,
                             self.control_module if o["adapter"] == "pe_codi" else None, self.unet,
                             float(o["conditioning_scale"]))

  # -- data ------------------------------------------------------------------------------------------

  def _request(self, split: str) -> Dict[str, Any]:
    req = super()._request(split)
    req["codi_task"] = self.task
    req["lowres_factor"] = int(self.config.data.get("lowres_factor", 4))
    return req

  def _cache_dir(self, split: str) -> str:
    d = super()._cache_dir(split)
    return os.path.join(os.path.dirname(d), f"codi_{self.task}_" + os.path.basename(d))

  def _pairs(self, split: str, num: Optional[int]):
    d = self.config.data
    lf = int(d.get("lowres_factor", 4))
    seed = int(d.get("seed", 0))
    pend = self._pending
    for i, p in enumerate(super()._pairs(split, num)):
      img = np.asarray(p["image"], np.uint8)
      if d.name == "shapes":
        from diffusion_jax.data import shapes as S
        scfg = S.ShapesConfig(image_size=self.image_size, lowres_factor=lf)
        scene = S.Scene.from_array(np.asarray(p["objects"]), self.image_size)
        r = S.render(scene, scfg)
        if not np.array_equal(r["image"], img):
          raise AssertionError("shapes render of the cached scene differs from its image")
        pend["cond"].append(shapes_condition(self.task, r, lf))
      else:
        pend["cond"].append(image_condition(self.task, img, i, seed, lf))
      pend["image"].append(img)
      yield p

  def _build_cache(self, split: str, path: str, req: Dict[str, Any]) -> None:
    self._pending = {"cond": [], "image": []}
    super()._build_cache(split, path, req)
    meta_p = os.path.join(path, "meta.json")
    with open(meta_p) as fh:
      meta = json.load(fh)
    np.save(os.path.join(path, "cond.npy"), np.stack(self._pending["cond"]))
    np.save(os.path.join(path, "image.npy"), np.stack(self._pending["image"]))  # kept next to latents (sheets)
    meta["keys"] = sorted(set(meta["keys"]) | {"cond", "image"})
    with open(meta_p + ".tmp", "w") as fh:
      json.dump(meta, fh, indent=1)
    os.replace(meta_p + ".tmp", meta_p)
    self._pending = None

  def cache(self, split: str) -> str:
    path = super().cache(split)
    with open(os.path.join(path, "meta.json")) as fh:
      keys = json.load(fh)["keys"]
    if "cond" not in keys:  # interrupted between the base cache and the conditions: build again
      self._dirs.pop(split, None)
      os.remove(os.path.join(path, "meta.json"))
      path = super().cache(split)
    return path

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    from diffusion_jax.data.pipeline import make_pipeline
    d = self.config.data
    src = t2i._CacheSource(self.cache(split))
    bs = int(d.batch_size) // shard_count
    if split != "train" and len(src) < bs:
      bs = len(src)
    # Sample sheets show the batch's image-like entries first: test batches carry the ground truth flattened, so
    # that the sheet reads condition | output | ground truth (`sample` returns it as "ground_truth").
    return make_pipeline(src, [] if split == "train" else [_flatten_truth], batch_size=bs, seed=seed,
                         shuffle=split == "train", num_epochs=None if split == "train" else 1,
                         num_workers=int(d.get("num_workers", 0)), prefetch=int(d.get("prefetch", 2)),
                         shard_index=shard_index, shard_count=shard_count, drop_remainder=split == "train")

  def schedule_settings(self, sampler: Optional[str] = None):
    sampler = sampler or str(self.config.sample.get("sampler", "consistency"))
    return super().schedule_settings("ddim" if sampler == "consistency" else sampler)

  # -- frozen weights and init -----------------------------------------------------------------------

  def load_frozen(self):
    from diffusion_jax.pretrained import diffusers_io
    frozen = super().load_frozen()
    _, frozen["unet"] = diffusers_io.load_unet(self.stages["pipeline"], subfolder="unet")
    return frozen

  def load_params(self, abstract_params):
    return None  # `init` builds the adapter from the frozen base (a traced argument)

  def pretrained_source(self):
    return None  # no released CoDi weights: --mode sample|eval need a checkpoint

  def init(self, rng, batch, frozen):
    from diffusion_jax.models import codi_adapter as A
    from diffusion_jax.models.controlnet import init_controlnet_from_unet
    if self.opts["adapter"] == "codi":
      return {"codi": A.init_codi_params(frozen["unet"], self.unet_config, self.cond_dim,
                                         A.cond_embedding_channels(self.cond_factor), rng)}
    return {"controlnet": init_controlnet_from_unet(frozen["unet"], self.control_config, rng)}

  # -- the step --------------------------------------------------------------------------------------

  def _cond(self, batch):
    c = jnp.asarray(batch["cond"], jnp.float32)
    return c / 255.0

  def loss(self, params, frozen, ema, batch, rng, step):
    from diffusion_jax.core.losses import diffusion_loss
    o = self.opts
    k_drop, k_lat, k_t, k_n, k_w, k_loss = jax.random.split(rng, 6)
    b = batch["ids"].shape[0]
    drop = jax.random.bernoulli(k_drop, float(self.config.data.get("caption_drop", 0.1)), (b,))
    ctx = jax.lax.stop_gradient(self._context(frozen, batch, drop))
    x0 = jax.lax.stop_gradient(self._x0(frozen, batch, k_lat)).astype(jnp.float32)
    cond = self._cond(batch)
    c = {"ctx": ctx, "cond": cond}
    model = self.model_fn()
    base = frozen["unet"]
    dtype = self.dtype
    metrics = {"caption_drop": jnp.mean(drop.astype(jnp.float32))}
    if o["objective"] == "diffusion":
      fn = lambda x, t, cc: model(params, base, x.astype(dtype), t, cc)
      per_ex, aux = diffusion_loss(fn, x0, k_loss, schedule=self.schedule, prediction_type=self.prediction_type,
                                   cond=c, snr_gamma=float(o["snr_gamma"]) or None)
      metrics["mse"] = jnp.mean(aux["mse"])
      return jnp.mean(per_ex), metrics

    t, s = codi_timesteps(k_t, b, num_train_timesteps=self.schedule.num_train_timesteps,
                          grid_size=int(o["grid_size"]), mode=o["timesteps"], shared=bool(o["shared_t"]))
    eps = jax.random.normal(k_n, x0.shape, jnp.float32)
    if o["cfg_aware"]:
      w = jax.random.randint(k_w, (b,), int(o["cfg_min"]), int(o["cfg_max"])).astype(jnp.float32)
      null = jnp.broadcast_to(jnp.asarray(frozen["null_text"], jnp.float32), ctx.shape)
      u = {"ctx": null, "cond": cond}
      metrics["cfg_scale"] = jnp.mean(w)

      def guided(p, z, tt):
        return cfg_prediction(lambda x, t_, cc: model(p, base, x.astype(dtype), t_, cc), z, tt, c, u, w)
    else:
      guided = None

    def call(p, z, tt, use_cfg):
      if use_cfg and guided is not None:
        return guided(p, z, tt)
      return model(p, base, z.astype(dtype), tt, c)

    target = ema["target"]
    pred_fn = lambda z, tt: call(params, z, tt, True)
    target_fn = lambda z, tt: call(target, z, tt, True)
    if o["ode_model"] == "base":
      ode_fn = lambda z, tt: _base_apply(self.unet, base, z.astype(dtype), tt, c)
    elif o["cfg_aware"] and not o["cfg_ode"]:
      ode_fn = lambda z, tt: call(jax.lax.stop_gradient(params), z, tt, False)
    else:
      ode_fn = None  # the online prediction itself (stop-gradient): no second forward
    cons, guide = consistency_targets(pred_fn, ode_fn, target_fn, x0, eps, t, s, self.schedule,
                                      self.prediction_type, sigma_data=float(o["sigma_data"]),
                                      timestep_scaling=float(o["timestep_scaling"]), ode_noise=o["ode_noise"],
                                      consistency_space=o["consistency_space"], snr_gamma=float(o["snr_gamma"]))
    loss = float(o["consistency_weight"]) * jnp.mean(cons) + float(o["guidance_weight"]) * jnp.mean(guide)
    metrics.update({"consistency": jnp.mean(cons), "guidance": jnp.mean(guide),
                    "t": jnp.mean(t.astype(jnp.float32))})
    if o["adapter"] == "codi":
      metrics["mu"] = params["codi"]["mu"]
    return loss, metrics

  # -- sampling --------------------------------------------------------------------------------------

  def codi_sample_fn(self, sampler: str, steps: int, guided: bool):
    """The jitted `(params, frozen, ids, cond_uint8, x_T, guidance) -> images [B, H, W, 3] in [0, 1]`."""
    from diffusion_jax.core import samplers
    check_choice("CoDi sampler", sampler, CODI_SAMPLERS)
    o = self.opts
    if sampler == "consistency":
      sched, opts = self.schedule_settings("ddim")
      opts = {"grid_size": int(o["grid_size"]), "sigma_data": float(o["sigma_data"]),
              "timestep_scaling": float(o["timestep_scaling"])}
    else:
      sched, opts = self.schedule_settings(sampler)
    model = self.model_fn()
    key = (model.args, self.host.text_module, self.host.vae_config, getattr(self, "pixel_patch", 1), sampler,
           int(steps), bool(guided), json.dumps(sched, sort_keys=True), json.dumps(dict(opts), sort_keys=True, default=str))
    if key in _SAMPLE_FNS:
      return _SAMPLE_FNS[key]
    schedule = t2i.make_schedule_from(sched)
    pt = sched["prediction_type"]
    text_module, latent, vae_cfg, dtype = self.host.text_module, self.latent, self.host.vae_config, self.dtype
    patch = int(getattr(self, "pixel_patch", 1))  # a pixel-space base on space-to-depth patches

    def fn(params, frozen, ids, cond_u8, x_T, guidance):
      from diffusion_jax.models.vae import decode_latents
      ctx = t2i._text_states(text_module, frozen["text"], ids).astype(jnp.float32)
      cond = jnp.asarray(cond_u8, jnp.float32) / 255.0
      c = {"ctx": ctx, "cond": cond}
      kw = dict(num_steps=int(steps), schedule=schedule, prediction_type=pt, cond=c, **opts)
      if guided:
        kw["uncond"] = {"ctx": jnp.broadcast_to(jnp.asarray(frozen["null_text"], jnp.float32), ctx.shape),
                        "cond": cond}
        kw["guidance_scale"] = guidance
      denoise = jax.tree_util.Partial(model, params, frozen["unet"])
      x = samplers.sample(sampler, denoise, x_T.astype(dtype) if dtype != jnp.float32 else x_T, **kw)
      if latent:
        x = decode_latents(frozen["vae"], vae_cfg, x.astype(dtype), dtype=dtype)
      elif patch > 1:
        x = t2i.from_model_space(x, patch)
      return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

    _SAMPLE_FNS[key] = jax.jit(fn)
    return _SAMPLE_FNS[key]

  def sample_images(self, params, frozen, ids, cond, rng, *, x_T=None, sampler: Optional[str] = None,
                    steps: Optional[int] = None, guidance: Optional[float] = None):
    s = self.config.sample
    sampler = sampler or str(s.get("sampler", "consistency"))
    steps = int(steps or s.get("steps", 4))
    guidance = float(s.get("guidance", 1.0) if guidance is None else guidance)
    ids = jnp.asarray(ids, jnp.int32)
    if x_T is None:
      x_T = jax.random.normal(jax.random.fold_in(rng, 1), (ids.shape[0],) + self.latent_shape, jnp.float32)
    fn = self.codi_sample_fn(sampler, steps, guidance != 1.0)
    return fn(params, frozen, ids, jnp.asarray(cond), jnp.asarray(x_T, jnp.float32), jnp.float32(guidance))

  def sample(self, params, frozen, batch, rng):
    imgs = self.sample_images(params, frozen, batch["ids"], batch["cond"], rng)
    out = {"output": np.asarray(imgs)}
    if "ground_truth_flat" in batch:
      gt = np.asarray(batch["ground_truth_flat"])
      out["ground_truth"] = gt.reshape(gt.shape[0], self.image_size, self.image_size, 3)
    return out

  def eval_settings(self) -> Sequence[str]:
    """`config.eval.settings`: "sampler:steps" entries; default by objective (CoDi 1/2/4 consistency steps;
    the diffusion baseline 4 and 50 DDIM steps and 4 DPM-Solver++ steps)."""
    s = list(self.config.eval.get("settings", ()) or ())
    if s:
      return s
    if self.opts["objective"] == "codi":
      return ["consistency:1", "consistency:2", "consistency:4"]
    return ["ddim:4", "ddim:50", "dpmpp_2m:4"]

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    """Per setting of `eval_settings`: pixel MSE / PSNR to the ground truth and, on the shapes world, the parser's
    scores of the outputs against the scenes the conditions were rendered from (class, binding, shape / colour
    recall, count) and, with `config.eval.shapes_fd_path`, the shapes FD (eval/shapes_fd.py) of the outputs to
    the ground-truth images (`<setting>_shapes_fd`), next to its floor at the same count: ground truth vs as many
    independent real train-split images (`real_shapes_fd`). Without the key, `shapes_fd_status` says it is not
    computed. Same initial noise for every setting. Writes WORKDIR/samples/codi_eval.png:
    condition | each setting | ground truth."""
    from diffusion_jax.images import sample_sheet, save_png
    arr = t2i._CacheSource(self.cache("test")).arrays()
    num = min(int(self.config.eval.get("num_examples", 200)), len(arr["ids"]))
    bs = min(int(self.config.eval.get("batch_size", 100)), num)
    guidance = self.config.eval.get("guidance", None)
    gt = np.asarray(arr["image"][:num])
    out: Dict[str, Any] = {}
    sheet_cols: Dict[str, np.ndarray] = {}
    fd = self._shapes_fd
    if fd is not None:
      from diffusion_jax.eval.fid import frechet_distance
      to_pm1 = lambda u8: np.asarray(u8, np.float32) / 127.5 - 1.0
      gt_stats = fd.statistics(to_pm1(gt))
      gt_mu, gt_cov = gt_stats.mean(), gt_stats.cov()

      def fd_to_gt(u8):
        st = fd.statistics(to_pm1(u8))
        return frechet_distance(st.mean(), st.cov(), gt_mu, gt_cov)

      real = np.asarray(t2i._CacheSource(self.cache("train")).arrays()["image"][:num])
      out["real_shapes_fd"] = fd_to_gt(real)
      out["shapes_fd_num"] = int(min(num, len(real)))
      out["shapes_fd_sha256"] = fd.sha256
    else:
      out["shapes_fd_status"] = ("not computed: config.eval.shapes_fd_path is unset (make the network with "
                                 "`python scripts/shapes_fd.py train --out PATH`, docs/eval.md)")
    for setting in self.eval_settings():
      sampler, steps = str(setting).split(":")
      imgs = []
      for i, start in enumerate(range(0, num, bs)):
        ids = np.asarray(arr["ids"][start:start + bs])
        cond = np.asarray(arr["cond"][start:start + bs])
        k = len(ids)
        if k < bs:
          ids = np.concatenate([ids, np.repeat(ids[-1:], bs - k, 0)])
          cond = np.concatenate([cond, np.repeat(cond[-1:], bs - k, 0)])
        key = jax.random.fold_in(rng, i)
        x_T = jax.random.normal(key, (bs,) + self.latent_shape, jnp.float32)
        imgs.append(np.asarray(self.sample_images(params, frozen, ids, cond, key, x_T=x_T, sampler=sampler,
                                                  steps=int(steps), guidance=guidance))[:k])
      imgs = np.concatenate(imgs)
      tag = f"{sampler}{steps}_"
      mse = np.mean((imgs - gt.astype(np.float32) / 255.0) ** 2, axis=(1, 2, 3))
      out[tag + "pixel_mse"] = float(np.mean(mse))
      out[tag + "psnr"] = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))
      u8 = np.round(imgs * 255).astype(np.uint8)  # as a PNG would store them
      if fd is not None:
        out[tag + "shapes_fd"] = fd_to_gt(u8)
      if self.config.data.name == "shapes" and "objects" in arr:
        from diffusion_jax.eval import shapes_parser
        for k_, v in shapes_parser.score_all(u8, np.asarray(arr["objects"][:num])).items():
          out[tag + k_] = float(v)
      sheet_cols[f"{sampler} {steps}"] = imgs[:16]
    if workdir:
      n = min(16, num)
      cond = np.asarray(arr["cond"][:n])
      sheet = sample_sheet({"condition": cond[..., :3] if cond.shape[-1] == 4 else cond},
                           {**{k: v[:n] for k, v in sheet_cols.items()}, "ground truth": gt[:n]})
      if sheet is not None:
        save_png(os.path.join(workdir, "samples", "codi_eval.png"), sheet)
    return out

  # -- export ----------------------------------------------------------------------------------------

  def export(self, params, frozen, directory: str) -> None:
    from diffusion_jax.pretrained import io
    os.makedirs(directory, exist_ok=True)
    io.save_state_dict(io.flatten(jax.tree.map(np.asarray, jax.device_get(params))),
                       os.path.join(directory, "params.safetensors"))
    io.write_json({"adapter": self.opts["adapter"], "objective": self.opts["objective"], "task": self.task,
                   "cond_channels": self.cond_dim, "image_size": self.image_size,
                   "base_pipeline": os.path.abspath(self.stages["pipeline"]),
                   "prediction_type": self.prediction_type, "codi": {k: self.opts[k] for k in DEFAULTS}},
                  os.path.join(directory, "codi.json"))
    if self.opts["adapter"] == "pe_codi":
      from diffusion_jax.pretrained import diffusers_io
      diffusers_io.save_controlnet(os.path.join(directory, "controlnet"), self.control_config,
                                   jax.device_get(params["controlnet"]))


def _flatten_truth(ex: Dict[str, Any]) -> Dict[str, Any]:
  ex = dict(ex)
  img = ex.pop("image", None)
  if img is not None:
    ex["ground_truth_flat"] = np.asarray(img).reshape(np.asarray(img).shape[:-3] + (-1,))
  return ex
