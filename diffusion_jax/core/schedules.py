"""Noise schedules and conversions between their representations.

Conventions (used everywhere in `diffusion_jax.core`):

* Variance-preserving (VP) forward process: `x_t = alpha_t * x_0 + sigma_t * eps` with
  `alpha_t = sqrt(alphas_cumprod[t])`, `sigma_t = sqrt(1 - alphas_cumprod[t])`.
* Variance-exploding (VE / EDM / Karras) view of the same process: `x_ve = x_t / alpha_t = x_0 + s * eps`
  with `s = sigma_t / alpha_t` (diffusers calls `s` the "sigma" of Euler/DPM schedulers).
* log-SNR `lambda = log(alpha^2 / sigma^2) = -2 log(s)`.

Discrete schedules (`make_schedule`) are host-side NumPy: a frozen `Schedule` holding `betas` and
`alphas_cumprod` as float64 arrays whose values are rounded to float32 exactly as diffusers builds them
(float32 betas, cumulative product accumulated in double and rounded to float32), so that samplers built on
them agree with diffusers' schedulers to float32 round-off. `Schedule` is also a JAX pytree (the two arrays
are leaves), so it can be closed over or passed into `jax.jit`.

Continuous-time helpers (`vp_alpha_sigma`, `cosine_alpha_sigma`) take `t` in [0, 1] and work on JAX or
NumPy arrays. `karras_sigmas` builds the EDM/Karras sigma grid (rho = 7).

Sigma-space samplers (Euler, Heun, DPM-Solver, UniPC, EDM on a discrete schedule) read the schedule through
`Schedule.solver_alphas_cumprod` / `Schedule.solver_sigmas()`: the same float32 values, except that a zero
terminal `alphas_cumprod` (zero-terminal-SNR rescaling) becomes 2^-24, exactly as diffusers' schedulers do. Every
other value is used as it is, however small (the cosine schedule ends at 2.4e-9, linear betas to 0.04 at 1.5e-9).

Timestep spacings (`spacing_timesteps`) follow diffusers: "leading", "trailing", "linspace" (with
`steps_offset` for "leading"), in three variants ("ddpm" for DDPM/DDIM, "dpm" for DPM-Solver multistep,
"euler" for EulerDiscrete, whose "linspace" grid is fractional).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.registry import Registry, check_choice

SCHEDULES = Registry("noise schedule")
SPACINGS = ("leading", "trailing", "linspace")
# diffusers' stand-in for the zero terminal alphas_cumprod of a zero-SNR schedule (sigma-space samplers only).
# It replaces the *terminal* value, and only a zero-SNR one: it is not a floor for small values.
ZERO_SNR_ALPHAS_CUMPROD = 2.0 ** -24
MIN_ALPHAS_CUMPROD = ZERO_SNR_ALPHAS_CUMPROD  # older name, kept for callers


def _xp(a):
  return np if isinstance(a, (np.ndarray, float, int)) else jnp


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A discrete VP noise schedule with `num_train_timesteps` steps.

  Attributes:
    betas: `[T]` float64 NumPy array (values rounded to float32 as diffusers does).
    alphas_cumprod: `[T]` cumulative product of `1 - betas` (float32-rounded, stored as float64).
    name: the schedule name it was built from ("linear", "scaled_linear", "cosine", ...).
    rescale_zero_snr: whether the betas were rescaled to zero terminal SNR (Lin et al. 2023, Alg. 1).
  """
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  name: str = "custom"
  rescale_zero_snr: bool = False

  @property
  def num_train_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas(self):
    return 1.0 - self.betas

  @property
  def alpha_t(self):
    """sqrt(alphas_cumprod): the signal scale alpha_t of the VP process."""
    return _xp(self.alphas_cumprod).sqrt(self.alphas_cumprod)

  @property
  def sigma_t(self):
    """sqrt(1 - alphas_cumprod): the noise scale sigma_t of the VP process."""
    return _xp(self.alphas_cumprod).sqrt(1.0 - self.alphas_cumprod)

  @property
  def solver_alphas_cumprod(self):
    """alphas_cumprod as diffusers' sigma-space schedulers (Euler, Heun, DPM-Solver, UniPC) see it.

    Identical to `alphas_cumprod`, except that the terminal value of a zero-terminal-SNR schedule
    (`rescale_zero_snr=True`, or a custom schedule whose last value is exactly 0) is replaced by 2^-24 so that
    the first sigma is finite. Small values are *not* floored: diffusers replaces only that terminal value.
    """
    ac = self.alphas_cumprod
    xp = _xp(ac)
    last = ac[-1]
    fix = xp.logical_or(self.rescale_zero_snr, last == 0)
    new_last = xp.where(fix, ZERO_SNR_ALPHAS_CUMPROD, last)
    if xp is np:
      out = np.array(ac, np.float64, copy=True)
      out[-1] = new_last
      return out
    return ac.at[-1].set(new_last)

  def solver_sigmas(self) -> np.ndarray:
    """`[T]` float32 VE sigmas `((1 - a) / a) ** 0.5` of `solver_alphas_cumprod`, in float32 arithmetic as diffusers'
    schedulers build their tables (host NumPy)."""
    ac = np.asarray(self.solver_alphas_cumprod, np.float64).astype(np.float32)
    if np.any(ac[:-1] <= 0):
      k = int(np.argmax(ac[:-1] <= 0))
      raise ValueError(f"Schedule {self.name!r}: alphas_cumprod[{k}] = {ac[k]} <= 0 before the last timestep; sigma "
                       f"(VE) would be infinite there. Only the terminal value may be zero (zero-terminal-SNR).")
    one = np.float32(1.0)
    return (((one - ac) / ac) ** np.float32(0.5)).astype(np.float32)

  @property
  def ve_sigmas(self):
    """sigma_t / alpha_t, the VE ("Karras") sigmas diffusers' Euler/DPM schedulers use, from
    `solver_alphas_cumprod` (a zero terminal alphas_cumprod of a zero-SNR schedule becomes 2^-24, as in those
    schedulers; every other value is kept)."""
    xp = _xp(self.alphas_cumprod)
    ac = self.solver_alphas_cumprod
    return xp.sqrt((1.0 - ac) / ac)

  @property
  def log_snr(self):
    xp = _xp(self.alphas_cumprod)
    return xp.log(self.alphas_cumprod) - xp.log1p(-self.alphas_cumprod)

  def snr(self):
    return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

  def gather(self, t, x=None, dtype=jnp.float32):
    """Returns (alpha_t, sigma_t) at integer timesteps `t` `[B]`, broadcast against `x` if given (JAX)."""
    ac = jnp.asarray(self.alphas_cumprod, dtype)[jnp.asarray(t, jnp.int32)]
    a, s = jnp.sqrt(ac), jnp.sqrt(1.0 - ac)
    if x is not None:
      a, s = bcast(a, x), bcast(s, x)
    return a, s


