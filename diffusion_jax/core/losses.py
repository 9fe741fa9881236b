"""Training losses. Every loss returns `(loss [B] float32, terms: dict of [B] float32)`: per-example values
(mean over all non-batch axes), so callers can mask/weight/average as they like (`jnp.mean(loss)`).

* `diffusion_loss`: eps / v / x0 MSE at uniformly sampled integer timesteps (Ho et al. 2020 "simple"
  loss), optional min-SNR-gamma weighting (Hang et al. 2023).
* `edm_loss`: EDM (Karras et al. 2022): ln(sigma) ~ N(P_mean = -1.2, P_std = 1.2), weight
  (sigma^2 + sd^2) / (sigma sd)^2 on ||D(x + sigma n, sigma) - x||^2.
* `hybrid_loss`: ADM hybrid loss (Nichol & Dhariwal 2021; used by ADM/DiT/latent DiffiT with
  learn_sigma): the model outputs 2C channels (eps, v in [-1, 1]); log var = frac log(beta) +
  (1 - frac) log(beta_tilde_clipped), frac = (v + 1) / 2; loss = MSE(eps) + lambda * L_vlb with the mean
  stop-gradiented inside L_vlb; L_vlb is KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
  discretised Gaussian NLL of x_0 (data in [-1, 1], 256 bins) at t = 0, in bits per dimension, lambda = 1.

Model functions: `fn(x_t, t, cond) -> output` with `t` float32 `[B]` DDPM indices (`edm_loss`: the raw
network `fn(c_in x, c_noise, cond)`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.core import parameterization as param_lib
from diffusion_jax.core.schedules import Schedule, bcast

f32 = jnp.float32


def mean_flat(x):
  """Mean over all axes but the first, in float32."""
  x = jnp.asarray(x, f32)
  return jnp.mean(x, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def sample_timesteps(rng, batch_size: int, num_train_timesteps: int):
  """Uniform integer timesteps in [0, T) -> int32 `[B]`."""
  return jax.random.randint(rng, (batch_size,), 0, num_train_timesteps, dtype=jnp.int32)


def q_sample(schedule: Schedule, x0, t, noise):
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise at integer timesteps `t` `[B]` (float32)."""
  a, s = schedule.gather(t, x0)
  return a * x0.astype(f32) + s * noise.astype(f32)


def min_snr_weight(snr, gamma: float, prediction_type: str = "epsilon"):
  """min-SNR-gamma loss weight (Hang et al. 2023) expressed for the given parameterisation's MSE:
  x0-MSE weight min(snr, gamma); eps-MSE min(snr, gamma) / snr; v-MSE min(snr, gamma) / (snr + 1)."""
  param_lib.check_prediction_type(prediction_type)
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == "epsilon":
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)  # limit 1 at zero SNR
  if prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  return clipped


def diffusion_loss(fn: Callable, x0, rng, *, schedule: Schedule, prediction_type: str = "epsilon", cond=None,
                   snr_gamma: Optional[float] = None, t=None, noise=None):
  """Simple diffusion MSE in the model's parameterisation.

  Args:
    fn: `fn(x_t, t, cond) -> prediction` (eps, v or x0 per `prediction_type`); `x_t` is passed in x0's dtype.
    x0: clean data `[B, ...]`.
    rng: key for timesteps and noise (ignored for what `t` / `noise` supply).
    schedule: discrete `Schedule`.
    snr_gamma: if set, min-SNR-gamma weighting (5.0 in the paper).
    t, noise: optional fixed timesteps `[B]` / noise.

  Returns:
    (loss `[B]`, {"mse": unweighted `[B]`, "t": t}).
  """
  param_lib.check_prediction_type(prediction_type)
  kt, kn = jax.random.split(rng)
  B = x0.shape[0]
  if t is None:
    t = sample_timesteps(kt, B, schedule.num_train_timesteps)
  if noise is None:
    noise = jax.random.normal(kn, x0.shape, f32)
  a, s = schedule.gather(t, x0)
  x0f, noise = x0.astype(f32), noise.astype(f32)
  x_t = a * x0f + s * noise
  target = param_lib.prediction_from_x0_eps(x0f, noise, a, s, prediction_type)
  out = fn(x_t.astype(x0.dtype), jnp.asarray(t, f32), cond).astype(f32)
  mse = mean_flat((out - target) ** 2)
  loss = mse
  if snr_gamma is not None:
    ac = jnp.asarray(schedule.alphas_cumprod, f32)[jnp.asarray(t, jnp.int32)]
    loss = mse * min_snr_weight(ac / (1.0 - ac), snr_gamma, prediction_type)
  return loss, {"mse": mse, "t": jnp.asarray(t, f32)}


