"""MT-Diffusion core math (`diffusion_jax.core.mt_diffusion`): the closed forms against a Monte-Carlo simulation
of the forward chain, the one-modality reduction to DDPM against textbook formulas and `core`'s DDPM, and
ancestral sampling with exact (oracle) code predictors.

Monte-Carlo tolerances are 5 standard errors of the statistic (n = 20000 chains; ~150-300 comparisons per test,
so a false alarm has probability ~1e-4); the expected values come from formulas written here in NumPy, not
from the module under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import core
from diffusion_jax.core import mt_diffusion as mt

T = 50
SCHED = core.make_schedule("linear", T, beta_start=2e-3, beta_end=0.4)
N_MC = 20000
CODES = np.array([[2.0, -1.0, 0.5], [-1.5, 1.0, 3.0]])  # two modalities, D = 3


def _ref_tables():
  """Independent float64 tables indexed by paper time 0..T (from the betas only)."""
  beta = np.concatenate([[0.0], SCHED.betas.astype(np.float64)])
  alpha = 1.0 - beta
  abar = np.cumprod(alpha)
  return beta, alpha, abar


def _ref_weights(kind):
  if kind == "constant":
    return np.tile([0.3, 0.7], (T + 1, 1))
  s = np.arange(T + 1)[:, None] / T
  return (1 - s) * np.array([1.0, 0.0]) + s * np.array([0.0, 1.0])


def _weights(kind):
  return mt.constant_weights([0.3, 0.7], T) if kind == "constant" else mt.linear_weights([1, 0], [0, 1], T)


def _simulate(kind, seed=0):
  """Runs the module's forward transition for N_MC chains; returns z [T + 1, N_MC, 3] (float64 copy)."""
  w = _weights(kind)
  codes = jnp.broadcast_to(jnp.asarray(CODES, jnp.float32)[:, None], (2, N_MC, 3))
  noise = jax.random.normal(jax.random.key(seed), (T, N_MC, 3))
  z0 = mt.aggregate(codes, w.at(0))  # z_0 = m_0

  @jax.jit
  def run(z0, noise):
    def body(z, xs):
      t, nz = xs
      z = mt.q_step(SCHED, w, t, z, codes, nz)
      return z, z
    _, zs = jax.lax.scan(body, z0, (jnp.arange(1, T + 1), noise))
    return jnp.concatenate([z0[None], zs])
  zs = run(z0, noise)
  return np.asarray(zs, np.float64), w, codes


@pytest.fixture(scope="module", params=["constant", "linear"])
def chains(request):
  return (request.param,) + _simulate(request.param)


