"""Shared helpers for the core tests: an analytic denoiser written for both JAX and torch, and a
Gaussian mixture with its exact (closed-form) denoiser."""


import jax
import jax.numpy as jnp
import numpy as np


V0 = 0.25  # the analytic model behaves like the exact denoiser of N(0, V0 I) data plus a smooth perturbation


def _interp_ac(ac, t, xp):
  t0 = xp.floor(t)
  w = t - t0
  i0 = t0.astype("int64") if xp is not jnp else t0.astype(jnp.int32)
  i1 = xp.minimum(i0 + 1, ac.shape[0] - 1)
  return ac[i0] * (1 - w) + ac[i1] * w


def analytic_jax(x, t, ac, pred="epsilon"):
  """A fixed nonlinear 'model' used in the diffusers parity tests, written identically in torch below.

  x0_hat = a V0 x / (a^2 V0 + s^2) + a (0.3 tanh(1.3 x + 0.5 flip(x)) + 0.2 sin(2.1 x) t/T), with (a, s)
  from the schedule's alphas_cumprod `ac` (linearly interpolated at fractional t); it returns eps, v or x0
  consistent with that x0_hat, so magnitudes stay O(1) at every noise level. x: [B, D], t: [B].
  """
  x = x.astype(jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  acb = _interp_ac(jnp.asarray(ac, jnp.float32), t, jnp)[:, None]
  a, s = jnp.sqrt(acb), jnp.sqrt(1.0 - acb)
  tt = t[:, None] / 1000.0
  x0 = a * V0 * x / (a * a * V0 + s * s) + a * (0.3 * jnp.tanh(1.3 * x + 0.5 * x[..., ::-1])
                                               + 0.2 * jnp.sin(2.1 * x) * tt)
  eps = (x - a * x0) / s
  return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[pred]


def analytic_torch(x, t, ac, pred="epsilon"):
  import torch
  t = torch.as_tensor(t, dtype=torch.float32)
  t0 = torch.floor(t)
  w = t - t0
  i0 = t0.long()
  i1 = torch.clamp(i0 + 1, max=ac.shape[0] - 1)
  acb = (ac[i0] * (1 - w) + ac[i1] * w)[:, None]
  a, s = torch.sqrt(acb), torch.sqrt(1.0 - acb)
  tt = t[:, None] / 1000.0
  x0 = a * V0 * x / (a * a * V0 + s * s) + a * (0.3 * torch.tanh(1.3 * x + 0.5 * torch.flip(x, dims=[-1]))
                                               + 0.2 * torch.sin(2.1 * x) * tt)
  eps = (x - a * x0) / s
  return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[pred]


def analytic_var_jax(x, t, ac, pred="epsilon"):
  """Learned-variance head: the prediction + an interpolation value in [-1, 1] (2C channels)."""
  tt = jnp.asarray(t, jnp.float32)[:, None] / 1000.0
  return jnp.concatenate([analytic_jax(x, t, ac, pred), jnp.tanh(0.7 * x.astype(jnp.float32) - tt + 0.2)], axis=-1)


def analytic_var_torch(x, t, ac, pred="epsilon"):
  import torch
  tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1) / 1000.0
  return torch.cat([analytic_torch(x, t, ac, pred), torch.tanh(0.7 * x - tt + 0.2)], dim=-1)