jax.tree_util.register_dataclass(
    Schedule, data_fields=["betas", "alphas_cumprod"], meta_fields=["name", "rescale_zero_snr"])


def bcast(v, x):
  """Reshapes a per-example `[B]` array (or a scalar) to broadcast against `x` `[B, ...]`."""
  v = jnp.asarray(v)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _f32(a) -> np.ndarray:
  return np.asarray(a, np.float64).astype(np.float32)


@SCHEDULES.register("linear")
def _linear(T, beta_start, beta_end):
  """DDPM linear betas (Ho et al. 2020): linspace(beta_start, beta_end, T)."""
  return _f32(np.linspace(beta_start, beta_end, T))


@SCHEDULES.register("scaled_linear")
def _scaled_linear(T, beta_start, beta_end):
  """Stable Diffusion / LDM betas: linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2."""
  return (_f32(np.linspace(beta_start ** 0.5, beta_end ** 0.5, T)) ** 2).astype(np.float32)


@SCHEDULES.register("squaredcos_cap_v2")  # diffusers' name
@SCHEDULES.register("cosine")
def _cosine(T, beta_start, beta_end, max_beta=0.999, s=0.008):
  """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17), betas clipped at 0.999.

  Same as diffusers' "squaredcos_cap_v2"; `beta_start`/`beta_end` are ignored.
  """
  del beta_start, beta_end
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
  return _f32(betas)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales betas so that the last timestep has zero SNR (Lin et al. 2023, "Common diffusion noise
  schedules and sample steps are flawed", Algorithm 1). float32 arithmetic, as diffusers does it."""
  betas = np.asarray(betas, np.float32)
  alphas = (np.float32(1.0) - betas).astype(np.float32)
  abar_sqrt = np.sqrt(np.cumprod(alphas.astype(np.float64)).astype(np.float32))
  a0, aT = abar_sqrt[0], abar_sqrt[-1]
  abar_sqrt = (abar_sqrt - aT).astype(np.float32)
  abar_sqrt = (abar_sqrt * (a0 / (a0 - aT))).astype(np.float32)
  abar = (abar_sqrt ** 2).astype(np.float32)
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]]).astype(np.float32)
  return (np.float32(1.0) - alphas).astype(np.float32)


