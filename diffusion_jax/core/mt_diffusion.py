"""MT-Diffusion core mathematics (pure JAX): the multi-modal forward process, its closed-form marginal and
posterior, the multi-term ELBO pieces, ancestral sampling (`mt_sample`, all T steps) and strided DDIM-style
sampling (`mt_ddim_sample`, any number of steps) in one shared diffusion space.

The formulation is the project's (derived; the paper's equations and code are not available), see
`shared/papers/mt_diffusion.md` and `docs/mt_diffusion.md`. Summary, with paper time t = 0..T:

* Modalities i = 1..N have codes E_i(x_i) in one space Z (same shape), stacked as `codes` `[N, B, ...]`.
* Weights w_t^(i) >= 0, sum_i w_t^(i) = 1, t = 0..T: a `WeightSchedule` (`constant_weights`,
  `linear_weights`, `weights_from_table`). Aggregated code m_t = sum_i w_t^(i) E_i (`aggregate`).
* abar_0 = 1 and abar_t = `schedule.alphas_cumprod[t - 1]` (the core's DDPM index is k = t - 1).
* forward:   q(z_t | z_{t-1}, x) = N(sqrt(alpha_t) z_{t-1} + sqrt(abar_t) (m_t - m_{t-1}), beta_t I), z_0 = m_0
* marginal:  q(z_t | x) = N(sqrt(abar_t) m_t, (1 - abar_t) I)
* posterior: q(z_{t-1} | z_t, x) = N(sqrt(abar_{t-1}) m_{t-1} + c_t (z_t - sqrt(abar_t) m_t), beta~_t I),
             c_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t), beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
* reverse:   p_theta(z_{t-1} | z_t) = the posterior with the codes replaced by predicted codes.

Predictors (the shared denoiser + heads): `predict_fn(z_t, k, cond) -> codes_hat [N, B, ...]` with `k` the
core's DDPM index t - 1 as float32 `[B]` (the same time convention as `core.samplers`, so the same backbone
serves both). Losses are per example `[B]` float32, mean over the non-batch axes of Z (nats per dimension), as
in `core.losses`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.core.schedules import Schedule

f32 = jnp.float32
VARIANCE_TYPES = ("fixed_small", "fixed_large")
WEIGHT_ATOL = 1e-6

# ----------------------------------------------------------------------------- modality weights


@dataclasses.dataclass(frozen=True, eq=False)
class WeightSchedule:
  """Modality weights w_t^(i) for paper time t = 0..T.

  Attributes:
    table: `[T + 1, N]` float64 NumPy array; row t holds (w_t^(1), ..., w_t^(N)), each row nonnegative and
      summing to 1.
    name: how it was built ("constant", "linear", "custom").
  """
  table: np.ndarray
  name: str = "custom"

  @property
  def num_modalities(self) -> int:
    return int(self.table.shape[1])

  @property
  def num_train_timesteps(self) -> int:
    return int(self.table.shape[0]) - 1

  def at(self, t):
    """Weights at integer paper times `t` (scalar or `[B]`) -> `[N]` or `[B, N]` float32 (JAX)."""
    return jnp.asarray(self.table, f32)[jnp.asarray(t, jnp.int32)]


def _check_weight_vector(w, what: str) -> np.ndarray:
  w = np.asarray(w, np.float64)
  if w.ndim != 1 or w.shape[0] < 1:
    raise ValueError(f"{what}: modality weights must be a non-empty 1-D vector (one weight per modality), got "
                     f"shape {w.shape}.")
  return w


def validate_weight_table(table, num_train_timesteps: Optional[int] = None, name: str = "weights") -> np.ndarray:
  """Checks a `[T + 1, N]` weight table: finite, >= 0, rows summing to 1 (atol 1e-6), T as expected.

  Returns the table as float64 NumPy; raises `ValueError` naming the first bad entry and the fix.
  """
  tab = np.asarray(table, np.float64)
  if tab.ndim != 2 or tab.shape[0] < 2 or tab.shape[1] < 1:
    raise ValueError(f"{name}: the weight table must have shape [T + 1, N] (rows t = 0..T, one column per "
                     f"modality, T >= 1, N >= 1), got shape {tab.shape}.")
  if num_train_timesteps is not None and tab.shape[0] != num_train_timesteps + 1:
    raise ValueError(f"{name}: the weight table has {tab.shape[0]} rows but the noise schedule has T = "
                     f"{num_train_timesteps} steps; it needs T + 1 = {num_train_timesteps + 1} rows (t = 0..T). "
                     f"Build it with the schedule's num_train_timesteps.")
  if not np.all(np.isfinite(tab)):
    t, i = np.argwhere(~np.isfinite(tab))[0]
    raise ValueError(f"{name}: weight w_t^(i) at t={t}, modality i={i} is {tab[t, i]}; weights must be finite.")
  if np.any(tab < 0):
    t, i = np.argwhere(tab < 0)[0]
    raise ValueError(f"{name}: weight w_t^(i) at t={t}, modality i={i} is {tab[t, i]} < 0; modality weights must "
                     f"be nonnegative.")
  sums = tab.sum(axis=1)
  bad = np.abs(sums - 1.0) > WEIGHT_ATOL
  if np.any(bad):
    t = int(np.argmax(bad))
    raise ValueError(f"{name}: the weights at t={t} sum to {sums[t]!r}, not 1; modality weights must sum to 1 at "
                     f"every t (normalise them: w / w.sum()).")
  return tab


def constant_weights(w: Sequence[float], num_train_timesteps: int) -> WeightSchedule:
  """The same weight vector `w` `[N]` (nonnegative, summing to 1) at every t = 0..T."""
  w = _check_weight_vector(w, "constant_weights")
  tab = np.tile(w[None], (int(num_train_timesteps) + 1, 1))
  return WeightSchedule(validate_weight_table(tab, num_train_timesteps, "constant_weights"), "constant")


def linear_weights(w_start: Sequence[float], w_end: Sequence[float], num_train_timesteps: int) -> WeightSchedule:
  """Weights that move linearly from `w_start` at t = 0 to `w_end` at t = T: w_t = (1 - t/T) w_start + (t/T) w_end.

  Both endpoints must be valid weight vectors of the same length; every row then is one too.
  """
  a = _check_weight_vector(w_start, "linear_weights (w_start)")
  b = _check_weight_vector(w_end, "linear_weights (w_end)")
  if a.shape != b.shape:
    raise ValueError(f"linear_weights: w_start has {a.shape[0]} modalities and w_end has {b.shape[0]}; they must "
                     f"match.")
  T = int(num_train_timesteps)
  validate_weight_table(np.stack([a, b]), None, "linear_weights (endpoints)")
  s = (np.arange(T + 1, dtype=np.float64) / T)[:, None]
  return WeightSchedule(validate_weight_table((1.0 - s) * a + s * b, T, "linear_weights"), "linear")


def weights_from_table(table, num_train_timesteps: Optional[int] = None) -> WeightSchedule:
  """Any `[T + 1, N]` table of weights (validated)."""
  return WeightSchedule(validate_weight_table(table, num_train_timesteps, "weights_from_table"), "custom")


def _check_weights(weights: WeightSchedule, schedule: Schedule, codes=None) -> WeightSchedule:
  if not isinstance(weights, WeightSchedule):
    raise TypeError(f"expected a WeightSchedule (constant_weights / linear_weights / weights_from_table), got "
                    f"{type(weights).__name__}.")
  if weights.num_train_timesteps != schedule.num_train_timesteps:
    raise ValueError(f"the weight schedule covers T = {weights.num_train_timesteps} steps but the noise schedule "
                     f"has T = {schedule.num_train_timesteps}; build the weights with the same T.")
  if codes is not None and codes.shape[0] != weights.num_modalities:
    raise ValueError(f"codes have {codes.shape[0]} modalities on their leading axis but the weight schedule has "
                     f"{weights.num_modalities}; codes must be stacked as [N, B, ...].")
  return weights


# ----------------------------------------------------------------------------- aggregation and tables


def aggregate(codes, weights_t):
  """m = sum_i w^(i) codes[i].

  Args:
    codes: `[N, B, ...]` stacked modality codes.
    weights_t: `[N]` (one weight vector for the batch) or `[B, N]` (per example, e.g. at per-example t).
  Returns:
    `[B, ...]` float32.
  """
  codes = jnp.asarray(codes, f32)
  w = jnp.asarray(weights_t, f32)
  if w.ndim == 1:
    if w.shape[0] != codes.shape[0]:
      raise ValueError(f"aggregate: {w.shape[0]} weights for {codes.shape[0]} modalities.")
    return jnp.tensordot(w, codes, axes=1)
  if w.ndim == 2:
    if w.shape != (codes.shape[1], codes.shape[0]):
      raise ValueError(f"aggregate: per-example weights must be [B, N] = {(codes.shape[1], codes.shape[0])}, got "
                       f"{w.shape}.")
    wb = jnp.moveaxis(w, 1, 0).reshape(w.shape[::-1] + (1,) * (codes.ndim - 2))
    return jnp.sum(wb * codes, axis=0)
  raise ValueError(f"aggregate: weights must be [N] or [B, N], got shape {w.shape}.")


def tables(schedule: Schedule) -> dict:
  """Float64 NumPy tables indexed by paper time t = 0..T (entry 0 is the data end: abar_0 = 1, beta_0 = 0):
  abar, beta, alpha, beta_tilde (posterior variance, beta~_1 = 0), coef_zt (c_t; 0 at t = 0 and t = 1)."""
  ac = np.concatenate([[1.0], np.asarray(schedule.alphas_cumprod, np.float64)])
  beta = np.concatenate([[0.0], np.asarray(schedule.betas, np.float64)])
  alpha = 1.0 - beta
  prev = np.concatenate([[1.0], ac[:-1]])
  with np.errstate(divide="ignore", invalid="ignore"):
    bt = np.where(ac < 1.0, beta * (1.0 - prev) / (1.0 - ac), 0.0)
    c = np.where(ac < 1.0, np.sqrt(alpha) * (1.0 - prev) / (1.0 - ac), 0.0)
  return dict(abar=ac, abar_prev=prev, beta=beta, alpha=alpha, beta_tilde=bt, coef_zt=c)


def _g(schedule, name, t, like):
  v = jnp.asarray(tables(schedule)[name], f32)[jnp.asarray(t, jnp.int32)]
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def _w(weights, t):
  """Weights at t: `[N]` for a scalar t, `[B, N]` for `[B]`."""
  return weights.at(t)


# ----------------------------------------------------------------------------- forward process


def q_step(schedule: Schedule, weights: WeightSchedule, t, z_prev, codes, noise):
  """One forward transition z_t ~ q(z_t | z_{t-1}, x) at paper time t in 1..T (scalar or `[B]`).

  z_t = sqrt(alpha_t) z_{t-1} + sqrt(abar_t) (m_t - m_{t-1}) + sqrt(beta_t) noise.
  """
  _check_weights(weights, schedule, codes)
  t = jnp.asarray(t, jnp.int32)
  z_prev = jnp.asarray(z_prev, f32)
  m_t = aggregate(codes, _w(weights, t))
  m_p = aggregate(codes, _w(weights, t - 1))
  return (jnp.sqrt(_g(schedule, "alpha", t, z_prev)) * z_prev
          + jnp.sqrt(_g(schedule, "abar", t, z_prev)) * (m_t - m_p)
          + jnp.sqrt(_g(schedule, "beta", t, z_prev)) * jnp.asarray(noise, f32))


def q_marginal(schedule: Schedule, weights: WeightSchedule, t, codes):
  """Closed-form q(z_t | x) at paper time t in 0..T: returns (mean `[B, ...]`, std broadcastable)."""
  _check_weights(weights, schedule, codes)
  m_t = aggregate(codes, _w(weights, t))
  return jnp.sqrt(_g(schedule, "abar", t, m_t)) * m_t, jnp.sqrt(1.0 - _g(schedule, "abar", t, m_t))


def q_sample(schedule: Schedule, weights: WeightSchedule, t, codes, noise):
  """z_t ~ q(z_t | x) = sqrt(abar_t) m_t + sqrt(1 - abar_t) noise."""
  mean, std = q_marginal(schedule, weights, t, codes)
  return mean + std * jnp.asarray(noise, f32)


def q_posterior(schedule: Schedule, weights: WeightSchedule, t, z_t, codes):
  """q(z_{t-1} | z_t, x) at paper time t in 1..T (t = 0 is not checked under jit): returns (mean `[B, ...]`,
  variance beta~_t broadcastable).

  mean = sqrt(abar_{t-1}) m_{t-1} + c_t (z_t - sqrt(abar_t) m_t).
  """
  _check_weights(weights, schedule, codes)
  t = jnp.asarray(t, jnp.int32)
  z_t = jnp.asarray(z_t, f32)
  m_t = aggregate(codes, _w(weights, t))
  m_p = aggregate(codes, _w(weights, t - 1))
  mean = (jnp.sqrt(_g(schedule, "abar_prev", t, z_t)) * m_p
          + _g(schedule, "coef_zt", t, z_t) * (z_t - jnp.sqrt(_g(schedule, "abar", t, z_t)) * m_t))
  return mean, _g(schedule, "beta_tilde", t, z_t)


# ----------------------------------------------------------------------------- reverse process


def _check_variance_type(v):
  if v not in VARIANCE_TYPES:
    raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {v!r}.")


def combine_known(codes_hat, known_codes=None, known_mask=None):
  """Replaces the predicted codes of known modalities (`known_mask` `[N]` bool) by `known_codes` `[N, B, ...]`."""
  if known_mask is None:
    return jnp.asarray(codes_hat, f32)
  mask = jnp.asarray(known_mask, bool).reshape((-1,) + (1,) * (codes_hat.ndim - 1))
  return jnp.where(mask, jnp.asarray(known_codes, f32), jnp.asarray(codes_hat, f32))


def p_mean_variance(schedule: Schedule, weights: WeightSchedule, t, z_t, codes_hat,
                    variance_type: str = "fixed_small"):
  """p_theta(z_{t-1} | z_t) given predicted codes `[N, B, ...]`: the posterior form with m replaced by m-hat.

  variance_type: "fixed_small" (beta~_t, DDPM's sigma^2 = beta~) or "fixed_large" (beta_t).
  Returns (mean, variance).
  """
  _check_variance_type(variance_type)
  mean, var = q_posterior(schedule, weights, t, z_t, codes_hat)
  if variance_type == "fixed_large":
    var = _g(schedule, "beta", t, mean)
  return mean, var


def p_step(schedule: Schedule, weights: WeightSchedule, t, z_t, codes_hat, noise,
           variance_type: str = "fixed_small"):
  """One reverse step z_{t-1} = mean + std * noise (no noise at t = 1, whatever the variance type)."""
  mean, var = p_mean_variance(schedule, weights, t, z_t, codes_hat, variance_type)
  t = jnp.asarray(t, jnp.int32)
  nonzero = (t > 1).astype(f32)
  nonzero = nonzero.reshape(nonzero.shape + (1,) * (mean.ndim - nonzero.ndim)) if nonzero.ndim else nonzero
  return mean + nonzero * jnp.sqrt(var) * jnp.asarray(noise, f32)


# ----------------------------------------------------------------------------- ELBO terms


def _mean_flat(x):
  x = jnp.asarray(x, f32)
  return jnp.mean(x, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def prior_kl(schedule: Schedule, weights: WeightSchedule, codes):
  """L_T = KL(q(z_T | x) || N(0, I)) per example, nats per dimension:
  0.5 [abar_T m_T^2 + (1 - abar_T) - 1 - log(1 - abar_T)] (the constant is 0 for a zero-SNR schedule)."""
  _check_weights(weights, schedule, codes)
  T = schedule.num_train_timesteps
  m = aggregate(codes, _w(weights, T))
  a = float(tables(schedule)["abar"][T])
  if not a < 1.0:
    raise ValueError(f"prior_kl: abar_T = {a} must be < 1 (a schedule with no noise at T has no prior term).")
  const = -a - math.log1p(-a)  # (1 - abar_T) - 1 - log(1 - abar_T)
  return _mean_flat(0.5 * (a * m ** 2 + const))


def posterior_kl(schedule: Schedule, weights: WeightSchedule, t, z_t, codes, codes_hat,
                 variance_type: str = "fixed_small"):
  """L_t = KL(q(z_{t-1} | z_t, x) || p_theta(z_{t-1} | z_t)) per example (nats per dimension), t in 2..T,
  from the two Gaussians directly."""
  qm, qv = q_posterior(schedule, weights, t, z_t, codes)
  pm, pv = p_mean_variance(schedule, weights, t, z_t, codes_hat, variance_type)
  qv, pv = jnp.broadcast_to(qv, qm.shape), jnp.broadcast_to(pv, qm.shape)
  kl = 0.5 * (jnp.log(pv) - jnp.log(qv) + qv / pv - 1.0 + (qm - pm) ** 2 / pv)
  return _mean_flat(kl)


def posterior_matching_error(schedule: Schedule, weights: WeightSchedule, t, codes, codes_hat):
  """The weighted squared error L_t reduces to (fixed_small variance):

      L_t = ||sqrt(abar_{t-1}) d_{t-1} - c_t sqrt(abar_t) d_t||^2 / (2 beta~_t),   d_s = sum_i w_s^(i) (E_i - E^_i).

  Returns (L_t `[B]`, lambda_t `[B]`) where lambda_t = beta_t^2 / (2 beta~_t alpha_t (1 - abar_t)) is DDPM's
  KL weight on the eps MSE: L_t / lambda_t is the "simple" (eps-MSE-equivalent) loss; with one modality, an
  identity encoder and constant weights it is exactly DDPM's ||eps - eps^||^2.
  """
  _check_weights(weights, schedule, codes)
  t = jnp.asarray(t, jnp.int32)
  d = jnp.asarray(codes, f32) - jnp.asarray(codes_hat, f32)
  d_t, d_p = aggregate(d, _w(weights, t)), aggregate(d, _w(weights, t - 1))
  diff = (jnp.sqrt(_g(schedule, "abar_prev", t, d_t)) * d_p
          - _g(schedule, "coef_zt", t, d_t) * jnp.sqrt(_g(schedule, "abar", t, d_t)) * d_t)
  tab = tables(schedule)
  with np.errstate(divide="ignore", invalid="ignore"):
    lam = np.where(tab["beta_tilde"] > 0,
                   tab["beta"] ** 2 / (2.0 * tab["beta_tilde"] * tab["alpha"] * (1.0 - tab["abar"])), 0.0)
  bt = _g(schedule, "beta_tilde", t, d_t)
  lt = _mean_flat(diff ** 2 / (2.0 * jnp.where(bt > 0, bt, 1.0)))
  return lt, jnp.asarray(lam, f32)[t]


def first_step_nll(schedule: Schedule, weights: WeightSchedule, z_1, codes, codes_hat, variance: str = "beta"):
  """L_0 = -log p_theta(z_0 | z_1) with z_0 = m_0(x), nats per dimension.

  The mean of p_theta at t = 1 is m^_0 (c_1 = 0). beta~_1 = 0, so the variance is beta_1 ("beta", DDPM's
  sigma_1^2 choice) or a float given here. `z_1` is accepted for the interface (the mean does not depend on it).
  """
  del z_1
  _check_weights(weights, schedule, codes)
  var = float(tables(schedule)["beta"][1]) if variance == "beta" else float(variance)
  if not var > 0:
    raise ValueError(f"first_step_nll: the variance must be > 0, got {var}.")
  m0 = aggregate(codes, _w(weights, 0))
  m0_hat = aggregate(codes_hat, _w(weights, 0))
  return _mean_flat(0.5 * (m0 - m0_hat) ** 2 / var + 0.5 * math.log(2.0 * math.pi * var))


def restoration_loss(rec_fns: Sequence[Optional[Callable]], inputs, targets, rec_weights=None):
  """L_rec hook: sum_i rec_weights[i] * rec_fns[i](inputs[i], targets[i]) -> `[B]`.

  The caller supplies the per-modality decoder losses (e.g. MSE through D_i for images and masks,
  cross-entropy for labels, cosine/MSE for embeddings); each returns `[B]`. A `None` entry skips that modality
  (e.g. a modality without a decoder). `inputs[i]` is what D_i reads (z_0, or the predicted code E^_i).
  Returns (total `[B]`, {"rec_<i>": `[B]`}).
  """
  n = len(rec_fns)
  if rec_weights is None:
    rec_weights = [1.0] * n
  if len(rec_weights) != n or len(inputs) != n or len(targets) != n:
    raise ValueError(f"restoration_loss: {n} decoder losses need {n} inputs, targets and weights, got "
                     f"{len(inputs)}, {len(targets)}, {len(rec_weights)}.")
  total, terms = None, {}
  for i, fn in enumerate(rec_fns):
    if fn is None:
      continue
    li = jnp.asarray(fn(inputs[i], targets[i]), f32)
    terms[f"rec_{i}"] = li
    total = rec_weights[i] * li if total is None else total + rec_weights[i] * li
  if total is None:
    raise ValueError("restoration_loss: every decoder loss is None.")
  return total, terms


def elbo_terms(predict_fn: Callable, codes, rng, *, schedule: Schedule, weights: WeightSchedule, cond=None,
               weighting: str = "kl", t=None, noise=None):
  """A one-sample, uniform-t estimate of the diffusion part of the multi-modal ELBO.

  t ~ U{1..T}, z_t ~ q(z_t | x), codes_hat = predict_fn(z_t, t - 1, cond); the per-example term is
  L_t (t >= 2) or L_0 (t = 1). weighting "kl": loss = L_T + T * term (unbiased for the negative ELBO up to the
  constant of the t = 1 term); "simple": loss = L_t / lambda_t (eps-MSE equivalent) at t >= 2 and
  ||m_0 - m^_0||^2 * abar_1 / (1 - abar_1) at t = 1 (DDPM's simple loss there), no prior term.
  Add `restoration_loss` (L_rec) on top with the decoders (e.g. on `terms["codes_hat"]`). Returns
  (loss `[B]`, terms: "L_T", "L_t", "L_0", "t" `[B]` and "codes_hat" `[N, B, ...]`).
  """
  if weighting not in ("kl", "simple"):
    raise ValueError(f"elbo_terms: weighting must be 'kl' or 'simple', got {weighting!r}.")
  _check_weights(weights, schedule, codes)
  codes = jnp.asarray(codes, f32)
  B = codes.shape[1]
  T = schedule.num_train_timesteps
  kt, kn = jax.random.split(rng)
  if t is None:
    t = jax.random.randint(kt, (B,), 1, T + 1, dtype=jnp.int32)
  t = jnp.asarray(t, jnp.int32)
  if noise is None:
    noise = jax.random.normal(kn, codes.shape[1:], f32)
  z_t = q_sample(schedule, weights, t, codes, noise)
  codes_hat = jnp.asarray(predict_fn(z_t, (t - 1).astype(f32), cond), f32)
  if codes_hat.shape != codes.shape:
    raise ValueError(f"elbo_terms: predict_fn must return codes of shape {codes.shape} ([N, B, ...]), got "
                     f"{codes_hat.shape}.")
  lt, lam = posterior_matching_error(schedule, weights, t, codes, codes_hat)
  l0 = first_step_nll(schedule, weights, z_t, codes, codes_hat)
  lT = prior_kl(schedule, weights, codes)
  if weighting == "kl":
    loss = lT + T * jnp.where(t == 1, l0, lt)
  else:
    a1 = float(tables(schedule)["abar"][1])
    m0_se = _mean_flat((aggregate(codes, _w(weights, 0)) - aggregate(codes_hat, _w(weights, 0))) ** 2)
    loss = jnp.where(t == 1, m0_se * a1 / (1.0 - a1), lt / jnp.where(lam > 0, lam, 1.0))
  return loss, {"L_T": lT, "L_t": jnp.where(t == 1, 0.0, lt), "L_0": jnp.where(t == 1, l0, 0.0),
                "t": t.astype(f32), "codes_hat": codes_hat}


# ----------------------------------------------------------------------------- ancestral sampling


@functools.partial(jax.jit, static_argnames=("variance_type",))
def _sample_loop(predict_fn, z_T, noises, wtab, tab, known_codes, known_mask, cond, variance_type):
  T = wtab.shape[0] - 1
  N = wtab.shape[1]
  B = z_T.shape[0]
  zshape = z_T.shape

  def body(carry, xs):
    z, _ = carry
    t, nz = xs
    ch = jnp.asarray(predict_fn(z, jnp.full((B,), t - 1, f32), cond), f32)
    ch = jnp.where(known_mask.reshape((N,) + (1,) * len(zshape)), known_codes, ch)
    m_t = jnp.tensordot(wtab[t], ch, axes=1)
    m_p = jnp.tensordot(wtab[t - 1], ch, axes=1)
    mean = jnp.sqrt(tab["abar_prev"][t]) * m_p + tab["coef_zt"][t] * (z - jnp.sqrt(tab["abar"][t]) * m_t)
    var = tab["beta_tilde"][t] if variance_type == "fixed_small" else tab["beta"][t]
    z = mean + jnp.where(t > 1, 1.0, 0.0) * jnp.sqrt(var) * nz
    return (z, ch), None

  ts = jnp.arange(T, 0, -1, dtype=jnp.int32)
  init = (z_T.astype(f32), jnp.zeros((N,) + zshape, f32))
  (z, ch), _ = jax.lax.scan(body, init, (ts, noises))
  return z, ch


def mt_sample(predict_fn: Callable, z_T, *, schedule: Schedule, weights: WeightSchedule, rng=None, cond=None,
              known_codes=None, known_mask=None, variance_type: str = "fixed_small", step_noise=None):
  """Ancestral sampling t = T..1 of the shared state, producing every modality's code at once.

  Args:
    predict_fn: `predict_fn(z_t, k, cond) -> codes_hat [N, B, ...]`, `k` = t - 1 float32 `[B]`. Wrap it in a
      `jax.tree_util.Partial` to carry arrays (network params) as traced arguments, as `core.samplers` does;
      a plain function is wrapped here (one compile per distinct function object).
    z_T: `[B, ...]` start (N(0, I), or anything else).
    weights: the `WeightSchedule` (T + 1 rows).
    known_codes, known_mask: conditional generation: modalities with `known_mask[i]` True have their codes
      held fixed at `known_codes[i]` `[B, ...]` (entries of unknown modalities are ignored); their
      contribution to every m_t uses the known code, whatever the predictor says.
    variance_type: "fixed_small" (beta~_t) or "fixed_large" (beta_t); no noise at the last step (t = 1).
    step_noise: `[T, B, ...]` per-step noise (entry j is used at t = T - j), instead of `rng`.
  Returns:
    (z_0 `[B, ...]`, codes `[N, B, ...]`): the final state (= m^_0) and the codes predicted at t = 1 (known
    codes substituted), one per modality; decode them with D_i.
  """
  _check_variance_type(variance_type)
  _check_weights(weights, schedule)
  T, N = schedule.num_train_timesteps, weights.num_modalities
  z_T = jnp.asarray(z_T, f32)
  if step_noise is not None:
    step_noise = jnp.asarray(step_noise, f32)
    if step_noise.shape != (T,) + z_T.shape:
      raise ValueError(f"mt_sample: step_noise must have shape (T,) + z_T.shape = {(T,) + z_T.shape}, got "
                       f"{step_noise.shape}.")
  else:
    if rng is None:
      raise ValueError("mt_sample is stochastic: pass `rng=` (a jax.random key) or `step_noise=`.")
    step_noise = jax.random.normal(rng, (T,) + z_T.shape, f32)
  if known_mask is None:
    known_mask = np.zeros((N,), bool)
    known_codes = jnp.zeros((N,) + z_T.shape, f32)
  else:
    known_mask = np.asarray(known_mask, bool)
    if known_mask.shape != (N,):
      raise ValueError(f"mt_sample: known_mask must have shape [N] = ({N},), got {known_mask.shape}.")
    if known_codes is None:
      raise ValueError("mt_sample: known_mask is set but known_codes is None; pass the known codes [N, B, ...].")
    known_codes = jnp.asarray(known_codes, f32)
    if known_codes.shape != (N,) + z_T.shape:
      raise ValueError(f"mt_sample: known_codes must have shape [N, B, ...] = {(N,) + z_T.shape}, got "
                       f"{known_codes.shape}.")
  tab = {k: jnp.asarray(v, f32) for k, v in tables(schedule).items()}
  fn = predict_fn if isinstance(predict_fn, Partial) else Partial(predict_fn)
  return _sample_loop(fn, z_T, step_noise, jnp.asarray(weights.table, f32), tab, known_codes,
                      jnp.asarray(known_mask), cond, variance_type)


# ----------------------------------------------------------------------------- strided (DDIM-style) sampling

MT_SAMPLERS = ("ancestral", "ddim")


def ddim_grid(schedule: Schedule, num_steps: int, timestep_spacing: str = "linspace") -> np.ndarray:
  """Paper times T >= t_1 > ... > t_n >= 1 of a strided sampler: `core.schedules.spacing_timesteps` (the
  DDPM / DDIM index grid of `core.samplers.ddim_sample`, k = t - 1) shifted to paper time. "linspace" runs
  from t = T (where z_T ~ N(0, I) holds) to t = 1 (where the last codes are predicted, as in `mt_sample`);
  "trailing" starts at T and ends at t = T / n, "leading" starts below T and ends at 1. With `num_steps` = T
  every spacing is T, T - 1, ..., 1."""
  from diffusion_jax.core.schedules import spacing_timesteps
  ks = spacing_timesteps(schedule.num_train_timesteps, int(num_steps), timestep_spacing, 0, variant="ddpm")
  return (np.asarray(ks, np.int64) + 1).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("stochastic",))
def _ddim_loop(predict_fn, z_T, noises, wtab, co, known_codes, known_mask, cond, eta, stochastic):
  N = wtab.shape[1]
  B = z_T.shape[0]
  zshape = z_T.shape

  def body(carry, xs):
    z, _ = carry
    c, nz = xs
    t, s = c["t"], c["s"]
    ch = jnp.asarray(predict_fn(z, jnp.full((B,), t - 1, f32), cond), f32)
    ch = jnp.where(known_mask.reshape((N,) + (1,) * len(zshape)), known_codes, ch)
    m_t = jnp.tensordot(wtab[t], ch, axes=1)
    m_s = jnp.tensordot(wtab[s], ch, axes=1)
    eps = (z - c["sqrt_abar_t"] * m_t) / c["sqrt_1m_abar_t"]
    std = eta * c["std1"]
    z = c["sqrt_abar_s"] * m_s + jnp.sqrt(jnp.maximum(c["one_m_abar_s"] - std * std, 0.0)) * eps
    if stochastic:
      z = z + std * nz
    return (z, ch), None

  init = (z_T.astype(f32), jnp.zeros((N,) + zshape, f32))
  (z, ch), _ = jax.lax.scan(body, init, (co, noises))
  return z, ch


def mt_ddim_sample(predict_fn: Callable, z_T, *, schedule: Schedule, weights: WeightSchedule, num_steps: int,
                   eta: float = 0.0, timestep_spacing: str = "linspace", rng=None, cond=None, known_codes=None,
                   known_mask=None, step_noise=None):
  """Strided (DDIM-style, Song et al. 2021) sampling of the shared state on `num_steps` <= T paper times.

  The MT forward marginal q(z_t | x) = N(sqrt(abar_t) m_t, (1 - abar_t) I) has DDIM's form with the clean
  signal m_t = sum_i w_t^(i) E_i depending on t; the step from t to the next grid time s < t (s = 0 after the
  last) is DDIM's update with the predicted codes aggregated at each end:

      eps^ = (z_t - sqrt(abar_t) m^_t) / sqrt(1 - abar_t),
      z_s  = sqrt(abar_s) m^_s + sqrt(1 - abar_s - sigma^2) eps^ + sigma noise,
      sigma = eta sqrt((1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s)),

  (`core.samplers.ddim_sample`'s coefficients; with one modality and constant weights it is that sampler with
  prediction_type="sample"). eta = 0 is deterministic (no rng needed); eta = 1 with num_steps = T is exactly
  the ancestral `mt_sample` with variance "fixed_small" (same noise: the same path). The last step lands on
  z_0 = m^_0 whatever eta. Known modalities (`known_codes`, `known_mask`) are held fixed as in `mt_sample`.

  Args:
    num_steps: grid size (1..T); the grid is `ddim_grid(schedule, num_steps, timestep_spacing)`.
    eta: DDIM's stochasticity (traced; 0 <= eta).
    timestep_spacing: "linspace" (default: from t = T to t = 1), "trailing" or "leading" (diffusers'
      spacings, as `core.samplers`; see `ddim_grid`).
    step_noise: `[num_steps, B, ...]` per-step noise (entry j is used on the step from grid time j), instead
      of `rng`; only read when eta != 0.
  Returns:
    (z_0 `[B, ...]`, codes `[N, B, ...]`) as `mt_sample`: the codes are those predicted at the last grid time.
  """
  _check_weights(weights, schedule)
  N = weights.num_modalities
  ts = ddim_grid(schedule, num_steps, timestep_spacing)
  n = len(ts)
  ss = np.concatenate([ts[1:], [0]]).astype(np.int32)
  tab = tables(schedule)
  a_t, a_s = tab["abar"][ts], tab["abar"][ss]
  with np.errstate(divide="ignore", invalid="ignore"):
    var = np.where(a_t < 1.0, (1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s), 0.0)
  co = dict(t=jnp.asarray(ts), s=jnp.asarray(ss),
            **{k: jnp.asarray(v, f32) for k, v in dict(
                sqrt_abar_t=np.sqrt(a_t), sqrt_1m_abar_t=np.sqrt(1.0 - a_t), sqrt_abar_s=np.sqrt(a_s),
                one_m_abar_s=1.0 - a_s, std1=np.sqrt(np.maximum(var, 0.0))).items()})
  z_T = jnp.asarray(z_T, f32)
  stochastic = not (isinstance(eta, (int, float)) and float(eta) == 0.0)
  if isinstance(eta, (int, float)) and float(eta) < 0:
    raise ValueError(f"mt_ddim_sample: eta must be >= 0 (0 = deterministic DDIM, 1 = ancestral), got {eta}.")
  if not stochastic:
    step_noise = jnp.zeros((n,) + z_T.shape, f32)
  elif step_noise is not None:
    step_noise = jnp.asarray(step_noise, f32)
    if step_noise.shape != (n,) + z_T.shape:
      raise ValueError(f"mt_ddim_sample: step_noise must have shape (num_steps,) + z_T.shape = "
                       f"{(n,) + z_T.shape}, got {step_noise.shape}.")
  else:
    if rng is None:
      raise ValueError("mt_ddim_sample with eta > 0 is stochastic: pass `rng=` (a jax.random key) or "
                       "`step_noise=`.")
    step_noise = jax.random.normal(rng, (n,) + z_T.shape, f32)
  known_codes, known_mask = _known(N, z_T, known_codes, known_mask, "mt_ddim_sample")
  fn = predict_fn if isinstance(predict_fn, Partial) else Partial(predict_fn)
  return _ddim_loop(fn, z_T, step_noise, jnp.asarray(weights.table, f32), co, known_codes,
                    jnp.asarray(known_mask), cond, jnp.asarray(eta, f32), stochastic)


def _known(N, z_T, known_codes, known_mask, where):
  if known_mask is None:
    return jnp.zeros((N,) + z_T.shape, f32), np.zeros((N,), bool)
  known_mask = np.asarray(known_mask, bool)
  if known_mask.shape != (N,):
    raise ValueError(f"{where}: known_mask must have shape [N] = ({N},), got {known_mask.shape}.")
  if known_codes is None:
    raise ValueError(f"{where}: known_mask is set but known_codes is None; pass the known codes [N, B, ...].")
  known_codes = jnp.asarray(known_codes, f32)
  if known_codes.shape != (N,) + z_T.shape:
    raise ValueError(f"{where}: known_codes must have shape [N, B, ...] = {(N,) + z_T.shape}, got "
                     f"{known_codes.shape}.")
  return known_codes, known_mask