class GMM:
  """A 2-D Gaussian mixture p(x0) = sum_k w_k N(mu_k, S_k), well separated.

  Under x = a x0 + s eps (any a, s), x is again a mixture with components N(a mu_k, a^2 S_k + s^2 I), and
  E[x0 | x] = sum_k r_k(x) (mu_k + a S_k (a^2 S_k + s^2 I)^-1 (x - a mu_k)) with responsibilities r_k
  under the noisy components: the exact denoiser.
  """

  def __init__(self):
    self.w = np.array([0.5, 0.3, 0.2])
    self.mu = np.array([[-2.0, 0.0], [2.0, 1.5], [1.0, -2.5]])
    self.cov = np.array([[[0.30, 0.10], [0.10, 0.20]],
                         [[0.15, -0.05], [-0.05, 0.25]],
                         [[0.20, 0.0], [0.0, 0.10]]])

  def sample(self, rng: np.random.Generator, n: int):
    k = rng.choice(3, size=n, p=self.w)
    L = np.linalg.cholesky(self.cov)
    z = rng.standard_normal((n, 2))
    return self.mu[k] + np.einsum("nij,nj->ni", L[k], z), k

  def x0_hat(self, x, a, s):
    """Exact E[x0 | x_t] for x_t = a x0 + s eps; x [B, 2] float32, a, s [B] (jnp)."""
    x = x.astype(jnp.float32)
    a = jnp.asarray(a, jnp.float32)[:, None, None, None]
    s = jnp.asarray(s, jnp.float32)[:, None, None, None]
    mu = jnp.asarray(self.mu, jnp.float32)[None]            # [1, K, 2]
    cov = jnp.asarray(self.cov, jnp.float32)[None]          # [1, K, 2, 2]
    eye = jnp.eye(2, dtype=jnp.float32)
    ncov = a ** 2 * cov + s ** 2 * eye                        # [B, K, 2, 2]
    diff = x[:, None, :] - a[..., 0] * mu                     # [B, K, 2]
    # Closed-form 2x2 inverse (faster than a batched solve).
    p, q, r = ncov[..., 0, 0], ncov[..., 0, 1], ncov[..., 1, 1]
    det = p * r - q * q
    sol = jnp.stack([r * diff[..., 0] - q * diff[..., 1], p * diff[..., 1] - q * diff[..., 0]], -1) / det[..., None]
    logp = jnp.log(jnp.asarray(self.w, jnp.float32)) - 0.5 * jnp.sum(diff * sol, -1) - 0.5 * jnp.log(det)
    r_k = jax.nn.softmax(logp, axis=-1)
    comp = mu + a[..., 0] * jnp.einsum("kij,bkj->bki", cov[0], sol)
    return jnp.sum(r_k[..., None] * comp, axis=1)

  def assign(self, x):
    """Component index of each sample (nearest under the clean mixture's log density)."""
    x = np.asarray(x, np.float64)
    inv = np.linalg.inv(self.cov)
    d = x[:, None, :] - self.mu[None]
    logp = (np.log(self.w) - 0.5 * np.einsum("nki,kij,nkj->nk", d, inv, d)
            - 0.5 * np.log(np.linalg.det(self.cov)))
    return np.argmax(logp, axis=1)


def moment_zscores(gmm: GMM, x):
  """|error| / standard error of the sampled mixture statistics: 3 weights, 3x2 means, 3x3 covariance
  entries (upper triangle). Standard errors are the sample-size ones of exact draws: weight sqrt(w(1-w)/N),
  mean sqrt(S_ii/n_k), covariance sqrt((S_ii S_jj + S_ij^2)/n_k) (Gaussian fourth moments)."""
  x = np.asarray(x, np.float64)
  k = gmm.assign(x)
  N = len(x)
  z = []
  for j in range(len(gmm.w)):
    xs = x[k == j]
    n, w, S = len(xs), gmm.w[j], gmm.cov[j]
    z.append(abs(n / N - w) / np.sqrt(w * (1 - w) / N))
    z.extend(np.abs(xs.mean(0) - gmm.mu[j]) / np.sqrt(np.diag(S) / n))
    se = np.sqrt((np.outer(np.diag(S), np.diag(S)) + S ** 2) / n)
    z.extend((np.abs(np.cov(xs.T) - S) / se)[np.triu_indices(2)])
  return np.array(z)


def discrete_gmm_denoiser(gmm: GMM, schedule, pred: str):
  """Exact model for a discrete schedule: (a, s) at (possibly fractional) timestep t by linear
  interpolation of log VE-sigma (the inverse of the samplers' sigma -> t map); returns eps / v / x0."""
  log_sig = jnp.asarray(np.log(schedule.ve_sigmas), jnp.float32)
  T = schedule.num_train_timesteps

  def fn(x, t, cond):
    del cond
    t = jnp.asarray(t, jnp.float32)
    i0 = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, T - 2)
    w = t - i0
    sig = jnp.exp(log_sig[i0] * (1 - w) + log_sig[i0 + 1] * w)
    a = 1.0 / jnp.sqrt(1.0 + sig * sig)
    s = sig * a
    x = x.astype(jnp.float32)
    x0 = gmm.x0_hat(x, a, s)
    a, s = a[:, None], s[:, None]
    eps = (x - a * x0) / s
    return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[pred]

  return fn


def edm_gmm_denoiser(gmm: GMM, sigma_data: float = 0.5):
  """Exact raw EDM network F for the mixture: F = (D - c_skip x) / c_out with D the exact VE denoiser."""
  from diffusion_jax.core.parameterization import edm_scalings

  def fn(x_in, c_noise, cond):
    del cond
    sigma = jnp.exp(4.0 * jnp.asarray(c_noise, jnp.float32))
    sc = edm_scalings(sigma, sigma_data)
    x = x_in.astype(jnp.float32) / sc.c_in[:, None]
    D = gmm.x0_hat(x, jnp.ones_like(sigma), sigma)
    return (D - sc.c_skip[:, None] * x) / sc.c_out[:, None]

  return fn
