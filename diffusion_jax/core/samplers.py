"""Samplers: each runs its whole loop inside ONE `jax.jit` (`lax.scan`), no Python per step.

| name (`sample(name, ...)`) | function | diffusers counterpart |
|---|---|---|
| "ddpm" | `ddpm_sample` | DDPMScheduler |
| "ddim" | `ddim_sample` | DDIMScheduler |
| "dpmpp" / "dpmpp_2m" | `dpmpp_sample` / `dpmpp_2m_sample` | DPMSolverMultistepScheduler (orders 1-3, SDE) |
| "unipc" | `unipc_sample` | UniPCMultistepScheduler |
| "euler" | `euler_sample` | EulerDiscreteScheduler |
| "euler_ancestral" | `euler_ancestral_sample` | EulerAncestralDiscreteScheduler |
| "heun" | `heun_sample` | HeunDiscreteScheduler |
| "lcm" | `lcm_sample` | LCMScheduler |
| "edm_heun" | `edm_sample` | (EDM Alg. 2; no diffusers scheduler) |
| "consistency" | `consistency_sample` | (CoDi's released rollout) |

A diffusers `scheduler_config.json` maps onto these with `scheduler_config.from_diffusers_config`.
Unknown keyword options raise a TypeError that names the closest valid option and lists all of them; unknown
values raise a ValueError listing the valid ones; a grid with a zero or negative step (repeated timesteps or
sigmas) is refused before anything is compiled.

Calling convention (all samplers)::

    x0 = ddim_sample(denoise_fn, x_T, num_steps=50, schedule=sched, prediction_type="epsilon",
                     rng=key, cond=labels, uncond=null_labels, guidance_scale=4.0)

* `denoise_fn(x, t, cond) -> prediction`: `x` has `x_T`'s shape and dtype, `t` is a float32 `[B]` array in
  the model's time convention (see each sampler: the DDPM integer index for discrete schedules, possibly
  fractional for Euler with Karras sigmas; `c_noise = ln(sigma)/4` for `edm_sample` with
  prediction_type="edm"), `cond` is whatever the caller passed (any pytree with batch-leading leaves, or
  None). The prediction is eps / v / x0 per `prediction_type`; with `variance_type="learned_range"` it has
  2C channels on the last axis (eps then the variance interpolation value in [-1, 1]).
* `x_T`: standard-normal noise of the output shape `[B, ...]` (channels last). Samplers working in VE
  sigma space (`euler_sample`, `euler_ancestral_sample`, `heun_sample`, `edm_sample`) scale it by their
  initial sigma themselves (diffusers' `init_noise_sigma`).
* Schedules: sigma-space samplers read `Schedule.solver_sigmas()` (diffusers' table: only a zero-SNR terminal
  alphas_cumprod becomes 2^-24; small values such as the cosine schedule's 2.4e-9 are used as they are).
* The result has `x_T`'s shape and dtype; the update arithmetic runs in float32 whatever the input dtype
  (bf16 inputs are fine: the network sees bf16, the solver state stays fp32).

No re-tracing: every per-step coefficient is computed on the host (NumPy float64, as diffusers does) and
passed into the jitted loop as an array, so the compiled loop is keyed only on static settings (sampler,
parameterisation, guidance layout), the input shapes and `num_steps`. The network parameters must reach
the loop as a *traced argument*, not as Python constants baked into a fresh closure. Either

* pass `jax.tree_util.Partial(apply_fn, params)` as `denoise_fn` with a module-level (or otherwise
  long-lived) `apply_fn(params, x, t, cond)`; the `Partial`'s leaves (params) are traced and its
  function is part of the cache key, so new parameter values do not re-trace; or
* pass the same plain function object every time (it is a cache key as well).

A new closure (e.g. `lambda x, t, c: model.apply(params, x, t, c)` built inside a loop) is a new cache
key and re-traces on every call.

`unroll` (all samplers, static): `lax.scan` unroll factor. 1 (default) keeps compile time independent of
`num_steps`; on multi-core CPUs XLA parallelises ops inside a rolled loop body less well than top-level ops,
so a fully unrolled loop (`unroll=num_steps`) can be faster there at the price of compile time (see the
benchmark in the README).

Guidance (all samplers): `cond`, `uncond` (same pytree structure), `guidance_scale` (traced: changing it
does not re-trace), `guidance_schedule` ("constant" | "power_cosine"), `guidance_power` (p = 4 for
DiffiT ImageNet-256), `guidance_channels` (guide only the first k output channels; defaults to the eps
channels when the output carries a learned variance). See `guidance.py` for the batch layout.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.core import guidance as guidance_lib
from diffusion_jax.core import parameterization as param_lib
from diffusion_jax.core.schedules import Schedule, karras_sigmas, sigma_to_t, spacing_timesteps
from diffusion_jax.registry import Registry, check_choice

SAMPLERS = Registry("sampler")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")

f32 = jnp.float32


class _Static(NamedTuple):
  """Hashable settings that select a compiled loop."""
  prediction_type: str
  guided: bool
  guidance_schedule: str
  guidance_power: float
  guidance_channels: Optional[int]
  num_train_timesteps: int
  extra: tuple = ()
  unroll: int = 1


def _as_partial(fn) -> Partial:
  if isinstance(fn, Partial):
    return fn
  if not callable(fn):
    raise TypeError(f"denoise_fn must be callable (fn(x, t, cond) -> prediction), got {type(fn).__name__}.")
  return Partial(fn)


def _check_schedule(schedule, sampler: str) -> Schedule:
  if not isinstance(schedule, Schedule):
    raise TypeError(f"{sampler} needs `schedule=` a diffusion_jax.core.schedules.Schedule (from make_schedule), "
                    f"got {type(schedule).__name__}.")
  return schedule


def _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                     guidance_channels, T, extra=(), unroll=1):
  check_choice("guidance schedule", guidance_schedule, guidance_lib.GUIDANCE_SCHEDULES)
  guided = guidance_lib.check_guidance(guidance_scale, uncond, cond)
  if guided:
    ts = jax.tree_util.tree_structure(cond)
    us = jax.tree_util.tree_structure(uncond)
    if ts != us:
      raise ValueError(f"cond and uncond must have the same pytree structure, got {ts} and {us}.")
  scale = jnp.asarray(1.0 if guidance_scale is None else guidance_scale, f32)
  static = _Static(prediction_type, guided, guidance_schedule, float(guidance_power),
                   None if guidance_channels is None else int(guidance_channels), int(T), tuple(extra),
                   max(1, int(unroll)))
  return static, scale


def _call_model(fn, x, t_scalar, cond, uncond, gscale, st: _Static, in_dtype, channels=None):
  """One (possibly guided) network evaluation at a scalar time; returns float32."""
  tb = jnp.full((x.shape[0],), t_scalar, f32)
  ch = st.guidance_channels if st.guidance_channels is not None else channels
  out = guidance_lib.guided_call(
      fn, x.astype(in_dtype), tb, cond, uncond if st.guided else None, gscale,
      schedule=st.guidance_schedule, num_train_timesteps=st.num_train_timesteps, power=st.guidance_power,
      channels=ch)
  return out.astype(f32)


def _step_keys(rng, n, step_noise, shape, name):
  if step_noise is not None:
    step_noise = jnp.asarray(step_noise, f32)
    if step_noise.shape != (n,) + tuple(shape):
      raise ValueError(f"{name}: step_noise must have shape (num_steps,) + x_T.shape = {(n,) + tuple(shape)}, "
                       f"got {step_noise.shape}.")
    return None, step_noise
  if rng is None:
    raise ValueError(f"{name} is stochastic: pass `rng=` (a jax.random key) or `step_noise=`.")
  return jax.random.split(rng, n), None


def _noise_for(key, noise, shape):
  return noise if noise is not None else jax.random.normal(key, shape, f32)


def _np32(d):
  return {k: jnp.asarray(np.asarray(v, np.float64), f32) for k, v in d.items()}


def _register(name: str):
  """Registers a sampler under `name` and checks its keyword options: an unknown option (a typo, or a diffusers
  config key passed straight through) names itself, the closest valid option and the full list."""

  def deco(fn):
    params = inspect.signature(fn).parameters
    valid = [k for k, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY]

    @functools.wraps(fn)
    def wrapper(denoise_fn, x_T, **kwargs):
      unknown = [k for k in kwargs if k not in params or k in ("denoise_fn", "x_T")]
      if unknown:
        hints = []
        for k in unknown:
          close = difflib.get_close_matches(k, valid, n=1)
          hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"{fn.__name__} (sampler {name!r}) got unknown option(s) {', '.join(hints)}. "
                        f"Valid options: {', '.join(valid)}.")
      return fn(denoise_fn, x_T, **kwargs)

    wrapper.options = tuple(valid)
    SAMPLERS.register(name)(wrapper)
    return wrapper

  return deco


# ----------------------------------------------------------------------------- DDPM

@functools.partial(jax.jit, static_argnames=("st",))
def _ddpm_loop(fn, x_T, keys, step_noise, co, cond, uncond, gscale, st: _Static):
  variance_type, clip = st.extra
  in_dtype = x_T.dtype
  C = x_T.shape[-1]

  def body(x, xs):
    c, key, nz = xs
    out = _call_model(fn, x, c["t"], cond, uncond, gscale, st, in_dtype,
                      channels=C if variance_type == "learned_range" else None)
    if variance_type == "learned_range":
      if out.shape[-1] != 2 * C:
        raise ValueError(f"variance_type='learned_range' needs a model output with 2C = {2 * C} channels "
                         f"(last axis), got {out.shape[-1]}.")
      out, v = out[..., :C], out[..., C:]
    x0, _ = param_lib.predict_x0_eps(out, x, c["alpha"], c["sigma"], st.prediction_type)
    if clip is not None:
      x0 = jnp.clip(x0, -clip, clip)
    mean = c["c0"] * x0 + c["c1"] * x
    if variance_type == "fixed_small":
      std = c["std_small"]
    elif variance_type == "fixed_large":
      std = c["std_large"]
    else:
      frac = (v + 1.0) / 2.0
      std = jnp.exp(0.5 * (frac * c["log_beta"] + (1.0 - frac) * c["log_var_small"]))
    noise = _noise_for(key, nz, x.shape)
    x = mean + c["nonzero"] * std * noise
    return x, None

  x, _ = jax.lax.scan(body, x_T.astype(f32), (co, keys, step_noise), unroll=st.unroll)
  return x.astype(in_dtype)


@_register("ddpm")
def ddpm_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                rng=None, cond=None, uncond=None, guidance_scale=None, guidance_schedule: str = "constant",
                guidance_power: float = 4.0, guidance_channels: Optional[int] = None, unroll: int = 1,
                timestep_spacing: str = "leading", steps_offset: int = 0,
                variance_type: str = "fixed_small", clip_sample: Optional[float] = None, step_noise=None):
  """DDPM ancestral sampling (Ho et al. 2020), diffusers `DDPMScheduler` semantics.

  Timesteps from `spacing_timesteps(..., variant="ddpm")`; the previous timestep is the next one in that
  list (-1 -> alphas_cumprod = 1 after the last). Per step, with a = alphas_cumprod:
  beta = 1 - a_t / a_prev, mean = sqrt(a_prev) beta / (1 - a_t) x0 + sqrt(1 - beta) (1 - a_prev) / (1 - a_t) x_t,
  variance "fixed_small" = (1 - a_prev) / (1 - a_t) beta (clamped at 1e-20), "fixed_large" = beta,
  "learned_range" (ADM/DiT learned sigma; model output has 2C channels, eps then v in [-1, 1]):
  log var = frac log(beta) + (1 - frac) log(fixed_small), frac = (v + 1) / 2. No noise is added at t = 0.
  Respacing: a_t/a_prev on the sub-sequence is exactly ADM's respaced-beta construction.

  Model time: the integer DDPM index (as float32 `[B]`).
  `step_noise` (`[num_steps, *x_T.shape]`) replaces the per-step Gaussian noise (for reproducibility tests).
  `clip_sample`: clip x0_hat to [-c, c] (diffusers' `clip_sample=True` means c = 1); None = off.
  """
  schedule = _check_schedule(schedule, "ddpm_sample")
  param_lib.check_prediction_type(prediction_type)
  check_choice("DDPM variance type", variance_type, VARIANCE_TYPES)
  T = schedule.num_train_timesteps
  ts = spacing_timesteps(T, num_steps, timestep_spacing, steps_offset, variant="ddpm")
  # Coefficients in float32 with diffusers' operation order (the schedule is float32 there), so that the
  # sampler reproduces DDPMScheduler to float32 round-off.
  ac = schedule.alphas_cumprod.astype(np.float32)
  one = np.float32(1.0)
  prev = np.concatenate([ts[1:], [-1]])
  a_t = ac[ts]
  a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], one).astype(np.float32)
  b_t, b_p = one - a_t, one - a_p
  cur_alpha = a_t / a_p
  beta = one - cur_alpha
  var_small = np.maximum(b_p / b_t * beta, np.float32(1e-20))
  with np.errstate(divide="ignore"):
    log_beta = np.log(np.maximum(beta, np.float32(1e-38)))
  co = _np32(dict(t=ts, alpha=a_t ** 0.5, sigma=b_t ** 0.5,
                  c0=a_p ** 0.5 * beta / b_t, c1=cur_alpha ** 0.5 * b_p / b_t,
                  std_small=var_small ** 0.5, std_large=beta ** 0.5, log_var_small=np.log(var_small),
                  log_beta=log_beta, nonzero=(ts > 0).astype(np.float32)))
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T,
                                (variance_type, None if clip_sample is None else float(clip_sample)),
                                unroll=unroll)
  keys, step_noise = _step_keys(rng, len(ts), step_noise, x_T.shape, "ddpm_sample")
  return _ddpm_loop(_as_partial(denoise_fn), x_T, keys, step_noise, co, cond, uncond, gscale, st)


# ----------------------------------------------------------------------------- DDIM

@functools.partial(jax.jit, static_argnames=("st",))
def _ddim_loop(fn, x_T, keys, step_noise, co, eta, cond, uncond, gscale, st: _Static):
  clip, stochastic = st.extra
  in_dtype = x_T.dtype

  def body(x, xs):
    c, key, nz = xs
    out = _call_model(fn, x, c["t"], cond, uncond, gscale, st, in_dtype)
    x0, eps = param_lib.predict_x0_eps(out, x, c["alpha"], c["sigma"], st.prediction_type)
    if clip is not None:
      x0 = jnp.clip(x0, -clip, clip)
    std = eta * c["std1"]
    x = c["alpha_prev"] * x0 + jnp.sqrt(jnp.maximum(c["one_minus_a_prev"] - std * std, 0.0)) * eps
    if stochastic:
      x = x + std * _noise_for(key, nz, x.shape)
    return x, None

  x, _ = jax.lax.scan(body, x_T.astype(f32), (co, keys, step_noise), unroll=st.unroll)
  return x.astype(in_dtype)


@_register("ddim")
def ddim_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                eta: float = 0.0, rng=None, cond=None, uncond=None, guidance_scale=None,
                guidance_schedule: str = "constant", guidance_power: float = 4.0,
                guidance_channels: Optional[int] = None, unroll: int = 1, timestep_spacing: str = "leading",
                steps_offset: int = 0,
                set_alpha_to_one: bool = True, clip_sample: Optional[float] = None, step_noise=None):
  """DDIM (Song et al. 2021, Eq. 12), diffusers `DDIMScheduler` semantics.

  prev_t = t - T // num_steps (alphas_cumprod at prev_t < 0 is 1, or alphas_cumprod[0] if
  `set_alpha_to_one=False`). x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std z with
  std = eta * sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)). eta = 0 is deterministic (no rng needed).
  Model time: the integer DDPM index.
  """
  schedule = _check_schedule(schedule, "ddim_sample")
  param_lib.check_prediction_type(prediction_type)
  T = schedule.num_train_timesteps
  ts = spacing_timesteps(T, num_steps, timestep_spacing, steps_offset, variant="ddpm")
  ac = schedule.alphas_cumprod.astype(np.float32)
  one = np.float32(1.0)
  prev = ts - T // num_steps
  final = one if set_alpha_to_one else ac[0]
  a_t = ac[ts]
  a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
  var = (one - a_p) / (one - a_t) * (one - a_t / a_p)
  co = _np32(dict(t=ts, alpha=a_t ** 0.5, sigma=(one - a_t) ** 0.5, alpha_prev=a_p ** 0.5,
                  one_minus_a_prev=one - a_p, std1=np.maximum(var, 0.0) ** 0.5))
  stochastic = not (isinstance(eta, (int, float)) and float(eta) == 0.0)
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, (None if clip_sample is None else float(clip_sample), stochastic),
                                unroll=unroll)
  keys, noise = (None, None)
  if stochastic:
    keys, noise = _step_keys(rng, len(ts), step_noise, x_T.shape, "ddim_sample with eta > 0")
  return _ddim_loop(_as_partial(denoise_fn), x_T, keys, noise, co, jnp.asarray(eta, f32), cond, uncond,
                    gscale, st)


# ----------------------------------------------------------------------------- sigma-space helpers

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
DPM_ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
DPM_SOLVER_TYPES = ("midpoint", "heun")
UNIPC_SOLVER_TYPES = ("bh1", "bh2")
SOLVER_ORDERS = (1, 2, 3)


def _check_order(sampler: str, order) -> int:
  if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or int(order) not in SOLVER_ORDERS:
    raise ValueError(f"Unknown {sampler} solver_order {order!r}. Valid solver_order values: "
                     f"{', '.join(map(str, SOLVER_ORDERS))}.")
  return int(order)


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {value!r}.")
  return bool(value)


def _is_cosine(schedule: Schedule) -> bool:
  return schedule.name in ("cosine", "squaredcos_cap_v2")


def _where(sampler: str, schedule: Schedule, num_steps: int, timestep_spacing: str, **extra) -> str:
  s = (f"{sampler} with schedule {schedule.name!r} (T={schedule.num_train_timesteps}"
       + (", zero-SNR" if schedule.rescale_zero_snr else "")
       + f"), timestep_spacing={timestep_spacing!r}, num_steps={num_steps}")
  return s + "".join(f", {k}={v!r}" for k, v in extra.items())


def _check_sigma_grid(sig, where: str, hint: str = ""):
  """`sig` `[n + 1]` (final 0 or sigma_min): every step must strictly lower sigma (a zero step is a division by
  zero in the multistep solvers and a wasted network call in the others)."""
  sig = np.asarray(sig, np.float64)
  if not np.all(np.isfinite(sig)):
    raise ValueError(f"{where}: the sigma grid is not finite (first {sig[0]:g}).")
  d = np.diff(sig)
  if np.any(d >= 0):
    i = int(np.argmax(d >= 0))
    raise ValueError(f"{where} gives a zero or negative step: step {i} goes from sigma {sig[i]:.6g} to "
                     f"{sig[i + 1]:.6g}. " + (hint or "Use fewer steps or another timestep_spacing."))


def _ve_coefs(s) -> dict:
  """Per-step float32 constants of a VE-sigma step, in diffusers' float32 order of operations."""
  s = np.asarray(s, np.float32)
  denom = (s * s + np.float32(1.0)).astype(np.float32)
  sqrt_denom = (denom ** np.float32(0.5)).astype(np.float32)
  return dict(sigma=s, denom=denom, sqrt_denom=sqrt_denom, v_coef=(-s / sqrt_denom).astype(np.float32))