def edm_loss(fn: Callable, x0, rng, *, cond=None, sigma_data: float = 0.5, p_mean: float = -1.2,
             p_std: float = 1.2, sigma=None, noise=None):
  """EDM training loss (Karras et al. 2022, Sec. 5 / Table 1) for a raw network `fn(c_in x, c_noise, cond)`.

  ln(sigma) ~ N(p_mean, p_std^2); loss = lambda(sigma) * mean ||D(x0 + sigma n, sigma) - x0||^2 with
  lambda = (sigma^2 + sd^2) / (sigma sd)^2.
  Returns (loss `[B]`, {"mse": unweighted, "sigma": sigma}).
  """
  ks, kn = jax.random.split(rng)
  B = x0.shape[0]
  if sigma is None:
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(ks, (B,), f32))
  sigma = jnp.asarray(sigma, f32)
  if noise is None:
    noise = jax.random.normal(kn, x0.shape, f32)
  x0f = x0.astype(f32)
  x = x0f + bcast(sigma, x0f) * noise.astype(f32)
  D = param_lib.edm_denoise(fn, x.astype(x0.dtype), sigma, cond, sigma_data)
  mse = mean_flat((D - x0f) ** 2)
  weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
  return weight * mse, {"mse": mse, "sigma": sigma}


# ----------------------------------------------------------------------------- ADM hybrid loss

def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood of data `x` in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2)
  (ADM `discretized_gaussian_log_likelihood`, DDPM Eq. 13), elementwise, in nats."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  cdf_delta = cdf_plus - cdf_min
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))))


def posterior_tables(schedule: Schedule):
  """NumPy float64 tables of q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7; ADM): coef_x0, coef_xt, variance,
  log variance clipped (first entry replaced by the second), log beta."""
  betas = schedule.betas
  ac = schedule.alphas_cumprod
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  var = betas * (1.0 - ac_prev) / (1.0 - ac)
  log_var_clipped = np.log(np.concatenate([var[1:2], var[1:]]))
  return dict(coef_x0=betas * np.sqrt(ac_prev) / (1.0 - ac),
              coef_xt=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
              var=var, log_var_clipped=log_var_clipped, log_beta=np.log(betas))


def hybrid_loss(fn: Callable, x0, rng, *, schedule: Schedule, cond=None, lambda_vlb: float = 1.0,
                t=None, noise=None):
  """ADM hybrid loss L_simple + lambda L_vlb with a learned variance (Nichol & Dhariwal 2021, Sec. 3.1).

  `fn(x_t, t, cond)` returns `[B, ..., 2C]`: eps (first C channels, last axis) and the variance
  interpolation v in [-1, 1]. The VLB term sees a stop-gradient eps (so it trains only the variance), as in
  ADM/DiT. Returns (loss `[B]`, {"mse", "vlb" (bits/dim), "t"}).
  """
  kt, kn = jax.random.split(rng)
  B, C = x0.shape[0], x0.shape[-1]
  T = schedule.num_train_timesteps
  if t is None:
    t = sample_timesteps(kt, B, T)
  t = jnp.asarray(t, jnp.int32)
  if noise is None:
    noise = jax.random.normal(kn, x0.shape, f32)
  x0f, noise = x0.astype(f32), noise.astype(f32)
  a, s = schedule.gather(t, x0f)
  x_t = a * x0f + s * noise
  out = fn(x_t.astype(x0.dtype), t.astype(f32), cond).astype(f32)
  if out.shape[-1] != 2 * C:
    raise ValueError(f"hybrid_loss needs a model output with 2C = {2 * C} channels on the last axis (eps and "
                     f"variance), got shape {out.shape}.")
  eps, v = out[..., :C], out[..., C:]
  mse = mean_flat((eps - noise) ** 2)

  tab = {k: jnp.asarray(val, f32) for k, val in posterior_tables(schedule).items()}
  g = lambda name: bcast(tab[name][t], x0f)
  # True posterior.
  true_mean = g("coef_x0") * x0f + g("coef_xt") * x_t
  true_logvar = g("log_var_clipped")
  # Model posterior with frozen mean.
  eps_sg = jax.lax.stop_gradient(eps)
  x0_hat = (x_t - s * eps_sg) / a
  model_mean = g("coef_x0") * x0_hat + g("coef_xt") * x_t
  frac = (v + 1.0) / 2.0
  model_logvar = frac * g("log_beta") + (1.0 - frac) * g("log_var_clipped")
  kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
  nll = -mean_flat(discretized_gaussian_log_likelihood(x0f, model_mean, 0.5 * model_logvar)) / math.log(2.0)
  vlb = jnp.where(t == 0, nll, kl)
  return mse + lambda_vlb * vlb, {"mse": mse, "vlb": vlb, "t": t.astype(f32)}
