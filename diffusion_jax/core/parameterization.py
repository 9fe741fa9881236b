"""Model parameterisations and the conversions between them.

For `x_t = alpha * x0 + sigma * eps` (VP, alpha^2 + sigma^2 = 1 for the discrete schedules, but the
eps/x0 formulas below hold for any alpha, sigma):

* "epsilon":       the network predicts eps;  x0 = (x_t - sigma eps) / alpha.
* "v_prediction":  the network predicts v = alpha eps - sigma x0 (Salimans & Ho 2022);
                   x0 = alpha x_t - sigma v,  eps = alpha v + sigma x_t   (needs alpha^2 + sigma^2 = 1).
* "sample":        the network predicts x0;   eps = (x_t - alpha x0) / sigma.

EDM preconditioning (Karras et al. 2022, Table 1): `D(x, s) = c_skip x + c_out F(c_in x, c_noise)` with
`c_skip = sd^2 / (s^2 + sd^2)`, `c_out = s sd / sqrt(s^2 + sd^2)`, `c_in = 1 / sqrt(s^2 + sd^2)`,
`c_noise = ln(s) / 4`, sigma_data sd = 0.5.

Consistency boundary condition as in the CoDi release (code form, LCM-style):
`c_skip(t) = sd^2 / ((k t)^2 + sd^2)`, `c_out(t) = k t / sqrt((k t)^2 + sd^2)`, sd = 0.5, k = 10, t the
integer DDPM index; `f(z, t) = c_skip z + c_out x0_hat(z, t)`, so `f(z, 0) = z`.

All functions are pure jnp; per-example `alpha`/`sigma` must already broadcast against `x` (use
`schedules.bcast`).
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax.numpy as jnp

from diffusion_jax.registry import check_choice

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str, extra: Tuple[str, ...] = ()) -> str:
  """Raises a ValueError listing the valid names if `prediction_type` is unknown."""
  return check_choice("prediction type (parameterisation)", prediction_type, PREDICTION_TYPES + tuple(extra))


def x0_from_eps(x_t, eps, alpha, sigma):
  return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t, x0, alpha, sigma):
  return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0, eps, alpha, sigma):
  """v = alpha eps - sigma x0."""
  return alpha * eps - sigma * x0


def x0_from_v(x_t, v, alpha, sigma):
  """x0 = alpha x_t - sigma v (VP)."""
  return alpha * x_t - sigma * v


def eps_from_v(x_t, v, alpha, sigma):
  """eps = alpha v + sigma x_t (VP)."""
  return alpha * v + sigma * x_t


def predict_x0_eps(pred, x_t, alpha, sigma, prediction_type: str):
  """Converts a model output to (x0_hat, eps_hat) for the given parameterisation."""
  check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return x0_from_eps(x_t, pred, alpha, sigma), pred
  if prediction_type == "v_prediction":
    return x0_from_v(x_t, pred, alpha, sigma), eps_from_v(x_t, pred, alpha, sigma)
  return pred, eps_from_x0(x_t, pred, alpha, sigma)


def prediction_from_x0_eps(x0, eps, alpha, sigma, prediction_type: str):
  """The quantity a model of this parameterisation should output (the regression target)."""
  check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return eps
  if prediction_type == "v_prediction":
    return v_from_x0_eps(x0, eps, alpha, sigma)
  return x0


training_target = prediction_from_x0_eps


class EDMScalings(NamedTuple):
  c_skip: jnp.ndarray
  c_out: jnp.ndarray
  c_in: jnp.ndarray
  c_noise: jnp.ndarray


def edm_scalings(sigma, sigma_data: float = 0.5) -> EDMScalings:
  """EDM preconditioning coefficients (Karras et al. 2022, Table 1) for VE sigma."""
  sigma = jnp.asarray(sigma, jnp.float32)
  s2, d2 = sigma * sigma, sigma_data * sigma_data
  return EDMScalings(c_skip=d2 / (s2 + d2), c_out=sigma * sigma_data / jnp.sqrt(s2 + d2),
                     c_in=1.0 / jnp.sqrt(s2 + d2), c_noise=0.25 * jnp.log(sigma))


def edm_denoise(fn, x, sigma, cond=None, sigma_data: float = 0.5):
  """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, cond) for a raw network `fn(x_in, c_noise, cond)`.

  `sigma` is per-example `[B]`; the network sees c_noise `[B]` (= ln(sigma) / 4) as its time input and
  `x_in` in `x`'s dtype; the result is float32.
  """
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
  sc = edm_scalings(sigma, sigma_data)
  b = lambda v: v.reshape(v.shape + (1,) * (x.ndim - 1))
  xf = x.astype(jnp.float32)
  out = fn((b(sc.c_in) * xf).astype(x.dtype), sc.c_noise, cond).astype(jnp.float32)
  return b(sc.c_skip) * xf + b(sc.c_out) * out


def consistency_scalings(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
  """CoDi / LCM boundary-condition scalings (code form) at DDPM integer timesteps `t`.

  Returns (c_skip, c_out) with c_skip = sd^2 / ((k t)^2 + sd^2), c_out = k t / sqrt((k t)^2 + sd^2).
  """
  kt = jnp.asarray(t, jnp.float32) * timestep_scaling
  d2 = sigma_data * sigma_data
  return d2 / (kt * kt + d2), kt / jnp.sqrt(kt * kt + d2)


def consistency_fn(pred, x_t, alpha, sigma, t, prediction_type: str = "v_prediction",
                   sigma_data: float = 0.5, timestep_scaling: float = 10.0):
  """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t): the CoDi consistency output in signal space."""
  x0, _ = predict_x0_eps(pred, x_t, alpha, sigma, prediction_type)
  c_skip, c_out = consistency_scalings(t, sigma_data, timestep_scaling)
  b = lambda v: v.reshape(v.shape + (1,) * (x_t.ndim - v.ndim)) if v.ndim else v
  return b(c_skip) * x_t + b(c_out) * x0