def _ve_x0(out, x, c, prediction_type):
  """x0 from a model output in VE sigma space (diffusers' Euler/Heun formulas)."""
  if prediction_type == "epsilon":
    return x - c["sigma"] * out
  if prediction_type == "v_prediction":
    return out * c["v_coef"] + x / c["denom"]
  return out


def _clip(x0, clip):
  return x0 if clip is None else jnp.clip(x0, -clip, clip)


def _lambdas(sig):
  """(alpha, sigma, lambda) of a VE sigma grid (float64; lambda = +inf at sigma = 0)."""
  s = np.asarray(sig, np.float64)
  alpha = 1.0 / np.sqrt(s * s + 1.0)
  sigma = s * alpha
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma)
  return alpha, sigma, lam


# ----------------------------------------------------------------------------- sigma grids (diffusers set_timesteps)

def euler_sigmas(schedule: Schedule, num_steps: int, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 use_karras_sigmas: bool = True, rho: float = 7.0, final_sigmas_type: str = "zero"):
  """(timesteps `[n]`, VE sigmas `[n + 1]`) as diffusers' `EulerDiscreteScheduler.set_timesteps` (also
  `EulerAncestralDiscreteScheduler` and `HeunDiscreteScheduler` without the repetition): sigmas interpolated
  at the spaced (float) timesteps, optionally re-gridded with Karras sigmas between their ends (timesteps then
  fractional, log-sigma interpolation), then the final sigma (0, or the schedule's smallest for "sigma_min")."""
  check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
  T = schedule.num_train_timesteps
  ts = spacing_timesteps(T, num_steps, timestep_spacing, steps_offset, variant="euler")
  table = schedule.solver_sigmas()
  sig = np.interp(ts, np.arange(T), table)
  if use_karras_sigmas:
    sig = karras_sigmas(num_steps, float(sig[-1]), float(sig[0]), rho)
    ts = sigma_to_t(np.asarray(sig, np.float64), np.log(table))
  last = float(table[0]) if final_sigmas_type == "sigma_min" else 0.0
  sig = np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)
  return np.asarray(ts, np.float32).astype(np.float64), sig


