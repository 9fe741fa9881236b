"""The diffusers parity harness shared by the wide parity grid (`test_parity_grid.py`) and the scheduler-config
tests: one diffusers scheduler and one of our samplers, the same analytic model (core_testlib), the same initial
noise and the same per-step noise, compared at the end.

Cost control: the denoiser is a `Partial` of a module-level function with the alphas_cumprod table as a traced
leaf, so a jitted loop is compiled once per (sampler settings, parameterisation, step count) and shared by every
schedule and spacing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from typing import Optional

import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from core_testlib import analytic_jax, analytic_torch

from diffusion_jax import core

SHAPE = (6, 4)
PROBE_ALWAYS = False
EPS32 = 2.0 ** -24
BASE_TOL = 1e-5
ANALYTIC = 4.0


def _model_epsilon(ac, x, t, cond):
  del cond
  return analytic_jax(x, t, ac, "epsilon")


def _model_v(ac, x, t, cond):
  del cond
  return analytic_jax(x, t, ac, "v_prediction")


def _model_sample(ac, x, t, cond):
  del cond
  return analytic_jax(x, t, ac, "sample")


_MODELS = {"epsilon": _model_epsilon, "v_prediction": _model_v, "sample": _model_sample}


def denoiser(ac_table, pred):
  """A traced-table denoiser: no re-trace across schedules (same function object, table is a leaf)."""
  return Partial(_MODELS[pred], jnp.asarray(np.asarray(ac_table, np.float32)))


# Beta schedules the project offers (ours, diffusers' keys). Every diffusers class gets explicit beta_start /
# beta_end (HeunDiscreteScheduler and LCMScheduler have other defaults).
SCHEDULES = {
    "linear": (dict(name="linear"), dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
    "linear_to_0.04": (dict(name="linear", beta_end=0.04), dict(beta_schedule="linear", beta_start=1e-4,
                                                                 beta_end=0.04)),
    "scaled_linear": (dict(name="scaled_linear", beta_start=0.00085, beta_end=0.012),
                      dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    "cosine": (dict(name="cosine"), dict(beta_schedule="squaredcos_cap_v2")),
    "zero_snr": (dict(name="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_snr=True),
                 dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)),
}

_SCHED_CACHE = {}


def our_schedule(name):
  if name not in _SCHED_CACHE:
    _SCHED_CACHE[name] = core.make_schedule(**SCHEDULES[name][0])
  return _SCHED_CACHE[name]


@dataclasses.dataclass(frozen=True)
class Case:
  """One sampler configuration on both sides."""
  id: str
  sampler: str                  # our registry name
  kwargs: tuple                 # our extra kwargs, as ((key, value), ...)
  cls: str                      # diffusers scheduler class
  dkw: tuple = ()               # diffusers config kwargs
  noise: Optional[str] = None   # None | "variance_noise" | diffusers module whose randn_tensor is patched
  spacing: bool = True          # the sampler takes timestep_spacing
  zero_snr: bool = True         # the diffusers class supports rescale_betas_zero_snr
  raw_ac: bool = False          # uses alphas_cumprod directly (DDPM/DDIM/LCM): eps is undefined at zero SNR
  spacing_free: bool = False    # Karras grid of DPM/UniPC: diffusers ignores the spacing (one spacing is run)
  sigma64: bool = False         # run diffusers' per-step sigma arithmetic in float64 (Euler ancestral)
  karras_start: bool = False    # DPM/UniPC Karras: diffusers fails when its first two timesteps coincide
  ve_state: bool = False        # the state is x / alpha (Euler, Euler ancestral, Heun): sigma_max-scaled


_DIFFUSERS_CACHE = {}


def _diffusers_scheduler(case: Case, sched_name, pred, spacing, n):
  """A fresh diffusers scheduler after `set_timesteps(n)` (constructed once per configuration, then copied)."""
  import copy

  import diffusers
  import torch
  key = (case.cls, repr(case.dkw), sched_name, pred, spacing if case.spacing else None)
  if key not in _DIFFUSERS_CACHE:
    kw = dict(SCHEDULES[sched_name][1])
    kw.update(dict(case.dkw))
    if case.spacing:
      kw["timestep_spacing"] = spacing
    _DIFFUSERS_CACHE[key] = getattr(diffusers, case.cls)(num_train_timesteps=1000, prediction_type=pred, **kw)
  s = copy.deepcopy(_DIFFUSERS_CACHE[key])
  s.set_timesteps(n)
  if case.sigma64:
    # diffusers' Euler-ancestral sigma_down = sqrt(sigma_to^2 - sigma_up^2) cancels catastrophically in float32 when
    # sigma_to << sigma (NaN with the cosine schedule, 3 trailing steps); the reference runs that arithmetic in
    # float64 (the same sigmas, widened), ours uses the exact closed forms.
    s.sigmas = s.sigmas.to(torch.float64)
  return s


@contextlib.contextmanager
def _patched_randn(module_name, holder):
  if module_name is None or module_name == "variance_noise":
    yield
    return
  mod = importlib.import_module(f"diffusers.schedulers.{module_name}")
  orig = mod.randn_tensor

  def fake(shape, *a, **k):
    z = holder["z"]
    assert tuple(z.shape) == tuple(shape), (z.shape, shape)
    return z.to(k.get("dtype") or z.dtype)

  mod.randn_tensor = fake
  try:
    yield
  finally:
    mod.randn_tensor = orig


def run_diffusers(sched, x, pred, noise=None, noise_mode=None, jitter=None):
  """diffusers loop: scale_model_input, the analytic torch model on the scheduler's own alphas_cumprod table,
  step. Per-step noise: row i (i = index of the scheduler step) as `variance_noise` or through a patched
  `randn_tensor`. `jitter` (a NumPy Generator): move every model output by one ulp in a random direction."""
  import torch
  xt = torch.from_numpy(x) * float(sched.init_noise_sigma)
  ac = sched.alphas_cumprod.to(torch.float32)
  holder = {}
  with _patched_randn(noise_mode, holder):
    for i, t in enumerate(sched.timesteps):
      xin = sched.scale_model_input(xt, t)
      out = analytic_torch(xin, t.float().reshape(1).expand(xt.shape[0]), ac, pred)
      if jitter is not None:
        out = torch.from_numpy(_ulp_step(out.numpy(), jitter))
      kw = {}
      if noise is not None:
        z = torch.from_numpy(noise[i])
        if noise_mode == "variance_noise":
          kw["variance_noise"] = z
        else:
          holder["z"] = z
      xt = sched.step(out, t, xt, **kw).prev_sample
  return xt.numpy()


def conditioning(sched):
  """sigma_max = sqrt((1 - a) / a) at the first timestep (the scheduler's own table: 2^-24 only for a zero-SNR
  terminal value in the sigma-space schedulers, 0 -> 2^-24 here for the others)."""
  ac = sched.alphas_cumprod.double().numpy()
  t0 = int(math.floor(float(sched.timesteps[0])))
  a = ac[t0] if ac[t0] > 0 else EPS32
  return float(np.sqrt((1 - a) / a))


def tolerance(sigma_max, delta, x_max, ve_state):
  """Float32 agreement bound of one cell: 1e-5 + 16 x diffusers' measured one-ulp sensitivity `delta`
  (`sensitivity`; 0 when not probed), and for samplers whose state is the VE x / alpha (Euler, Euler ancestral,
  Heun) + 4 ulps of the initial state sigma_max * max|x_T|: such a state resolves no better than that, and the first
  step cancels it down to O(1) (with max |x_T| ~ 2.5 the term is 1.2e-2 for the cosine schedule's sigma_max 2.0e4,
  2.4e-3 at zero SNR's 4096, 9e-5 for linear's 157)."""
  ve = ANALYTIC * EPS32 * sigma_max * max(1.0, x_max) if ve_state else 0.0
  return BASE_TOL + 16.0 * delta + ve


def _ulp_step(a, rng):
  """Moves every nonzero entry of a float32 array by one ulp, in a random direction."""
  a = np.asarray(a, np.float32)
  away = np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
  return np.where(a == 0, a, np.nextafter(a, away))


def sensitivity(case, sched_name, pred, spacing, n, x, noise, ref, rng, probes=3):
  """diffusers' own float32 noise floor for this case: the largest change of its result over `probes` runs in which
  x_T, its sigma table (sigma-space schedulers) and every model output move by one ulp per entry, in random
  directions. Both sides legitimately differ by such ulps: NumPy vs torch host arithmetic (torch's `** 0.5` is not
  always correctly rounded) and torch vs XLA transcendentals in the model (tanh, sin). Tiny alphas_cumprod tails
  amplify an ulp of eps by 1 / alpha (2e4 on the cosine schedule), and coarse grids amplify it further (Heun from
  sigma 157 to 0.01 in one step divides a cancellation error by 0.01)."""
  import torch
  d = 0.0
  for _ in range(probes):
    s = _diffusers_scheduler(case, sched_name, pred, spacing, n)
    if hasattr(s, "sigmas"):
      s.sigmas = torch.from_numpy(_ulp_step(s.sigmas.numpy(), rng)).to(s.sigmas.dtype)
    d = max(d, float(np.max(np.abs(run_diffusers(s, _ulp_step(x, rng), pred, noise, case.noise, rng) - ref))))
  return d


def run_ours(case: Case, sched_name, pred, spacing, n, x, noise, ac_table):
  kw = dict(case.kwargs)
  if case.spacing:
    kw["timestep_spacing"] = spacing
  if noise is not None:
    kw["step_noise"] = noise
  return np.asarray(core.sample(case.sampler, denoiser(ac_table, pred), jnp.asarray(x), num_steps=n,
                                schedule=our_schedule(sched_name), prediction_type=pred, **kw))


class DiffusersFailed(Exception):
  """diffusers raised on this case; `ours` holds our result."""

  def __init__(self, ours, err):
    super().__init__(repr(err))
    self.ours, self.err = ours, err


def run_case(case: Case, sched_name, pred, spacing, n, seed=0):
  """Returns (ours, ref, tol, sigma_max, delta); raises DiffusersFailed (with our result) if diffusers raises."""
  sched = _diffusers_scheduler(case, sched_name, pred, spacing, n)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  noise = None
  if case.noise is not None:
    noise = rng.standard_normal((len(sched.timesteps),) + SHAPE).astype(np.float32)
  ac_table = sched.alphas_cumprod.numpy()
  try:
    ref = run_diffusers(sched, x, pred, noise, case.noise)
  except (IndexError, AssertionError) as e:
    raise DiffusersFailed(run_ours(case, sched_name, pred, spacing, n, x, noise, ac_table), e) from None
  ours = run_ours(case, sched_name, pred, spacing, n, x, noise, ac_table)
  sm, x_max = conditioning(sched), float(np.abs(x).max())
  delta = 0.0
  if PROBE_ALWAYS or not float(np.max(np.abs(ours - ref))) <= tolerance(sm, 0.0, x_max, case.ve_state):
    # Only needed (and only run) when the analytic bound is not enough: the probes can only widen the tolerance.
    delta = sensitivity(case, sched_name, pred, spacing, n, x, noise, ref, rng)
  return ours, ref, tolerance(sm, delta, x_max, case.ve_state), sm, delta