def test_q_step_matches_formula():
  beta, alpha, abar = _ref_tables()
  W = _ref_weights("linear")
  w = _weights("linear")
  rng = np.random.default_rng(0)
  codes = rng.normal(size=(2, 4, 3))
  z_prev, noise = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  t = np.array([1, 7, 30, 50])
  got = mt.q_step(SCHED, w, t, z_prev, codes, noise)
  m = lambda s: np.einsum("bn,nbd->bd", W[s], codes)
  want = (np.sqrt(alpha[t])[:, None] * z_prev + np.sqrt(abar[t])[:, None] * (m(t) - m(t - 1))
          + np.sqrt(beta[t])[:, None] * noise)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_marginal_matches_monte_carlo(chains):
  kind, zs, w, codes = chains
  _, _, abar = _ref_tables()
  W = _ref_weights(kind)
  n = zs.shape[1]
  for t in range(1, T + 1):
    mean_ref = np.sqrt(abar[t]) * (W[t] @ CODES)
    var_ref = 1.0 - abar[t]
    mean, std = mt.q_marginal(SCHED, w, t, codes[:, :1])
    np.testing.assert_allclose(np.asarray(mean)[0], mean_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(float(np.asarray(std).reshape(-1)[0]) ** 2, var_ref, rtol=2e-5, atol=1e-6)
    mc_mean, mc_var = zs[t].mean(0), zs[t].var(0, ddof=1)
    assert np.all(np.abs(mc_mean - mean_ref) < 5 * np.sqrt(var_ref / n)), (kind, t, mc_mean, mean_ref)
    assert np.all(np.abs(mc_var - var_ref) < 5 * var_ref * np.sqrt(2.0 / n)), (kind, t, mc_var, var_ref)
    if kind == "linear" and t == 10:  # the check can fail: a plain VP chain from m_0 (no shift term) is far off
      assert np.max(np.abs(mc_mean - np.sqrt(abar[t]) * (W[0] @ CODES))) > 20 * np.sqrt(var_ref / n)


@pytest.mark.parametrize("t", [2, 10, 30, 50])
def test_posterior_matches_monte_carlo(chains, t):
  kind, zs, w, codes = chains
  beta, alpha, abar = _ref_tables()
  n = zs.shape[1]
  zt, zp = zs[t], zs[t - 1]
  mean, var = mt.q_posterior(SCHED, w, t, jnp.asarray(zt, jnp.float32), codes)
  var = float(np.asarray(var).reshape(-1)[0])
  bt_ref = beta[t] * (1 - abar[t - 1]) / (1 - abar[t])
  np.testing.assert_allclose(var, bt_ref, rtol=1e-4)
  r = zp - np.asarray(mean, np.float64)  # residual of z_{t-1} given z_t
  assert np.all(np.abs(r.mean(0)) < 5 * np.sqrt(bt_ref / n)), (kind, t, r.mean(0))
  zc = zt - zt.mean(0)
  cov = (r * zc).mean(0)  # the posterior mean must be the regression of z_{t-1} on z_t
  assert np.all(np.abs(cov) < 5 * np.sqrt(bt_ref * zc.var(0) / n)), (kind, t, cov)
  assert np.all(np.abs(r.var(0, ddof=1) - bt_ref) < 5 * bt_ref * np.sqrt(2.0 / n)), (kind, t, r.var(0), bt_ref)


@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_posterior_gaussian_identity(kind):
  """integral q(z_{t-1}|z_t,x) q(z_t|x) dz_t = q(z_{t-1}|x): mean A mu_t + b = mu_{t-1}, A^2 s_t^2 + v = s_{t-1}^2."""
  w = _weights(kind)
  t = np.arange(2, T + 1)  # all t at once, one row each
  codes = jnp.broadcast_to(jnp.asarray(CODES, jnp.float32)[:, None], (2, t.size, 3))
  b, v = mt.q_posterior(SCHED, w, t, jnp.zeros((t.size, 3)), codes)
  a1, _ = mt.q_posterior(SCHED, w, t, jnp.ones((t.size, 3)), codes)
  A = np.asarray(a1 - b, np.float64)
  mu_t, s_t = mt.q_marginal(SCHED, w, t, codes)
  mu_p, s_p = mt.q_marginal(SCHED, w, t - 1, codes)
  np.testing.assert_allclose(A * np.asarray(mu_t) + np.asarray(b), np.asarray(mu_p), atol=1e-5)
  s_p2 = np.broadcast_to(np.asarray(s_p) ** 2, A.shape)
  np.testing.assert_allclose(A ** 2 * np.asarray(s_t) ** 2 + np.asarray(v), s_p2, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- N = 1 reduces to DDPM

T1 = 100
SCHED1 = core.make_schedule("linear", T1, beta_start=1e-3, beta_end=0.2)
W1 = mt.constant_weights([1.0], T1)


def _x0_model(z, k):
  return 0.8 * jnp.tanh(z) + 1e-3 * k[:, None]


def _predict1(z, k, cond):
  return _x0_model(z, k)[None]


def _ddpm_x0_fn(x, k, cond):
  return _x0_model(x, k)


def test_one_modality_loss_is_ddpm():
  rng = np.random.default_rng(1)
  B, D = 64, 5
  x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  t = jnp.asarray(rng.integers(1, T1 + 1, size=B), jnp.int32)
  t = t.at[0].set(1).at[1].set(2).at[2].set(T1)
  # textbook DDPM (Ho et al. 2020, Eq. 5-12), float64, from the betas only
  beta = np.concatenate([[0.0], SCHED1.betas.astype(np.float64)])
  alpha = 1 - beta
  abar = np.cumprod(alpha)
  tn = np.asarray(t)
  xn, en = np.asarray(x, np.float64), np.asarray(eps, np.float64)
  z = np.sqrt(abar[tn])[:, None] * xn + np.sqrt(1 - abar[tn])[:, None] * en
  x_hat = np.asarray(_x0_model(jnp.asarray(z, jnp.float32), jnp.asarray(tn - 1, jnp.float32)), np.float64)
  eps_hat = (z - np.sqrt(abar[tn])[:, None] * x_hat) / np.sqrt(1 - abar[tn])[:, None]
  bt = beta[tn] * (1 - abar[tn - 1]) / (1 - abar[tn])
  mse_eps = ((en - eps_hat) ** 2).mean(1)
  two = tn >= 2
  kl_ref = beta[tn][two] ** 2 / (2 * bt[two] * alpha[tn][two] * (1 - abar[tn][two])) * mse_eps[two]

  codes = x[None]
  z32 = jnp.asarray(z, jnp.float32)
  lt, lam = mt.posterior_matching_error(SCHED1, W1, t, codes, _predict1(z32, (t - 1).astype(jnp.float32), None))
  np.testing.assert_allclose(np.asarray(lt)[two], kl_ref, rtol=2e-3, atol=1e-6)
  kl = mt.posterior_kl(SCHED1, W1, t, z32, codes, _predict1(z32, (t - 1).astype(jnp.float32), None))
  np.testing.assert_allclose(np.asarray(kl)[two], kl_ref, rtol=2e-3, atol=1e-6)
  # "simple" weighting == DDPM's eps MSE == core.diffusion_loss with the equivalent eps model
  loss, terms = mt.elbo_terms(_predict1, codes, jax.random.key(0), schedule=SCHED1, weights=W1,
                              weighting="simple", t=t, noise=eps)
  np.testing.assert_allclose(np.asarray(loss), mse_eps, rtol=2e-3, atol=1e-5)

  def eps_fn(xt, k, cond):
    a, s = SCHED1.gather(k.astype(jnp.int32), xt)
    return (xt - a * _x0_model(xt, k)) / s
  core_loss, _ = core.diffusion_loss(eps_fn, x, jax.random.key(0), schedule=SCHED1, t=t - 1, noise=eps)
  np.testing.assert_allclose(np.asarray(loss), np.asarray(core_loss), rtol=1e-3, atol=1e-5)
  # "kl" weighting: L_T + T * L_t
  loss_kl, terms = mt.elbo_terms(_predict1, codes, jax.random.key(0), schedule=SCHED1, weights=W1, t=t, noise=eps)
  lT_ref = (0.5 * (abar[T1] * xn ** 2 - abar[T1] - np.log(1 - abar[T1]))).mean(1)
  np.testing.assert_allclose(np.asarray(terms["L_T"]), lT_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(loss_kl)[two], lT_ref[two] + T1 * kl_ref, rtol=2e-3, atol=1e-5)
  l0_ref = (0.5 * (xn - x_hat) ** 2 / beta[1] + 0.5 * np.log(2 * np.pi * beta[1])).mean(1)
  np.testing.assert_allclose(np.asarray(terms["L_0"])[0], l0_ref[0], rtol=1e-4)


def test_one_modality_reverse_step_is_ddpm():
  rng = np.random.default_rng(2)
  B, D = 16, 4
  z = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  tab = core.losses.posterior_tables(SCHED1)
  for t in [1, 2, 17, T1]:
    k = jnp.full((B,), t - 1, jnp.float32)
    x_hat = _x0_model(z, k)
    mean, var = mt.p_mean_variance(SCHED1, W1, t, z, x_hat[None])
    ref = tab["coef_x0"][t - 1] * np.asarray(x_hat, np.float64) + tab["coef_xt"][t - 1] * np.asarray(z, np.float64)
    # 3e-5: the Schedule's float32-rounded betas and alphas_cumprod disagree at ~1.3e-5 (core's coef_x0 at t = 1
    # is 1.0000129, not 1); the two tables mix them differently.
    np.testing.assert_allclose(np.asarray(mean), ref, rtol=3e-5, atol=3e-5)
    np.testing.assert_allclose(float(var), tab["var"][t - 1], rtol=1e-5, atol=1e-12)


def test_one_modality_sampler_is_core_ddpm():
  B, D = 8, 3
  z_T = jax.random.normal(jax.random.key(3), (B, D))
  noise = jax.random.normal(jax.random.key(4), (T1, B, D))
  z0, codes = mt.mt_sample(_predict1, z_T, schedule=SCHED1, weights=W1, step_noise=noise)
  ref = core.ddpm_sample(_ddpm_x0_fn, z_T, num_steps=T1, schedule=SCHED1, prediction_type="sample",
                         step_noise=noise)
  np.testing.assert_allclose(np.asarray(z0), np.asarray(ref), rtol=1e-4, atol=1e-4)
  # and it is really stochastic: other noise gives another sample
  z0b, _ = mt.mt_sample(_predict1, z_T, schedule=SCHED1, weights=W1, step_noise=noise[::-1])
  assert np.max(np.abs(np.asarray(z0b) - np.asarray(z0))) > 1e-2


# ----------------------------------------------------------------------------- ancestral sampling

TAB = {k: jnp.asarray(v, jnp.float32) for k, v in mt.tables(SCHED).items()}
WLIN = mt.linear_weights([1, 0], [0, 1], T)
POINT = np.array([[[1.0, -2.0]], [[0.5, 3.0]]])  # [N=2, 1, D=2]


def _point_fn(point, z, k, cond):
  return jnp.broadcast_to(point, (2,) + z.shape)


def _point_oracle(point=POINT):
  # the arrays ride in a Partial (as network params would): traced, so every use below shares one compile
  return jax.tree_util.Partial(_point_fn, jnp.asarray(point, jnp.float32))


# Two-point mixtures (component codes [K, N, D]). Unconditional: A and B differ in both modalities. Conditional:
# modality 0 is shared by both components (and known), modality 1 must come out as A's or B's, half each.
COMP = np.array([[[1.0, 1.0], [2.0, -1.0]],
                 [[-1.0, 0.5], [-2.0, 1.0]]])
PRIOR = np.array([0.3, 0.7])
# The unknown modality needs weight near t = 0 (with w_0^(2) = 0, z_0 carries nothing about it): see the docs.
WCOND = mt.linear_weights([0.5, 0.5], [0.1, 0.9], T)
COND_COMP = np.array([[[1.0, 1.0], [2.0, -1.0]],
                      [[1.0, 1.0], [-2.0, 1.5]]])


def _mixture_posterior_mean(z, k, comps, prior, weights):
  t = k.astype(jnp.int32) + 1
  w_t = jnp.asarray(weights.table, jnp.float32)[t]  # [B, N]
  comps = jnp.asarray(comps, jnp.float32)
  m = jnp.einsum("bn,knd->bkd", w_t, comps)  # m_t of each component
  a = TAB["abar"][t][:, None, None]
  logp = -jnp.sum((z[:, None] - jnp.sqrt(a) * m) ** 2, -1) / (2 * (1 - a[..., 0])) + jnp.log(jnp.asarray(prior))
  p = jax.nn.softmax(logp, axis=-1)  # [B, K]
  return jnp.einsum("bk,knd->nbd", p, comps)


def _mixture_oracle(z, k, cond):
  return _mixture_posterior_mean(z, k, COMP, PRIOR, WLIN)


def _cond_oracle(z, k, cond):
  # E[c_1 | z_t, c_0 = known]; the known modality's slot is garbage on purpose (the sampler must not use it).
  c = _mixture_posterior_mean(z, k, COND_COMP, np.array([0.5, 0.5]), WCOND)
  return c.at[0].set(-100.0)


def test_point_mass_recovered():
  B = 16
  z_T = jax.random.normal(jax.random.key(5), (B, 2))
  z0, codes = mt.mt_sample(_point_oracle(), z_T, schedule=SCHED, weights=WLIN, rng=jax.random.key(6))
  want = np.broadcast_to(POINT, (2, B, 2))
  np.testing.assert_allclose(np.asarray(codes), want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(z0), np.broadcast_to(POINT[0], (B, 2)), atol=1e-5)  # m_0 = E_1 (w_0 = (1, 0))
  # arrays carried in the Partial are traced, not baked in
  _, codes2 = mt.mt_sample(_point_oracle(POINT[::-1]), z_T, schedule=SCHED, weights=WLIN, rng=jax.random.key(6))
  np.testing.assert_allclose(np.asarray(codes2), np.broadcast_to(POINT[::-1], (2, B, 2)), atol=1e-6)


def test_joint_sampling_is_coherent_and_weighted():
  B = 1500
  z_T = jax.random.normal(jax.random.key(7), (B, 2))
  z0, codes = mt.mt_sample(_mixture_oracle, z_T, schedule=SCHED, weights=WLIN, rng=jax.random.key(8))
  codes = np.asarray(codes)  # [N, B, D]
  d = np.stack([np.abs(codes - COMP[k][:, None]).max(axis=(0, 2)) for k in range(2)])  # [K, B]
  assert np.all(d.min(0) < 1e-3), "every sample's codes must be one component's (all modalities together)"
  frac_a = np.mean(d[0] < 1e-3)
  assert abs(frac_a - PRIOR[0]) < 5 * np.sqrt(PRIOR[0] * PRIOR[1] / B) + 0.02, frac_a
  np.testing.assert_allclose(np.asarray(z0), codes[0], atol=1e-5)  # z_0 = m_0 = E_1 with w_0 = (1, 0)


def test_conditional_sampling_keeps_known_codes():
  B = 1000
  z_T = jax.random.normal(jax.random.key(9), (B, 2))
  known = np.zeros((2, B, 2), np.float32)
  known[0] = COND_COMP[0, 0]
  known[1] = 55.0  # ignored: modality 1 is unknown
  mask = np.array([True, False])
  z0, codes = mt.mt_sample(_cond_oracle, z_T, schedule=SCHED, weights=WCOND, rng=jax.random.key(10),
                           known_codes=known, known_mask=mask)
  codes = np.asarray(codes)
  np.testing.assert_array_equal(codes[0], known[0])
  d = np.stack([np.abs(codes[1] - COND_COMP[k, 1]).max(-1) for k in range(2)])
  assert np.all(d.min(0) < 1e-3)
  frac_a = np.mean(d[0] < 1e-3)
  assert abs(frac_a - 0.5) < 5 * np.sqrt(0.25 / B) + 0.02, frac_a
  np.testing.assert_allclose(np.asarray(z0), 0.5 * codes[0] + 0.5 * codes[1], atol=1e-5)  # z_0 = m_0, known code in it
  # point mass: unknown modality recovered, known fixed, predictor's known slot ignored
  z_T = jax.random.normal(jax.random.key(11), (16, 2))
  kn = np.broadcast_to(POINT, (2, 16, 2)).copy()
  kn[1] = 0.0
  wrong = POINT.copy()
  wrong[0] = 7.0  # the predictor is wrong about the known modality; its output there must be ignored
  z0, c = mt.mt_sample(_point_oracle(wrong), z_T, schedule=SCHED, weights=WLIN, rng=jax.random.key(12),
                       known_codes=kn, known_mask=[True, False])
  np.testing.assert_allclose(np.asarray(c), np.broadcast_to(POINT, (2, 16, 2)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(z0), np.broadcast_to(POINT[0], (16, 2)), atol=1e-5)


def test_elbo_terms_jit_and_restoration_hook():
  codes = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 2)), jnp.float32)
  f = jax.jit(lambda c, r: mt.elbo_terms(_mixture_oracle, c, r, schedule=SCHED, weights=WLIN)[0])
  loss = f(codes, jax.random.key(0))
  assert loss.shape == (6,) and np.all(np.isfinite(np.asarray(loss)))
  mse = lambda a, b: jnp.mean((a - b) ** 2, -1)
  tot, terms = mt.restoration_loss([mse, None], [codes[0], codes[1]], [codes[0] + 1.0, codes[1]], [2.0, 1.0])
  np.testing.assert_allclose(np.asarray(tot), 2.0, rtol=1e-6)
  assert set(terms) == {"rec_0"}