def dpm_sigmas(schedule: Schedule, num_steps: int, timestep_spacing: str = "linspace", steps_offset: int = 0,
               use_karras_sigmas: bool = False, final_sigmas_type: str = "zero",
               lambda_min_clipped: float = -math.inf, variant: str = "dpm"):
  """(integer timesteps `[n]`, VE sigmas `[n + 1]`) as diffusers' `DPMSolverMultistepScheduler.set_timesteps`
  (`variant="dpm"`) or `UniPCMultistepScheduler.set_timesteps` (`variant="unipc"`).

  Spacings build n + 1 points and drop the last ("leading"/"linspace"); `lambda_min_clipped` (DPM only) ends
  the grid where lambda = log(alpha / sigma) falls below it. Karras sigmas span the schedule's whole sigma
  range; their timesteps are rounded (DPM on a cosine schedule: truncated, as diffusers' int64 cast does).
  Final sigma: 0 ("zero") or the schedule's smallest sigma ("sigma_min"; UniPC with Karras sigmas: the last
  Karras sigma).
  """
  check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
  check_choice("multistep grid variant", variant, ("dpm", "unipc"))
  T = schedule.num_train_timesteps
  table = schedule.solver_sigmas()
  last_t = None
  if variant == "dpm" and lambda_min_clipped > -math.inf:
    ac = schedule.solver_alphas_cumprod.astype(np.float32)
    lam = (np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))).astype(np.float32)
    last_t = T - int(np.searchsorted(lam[::-1], np.float32(lambda_min_clipped), side="left"))
    if last_t < 1:
      raise ValueError(f"lambda_min_clipped={lambda_min_clipped} clips every timestep of schedule {schedule.name!r}; "
                       f"its lambda ranges over [{lam.min():.3g}, {lam.max():.3g}].")
  ts = spacing_timesteps(T, num_steps, timestep_spacing, steps_offset, variant="dpm", last_timestep=last_t)
  if use_karras_sigmas:
    sig = karras_sigmas(num_steps, float(table[0]), float(table[-1]))
    tf = sigma_to_t(np.asarray(sig, np.float64), np.log(table))
    if variant == "dpm" and _is_cosine(schedule):
      ts = np.trunc(tf).astype(np.int64)  # diffusers skips .round() for squaredcos_cap_v2, then casts to int64
    else:
      ts = np.round(tf).astype(np.int64)
    last = float(sig[-1]) if variant == "unipc" else float(table[0])
  else:
    sig = np.interp(ts, np.arange(T), table)
    last = float(table[0])
  sig = np.concatenate([sig, [last if final_sigmas_type == "sigma_min" else 0.0]]).astype(np.float32)
  return ts, sig.astype(np.float64)


# ----------------------------------------------------------------------------- multistep loop (DPM-Solver++, UniPC)

def _wsum(w, ms):
  acc = w[0] * ms[0]
  for j in range(1, len(ms)):
    acc = acc + w[j] * ms[j]
  return acc


