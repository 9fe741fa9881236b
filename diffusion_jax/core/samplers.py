"""Samplers: each runs its whole loop inside ONE `jax.jit` (`lax.scan`), no Python per step.

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
  sigma space (`euler_sample`, `edm_sample`) scale it by their initial sigma themselves (diffusers'
  `init_noise_sigma`).
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

import functools
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


def _check_sigma_grid(sig, where: str):
  """`sig` `[n + 1]` (final 0): every step must strictly lower sigma (a zero step is a division by zero in
  DPM-Solver and a wasted network call in Euler)."""
  sig = np.asarray(sig, np.float64)
  d = np.diff(sig)
  if np.any(d >= 0):
    i = int(np.argmax(d >= 0))
    raise ValueError(f"{where} gives a zero or negative step: step {i} goes from sigma {sig[i]:.6g} to "
                     f"{sig[i + 1]:.6g}. Use fewer steps or another timestep_spacing.")


def _where(sampler: str, schedule: Schedule, num_steps: int, timestep_spacing: str) -> str:
  return (f"{sampler} with schedule {schedule.name!r} (T={schedule.num_train_timesteps}"
          + (", zero-SNR" if schedule.rescale_zero_snr else "")
          + f"), timestep_spacing={timestep_spacing!r}, num_steps={num_steps}")


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


@SAMPLERS.register("ddpm")
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


@SAMPLERS.register("ddim")
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


# ----------------------------------------------------------------------------- DPM-Solver++ 2M

@functools.partial(jax.jit, static_argnames=("st",))
def _dpmpp_loop(fn, x_T, co, cond, uncond, gscale, st: _Static):
  in_dtype = x_T.dtype

  def body(carry, c):
    x, m_prev = carry
    out = _call_model(fn, x, c["t"], cond, uncond, gscale, st, in_dtype)
    m0, _ = param_lib.predict_x0_eps(out, x, c["alpha"], c["sigma"], st.prediction_type)
    x = c["a"] * x + c["b"] * m0 + c["d"] * (m0 - m_prev)
    return (x, m0), None

  x = x_T.astype(f32)
  (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), co, unroll=st.unroll)
  return x.astype(in_dtype)


@SAMPLERS.register("dpmpp_2m")
def dpmpp_2m_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                    rng=None, cond=None, uncond=None, guidance_scale=None, guidance_schedule: str = "constant",
                    guidance_power: float = 4.0, guidance_channels: Optional[int] = None, unroll: int = 1,
                    timestep_spacing: str = "linspace", steps_offset: int = 0, lower_order_final: bool = True):
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), diffusers `DPMSolverMultistepScheduler` defaults
  (solver_order=2, algorithm "dpmsolver++", solver_type "midpoint", final_sigmas_type "zero", spacing
  "linspace").

  In data-prediction form with lambda = log(alpha/sigma), h = lambda_next - lambda_cur, r = h_prev / h:
  x_next = (sigma_next/sigma_cur) x - alpha_next (e^-h - 1) (m0 + (m0 - m_prev) / (2 r)).
  The first step and the final step (to sigma = 0) are first order; with `lower_order_final` and fewer
  than 15 steps the last step is first order too (it always is with the "zero" final sigma).
  Model time: the integer DDPM index. `rng` is unused (deterministic).
  """
  del rng
  schedule = _check_schedule(schedule, "dpmpp_2m_sample")
  param_lib.check_prediction_type(prediction_type)
  T = schedule.num_train_timesteps
  ts = spacing_timesteps(T, num_steps, timestep_spacing, steps_offset, variant="dpm")
  # diffusers' table: only a zero-SNR terminal alphas_cumprod becomes 2^-24; small values are used as they are.
  ve = schedule.solver_sigmas()
  s = np.concatenate([np.interp(ts, np.arange(T), ve), [0.0]]).astype(np.float32).astype(np.float64)
  _check_sigma_grid(s, _where("dpmpp_2m_sample", schedule, num_steps, timestep_spacing))
  alpha = 1.0 / np.sqrt(s ** 2 + 1.0)
  sig = s * alpha
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sig)
  n = len(ts)
  a = np.zeros(n); b = np.zeros(n); d = np.zeros(n)
  for i in range(n):
    h = lam[i + 1] - lam[i]
    a[i] = sig[i + 1] / sig[i]
    b[i] = -alpha[i + 1] * (np.exp(-h) - 1.0)
    first = i == 0 or i == n - 1  # final sigma is zero -> always first order at the end
    if lower_order_final and n < 15 and i == n - 1:
      first = True
    if not first:
      r = (lam[i] - lam[i - 1]) / h
      d[i] = 0.5 * b[i] / r
  co = _np32(dict(t=ts, alpha=alpha[:-1], sigma=sig[:-1], a=a, b=b, d=d))
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, unroll=unroll)
  return _dpmpp_loop(_as_partial(denoise_fn), x_T, co, cond, uncond, gscale, st)