def make_schedule(name: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, rescale_zero_snr: bool = False) -> Schedule:
  """Builds a discrete VP schedule.

  Args:
    name: "linear" (DDPM; defaults beta 1e-4 -> 0.02), "scaled_linear" (Stable Diffusion: use
      beta_start=0.00085, beta_end=0.012), "cosine" (improved DDPM; alias "squaredcos_cap_v2").
    num_train_timesteps: T.
    beta_start, beta_end: end points of the beta ramp (ignored by "cosine").
    rescale_zero_snr: rescale to zero terminal SNR (then `alphas_cumprod[-1] == 0`; use a
      v-prediction model and "trailing" spacing with it). Sigma-space samplers (Euler, DPM-Solver, EDM)
      use 2^-24 instead of the zero, as diffusers does.

  Returns:
    A frozen `Schedule`.
  """
  fn = SCHEDULES.get(name)
  if num_train_timesteps < 1:
    raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")
  betas = fn(int(num_train_timesteps), float(beta_start), float(beta_end))
  return schedule_from_betas(betas, name=name, rescale_zero_snr=rescale_zero_snr)


def schedule_from_betas(betas, name: str = "custom", rescale_zero_snr: bool = False) -> Schedule:
  """A `Schedule` from explicit betas (diffusers' `trained_betas`), rounded to float32 as diffusers does.

  Betas must lie in [0, 1] (1 only at the last timestep, a zero-terminal-SNR schedule).
  """
  betas = np.asarray(betas, np.float64).reshape(-1)
  if betas.size < 1:
    raise ValueError("betas must be a non-empty 1-D array.")
  if not np.all(np.isfinite(betas)) or np.any(betas < 0) or np.any(betas[:-1] >= 1) or betas[-1] > 1:
    raise ValueError(f"betas must be finite and in [0, 1) (1 allowed only for the last timestep); got min "
                     f"{betas.min()}, max {betas.max()}.")
  betas = betas.astype(np.float32)
  if rescale_zero_snr:
    betas = rescale_zero_terminal_snr(betas)
  alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float32)
  # diffusers: torch.cumprod on CPU float32 accumulates in double and rounds the outputs to float32.
  alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  return Schedule(betas=betas.astype(np.float64), alphas_cumprod=alphas_cumprod.astype(np.float64),
                  name=name, rescale_zero_snr=bool(rescale_zero_snr))


# ----------------------------------------------------------------------------- conversions

def alpha_sigma_from_alphas_cumprod(ac):
  xp = _xp(ac)
  return xp.sqrt(ac), xp.sqrt(1.0 - ac)


def log_snr_from_alpha_sigma(alpha, sigma):
  """lambda = log(alpha^2 / sigma^2)."""
  xp = _xp(alpha)
  return 2.0 * (xp.log(alpha) - xp.log(sigma))


def alpha_sigma_from_log_snr(log_snr):
  """VP (alpha, sigma) with alpha^2 + sigma^2 = 1 from lambda: alpha^2 = sigmoid(lambda)."""
  xp = _xp(log_snr)
  if xp is np:
    a2 = 1.0 / (1.0 + np.exp(-log_snr))
    s2 = 1.0 / (1.0 + np.exp(log_snr))
  else:
    a2, s2 = jax.nn.sigmoid(log_snr), jax.nn.sigmoid(-log_snr)
  return xp.sqrt(a2), xp.sqrt(s2)


def ve_sigma_from_alpha_sigma(alpha, sigma):
  """VE sigma s = sigma / alpha (x_ve = x_t / alpha)."""
  return sigma / alpha


def alpha_sigma_from_ve_sigma(s):
  """VP (alpha, sigma) for VE sigma s: alpha = 1 / sqrt(1 + s^2), sigma = s * alpha."""
  xp = _xp(s)
  alpha = 1.0 / xp.sqrt(s * s + 1.0)
  return alpha, s * alpha


def vp_log_alpha(t, beta_min: float = 0.1, beta_max: float = 20.0):
  """Continuous VP-SDE (Song et al. 2021): log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2."""
  return -0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min


def vp_alpha_sigma(t, beta_min: float = 0.1, beta_max: float = 20.0):
  """(alpha(t), sigma(t)) of the continuous VP-SDE for t in [0, 1]."""
  xp = _xp(t)
  log_a = vp_log_alpha(t, beta_min, beta_max)
  return xp.exp(log_a), xp.sqrt(-xp.expm1(2.0 * log_a))