@functools.partial(jax.jit, static_argnames=("st",))
def _multistep_loop(fn, x_T, keys, step_noise, co, cond, uncond, gscale, st: _Static):
  """x_{i+1} = px x_i + sum_j pm_j m_{i-j} (+ pn z), m = x0 (or eps) predictions; UniPC's corrector first
  replaces x_i by ck x_i + cx x_{i-1} + sum_j cm_j m_{i-j} (m_i included). History length K is static."""
  K, corrector, stochastic, data_pred = st.extra
  in_dtype = x_T.dtype

  def body(carry, xs):
    x, last, hist = carry
    c, key, nz = xs
    out = _call_model(fn, x, c["t"], cond, uncond, gscale, st, in_dtype)
    x0, eps = param_lib.predict_x0_eps(out, x, c["alpha"], c["sigma"], st.prediction_type)
    ms = ((x0 if data_pred else eps),) + hist
    if corrector:
      x = c["ck"] * x + c["cx"] * last + _wsum(c["cm"], ms)
      last = x
    x = c["px"] * x + _wsum(c["pm"], ms[:c["pm"].shape[0]])
    if stochastic:
      x = x + c["pn"] * _noise_for(key, nz, x.shape)
    return (x, last, ms[:K]), None

  x = x_T.astype(f32)
  hist = tuple(jnp.zeros_like(x) for _ in range(K))
  (x, _, _), _ = jax.lax.scan(body, (x, x, hist), (co, keys, step_noise), unroll=st.unroll)
  return x.astype(in_dtype)


def _dpm_coefficients(sig, order, algorithm_type, solver_type, lower_order_final, euler_at_final, final_zero):
  """Per-step weights of diffusers' DPMSolverMultistepScheduler.step, expanded into
  x_next = px x + sum_j pm_j m_{i-j} + pn z (float64). Returns (px, pm [n, order], pn, orders)."""
  alpha, sigma, lam = _lambdas(sig)
  n = len(sig) - 1
  px, pm, pn, orders = np.zeros(n), np.zeros((n, order)), np.zeros(n), []
  sde = algorithm_type == "sde-dpmsolver++"
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    for i in range(n):
      lof = i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_zero)
      los = i == n - 2 and lower_order_final and n < 15
      p = 1 if (order == 1 or i < 1 or lof) else 2 if (order == 2 or i < 2 or los) else 3
      orders.append(p)
      a_t, s_t, h = alpha[i + 1], sigma[i + 1], lam[i + 1] - lam[i]
      if sde:
        e2 = -np.expm1(-2.0 * h)  # 1 - e^{-2h}
        px[i] = s_t / sigma[i] * np.exp(-h)
        b0 = a_t * e2
        pn[i] = s_t * np.sqrt(e2)
      else:
        px[i] = s_t / sigma[i]
        b0 = -a_t * np.expm1(-h)  # -alpha_t (e^{-h} - 1)
      w = [b0, 0.0, 0.0]
      if p == 2:
        r0 = (lam[i] - lam[i - 1]) / h
        if solver_type == "midpoint":
          b1 = 0.5 * b0
        else:
          b1 = a_t * (e2 / (-2.0 * h) + 1.0) if sde else a_t * (np.expm1(-h) / h + 1.0)
        w[0] += b1 / r0           # D1 = (m0 - m1) / r0
        w[1] -= b1 / r0
      elif p == 3:
        r0 = (lam[i] - lam[i - 1]) / h
        r1 = (lam[i - 1] - lam[i - 2]) / h
        if sde:
          b1 = a_t * (e2 / (-2.0 * h) + 1.0)
          b2 = a_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        else:
          b1 = a_t * (np.expm1(-h) / h + 1.0)
          b2 = -a_t * ((np.expm1(-h) + h) / h ** 2 - 0.5)
        # D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1),
        # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1.
        c0 = b1 * (1.0 + r0 / (r0 + r1)) + b2 / (r0 + r1)
        c1 = -b1 * r0 / (r0 + r1) - b2 / (r0 + r1)
        w[0] += c0 / r0
        w[1] += -c0 / r0 + c1 / r1
        w[2] += -c1 / r1
      pm[i] = w[:order]
  return px, pm, pn, orders


def _multistep_common(sampler, schedule, prediction_type, num_steps, timestep_spacing, steps_offset,
                      use_karras_sigmas, final_sigmas_type, lambda_min_clipped, variant):
  schedule = _check_schedule(schedule, sampler)
  param_lib.check_prediction_type(prediction_type)
  check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
  _check_bool("use_karras_sigmas", use_karras_sigmas)
  ts, sig = dpm_sigmas(schedule, num_steps, timestep_spacing, steps_offset, use_karras_sigmas, final_sigmas_type,
                       lambda_min_clipped, variant)
  where = _where(sampler, schedule, num_steps, timestep_spacing, use_karras_sigmas=use_karras_sigmas,
                 final_sigmas_type=final_sigmas_type)
  hint = ("diffusers repeats the last Karras sigma as the final sigma here: use final_sigmas_type='zero' with "
          "use_karras_sigmas=True." if (variant == "unipc" and use_karras_sigmas and final_sigmas_type == "sigma_min")
          else "Use fewer steps or another timestep_spacing.")
  _check_sigma_grid(sig, where, hint)
  return schedule, ts, sig, where


@_register("dpmpp")
def dpmpp_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                 solver_order: int = 2, algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                 use_karras_sigmas: bool = False, final_sigmas_type: str = "zero", lower_order_final: bool = True,
                 euler_at_final: bool = False, lambda_min_clipped: float = -math.inf,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rng=None, step_noise=None, cond=None,
                 uncond=None, guidance_scale=None, guidance_schedule: str = "constant", guidance_power: float = 4.0,
                 guidance_channels: Optional[int] = None, unroll: int = 1):
  """Multistep DPM-Solver++ (Lu et al. 2022), diffusers `DPMSolverMultistepScheduler` semantics.

  Data-prediction form on lambda = log(alpha / sigma), h = lambda_next - lambda_cur:
  order 1 (DDIM): x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) x0; orders 2 and 3 add the divided
  differences of the previous x0 predictions (`solver_type` "midpoint" or "heun" for order 2).
  `algorithm_type="sde-dpmsolver++"` is the SDE variant: x_next = (sigma_next / sigma) e^-h x
  + alpha_next (1 - e^-2h) x0 (+ differences) + sigma_next sqrt(1 - e^-2h) z, z from `rng` or `step_noise`
  (`[n, *x_T.shape]`, row i is diffusers' `variance_noise` of step i).

  The first steps warm up (order 1, then 2); the last step is first order when `final_sigmas_type="zero"`
  (sigma 0), with `euler_at_final`, or with `lower_order_final` and fewer than 15 steps, which also caps the
  second-to-last step at order 2. Grid: `dpm_sigmas` (spacings, `use_karras_sigmas`, `lambda_min_clipped`).
  Model time: the integer DDPM index. A grid with a zero or negative step is refused before sampling.
  """
  _check_order("dpmpp_sample", solver_order)
  check_choice("DPM-Solver algorithm_type", algorithm_type, DPM_ALGORITHM_TYPES)
  check_choice("DPM-Solver solver_type", solver_type, DPM_SOLVER_TYPES)
  for name, v in (("lower_order_final", lower_order_final), ("euler_at_final", euler_at_final)):
    _check_bool(name, v)
  schedule, ts, sig, _ = _multistep_common("dpmpp_sample", schedule, prediction_type, num_steps, timestep_spacing,
                                           steps_offset, use_karras_sigmas, final_sigmas_type,
                                           float(lambda_min_clipped), "dpm")
  order = int(solver_order)
  px, pm, pn, _ = _dpm_coefficients(sig, order, algorithm_type, solver_type, bool(lower_order_final),
                                    bool(euler_at_final), final_sigmas_type == "zero")
  alpha, sigma, _ = _lambdas(sig)
  co = _np32(dict(t=ts, alpha=alpha[:-1], sigma=sigma[:-1], px=px, pm=pm))
  stochastic = algorithm_type == "sde-dpmsolver++"
  keys = noise = None
  if stochastic:
    co.update(_np32(dict(pn=pn)))
    keys, noise = _step_keys(rng, len(ts), step_noise, x_T.shape, "dpmpp_sample with algorithm_type='sde-dpmsolver++'")
  T = schedule.num_train_timesteps
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, (order - 1, False, stochastic, True), unroll=unroll)
  return _multistep_loop(_as_partial(denoise_fn), x_T, keys, noise, co, cond, uncond, gscale, st)


