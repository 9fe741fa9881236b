"""Samplers built from a diffusers `scheduler_config.json`.

    spec = from_diffusers_config("path/to/model/scheduler")          # dir, file or dict
    spec = from_diffusers_config(sd_config, class_name="UniPCMultistepScheduler")   # diffusers' from_config
    x0 = spec.sample(denoise_fn, x_T, num_steps=20, rng=key, cond=c, uncond=u, guidance_scale=7.5)

The class name (`_class_name`, or `class_name=`) picks the sampler, the schedule keys build the `Schedule`
(`spec.schedule`, also what a model was trained on) and the remaining keys become the sampler's options
(`spec.options`). Missing keys take diffusers' defaults for that class (they differ: Heun and LCM default to
other betas, DDPM/DDIM to `clip_sample=True`).

Every key is accounted for. A key this project does not support (an unimplemented feature such as dynamic
thresholding or exponential sigmas, a value outside what is implemented, or a key that is not an option of the
class) is reported, all of them in one `ValueError` before anything is built, with the supported values. Keys that
only matter when another key enables them (`dynamic_thresholding_ratio` without `thresholding`) and keys that have
no effect in diffusers' own scheduler either (LCM's `timestep_spacing`) are accepted. With `class_name=` set to
another class (diffusers' `Scheduler.from_config(other.config)`), keys that belong to other diffusers schedulers
are dropped, as diffusers drops them; `spec.ignored` lists them. `ignore_keys=` drops named keys deliberately.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

from diffusion_jax.core import samplers as samplers_lib
from diffusion_jax.core.schedules import Schedule, make_schedule, schedule_from_betas

CONFIG_NAME = "scheduler_config.json"
METADATA_KEYS = ("_class_name", "_diffusers_version", "_use_default_values", "_name_or_path")

_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")
_FINAL = ("zero", "sigma_min")

_SCHEDULE_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                          trained_betas=None, prediction_type="epsilon")


def _d(**kw):
  out = dict(_SCHEDULE_DEFAULTS)
  out.update(kw)
  return out


# Per diffusers class: our sampler, diffusers' defaults (checked against diffusers in the tests), the keys that map
# onto our options, the keys accepted only at their inert value, the keys accepted whatever their value (ignored
# because a disabled switch makes them inert, or because diffusers' class ignores them too).
_CLASSES: Dict[str, dict] = {
    "DDPMScheduler": dict(
        sampler="ddpm",
        defaults=_d(variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, thresholding=False,
                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
                    steps_offset=0, rescale_betas_zero_snr=False),
        options=("variance_type", "clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset"),
        inert=dict(thresholding=False), free=("dynamic_thresholding_ratio", "sample_max_value")),
    "DDIMScheduler": dict(
        sampler="ddim",
        defaults=_d(clip_sample=True, set_alpha_to_one=True, steps_offset=0, thresholding=False,
                    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0,
                    timestep_spacing="leading", rescale_betas_zero_snr=False),
        options=("clip_sample", "clip_sample_range", "set_alpha_to_one", "timestep_spacing", "steps_offset"),
        inert=dict(thresholding=False), free=("dynamic_thresholding_ratio", "sample_max_value")),
    "DPMSolverMultistepScheduler": dict(
        sampler="dpmpp",
        defaults=_d(solver_order=2, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                    euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0,
                    final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None,
                    timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
                    use_dynamic_shifting=False, time_shift_type="exponential"),
        options=("solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
                 "use_karras_sigmas", "final_sigmas_type", "lambda_min_clipped", "timestep_spacing", "steps_offset"),
        inert=dict(thresholding=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                   use_flow_sigmas=False, variance_type=None, use_dynamic_shifting=False),
        free=("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type")),
    "EulerDiscreteScheduler": dict(
        sampler="euler",
        defaults=_d(interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                    timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero"),
        options=("use_karras_sigmas", "timestep_spacing", "steps_offset", "final_sigmas_type"),
        inert=dict(interpolation_type="linear", use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None,
                   sigma_max=None, timestep_type="discrete"),
        free=()),
    "EulerAncestralDiscreteScheduler": dict(
        sampler="euler_ancestral",
        defaults=_d(timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False),
        options=("timestep_spacing", "steps_offset"), inert={}, free=()),
    "HeunDiscreteScheduler": dict(
        sampler="heun",
        defaults=_d(beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace",
                    steps_offset=0),
        options=("use_karras_sigmas", "clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset"),
        inert=dict(use_exponential_sigmas=False, use_beta_sigmas=False), free=()),
    "UniPCMultistepScheduler": dict(
        sampler="unipc",
        defaults=_d(solver_order=2, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                    predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[], solver_p=None,
                    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                    use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0,
                    final_sigmas_type="zero", rescale_betas_zero_snr=False, use_dynamic_shifting=False,
                    time_shift_type="exponential", sigma_min=None, sigma_max=None, shift_terminal=None),
        options=("solver_order", "predict_x0", "solver_type", "lower_order_final", "disable_corrector",
                 "use_karras_sigmas", "final_sigmas_type", "timestep_spacing", "steps_offset"),
        inert=dict(thresholding=False, solver_p=None, use_exponential_sigmas=False, use_beta_sigmas=False,
                   use_flow_sigmas=False, use_dynamic_shifting=False, sigma_min=None, sigma_max=None,
                   shift_terminal=None),
        free=("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type")),
    "LCMScheduler": dict(
        sampler="lcm",
        defaults=_d(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=50,
                    clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                    thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                    timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False),
        options=("original_inference_steps", "timestep_scaling", "clip_sample", "clip_sample_range"),
        inert=dict(thresholding=False),
        # No effect on diffusers' LCMScheduler sampling either: its grid ignores the spacing and offset, and the
        # final alpha is never reached (the last step returns the denoised sample).
        free=("dynamic_thresholding_ratio", "sample_max_value", "set_alpha_to_one", "steps_offset",
              "timestep_spacing")),
}
for _spec in _CLASSES.values():
  _spec["schedule"] = tuple(k for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                        "trained_betas", "rescale_betas_zero_snr") if k in _spec["defaults"])

SUPPORTED_CLASSES = tuple(sorted(_CLASSES))
# Keys of other diffusers schedulers (dropped, as diffusers' from_config drops them, when converting classes).
_OTHER_KEYS = frozenset(k for s in _CLASSES.values() for k in s["defaults"]) | {"skip_prk_steps"}

# Values diffusers itself rewrites on construction (what `from_config` of another class's config gives).
_DIFFUSERS_REMAPS = {
    "DPMSolverMultistepScheduler": dict(algorithm_type={"deis": "dpmsolver++"},
                                        solver_type={"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}),
    "UniPCMultistepScheduler": dict(solver_type={"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}),
}


@dataclasses.dataclass(frozen=True)
class DiffusersScheduler:
  """A sampler configured from a diffusers scheduler config.

  Attributes:
    class_name: the diffusers scheduler class it mirrors.
    sampler: the `core.SAMPLERS` name it runs.
    schedule: the noise schedule (betas / alphas_cumprod) of the config.
    options: keyword options passed to the sampler (prediction_type, spacing, solver settings, ...).
    ignored: config keys dropped (metadata excluded): other schedulers' keys when converting, `ignore_keys`.
  """
  class_name: str
  sampler: str
  schedule: Schedule
  options: Mapping[str, Any]
  ignored: Tuple[str, ...] = ()

  def sample(self, denoise_fn: Callable, x_T, *, num_steps: int, **kwargs):
    """Runs the sampler; `kwargs` (rng, step_noise, cond, uncond, guidance_*, unroll, or any option) override."""
    return samplers_lib.sample(self.sampler, denoise_fn, x_T, num_steps=num_steps, schedule=self.schedule,
                               **{**dict(self.options), **kwargs})

  __call__ = sample


def load_config(config: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
  """A config dict from a dict, a JSON file, or a directory holding `scheduler_config.json` (or `scheduler/`)."""
  if isinstance(config, Mapping):
    return dict(config)
  path = os.fspath(config)
  if os.path.isdir(path):
    for cand in (os.path.join(path, CONFIG_NAME), os.path.join(path, "scheduler", CONFIG_NAME)):
      if os.path.isfile(cand):
        path = cand
        break
    else:
      raise FileNotFoundError(f"No {CONFIG_NAME} in {path!r} or its 'scheduler' sub-directory.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Scheduler config {path!r} does not exist.")
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"Scheduler config {path!r} is not valid JSON: {e}.") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"Scheduler config {path!r} must hold a JSON object, got {type(cfg).__name__}.")
  return cfg


def _fmt(v):
  return repr(v)


def from_diffusers_config(config: Union[str, os.PathLike, Mapping[str, Any]], *, class_name: Optional[str] = None,
                          ignore_keys: Iterable[str] = ()) -> DiffusersScheduler:
  """Builds a `DiffusersScheduler` from a diffusers scheduler config (dict, JSON file or directory).

  Args:
    config: the config (its `_class_name` picks the scheduler unless `class_name` is given).
    class_name: use this scheduler class instead (diffusers' `Class.from_config(config)`); keys that belong to
      other diffusers schedulers are then dropped (`.ignored`), as diffusers drops them.
    ignore_keys: keys to drop deliberately (e.g. a feature you accept losing).

  Raises:
    ValueError: an unknown class (with the supported ones), or, in one message, every key this project does not
      support, each with the reason and the supported values.
  """
  cfg = load_config(config)
  ignore = set(ignore_keys)
  src = cfg.get("_class_name")
  cls = class_name or src
  if cls is None:
    raise ValueError(f"The scheduler config has no '_class_name'; pass class_name= one of: "
                     f"{', '.join(SUPPORTED_CLASSES)}.")
  if cls not in _CLASSES:
    hint = ""
    if cls == "PNDMScheduler":
      hint = (" PNDM (PLMS) is not implemented; Stable Diffusion checkpoints ship a PNDMScheduler config that "
              "pipelines routinely swap for another scheduler: pass class_name='UniPCMultistepScheduler' (or "
              "'DDIMScheduler', 'DPMSolverMultistepScheduler', ...), as diffusers' from_config does.")
    raise ValueError(f"Unsupported diffusers scheduler class {cls!r}. Supported classes: "
                     f"{', '.join(SUPPORTED_CLASSES)}.{hint}")
  spec = _CLASSES[cls]
  converting = class_name is not None and src is not None and class_name != src
  merged = dict(spec["defaults"])
  problems, ignored = [], []
  for key, value in cfg.items():
    if key in METADATA_KEYS:
      continue
    if key in ignore:
      ignored.append(key)
      continue
    if key not in spec["defaults"]:
      if converting and key in _OTHER_KEYS:
        ignored.append(key)
        continue
      problems.append(f"{key}={_fmt(value)}: not an option of {cls} (its options: "
                      f"{', '.join(sorted(spec['defaults']))})")
      continue
    remap = _DIFFUSERS_REMAPS.get(cls, {}).get(key, {})
    if isinstance(value, str) and value in remap:
      value = remap[value]
    merged[key] = value
  for key, inert in spec["inert"].items():
    if key in merged and key not in ignored and merged[key] != inert and not (
        inert is False and merged[key] in (0, None)):
      problems.append(f"{key}={_fmt(merged[key])}: not supported (only {_fmt(inert)}, i.e. the feature off, is "
                      f"implemented)")
  opts, sched_kw = _options(cls, spec, merged, problems)
  if problems:
    raise ValueError(f"{cls} config: {len(problems)} key(s) not supported by diffusion_jax:\n  - "
                     + "\n  - ".join(problems)
                     + "\nFix or remove them, or pass ignore_keys=[...] to drop them deliberately.")
  schedule = _schedule(sched_kw)
  return DiffusersScheduler(class_name=cls, sampler=spec["sampler"], schedule=schedule, options=opts,
                            ignored=tuple(ignored))


def _check(problems, key, value, valid):
  if value not in valid:
    problems.append(f"{key}={_fmt(value)}: supported values are {', '.join(map(_fmt, valid))}")
    return False
  return True


def _bool(problems, key, value):
  if not isinstance(value, bool):
    problems.append(f"{key}={_fmt(value)}: must be true or false")
    return False
  return True


def _options(cls, spec, m, problems):
  """Maps the merged config onto (sampler options, schedule keys), appending problems."""
  opts: Dict[str, Any] = {}
  _check(problems, "prediction_type", m["prediction_type"], _PREDICTION_TYPES)
  opts["prediction_type"] = m["prediction_type"]
  names = spec["options"]
  if "timestep_spacing" in names and _check(problems, "timestep_spacing", m["timestep_spacing"], _SPACINGS):
    opts["timestep_spacing"] = m["timestep_spacing"]
  if "steps_offset" in names:
    if isinstance(m["steps_offset"], bool) or not isinstance(m["steps_offset"], int) or m["steps_offset"] < 0:
      problems.append(f"steps_offset={_fmt(m['steps_offset'])}: must be an integer >= 0")
    else:
      opts["steps_offset"] = m["steps_offset"]
  if "clip_sample" in names and _bool(problems, "clip_sample", m["clip_sample"]):
    opts["clip_sample"] = float(m["clip_sample_range"]) if m["clip_sample"] else None
  if "variance_type" in names and _check(problems, "variance_type", m["variance_type"], samplers_lib.VARIANCE_TYPES):
    opts["variance_type"] = m["variance_type"]
  for key in ("set_alpha_to_one", "lower_order_final", "euler_at_final", "use_karras_sigmas", "predict_x0"):
    if key in names and _bool(problems, key, m[key]):
      opts[key] = m[key]
  if "solver_order" in names and _check(problems, "solver_order", m["solver_order"], samplers_lib.SOLVER_ORDERS):
    opts["solver_order"] = m["solver_order"]
  if "algorithm_type" in names and _check(problems, "algorithm_type", m["algorithm_type"],
                                          samplers_lib.DPM_ALGORITHM_TYPES):
    opts["algorithm_type"] = m["algorithm_type"]
  if "solver_type" in names:
    valid = samplers_lib.UNIPC_SOLVER_TYPES if cls == "UniPCMultistepScheduler" else samplers_lib.DPM_SOLVER_TYPES
    if _check(problems, "solver_type", m["solver_type"], valid):
      opts["solver_type"] = m["solver_type"]
  if "final_sigmas_type" in names and _check(problems, "final_sigmas_type", m["final_sigmas_type"], _FINAL):
    opts["final_sigmas_type"] = m["final_sigmas_type"]
  if "lambda_min_clipped" in names:
    try:
      opts["lambda_min_clipped"] = float(m["lambda_min_clipped"])
    except (TypeError, ValueError):
      problems.append(f"lambda_min_clipped={_fmt(m['lambda_min_clipped'])}: must be a number")
  if "disable_corrector" in names:
    dc = m["disable_corrector"]
    if not isinstance(dc, (list, tuple)) or not all(isinstance(k, int) and not isinstance(k, bool) for k in dc):
      problems.append(f"disable_corrector={_fmt(dc)}: must be a list of step indices")
    else:
      opts["disable_corrector"] = tuple(dc)
  for key, typ in (("original_inference_steps", int), ("timestep_scaling", float)):
    if key in names:
      try:
        opts[key] = typ(m[key])
      except (TypeError, ValueError):
        problems.append(f"{key}={_fmt(m[key])}: must be a number")
  sched_kw = {k: m[k] for k in spec["schedule"]}
  sched_kw.setdefault("rescale_betas_zero_snr", False)
  if sched_kw["trained_betas"] is None:
    _check(problems, "beta_schedule", sched_kw["beta_schedule"], tuple(_BETA_SCHEDULES))
  if not isinstance(sched_kw["num_train_timesteps"], int) or sched_kw["num_train_timesteps"] < 1:
    problems.append(f"num_train_timesteps={_fmt(sched_kw['num_train_timesteps'])}: must be an integer >= 1")
  _bool(problems, "rescale_betas_zero_snr", sched_kw["rescale_betas_zero_snr"])
  return opts, sched_kw


def _schedule(kw) -> Schedule:
  if kw["trained_betas"] is not None:
    betas = list(kw["trained_betas"])
    if len(betas) != kw["num_train_timesteps"]:
      raise ValueError(f"trained_betas has {len(betas)} values but num_train_timesteps={kw['num_train_timesteps']}.")
    return schedule_from_betas(betas, name="trained_betas", rescale_zero_snr=kw["rescale_betas_zero_snr"])
  return make_schedule(_BETA_SCHEDULES[kw["beta_schedule"]], num_train_timesteps=kw["num_train_timesteps"],
                       beta_start=float(kw["beta_start"]), beta_end=float(kw["beta_end"]),
                       rescale_zero_snr=kw["rescale_betas_zero_snr"])