# ----------------------------------------------------------------------------- weights


def test_linear_weights_values():
  w = mt.linear_weights([0.2, 0.8], [0.6, 0.4], 10)
  s = np.arange(11)[:, None] / 10
  np.testing.assert_allclose(w.table, (1 - s) * [0.2, 0.8] + s * [0.6, 0.4], atol=1e-12)
  assert w.table.shape == (11, 2) and w.num_modalities == 2 and w.num_train_timesteps == 10


@pytest.mark.parametrize("build, match", [
    (lambda: mt.constant_weights([0.5, 0.6], T), "sum to"),
    (lambda: mt.constant_weights([1.5, -0.5], T), "nonnegative"),
    (lambda: mt.constant_weights([], T), "non-empty"),
    (lambda: mt.constant_weights([[0.5, 0.5]], T), "1-D"),
    (lambda: mt.linear_weights([1, 0], [0.5, 0.5, 0.0], T), "must match"),
    (lambda: mt.linear_weights([1, 0], [0.7, 0.7], T), "sum to"),
    (lambda: mt.weights_from_table(np.full((T + 1, 2), np.nan)), "finite"),
    (lambda: mt.weights_from_table(np.full((T, 2), 0.5), T), "T \\+ 1"),
    (lambda: mt.weights_from_table(np.ones(3)), "shape"),
])
def test_weights_validation(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_weights_schedule_mismatch():
  with pytest.raises(ValueError, match="same T"):
    mt.q_marginal(SCHED, mt.constant_weights([1.0], T + 1), 1, jnp.zeros((1, 2, 3)))
  with pytest.raises(ValueError, match="modalities"):
    mt.q_marginal(SCHED, mt.constant_weights([0.5, 0.5], T), 1, jnp.zeros((3, 2, 3)))
  with pytest.raises(ValueError, match="known_codes"):
    mt.mt_sample(_point_oracle(), jnp.zeros((2, 2)), schedule=SCHED, weights=WLIN, rng=jax.random.key(0),
                 known_mask=[True, False])


# ----------------------------------------------------------------------------- strided (DDIM-style) sampling


def test_strided_full_grid_with_eta_1_is_the_ancestral_path():
  """num_steps = T, eta = 1: the same step noise gives the ancestral sampler's path (conditional, time-varying
  weights, the known modality held fixed); a coarser grid gives another sample."""
  B = 64
  z_T = jax.random.normal(jax.random.key(20), (B, 2))
  noise = jax.random.normal(jax.random.key(21), (T, B, 2))
  known = np.zeros((2, B, 2), np.float32)
  known[0] = COND_COMP[0, 0]
  kw = dict(schedule=SCHED, weights=WCOND, known_codes=known, known_mask=[True, False])
  z_a, c_a = mt.mt_sample(_cond_oracle, z_T, step_noise=noise, **kw)
  z_d, c_d = mt.mt_ddim_sample(_cond_oracle, z_T, num_steps=T, eta=1.0, step_noise=noise, **kw)
  np.testing.assert_allclose(np.asarray(z_d), np.asarray(z_a), atol=1e-4)
  np.testing.assert_allclose(np.asarray(c_d), np.asarray(c_a), atol=1e-4)
  z_5, _ = mt.mt_ddim_sample(_cond_oracle, z_T, num_steps=5, eta=1.0, step_noise=noise[:5], **kw)
  assert np.max(np.abs(np.asarray(z_5) - np.asarray(z_a))) > 1e-2
  # eta = 0 is deterministic: no rng needed, the same result twice
  z_0, _ = mt.mt_ddim_sample(_cond_oracle, z_T, num_steps=T, **kw)
  assert np.max(np.abs(np.asarray(z_0) - np.asarray(z_a))) > 1e-2
  np.testing.assert_array_equal(np.asarray(mt.mt_ddim_sample(_cond_oracle, z_T, num_steps=T, **kw)[0]),
                                np.asarray(z_0))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_strided_one_modality_is_core_ddim(eta):
  B, D, n = 8, 3, 10
  z_T = jax.random.normal(jax.random.key(22), (B, D))
  noise = jax.random.normal(jax.random.key(23), (n, B, D))
  z0, codes = mt.mt_ddim_sample(_predict1, z_T, schedule=SCHED1, weights=W1, num_steps=n, eta=eta,
                                timestep_spacing="trailing", step_noise=noise)
  ref = core.ddim_sample(_ddpm_x0_fn, z_T, num_steps=n, schedule=SCHED1, prediction_type="sample", eta=eta,
                         timestep_spacing="trailing", step_noise=noise)
  np.testing.assert_allclose(np.asarray(z0), np.asarray(ref), rtol=1e-4, atol=1e-4)
  assert codes.shape == (1, B, D)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_strided_grid(spacing):
  ts = mt.ddim_grid(SCHED, 5, spacing)
  assert len(ts) == 5 and np.all(np.diff(ts) < 0) and ts.min() >= 1 and ts.max() <= T
  if spacing != "leading":
    assert ts[0] == T
  if spacing != "trailing":
    assert ts[-1] == 1  # the last codes are predicted at t = 1, as by the ancestral sampler
  np.testing.assert_array_equal(mt.ddim_grid(SCHED, T, spacing), np.arange(T, 0, -1))


def test_strided_sampler_with_exact_predictors():
  """Few steps with the exact predictors: the point mass comes back, joint samples stay coherent (one component
  for all modalities) with about the mixture's weights, and known codes stay fixed. (With 10 steps of this
  steep schedule a sample or two may end between the components: 99 % must be on one.)"""
  z_T = jax.random.normal(jax.random.key(24), (16, 2))
  z0, codes = mt.mt_ddim_sample(_point_oracle(), z_T, schedule=SCHED, weights=WLIN, num_steps=4)
  np.testing.assert_allclose(np.asarray(codes), np.broadcast_to(POINT, (2, 16, 2)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(z0), np.broadcast_to(POINT[0], (16, 2)), atol=1e-5)
  B = 1500
  z_T = jax.random.normal(jax.random.key(25), (B, 2))
  z0, codes = mt.mt_ddim_sample(_mixture_oracle, z_T, schedule=SCHED, weights=WLIN, num_steps=10, eta=0.5,
                                rng=jax.random.key(26))
  codes = np.asarray(codes)
  d = np.stack([np.abs(codes - COMP[k][:, None]).max(axis=(0, 2)) for k in range(2)])
  assert np.mean(d.min(0) < 1e-3) > 0.99
  frac_a = np.mean(d[0] < 1e-3)
  assert abs(frac_a - PRIOR[0]) < 5 * np.sqrt(PRIOR[0] * PRIOR[1] / B) + 0.02, frac_a
  np.testing.assert_allclose(np.asarray(z0), codes[0], atol=1e-5)
  known = np.zeros((2, B, 2), np.float32)
  known[0] = COND_COMP[0, 0]
  _, codes = mt.mt_ddim_sample(_cond_oracle, z_T, schedule=SCHED, weights=WCOND, num_steps=10,
                               known_codes=known, known_mask=[True, False])
  codes = np.asarray(codes)
  np.testing.assert_array_equal(codes[0], known[0])
  d = np.stack([np.abs(codes[1] - COND_COMP[k, 1]).max(-1) for k in range(2)])
  assert np.mean(d.min(0) < 1e-3) > 0.99
  assert abs(np.mean(d[0] < 1e-3) - 0.5) < 5 * np.sqrt(0.25 / B) + 0.02


def test_strided_sampler_validation():
  z_T = jnp.zeros((2, 2))
  with pytest.raises(ValueError, match="at most"):
    mt.mt_ddim_sample(_point_oracle(), z_T, schedule=SCHED, weights=WLIN, num_steps=T + 1)
  with pytest.raises(ValueError, match="step_noise"):
    mt.mt_ddim_sample(_point_oracle(), z_T, schedule=SCHED, weights=WLIN, num_steps=4, eta=1.0,
                      step_noise=jnp.zeros((T, 2, 2)))
  with pytest.raises(ValueError, match="rng"):
    mt.mt_ddim_sample(_point_oracle(), z_T, schedule=SCHED, weights=WLIN, num_steps=4, eta=1.0)
  with pytest.raises(ValueError, match="eta"):
    mt.mt_ddim_sample(_point_oracle(), z_T, schedule=SCHED, weights=WLIN, num_steps=4, eta=-0.5)