@_register("dpmpp_2m")
def dpmpp_2m_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                    rng=None, cond=None, uncond=None, guidance_scale=None, guidance_schedule: str = "constant",
                    guidance_power: float = 4.0, guidance_channels: Optional[int] = None, unroll: int = 1,
                    timestep_spacing: str = "linspace", steps_offset: int = 0, lower_order_final: bool = True,
                    algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
                    use_karras_sigmas: bool = False, final_sigmas_type: str = "zero", euler_at_final: bool = False,
                    lambda_min_clipped: float = -math.inf, step_noise=None):
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): `dpmpp_sample` with `solver_order=2` (diffusers'
  `DPMSolverMultistepScheduler` defaults: midpoint, final sigma 0, "linspace" spacing)."""
  return dpmpp_sample(denoise_fn, x_T, num_steps=num_steps, schedule=schedule, prediction_type=prediction_type,
                      solver_order=2, algorithm_type=algorithm_type, solver_type=solver_type,
                      use_karras_sigmas=use_karras_sigmas, final_sigmas_type=final_sigmas_type,
                      lower_order_final=lower_order_final, euler_at_final=euler_at_final,
                      lambda_min_clipped=lambda_min_clipped, timestep_spacing=timestep_spacing,
                      steps_offset=steps_offset, rng=rng, step_noise=step_noise, cond=cond, uncond=uncond,
                      guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
                      guidance_power=guidance_power, guidance_channels=guidance_channels, unroll=unroll)


def _unipc_coefficients(sig, order, solver_type, predict_x0, lower_order_final, disable_corrector):
  """Per-step weights of diffusers' UniPCMultistepScheduler.step (UniP-p predictor, UniC-p corrector, B(h)
  "bh1" / "bh2"), expanded into the `_multistep_loop` form (float64)."""
  alpha, sigma, lam = _lambdas(sig)
  n = len(sig) - 1
  px, pm = np.zeros(n), np.zeros((n, order))
  ck, cx, cm = np.ones(n), np.zeros(n), np.zeros((n, order + 1))
  orders = [min(min(order, n - i) if lower_order_final else order, i + 1) for i in range(n)]

  def phis(h, p):
    hh = -h if predict_x0 else h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    B_h = hh if solver_type == "bh1" else np.expm1(hh)
    b, fact = [], 1
    for j in range(1, p + 1):
      b.append(h_phi_k * fact / B_h)
      fact *= j + 1
      h_phi_k = h_phi_k / hh - 1.0 / fact
    return h_phi_1, B_h, np.asarray(b)

  def scales(t, s):  # (x coefficient, base) of the update from index s to index t
    return (sigma[t] / sigma[s], alpha[t]) if predict_x0 else (alpha[t] / alpha[s], sigma[t])

  def base_phi(t, s, h_phi_1):  # base * h_phi_1; its sigma_t -> 0 limit for the noise-prediction form
    if not predict_x0 and sigma[t] == 0:
      return alpha[t] * sigma[s] / alpha[s]  # sigma_t (e^h - 1) = alpha_t sigma_s / alpha_s - sigma_t
    return scales(t, s)[1] * h_phi_1

  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    for i in range(n):
      # Predictor UniP-p from i to i + 1 with m_i, ..., m_{i-p+1}.
      p = orders[i]
      h = lam[i + 1] - lam[i]
      rk = np.array([(lam[i - k] - lam[i]) / h for k in range(1, p)])
      h_phi_1, B_h, b = phis(h, p)
      ratio, base = scales(i + 1, i)
      px[i] = ratio
      pm[i, 0] = -base_phi(i + 1, i, h_phi_1)
      if p >= 2:
        R = np.stack([np.concatenate([rk, [1.0]]) ** (j - 1) for j in range(1, p + 1)])
        rhos = np.array([0.5]) if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        for k in range(1, p):
          pm[i, 0] += base * B_h * rhos[k - 1] / rk[k - 1]
          pm[i, k] = -base * B_h * rhos[k - 1] / rk[k - 1]
      # Corrector UniC-q at step i (before its predictor): x_i from x_{i-1} with m_{i-1}, ..., m_{i-q} and m_i.
      if i >= 1 and (i - 1) not in disable_corrector:
        q = orders[i - 1]
        h = lam[i] - lam[i - 1]
        rk = np.array([(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, q)])
        h_phi_1, B_h, b = phis(h, q)
        R = np.stack([np.concatenate([rk, [1.0]]) ** (j - 1) for j in range(1, q + 1)])
        rhos = np.array([0.5]) if q == 1 else np.linalg.solve(R, b)
        ratio, base = scales(i, i - 1)
        ck[i], cx[i] = 0.0, ratio
        cm[i, 0] = -base * B_h * rhos[-1]
        cm[i, 1] = -base_phi(i, i - 1, h_phi_1) + base * B_h * rhos[-1]
        for k in range(1, q):
          cm[i, 1] += base * B_h * rhos[k - 1] / rk[k - 1]
          cm[i, 1 + k] = -base * B_h * rhos[k - 1] / rk[k - 1]
  return px, pm, ck, cx, cm, orders


@_register("unipc")
def unipc_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                 solver_order: int = 2, solver_type: str = "bh2", predict_x0: bool = True,
                 lower_order_final: bool = True, disable_corrector=(), use_karras_sigmas: bool = False,
                 final_sigmas_type: str = "zero", timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rng=None, cond=None, uncond=None, guidance_scale=None, guidance_schedule: str = "constant",
                 guidance_power: float = 4.0, guidance_channels: Optional[int] = None, unroll: int = 1):
  """UniPC (Zhao et al. 2023), diffusers `UniPCMultistepScheduler` semantics (the Prompt Diffusion pipeline's
  default sampler): a UniP-p predictor and, from the second step on, a UniC-p corrector that reuses the model
  evaluation at the predicted point (no extra network call), B(h) = h ("bh1") or e^h - 1 ("bh2").

  Orders warm up 1, 2, ...; with `lower_order_final` the order is also capped by the number of steps left.
  `predict_x0=False` runs the noise-prediction variant. `disable_corrector`: step indices whose *following*
  correction is skipped (diffusers' list). Grid: `dpm_sigmas(..., variant="unipc")`. Model time: the integer
  DDPM index. Refused before sampling: a zero or negative step, and a higher-order final step to sigma 0
  (`lower_order_final=False` with `final_sigmas_type="zero"`, an infinite step where diffusers returns NaN).
  Deterministic; `rng` is unused.
  """
  del rng
  order = _check_order("unipc_sample", solver_order)
  check_choice("UniPC solver_type", solver_type, UNIPC_SOLVER_TYPES)
  for name, v in (("predict_x0", predict_x0), ("lower_order_final", lower_order_final)):
    _check_bool(name, v)
  try:
    disable = frozenset(int(k) for k in disable_corrector)
  except (TypeError, ValueError):
    raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}.") from None
  schedule, ts, sig, where = _multistep_common("unipc_sample", schedule, prediction_type, num_steps,
                                               timestep_spacing, steps_offset, use_karras_sigmas, final_sigmas_type,
                                               -math.inf, "unipc")
  if final_sigmas_type == "zero" and not lower_order_final and order > 1:
    raise ValueError(f"{where}, solver_order={order}, lower_order_final=False: the final step to sigma = 0 would be of "
                     f"order > 1, an infinite step in log-SNR (diffusers returns NaN). Use lower_order_final=True or "
                     f"final_sigmas_type='sigma_min'.")
  px, pm, ck, cx, cm, _ = _unipc_coefficients(sig, order, solver_type, bool(predict_x0), bool(lower_order_final),
                                              disable)
  alpha, sigma, _ = _lambdas(sig)
  co = _np32(dict(t=ts, alpha=alpha[:-1], sigma=sigma[:-1], px=px, pm=pm, ck=ck, cx=cx, cm=cm))
  T = schedule.num_train_timesteps
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, (order, True, False, bool(predict_x0)), unroll=unroll)
  return _multistep_loop(_as_partial(denoise_fn), x_T, None, None, co, cond, uncond, gscale, st)


# ----------------------------------------------------------------------------- Euler / Euler ancestral (discrete)

@functools.partial(jax.jit, static_argnames=("st",))
def _euler_loop(fn, x_T, keys, step_noise, co, cond, uncond, gscale, st: _Static):
  stochastic, clip = st.extra
  in_dtype = x_T.dtype

  def body(x, xs):
    c, key, nz = xs
    out = _call_model(fn, x / c["sqrt_denom"], c["t"], cond, uncond, gscale, st, in_dtype)
    x0 = _clip(_ve_x0(out, x, c, st.prediction_type), clip)
    d = (x - x0) / c["sigma"]
    x = x + d * c["dt"]
    if stochastic:
      x = x + _noise_for(key, nz, x.shape) * c["sigma_up"]
    return x, None

  x, _ = jax.lax.scan(body, x_T.astype(f32) * co["init"][0], (co, keys, step_noise), unroll=st.unroll)
  return x.astype(in_dtype)


def _init_sigma(sig, timestep_spacing):
  """diffusers' `init_noise_sigma`: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" (float32)."""
  m = np.float32(np.max(sig))
  return m if timestep_spacing in ("linspace", "trailing") else np.float32((m ** 2 + np.float32(1)) ** 0.5)


@_register("euler")
def euler_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                 rng=None, cond=None, uncond=None, guidance_scale=None, guidance_schedule: str = "constant",
                 guidance_power: float = 4.0, guidance_channels: Optional[int] = None, unroll: int = 1,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, use_karras_sigmas: bool = True,
                 rho: float = 7.0, final_sigmas_type: str = "zero"):
  """Euler on the probability-flow ODE in VE sigma space (Karras et al. 2022, Alg. 1 with Euler steps),
  diffusers `EulerDiscreteScheduler` semantics (no churn): sigmas interpolated at the spaced timesteps,
  optionally re-gridded with Karras sigmas (rho = 7) between their ends, then a final 0 (or the schedule's
  smallest sigma, `final_sigmas_type="sigma_min"`).

  The state is x_ve = x_vp / alpha; the model sees x_ve / sqrt(sigma^2 + 1) (the VP x_t) and the
  timestep t(sigma) (fractional, log-sigma interpolation, for Karras sigmas). x_T is multiplied by
  diffusers' init_noise_sigma (sigma_max, or sqrt(sigma_max^2 + 1) for "leading").
  Deterministic; `rng` is unused.
  """
  del rng
  schedule = _check_schedule(schedule, "euler_sample")
  param_lib.check_prediction_type(prediction_type)
  _check_bool("use_karras_sigmas", use_karras_sigmas)
  T = schedule.num_train_timesteps
  ts, sig = euler_sigmas(schedule, num_steps, timestep_spacing, steps_offset, use_karras_sigmas, rho,
                         final_sigmas_type)
  _check_sigma_grid(sig, _where("euler_sample", schedule, num_steps, timestep_spacing,
                                use_karras_sigmas=use_karras_sigmas, final_sigmas_type=final_sigmas_type))
  # float32 host arithmetic in diffusers' order (matters for huge sigmas, e.g. the cosine schedule's 2e4).
  sig = sig.astype(np.float32)
  s = sig[:-1]
  co = _np32(dict(t=ts, dt=(sig[1:] - s).astype(np.float32), init=np.full_like(s, _init_sigma(sig, timestep_spacing)),
                  **_ve_coefs(s)))
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, (False, None), unroll=unroll)
  return _euler_loop(_as_partial(denoise_fn), x_T, None, None, co, cond, uncond, gscale, st)