def cosine_alpha_sigma(t, s: float = 0.008):
  """Continuous cosine schedule (improved DDPM):
  alpha(t) = cos((t + s) / (1 + s) * pi / 2) / cos(s / (1 + s) * pi / 2)."""
  xp = _xp(t)
  f = lambda u: xp.cos((u + s) / (1 + s) * math.pi / 2)
  alpha = f(t) / f(0.0 * t)
  alpha = xp.clip(alpha, 0.0, 1.0)
  return alpha, xp.sqrt(1.0 - alpha * alpha)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
  """EDM / Karras et al. 2022 (Eq. 5) sigma grid, `n` values descending from sigma_max to sigma_min.

  `sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`. No trailing zero
  (samplers append it).
  """
  if n < 1:
    raise ValueError(f"karras_sigmas needs n >= 1, got {n}.")
  ramp = np.linspace(0.0, 1.0, n)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma, log_sigmas):
  """Fractional discrete timestep for VE sigma(s), linear interpolation in log-sigma (diffusers'
  `_sigma_to_t`). Works on NumPy or JAX arrays; `log_sigmas` is the `[T]` log VE-sigma table."""
  xp = _xp(sigma)
  log_sigmas = xp.asarray(log_sigmas)
  log_sigma = xp.log(xp.maximum(sigma, 1e-10))
  dists = log_sigma[..., None] - log_sigmas
  low_idx = xp.clip(xp.sum(dists >= 0, axis=-1) - 1, 0, log_sigmas.shape[0] - 2)
  low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
  w = xp.clip((low - log_sigma) / (low - high), 0.0, 1.0)
  return (1.0 - w) * low_idx + w * (low_idx + 1)


def spacing_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                      steps_offset: int = 0, variant: str = "ddpm", last_timestep=None) -> np.ndarray:
  """Descending inference timesteps exactly as diffusers' `set_timesteps` defines them.

  Args:
    num_train_timesteps: T.
    num_steps: number of sampling steps (must be <= T).
    spacing: "leading" (`arange(n) * (T // n)` + steps_offset), "trailing"
      (`round(arange(T, 0, -T/n)) - 1`), "linspace" (`round(linspace(0, T-1, n))`).
    steps_offset: added to "leading" timesteps (Stable Diffusion uses 1).
    variant: "ddpm" (DDPMScheduler/DDIMScheduler), "dpm" (DPMSolverMultistepScheduler, which builds n + 1
      points for "leading"/"linspace" and drops the last), "euler" (EulerDiscreteScheduler; float grid,
      "linspace" not rounded).
    last_timestep: variant "dpm" only: the grid ends at this timestep instead of T (diffusers'
      `lambda_min_clipped`); "trailing" keeps the stride T / n, so it may give fewer than `num_steps` steps.

  Returns:
    `[num_steps]` int64 (float64 for variant "euler") NumPy array, descending.
  """
  check_choice("timestep spacing", spacing, SPACINGS)
  check_choice("timestep spacing variant", variant, ("ddpm", "dpm", "euler"))
  T, n = int(num_train_timesteps), int(num_steps)
  if n < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if n > T:
    raise ValueError(f"num_steps={n} is larger than the schedule's num_train_timesteps={T}: a model trained "
                     f"on {T} timesteps can be sampled with at most {T} steps. Use num_steps <= {T}.")
  if last_timestep is not None and variant != "dpm":
    raise ValueError("last_timestep is only defined for the 'dpm' spacing variant.")
  if variant == "dpm":
    L = T if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
      ts = np.linspace(0, L - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
      ratio = L // (n + 1)
      ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:
      ts = np.arange(L, 0, -T / n).round().astype(np.int64) - 1
    return _check_timesteps(ts.copy(), T, n, spacing, steps_offset, variant)
  if spacing == "linspace":
    if variant == "euler":
      ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    else:
      ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
  elif spacing == "leading":
    ratio = T // n
    ts = (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + steps_offset
  else:
    ratio = T / n
    ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
  if variant == "euler":
    ts = ts.astype(np.float32).astype(np.float64)
  return _check_timesteps(ts.copy(), T, n, spacing, steps_offset, variant)


def _check_timesteps(ts, T, n, spacing, steps_offset, variant):
  """Timesteps must lie in [0, T - 1] and strictly decrease: a repeated timestep is a zero step."""
  where = (f"timestep_spacing={spacing!r}, num_steps={n}, steps_offset={steps_offset}, num_train_timesteps={T}"
           + (f" (spacing variant {variant!r})" if variant != "ddpm" else ""))
  if ts.max() > T - 1 or ts.min() < 0:
    raise ValueError(f"{where} gives timesteps outside [0, {T - 1}] (first {ts[0]:g}, last {ts[-1]:g}). "
                     f"Lower steps_offset or num_steps, or use timestep_spacing='trailing' or 'linspace'.")
  d = np.diff(ts)
  if np.any(d >= 0):
    i = int(np.argmax(d >= 0))
    raise ValueError(f"{where} gives a zero or negative step: timestep {ts[i]:g} is followed by {ts[i + 1]:g} "
                     f"(step {i} -> {i + 1}). Use fewer steps or timestep_spacing='trailing' (distinct timesteps for "
                     f"every num_steps <= {T}).")
  return ts