# ----------------------------------------------------------------------------- Euler (discrete, diffusers)

def euler_sigmas(schedule: Schedule, num_steps: int, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 use_karras_sigmas: bool = True, rho: float = 7.0):
  """(timesteps `[n]`, VE sigmas `[n + 1]` ending in 0) as diffusers' `EulerDiscreteScheduler.set_timesteps`."""
  T = schedule.num_train_timesteps
  ts = spacing_timesteps(T, num_steps, timestep_spacing, steps_offset, variant="euler")
  # diffusers' table: only a zero-SNR terminal alphas_cumprod becomes 2^-24; small values are used as they are.
  ve = schedule.solver_sigmas()
  sig = np.interp(ts, np.arange(T), ve)
  if use_karras_sigmas:
    sig = karras_sigmas(num_steps, float(sig[-1]), float(sig[0]), rho)
    ts = sigma_to_t(np.asarray(sig, np.float64), np.log(ve))
  sig = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)
  return np.asarray(ts, np.float32).astype(np.float64), sig


@functools.partial(jax.jit, static_argnames=("st",))
def _euler_loop(fn, x_T, co, cond, uncond, gscale, st: _Static):
  in_dtype = x_T.dtype

  def body(x, c):
    xin = x / c["sqrt_denom"]
    out = _call_model(fn, xin, c["t"], cond, uncond, gscale, st, in_dtype)
    if st.prediction_type == "epsilon":
      x0 = x - c["sigma"] * out
    elif st.prediction_type == "v_prediction":
      x0 = out * c["v_coef"] + x / c["denom"]
    else:
      x0 = out
    d = (x - x0) / c["sigma"]
    return x + d * c["dt"], None

  x, _ = jax.lax.scan(body, x_T.astype(f32) * co["init"][0], co, unroll=st.unroll)
  return x.astype(in_dtype)


@SAMPLERS.register("euler")
def euler_sample(denoise_fn, x_T, *, num_steps: int, schedule: Schedule, prediction_type: str = "epsilon",
                 rng=None, cond=None, uncond=None, guidance_scale=None, guidance_schedule: str = "constant",
                 guidance_power: float = 4.0, guidance_channels: Optional[int] = None, unroll: int = 1,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, use_karras_sigmas: bool = True,
                 rho: float = 7.0):
  """Euler on the probability-flow ODE in VE sigma space (Karras et al. 2022, Alg. 1 with Euler steps),
  diffusers `EulerDiscreteScheduler` semantics (no churn): sigmas interpolated at the spaced timesteps,
  optionally re-gridded with Karras sigmas (rho = 7) between their ends, then a final 0.

  The state is x_ve = x_vp / alpha; the model sees x_ve / sqrt(sigma^2 + 1) (the VP x_t) and the
  timestep t(sigma) (fractional, log-sigma interpolation, for Karras sigmas). x_T is multiplied by
  diffusers' init_noise_sigma (sigma_max, or sqrt(sigma_max^2 + 1) for "leading").
  Deterministic; `rng` is unused.
  """
  del rng
  schedule = _check_schedule(schedule, "euler_sample")
  param_lib.check_prediction_type(prediction_type)
  T = schedule.num_train_timesteps
  ts, sig = euler_sigmas(schedule, num_steps, timestep_spacing, steps_offset, use_karras_sigmas, rho)
  _check_sigma_grid(sig, _where("euler_sample", schedule, num_steps, timestep_spacing))
  # float32 host arithmetic in diffusers' order (matters for huge sigmas: cosine 2.0e4, zero-SNR 4096).
  sig = sig.astype(np.float32)
  s = sig[:-1]
  denom = (s ** 2 + np.float32(1.0)).astype(np.float32)
  sqrt_denom = (denom ** np.float32(0.5)).astype(np.float32)
  init = sig.max() if timestep_spacing in ("linspace", "trailing") else (sig.max() ** 2 + np.float32(1)) ** 0.5
  co = _np32(dict(t=ts, sigma=s, denom=denom, sqrt_denom=sqrt_denom, v_coef=(-s / sqrt_denom).astype(np.float32),
                  dt=(sig[1:] - s).astype(np.float32), init=np.full_like(s, np.float32(init))))
  st, gscale = _guidance_static(prediction_type, cond, uncond, guidance_scale, guidance_schedule, guidance_power,
                                guidance_channels, T, unroll=unroll)
  return _euler_loop(_as_partial(denoise_fn), x_T, co, cond, uncond, gscale, st)


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


@SAMPLERS.register("edm_heun")
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


@SAMPLERS.register("consistency")
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


def sample(sampler: str, denoise_fn: Callable, x_T, **kwargs):
  """Dispatches to a sampler by name: "ddpm", "ddim", "dpmpp_2m", "euler", "edm_heun", "consistency"."""
  return SAMPLERS.get(sampler)(denoise_fn, x_T, **kwargs)