@_register("euler_ancestral")
def euler_ancestral_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                           rng=None, step_noise=None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                           cond=None, uncond=None, guidance_scale=None, guidance_schedule: str = "constant",
                           guidance_power: float = 4.0, guidance_channels: Optional[int] = None, unroll: int = 1):
  """Euler ancestral sampling, diffusers `EulerAncestralDiscreteScheduler` semantics: per step from sigma to
  sigma_next, sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
  sigma_down = sqrt(sigma_next^2 - sigma_up^2), x <- x + (x - x0) / sigma (sigma_down - sigma) + sigma_up z.

  Sigmas interpolated at the spaced timesteps (no Karras option in diffusers), final 0; state, model input
  and init_noise_sigma as `euler_sample`. Stochastic: `rng`, or `step_noise` `[n, *x_T.shape]` (row i is the
  noise diffusers draws at step i; the last row is multiplied by sigma_up = 0).
  """
  schedule = _check_schedule(schedule, "euler_ancestral_sample")
  param_lib.check_prediction_type(prediction_type)
  T = schedule.num_train_timesteps
  ts, sig = euler_sigmas(schedule, num_steps, timestep_spacing, steps_offset, False)
  _check_sigma_grid(sig, _where("euler_ancestral_sample", schedule, num_steps, timestep_spacing))
  sig = sig.astype(np.float32)
  s, s_to = sig[:-1], sig[1:]
  # Exact closed forms in float64: sigma_down = sigma_next^2 / sigma, sigma_up = sigma_next sqrt(1 - (sigma_next /
  # sigma)^2). diffusers evaluates sqrt(sigma_next^2 - sigma_up^2) in float32, which cancels catastrophically when
  # sigma_next << sigma (NaN on the cosine schedule with 3 "trailing" steps: sigma 2.0e4 -> 1.75).
  s64, to64 = s.astype(np.float64), s_to.astype(np.float64)
  up = (to64 * np.sqrt(np.maximum(1.0 - (to64 / s64) ** 2, 0.0))).astype(np.float32)
  down = (to64 * to64 / s64).astype(np.float32)
  co = _np32(dict(t=ts, dt=(down - s).astype(np.float32), sigma_up=up,
                  init=np.full_like(s, _init_sigma(sig, timestep_spacing)), **_ve_coefs(s)))
  keys, noise = _step_keys(rng, len(ts), step_noise, x_T.shape, "euler_ancestral_sample")
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, (True, None), unroll=unroll)
  return _euler_loop(_as_partial(denoise_fn), x_T, keys, noise, co, cond, uncond, gscale, st)


# ----------------------------------------------------------------------------- Heun (discrete, diffusers)

@functools.partial(jax.jit, static_argnames=("st",))
def _heun_loop(fn, x_T, co, last, cond, uncond, gscale, st: _Static):
  clip = st.extra[0]
  in_dtype = x_T.dtype

  def x0_at(x, c):
    out = _call_model(fn, x / c["sqrt_denom"], c["t"], cond, uncond, gscale, st, in_dtype)
    return _clip(_ve_x0(out, x, c, st.prediction_type), clip)

  def body(x, c):
    cur = {k: c[k] for k in ("t", "sigma", "denom", "sqrt_denom", "v_coef")}
    nxt = {k: c[k + "_next"] for k in ("t", "sigma", "denom", "sqrt_denom", "v_coef")}
    d = (x - x0_at(x, cur)) / c["sigma"]
    x2 = x + d * c["dt"]
    d2 = (x2 - x0_at(x2, nxt)) / c["sigma_next"]
    return x + (d + d2) / 2 * c["dt"], None

  x = x_T.astype(f32) * last["init"]
  x, _ = jax.lax.scan(body, x, co, unroll=st.unroll)
  d = (x - x0_at(x, last)) / last["sigma"]  # final step to sigma = 0: Euler
  return (x + d * last["dt"]).astype(in_dtype)


@_register("heun")
def heun_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                use_karras_sigmas: bool = False, timestep_spacing: str = "linspace", steps_offset: int = 0,
                clip_sample: Optional[float] = None, rng=None, cond=None, uncond=None, guidance_scale=None,
                guidance_schedule: str = "constant", guidance_power: float = 4.0,
                guidance_channels: Optional[int] = None, unroll: int = 1):
  """Heun's 2nd-order method on a discrete schedule, diffusers `HeunDiscreteScheduler` semantics: an Euler
  step from sigma_i to sigma_{i+1}, a second model call there (time t_{i+1}), the average of the two slopes;
  the final step to sigma = 0 is a plain Euler step. NFE = 2 n - 1.

  Grid and model input as `euler_sample` (`use_karras_sigmas` off by default, as in diffusers; timesteps
  then fractional). `clip_sample`: clip x0_hat to [-c, c] (diffusers' `clip_sample=True`,
  `clip_sample_range=c`). Deterministic; `rng` is unused. (`edm_heun` is the EDM-paper variant with churn.)
  """
  del rng
  schedule = _check_schedule(schedule, "heun_sample")
  param_lib.check_prediction_type(prediction_type)
  _check_bool("use_karras_sigmas", use_karras_sigmas)
  T = schedule.num_train_timesteps
  ts, sig = euler_sigmas(schedule, num_steps, timestep_spacing, steps_offset, use_karras_sigmas)
  _check_sigma_grid(sig, _where("heun_sample", schedule, num_steps, timestep_spacing,
                                use_karras_sigmas=use_karras_sigmas))
  sig = sig.astype(np.float32)
  s = sig[:-1]
  ve = _ve_coefs(s)
  n = len(s)
  co = dict(t=ts[:n - 1], t_next=ts[1:], dt=(sig[1:n] - s[:n - 1]).astype(np.float32))
  for k, v in ve.items():
    co[k], co[k + "_next"] = v[:n - 1], v[1:]
  last = dict(t=ts[n - 1], dt=-s[n - 1], init=_init_sigma(sig, timestep_spacing),
              **{k: v[n - 1] for k, v in ve.items()})
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, (None if clip_sample is None else float(clip_sample),),
                                unroll=unroll)
  return _heun_loop(_as_partial(denoise_fn), x_T, _np32(co), _np32(last), cond, uncond, gscale, st)


# ----------------------------------------------------------------------------- EDM Heun

def _edm_D(fn, x, sigma, t_model, cond, uncond, gscale, st, in_dtype):
  """Denoiser D(x_ve, sigma) -> x0 in float32 for an EDM-preconditioned or a discrete VP model."""
  sigma_data = st.extra[0]
  if st.prediction_type == "edm":
    sc = param_lib.edm_scalings(sigma, sigma_data)
    out = _call_model(fn, x * sc.c_in, sc.c_noise, cond, uncond, gscale, st, in_dtype)
    return sc.c_skip * x + sc.c_out * out
  alpha = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
  out = _call_model(fn, x * alpha, t_model, cond, uncond, gscale, st, in_dtype)
  x0, _ = param_lib.predict_x0_eps(out, x * alpha, alpha, sigma * alpha, st.prediction_type)
  return x0


@functools.partial(jax.jit, static_argnames=("st",))
def _edm_loop(fn, x_T, keys, co, last, cond, uncond, gscale, st: _Static):
  _, second_order, churn = st.extra
  in_dtype = x_T.dtype
  D = lambda x, s, t: _edm_D(fn, x, s, t, cond, uncond, gscale, st, in_dtype)

  def body(x, xs):
    c, key = xs
    if churn:
      x = x + c["noise_scale"] * jax.random.normal(key, x.shape, f32)
    d = (x - D(x, c["sigma_hat"], c["t_hat"])) / c["sigma_hat"]
    x_next = x + (c["sigma_next"] - c["sigma_hat"]) * d
    if second_order:
      d2 = (x_next - D(x_next, c["sigma_next"], c["t_next"])) / c["sigma_next"]
      x_next = x + (c["sigma_next"] - c["sigma_hat"]) * (0.5 * d + 0.5 * d2)
    return x_next, None

  x = x_T.astype(f32) * last["init"]
  x, _ = jax.lax.scan(body, x, (co, keys), unroll=st.unroll)
  # Final step to sigma = 0: Euler (Karras et al. 2022, Alg. 2 line 7 is skipped when t_{i+1} = 0).
  if churn:
    x = x + last["noise_scale"] * jax.random.normal(last["key"], x.shape, f32)
  x = D(x, last["sigma_hat"], last["t_hat"])
  return x.astype(in_dtype)


@_register("edm_heun")
def edm_sample(denoise_fn, x_T, *, num_steps: int, prediction_type: str = "edm", schedule: Optional[Schedule] = None,
               sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, rho: float = 7.0,
               sigma_data: float = 0.5, second_order: bool = True, S_churn: float = 0.0, S_tmin: float = 0.0,
               S_tmax: float = float("inf"), S_noise: float = 1.0, rng=None, cond=None, uncond=None,
               guidance_scale=None, guidance_schedule: str = "constant", guidance_power: float = 4.0,
               guidance_channels: Optional[int] = None, unroll: int = 1):
  """EDM sampler (Karras et al. 2022, Algorithm 2): Heun's 2nd-order method on the Karras sigma grid
  (rho = 7) with optional stochastic churn; `second_order=False` gives the Euler variant (same grid).

  gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax else 0; sigma_hat = (1 + gamma) sigma_i;
  x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise z; Euler step to sigma_{i+1}, Heun correction unless
  sigma_{i+1} = 0. NFE = 2N - 1.

  prediction_type:
    "edm": `denoise_fn(c_in x, c_noise, cond) -> F` is the raw EDM network, D = c_skip x + c_out F,
      model time c_noise = ln(sigma) / 4 (sigma_min/max default 0.002 / 80).
    "epsilon" / "v_prediction" / "sample": a discrete VP model on `schedule`; it sees x / sqrt(sigma^2+1)
      and the fractional DDPM timestep t(sigma) (log-sigma interpolation); sigma_min/max default to the
      schedule's VE sigma range.
  """
  check_choice("prediction type (parameterisation)", prediction_type, ("edm",) + param_lib.PREDICTION_TYPES)
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if prediction_type == "edm":
    sigma_min = 0.002 if sigma_min is None else sigma_min
    sigma_max = 80.0 if sigma_max is None else sigma_max
    T = 1000
    if guidance_schedule != "constant":
      raise ValueError("guidance_schedule='power_cosine' is defined on DDPM timesteps; EDM models (c_noise time) "
                       "support only guidance_schedule='constant'.")
    t_of = lambda s: 0.25 * np.log(np.maximum(s, 1e-30))
  else:
    schedule = _check_schedule(schedule, "edm_sample with a discrete prediction_type")
    T = schedule.num_train_timesteps
    if num_steps > T:
      spacing_timesteps(T, num_steps)  # raises the standard error
    ve = schedule.ve_sigmas
    sigma_min = float(ve[0]) if sigma_min is None else sigma_min
    sigma_max = float(ve[-1]) if sigma_max is None else sigma_max
    log_sigmas = np.log(ve)
    t_of = lambda s: sigma_to_t(np.asarray(s, np.float64), log_sigmas)
  sig = np.concatenate([karras_sigmas(num_steps, sigma_min, sigma_max, rho), [0.0]])
  s = sig[:-1]
  gamma = np.where((s >= S_tmin) & (s <= S_tmax), min(S_churn / num_steps, math.sqrt(2) - 1), 0.0)
  s_hat = s * (1.0 + gamma)
  noise_scale = np.sqrt(np.maximum(s_hat ** 2 - s ** 2, 0.0)) * S_noise
  churn = bool(np.any(gamma > 0))
  t_hat = t_of(s_hat)
  t_next = t_of(np.maximum(sig[1:], 1e-30))
  n = num_steps
  co = _np32(dict(sigma_hat=s_hat[:n - 1], sigma_next=sig[1:n], t_hat=t_hat[:n - 1], t_next=t_next[:n - 1],
                  noise_scale=noise_scale[:n - 1]))
  last = _np32(dict(sigma_hat=s_hat[n - 1], t_hat=t_hat[n - 1], noise_scale=noise_scale[n - 1], init=sig[0]))
  if churn:
    if rng is None:
      raise ValueError("edm_sample with S_churn > 0 is stochastic: pass `rng=`.")
    keys = jax.random.split(rng, n)
    last["key"] = keys[-1]
    keys = keys[:-1]
  else:
    keys = None
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, (float(sigma_data), bool(second_order), churn), unroll=unroll)
  return _edm_loop(_as_partial(denoise_fn), x_T, keys, co, last, cond, uncond, gscale, st)


# ----------------------------------------------------------------------------- CoDi consistency rollout

def consistency_timesteps(num_steps: int, num_train_timesteps: int = 1000, grid_size: int = 50) -> np.ndarray:
  """CoDi's few-step grid: `arange(N) * (T // N)` reversed, strided by ceil(N / steps); e.g. 4 steps ->
  [980, 720, 460, 200] for T = 1000, N = 50."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if num_steps > grid_size:
    raise ValueError(f"num_steps={num_steps} exceeds the consistency grid size {grid_size} (distill_learning_steps);"
                     f" use num_steps <= {grid_size}.")
  grid = (np.arange(grid_size) * (num_train_timesteps // grid_size))[::-1]
  stride = -(-grid_size // num_steps)
  ts = grid[::stride]
  if len(ts) != num_steps:
    valid = [k for k in range(1, grid_size + 1) if len(grid[::-(-grid_size // k)]) == k]
    raise ValueError(f"num_steps={num_steps} does not fit the consistency grid of {grid_size} timesteps (stride "
                     f"ceil({grid_size}/{num_steps}) gives {len(ts)} steps). Valid num_steps: {valid}.")
  return ts.astype(np.int64)


@functools.partial(jax.jit, static_argnames=("st",))
def _consistency_loop(fn, x_T, co, cond, uncond, gscale, st: _Static):
  in_dtype = x_T.dtype

  def body(z, c):
    out = _call_model(fn, z, c["t"], cond, uncond, gscale, st, in_dtype)
    x0, eps = param_lib.predict_x0_eps(out, z, c["alpha"], c["sigma"], st.prediction_type)
    x0 = c["c_skip"] * z + c["c_out"] * x0
    return c["alpha_s"] * x0 + c["sigma_s"] * eps, None

  z, _ = jax.lax.scan(body, x_T.astype(f32), co, unroll=st.unroll)
  return z.astype(in_dtype)


@_register("consistency")
def consistency_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "v_prediction",
                       rng=None, cond=None, uncond=None, guidance_scale=None, guidance_schedule: str = "constant",
                       guidance_power: float = 4.0, guidance_channels: Optional[int] = None, unroll: int = 1,
                       grid_size: int = 50, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
  """CoDi's deterministic few-step consistency rollout (released Flax pipeline; codi.md A5).

  Timesteps from `consistency_timesteps` (4 steps: 980, 720, 460, 200), target s = next timestep, 0 after
  the last. Per step: (x0_hat, eps_hat) from the prediction (for v: x0 = alpha z - sigma v,
  eps = alpha v + sigma z), x0 <- c_skip(t) z + c_out(t) x0_hat (`consistency_scalings`, sd = 0.5, k = 10),
  z <- alpha_s x0 + sigma_s eps_hat. No fresh noise. Model time: the integer DDPM index.
  """
  del rng
  schedule = _check_schedule(schedule, "consistency_sample")
  param_lib.check_prediction_type(prediction_type)
  T = schedule.num_train_timesteps
  ts = consistency_timesteps(num_steps, T, grid_size)
  ss = np.concatenate([ts[1:], [0]])
  ac = schedule.alphas_cumprod
  k = ts.astype(np.float64) * timestep_scaling
  d2 = sigma_data ** 2
  co = _np32(dict(t=ts, alpha=np.sqrt(ac[ts]), sigma=np.sqrt(1 - ac[ts]), alpha_s=np.sqrt(ac[ss]),
                  sigma_s=np.sqrt(1 - ac[ss]), c_skip=d2 / (k ** 2 + d2), c_out=k / np.sqrt(k ** 2 + d2)))
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, unroll=unroll)
  return _consistency_loop(_as_partial(denoise_fn), x_T, co, cond, uncond, gscale, st)


# ----------------------------------------------------------------------------- LCM (diffusers LCMScheduler)

def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, original_inference_steps: int = 50) -> np.ndarray:
  """diffusers' `LCMScheduler.set_timesteps`: the distillation grid k, 2k, ..., T (minus 1), k = T // N with
  N = `original_inference_steps`, reversed, sampled at floor(linspace(0, N, num_steps, endpoint=False));
  e.g. 4 steps -> [999, 759, 499, 259] for T = 1000, N = 50."""
  T, N, n = int(num_train_timesteps), int(original_inference_steps), int(num_steps)
  if n < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if N < 1 or N > T:
    raise ValueError(f"original_inference_steps={N} must be in [1, num_train_timesteps={T}].")
  if n > N:
    raise ValueError(f"num_steps={n} is larger than original_inference_steps={N}: LCM samples a subset of its "
                     f"{N}-step distillation grid. Use num_steps <= {N}.")
  origin = (np.arange(1, N + 1) * (T // N) - 1)[::-1]
  idx = np.floor(np.linspace(0, N, num=n, endpoint=False)).astype(np.int64)
  return origin[idx].astype(np.int64)


@functools.partial(jax.jit, static_argnames=("st",))
def _lcm_loop(fn, x_T, keys, step_noise, co, cond, uncond, gscale, st: _Static):
  clip = st.extra[0]
  in_dtype = x_T.dtype

  def body(x, xs):
    c, key, nz = xs
    out = _call_model(fn, x, c["t"], cond, uncond, gscale, st, in_dtype)
    x0, _ = param_lib.predict_x0_eps(out, x, c["alpha"], c["sigma"], st.prediction_type)
    denoised = c["c_out"] * _clip(x0, clip) + c["c_skip"] * x
    return c["alpha_prev"] * denoised + c["sigma_prev"] * _noise_for(key, nz, x.shape), None

  x, _ = jax.lax.scan(body, x_T.astype(f32), (co, keys, step_noise), unroll=st.unroll)
  return x.astype(in_dtype)


@_register("lcm")
def lcm_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
               original_inference_steps: int = 50, timestep_scaling: float = 10.0, sigma_data: float = 0.5,
               clip_sample: Optional[float] = None, rng=None, step_noise=None, cond=None, uncond=None,
               guidance_scale=None, guidance_schedule: str = "constant", guidance_power: float = 4.0,
               guidance_channels: Optional[int] = None, unroll: int = 1):
  """Latent Consistency Model multistep sampling (Luo et al. 2023), diffusers `LCMScheduler` semantics.

  Per step at timestep t (`lcm_timesteps`), next timestep s: x0_hat from the prediction, the boundary
  condition denoised = c_out(t) x0_hat + c_skip(t) x with c_skip = sd^2 / ((k t)^2 + sd^2),
  c_out = k t / sqrt((k t)^2 + sd^2) (k = `timestep_scaling`, sd = `sigma_data`), then fresh noise:
  x <- sqrt(a_s) denoised + sqrt(1 - a_s) z; the last step returns `denoised`. Unlike `consistency_sample`
  (CoDi's rollout, which re-noises with the predicted eps), each step draws new noise: `rng`, or `step_noise`
  `[n, *x_T.shape]` (row i is the noise diffusers draws after step i; the last row is unused).
  Model time: the integer DDPM index. Guidance-embedding LCMs take their w embedding through `cond`.
  """
  schedule = _check_schedule(schedule, "lcm_sample")
  param_lib.check_prediction_type(prediction_type)
  T = schedule.num_train_timesteps
  ts = lcm_timesteps(num_steps, T, original_inference_steps)
  ac = schedule.alphas_cumprod.astype(np.float32)
  prev = np.concatenate([ts[1:], [ts[-1]]])
  last = np.arange(len(ts)) == len(ts) - 1
  k = ts.astype(np.float64) * float(timestep_scaling)
  d2 = float(sigma_data) ** 2
  co = _np32(dict(t=ts, alpha=np.sqrt(ac[ts]), sigma=np.sqrt(np.float32(1.0) - ac[ts]),
                  c_skip=d2 / (k ** 2 + d2), c_out=k / np.sqrt(k ** 2 + d2),
                  alpha_prev=np.where(last, 1.0, np.sqrt(ac[prev])),
                  sigma_prev=np.where(last, 0.0, np.sqrt(np.float32(1.0) - ac[prev]))))
  if len(ts) == 1 and rng is None and step_noise is None:  # one step: no noise is drawn
    keys, noise = None, jnp.zeros((1,) + tuple(x_T.shape), f32)
  else:
    keys, noise = _step_keys(rng, len(ts), step_noise, x_T.shape, "lcm_sample")
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, (None if clip_sample is None else float(clip_sample),),
                                unroll=unroll)
  return _lcm_loop(_as_partial(denoise_fn), x_T, keys, noise, co, cond, uncond, gscale, st)


def sample(sampler: str, denoise_fn: Callable, x_T, **kwargs):
  """Dispatches to a sampler by name: "ddpm", "ddim", "dpmpp", "dpmpp_2m", "euler", "euler_ancestral", "heun",
  "unipc", "lcm", "edm_heun", "consistency" (`SAMPLERS.names()`)."""
  return SAMPLERS.get(sampler)(denoise_fn, x_T, **kwargs)
