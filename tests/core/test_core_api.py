"""Core API: guidance layout, dtypes, tracing, errors, losses, schedules and parameterisations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import core
from diffusion_jax.core import guidance, losses, parameterization as P, schedules as S
from diffusion_jax.core.samplers import consistency_timesteps

SCHED = core.make_schedule("linear")


# ----------------------------------------------------------------------------- guidance

def _cond_echo(x, t, cond):
  """Output = the conditioning value, broadcast over the example: cond and uncond halves differ."""
  return jnp.zeros(x.shape, jnp.float32) + cond[:, None].astype(jnp.float32)


def test_cfg_halves_order_in_one_forward():
  x = jnp.zeros((3, 4))
  calls = []

  def fn(x, t, cond):
    calls.append(x.shape[0])
    return _cond_echo(x, t, cond)

  out = guidance.guided_call(fn, x, jnp.zeros(3), jnp.ones(3), jnp.zeros(3), 3.0)
  assert calls == [6]  # one batched forward on [cond; uncond]
  np.testing.assert_allclose(out, 3.0)  # uncond + 3 (cond - uncond) = 0 + 3 * 1; swapped halves give -2


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m", "consistency"])
def test_cfg_inside_samplers(sampler):
  """x0-prediction model = the conditioning value, so one step lands exactly on the guided x0."""
  x = jax.random.normal(jax.random.key(0), (2, 4))
  kw = dict(num_steps=1, schedule=SCHED, prediction_type="sample", cond=jnp.ones(2), uncond=jnp.zeros(2),
            guidance_scale=3.0, rng=jax.random.key(1))
  if sampler in ("ddim", "ddpm"):
    kw["timestep_spacing"] = "trailing"
  out = core.sample(sampler, _cond_echo, x, **kw)
  expected = np.full(x.shape, 3.0)
  if sampler == "consistency":
    # The CoDi rollout from t = 980 ends at alphas_cumprod[0] (as in the released code), not at exactly t = -1:
    # z = alpha_0 x0 + sigma_0 eps_hat with eps_hat = (x_T - alpha_980 x0_hat) / sigma_980 (c_skip(980) ~ 3e-9).
    ac, a0 = SCHED.alphas_cumprod[980], SCHED.alphas_cumprod[0]
    eps = (np.asarray(x) - math.sqrt(ac) * 3.0) / math.sqrt(1 - ac)
    expected = math.sqrt(a0) * 3.0 + math.sqrt(1 - a0) * eps
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_guidance_channel_subset():
  x = jnp.zeros((2, 5, 5, 4))
  out = guidance.guided_call(lambda x, t, c: jnp.zeros(x.shape) + c[:, None, None, None], x, jnp.zeros(2),
                             jnp.ones(2), jnp.zeros(2), 4.0, channels=3)
  np.testing.assert_allclose(out[..., :3], 4.0)
  np.testing.assert_allclose(out[..., 3:], 1.0)  # 4th channel from the conditional half


def test_learned_variance_guides_only_eps_channels():
  """DDPM with learned variance (C = 2): the eps channels are guided, the variance channels come from the
  conditional branch. A 2-timestep schedule makes one step with a large beta / beta_tilde gap checkable."""
  sched = core.make_schedule("linear", num_train_timesteps=2)

  def fn(x, t, cond):
    # x0 part: the cond value at t = 1 (guided: 0 + 5 (1 - 0) = 5), the input itself at t = 0 (so the last step
    # returns x_1 unchanged); variance part: cond - 1 (conditional 0, unconditional -1, guided would be 5).
    x0 = jnp.where(t[:, None] > 0.5, jnp.zeros(x.shape) + cond[:, None], x)
    return jnp.concatenate([x0, jnp.zeros(x.shape) + cond[:, None] - 1.0], -1)

  out = core.ddpm_sample(fn, jnp.zeros((2, 2)), num_steps=2, schedule=sched, prediction_type="sample",
                         cond=jnp.ones(2), uncond=jnp.zeros(2), guidance_scale=5.0, variance_type="learned_range",
                         timestep_spacing="trailing", step_noise=jnp.ones((2, 2, 2)))
  # DDPM posterior for the step t = 1 -> 0 (Ho et al. Eq. 7): mean coefficient of x0 and beta_tilde.
  b = np.array([1e-4, 0.02])
  ac = np.cumprod(1 - b)
  coef_x0 = np.sqrt(ac[0]) * b[1] / (1 - ac[1])
  beta_tilde = (1 - ac[0]) / (1 - ac[1]) * b[1]
  frac = 0.5  # from the conditional variance value v = 0
  std = np.exp(0.5 * (frac * np.log(b[1]) + (1 - frac) * np.log(beta_tilde)))
  np.testing.assert_allclose(out, coef_x0 * 5.0 + std, rtol=1e-4)


def test_power_cosine_ramp():
  w, T = 4.6, 1000
  t = jnp.array([1000.0, 500.0, 250.0, 0.0])
  got = guidance.power_cosine_scale(t, w, T, 4.0)
  u = 1 - np.array([1000.0, 500.0, 250.0, 0.0]) / T
  expect = 1 + (w - 1) * 0.5 * (1 - np.cos(np.pi * u ** 4))
  np.testing.assert_allclose(got, expect, rtol=1e-6)
  assert abs(float(got[0]) - 1.0) < 1e-6 and abs(float(got[-1]) - w) < 1e-5
  # Hand value at t = T/2: 1 + 3.6 * 0.5 * (1 - cos(pi / 16)).
  np.testing.assert_allclose(got[1], 1 + 3.6 * 0.5 * (1 - math.cos(math.pi / 16)), rtol=1e-6)
  out = guidance.guided_call(_cond_echo, jnp.zeros((4, 2)), t, jnp.ones(4), jnp.zeros(4), w,
                             schedule="power_cosine", num_train_timesteps=T, power=4.0)
  np.testing.assert_allclose(out[:, 0], expect, rtol=1e-6)


# ----------------------------------------------------------------------------- dtypes, shapes, tracing

TRACES = {"n": 0}


def _apply(params, x, t, cond):
  TRACES["n"] += 1
  assert x.dtype == params["dtype_probe"].dtype  # the network sees the input dtype
  return (jnp.tanh(x.astype(jnp.float32) * params["w"]) * 0.5).astype(x.dtype)


ALL = [("ddpm", "epsilon", {}), ("ddim", "v_prediction", {}), ("dpmpp_2m", "epsilon", {}),
       ("euler", "epsilon", {}), ("edm_heun", "edm", {}), ("edm_heun", "epsilon", dict(S_churn=5.0)),
       ("consistency", "v_prediction", {}),
       ("dpmpp", "v_prediction", dict(solver_order=3, use_karras_sigmas=True)),
       ("dpmpp", "epsilon", dict(algorithm_type="sde-dpmsolver++")), ("unipc", "epsilon", {}),
       ("heun", "v_prediction", {}), ("euler_ancestral", "epsilon", {}), ("lcm", "epsilon", {})]


def _kw(sampler, pred, extra, n=4):
  kw = dict(num_steps=n, prediction_type=pred, rng=jax.random.key(3), **extra)
  if not (sampler == "edm_heun" and pred == "edm"):
    kw["schedule"] = SCHED
  return kw


@pytest.mark.parametrize("sampler,pred,extra", ALL,
                         ids=[f"{a[0]}-{a[1]}" + "".join(f"-{v}" for v in a[2].values()) for a in ALL])
def test_bf16_dtype_shape_and_no_retrace(sampler, pred, extra):
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4)).astype(jnp.bfloat16)
  params = {"w": jnp.float32(0.7), "dtype_probe": jnp.zeros((), jnp.bfloat16)}
  TRACES["n"] = 0
  out = core.sample(sampler, Partial(_apply, params), x, **_kw(sampler, pred, extra))
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  n1 = TRACES["n"]
  assert n1 >= 1
  params2 = {"w": jnp.float32(1.3), "dtype_probe": jnp.zeros((), jnp.bfloat16)}
  out2 = core.sample(sampler, Partial(_apply, params2), x * 2, **_kw(sampler, pred, extra))
  assert TRACES["n"] == n1, "second call with new params / inputs of the same shape re-traced"
  assert not np.allclose(np.asarray(out2, np.float32), np.asarray(out, np.float32))  # params were used
  if sampler == "ddim":
    core.sample(sampler, Partial(_apply, params2), x, **_kw(sampler, pred, extra, n=5))
    assert TRACES["n"] > n1  # a new step count is a new trace (documented)


def test_guidance_scale_change_does_not_retrace():
  params = {"w": jnp.float32(0.7), "dtype_probe": jnp.zeros((), jnp.float32)}

  def apply(params, x, t, cond):
    return _apply(params, x, t, cond) + cond[:, None]

  x = jnp.ones((2, 4))
  TRACES["n"] = 0
  outs = [core.ddim_sample(Partial(apply, params), x, num_steps=3, schedule=SCHED, cond=jnp.ones(2),
                           uncond=jnp.zeros(2), guidance_scale=w) for w in (1.5, 4.0)]
  assert TRACES["n"] == 1
  assert not np.allclose(outs[0], outs[1])


def test_fp32_precision_default_and_determinism():
  x = jax.random.normal(jax.random.key(0), (2, 4))
  fn = lambda x, t, c: 0.3 * x
  a = core.ddpm_sample(fn, x, num_steps=5, schedule=SCHED, rng=jax.random.key(1))
  b = core.ddpm_sample(fn, x, num_steps=5, schedule=SCHED, rng=jax.random.key(1))
  c = core.ddpm_sample(fn, x, num_steps=5, schedule=SCHED, rng=jax.random.key(2))
  assert a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


# ----------------------------------------------------------------------------- errors

def _msg(excinfo):
  return str(excinfo.value)


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError) as e:
    core.make_schedule("quadratic")
  assert "cosine" in _msg(e) and "scaled_linear" in _msg(e) and "linear" in _msg(e)
  with pytest.raises(ValueError) as e:
    core.ddim_sample(lambda x, t, c: x, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED, prediction_type="eps")
  assert "epsilon" in _msg(e) and "v_prediction" in _msg(e) and "sample" in _msg(e)
  with pytest.raises(ValueError) as e:
    core.sample("plms", lambda x, t, c: x, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED)
  for name in ("ddpm", "ddim", "dpmpp", "dpmpp_2m", "euler", "euler_ancestral", "heun", "unipc", "lcm", "edm_heun",
               "consistency"):
    assert name in _msg(e)
  with pytest.raises(ValueError) as e:
    core.ddim_sample(lambda x, t, c: x, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED, timestep_spacing="uniform")
  assert "leading" in _msg(e) and "trailing" in _msg(e)
  with pytest.raises(ValueError, match="fixed_small"):
    core.ddpm_sample(lambda x, t, c: x, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED, variance_type="learned",
                     rng=jax.random.key(0))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler", "dpmpp", "unipc", "heun", "euler_ancestral"])
def test_too_many_steps(sampler):
  with pytest.raises(ValueError, match="num_train_timesteps=1000"):
    core.sample(sampler, lambda x, t, c: x, jnp.zeros((1, 2)), num_steps=1001, schedule=SCHED,
                rng=jax.random.key(0))


def test_guidance_without_unconditional_branch():
  fn = lambda x, t, c: x
  with pytest.raises(ValueError, match="no unconditional branch"):
    core.ddim_sample(fn, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED, cond=jnp.ones(1), guidance_scale=4.0)
  with pytest.raises(ValueError, match="no unconditional branch"):
    core.edm_sample(fn, jnp.zeros((1, 2)), num_steps=2, guidance_scale=2.0)
  with pytest.raises(ValueError, match="cond is None"):
    core.ddim_sample(fn, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED, uncond=jnp.zeros(1), guidance_scale=4.0)
  # guidance_scale 1 without uncond is plain conditional sampling.
  core.ddim_sample(fn, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED, cond=jnp.ones(1), guidance_scale=1.0)


def test_other_bad_inputs():
  fn = lambda x, t, c: x
  with pytest.raises(ValueError, match="rng"):
    core.ddpm_sample(fn, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED)
  with pytest.raises(ValueError, match="step_noise must have shape"):
    core.ddpm_sample(fn, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED, step_noise=jnp.zeros((3, 1, 2)))
  with pytest.raises(ValueError, match="2C = 4 channels"):
    core.ddpm_sample(fn, jnp.zeros((1, 2)), num_steps=2, schedule=SCHED, variance_type="learned_range",
                     rng=jax.random.key(0))
  with pytest.raises(ValueError, match="Valid num_steps"):
    core.consistency_sample(fn, jnp.zeros((1, 2)), num_steps=11, schedule=SCHED)
  with pytest.raises(TypeError, match="make_schedule"):
    core.ddim_sample(fn, jnp.zeros((1, 2)), num_steps=2, schedule="linear")
  with pytest.raises(ValueError, match="2C = 4 channels"):
    losses.hybrid_loss(fn, jnp.zeros((1, 2)), jax.random.key(0), schedule=SCHED)


# ----------------------------------------------------------------------------- schedules

def test_schedule_values():
  lin = core.make_schedule("linear")
  np.testing.assert_allclose(lin.betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(lin.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-5)
  cos = core.make_schedule("cosine")
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  expect = f(np.arange(1, 1001) / 1000) / f(0)
  np.testing.assert_allclose(cos.alphas_cumprod[:900], expect[:900], rtol=1e-4, atol=1e-7)
  assert cos.betas.max() <= 0.999 + 1e-7
  z = core.make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_snr=True)
  sl = core.make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
  assert z.alphas_cumprod[-1] < 1e-7 and abs(z.alphas_cumprod[0] - sl.alphas_cumprod[0]) < 1e-7
  # the pytree round trip keeps metadata
  leaves, tree = jax.tree_util.tree_flatten(z)
  assert len(leaves) == 2 and jax.tree_util.tree_unflatten(tree, leaves).name == "scaled_linear"


def test_karras_and_conversions():
  s = S.karras_sigmas(18, 0.002, 80.0, 7.0)
  assert s.shape == (18,) and abs(s[0] - 80) < 1e-9 and abs(s[-1] - 0.002) < 1e-12
  i = 9
  expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  assert abs(s[i] - expect) < 1e-9 * expect
  lam = np.linspace(-10, 10, 7)
  a, sg = S.alpha_sigma_from_log_snr(lam)
  np.testing.assert_allclose(S.log_snr_from_alpha_sigma(a, sg), lam, atol=1e-9)
  np.testing.assert_allclose(a ** 2 + sg ** 2, 1.0, atol=1e-12)
  ve = np.array([0.1, 1.0, 10.0])
  a, sg = S.alpha_sigma_from_ve_sigma(ve)
  np.testing.assert_allclose(S.ve_sigma_from_alpha_sigma(a, sg), ve)
  t = np.linspace(0, 1, 5)
  a, sg = S.vp_alpha_sigma(t)
  np.testing.assert_allclose(a ** 2 + sg ** 2, 1.0, atol=1e-12)
  np.testing.assert_allclose(np.log(a[-1]), -0.25 * 19.9 - 0.05)
  a, sg = S.cosine_alpha_sigma(t)
  assert abs(a[0] - 1) < 1e-12 and a[-1] < 1e-6
  ja, _ = S.vp_alpha_sigma(jnp.asarray(t))
  np.testing.assert_allclose(ja, S.vp_alpha_sigma(t)[0], rtol=1e-5)
  # sigma -> t is the inverse of the log-sigma interpolation at integer and fractional points
  log_s = np.log(SCHED.ve_sigmas)
  tt = np.array([0.0, 10.5, 500.25, 999.0])
  sig = np.exp(np.interp(tt, np.arange(1000), log_s))
  np.testing.assert_allclose(S.sigma_to_t(sig, log_s), tt, atol=1e-6)


def test_consistency_grid():
  np.testing.assert_array_equal(consistency_timesteps(4), [980, 720, 460, 200])
  np.testing.assert_array_equal(consistency_timesteps(1), [980])
  assert len(consistency_timesteps(50)) == 50


# ----------------------------------------------------------------------------- parameterisations

def test_parameterisation_round_trips():
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (3, 5))
  eps = jax.random.normal(k2, (3, 5))
  ac = jnp.array([0.9, 0.5, 0.01])[:, None]
  a, s = jnp.sqrt(ac), jnp.sqrt(1 - ac)
  xt = a * x0 + s * eps
  for pred in P.PREDICTION_TYPES:
    out = P.prediction_from_x0_eps(x0, eps, a, s, pred)
    x0h, epsh = P.predict_x0_eps(out, xt, a, s, pred)
    np.testing.assert_allclose(x0h, x0, atol=2e-4)
    np.testing.assert_allclose(epsh, eps, atol=2e-4)
  np.testing.assert_allclose(P.v_from_x0_eps(x0, eps, a, s), a * eps - s * x0)


def test_edm_and_consistency_scalings():
  sc = P.edm_scalings(jnp.array([0.5, 2.0]), 0.5)
  np.testing.assert_allclose(sc.c_skip, [0.5, 0.25 / 4.25], rtol=1e-6)
  np.testing.assert_allclose(sc.c_out, [0.25 / math.sqrt(0.5), 1.0 / math.sqrt(4.25)], rtol=1e-6)
  np.testing.assert_allclose(sc.c_in, [1 / math.sqrt(0.5), 1 / math.sqrt(4.25)], rtol=1e-6)
  np.testing.assert_allclose(sc.c_noise, [0.25 * math.log(0.5), 0.25 * math.log(2.0)], rtol=1e-6)
  c_skip, c_out = P.consistency_scalings(jnp.array([0.0, 1.0, 200.0]))
  np.testing.assert_allclose(c_skip, [1.0, 0.25 / 100.25, 0.25 / (2000 ** 2 + 0.25)], rtol=1e-6)
  np.testing.assert_allclose(c_out, [0.0, 10 / math.sqrt(100.25), 2000 / math.sqrt(2000 ** 2 + 0.25)], rtol=1e-6)


# ----------------------------------------------------------------------------- losses

def _fixed(B=4, shape=(3, 3, 2)):
  k1, k2 = jax.random.split(jax.random.key(7))
  return jax.random.normal(k1, (B,) + shape), jax.random.normal(k2, (B,) + shape), jnp.array([0, 10, 500, 999])


@pytest.mark.parametrize("pred", P.PREDICTION_TYPES)
def test_diffusion_loss_targets(pred):
  x0, noise, t = _fixed()
  ac = SCHED.alphas_cumprod[np.asarray(t)][:, None, None, None]
  a, s = np.sqrt(ac), np.sqrt(1 - ac)
  x0n, nn = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
  target = {"epsilon": nn, "v_prediction": a * nn - s * x0n, "sample": x0n}[pred]
  xt = a * x0n + s * nn
  oracle = lambda x, tt, c: jnp.asarray(target, jnp.float32)
  loss, terms = losses.diffusion_loss(oracle, x0, jax.random.key(0), schedule=SCHED, prediction_type=pred,
                                      t=t, noise=noise)
  assert loss.shape == (4,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, 0.0, atol=1e-10)
  seen = {}

  def zero(x, tt, c):
    seen["x"], seen["t"] = x, tt
    return jnp.zeros_like(x)

  loss, _ = losses.diffusion_loss(zero, x0, jax.random.key(0), schedule=SCHED, prediction_type=pred, t=t,
                                  noise=noise)
  np.testing.assert_allclose(loss, np.mean(target ** 2, axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(seen["x"], xt, atol=1e-5)
  np.testing.assert_allclose(seen["t"], t)
  loss_w, _ = losses.diffusion_loss(zero, x0, jax.random.key(0), schedule=SCHED, prediction_type=pred, t=t,
                                    noise=noise, snr_gamma=5.0)
  snr = (ac / (1 - ac)).reshape(-1)
  w = {"epsilon": np.minimum(snr, 5) / snr, "v_prediction": np.minimum(snr, 5) / (snr + 1),
       "sample": np.minimum(snr, 5)}[pred]
  np.testing.assert_allclose(loss_w, w * np.mean(target ** 2, axis=(1, 2, 3)), rtol=1e-4)


def test_diffusion_loss_samples_timesteps_and_noise():
  x0 = jnp.zeros((256, 2))
  _, terms = jax.jit(lambda x0: losses.diffusion_loss(lambda x, t, c: x, x0, jax.random.key(0), schedule=SCHED))(x0)
  t = np.asarray(terms["t"])
  assert t.min() >= 0 and t.max() <= 999 and len(np.unique(t)) > 200 and abs(t.mean() - 499.5) < 60


def test_edm_loss():
  x0, noise, _ = _fixed()
  sigma = jnp.array([0.01, 0.5, 2.0, 40.0])
  sd = 0.5
  sg = np.asarray(sigma)[:, None, None, None]
  c_skip, c_out = sd ** 2 / (sg ** 2 + sd ** 2), sg * sd / np.sqrt(sg ** 2 + sd ** 2)
  x = np.asarray(x0) + sg * np.asarray(noise)
  oracle = lambda xin, cn, c: jnp.asarray((np.asarray(x0) - c_skip * x) / c_out, jnp.float32)
  loss, _ = losses.edm_loss(oracle, x0, jax.random.key(0), sigma=sigma, noise=noise)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  loss, terms = losses.edm_loss(lambda xin, cn, c: jnp.zeros_like(xin), x0, jax.random.key(0), sigma=sigma,
                                noise=noise)
  w = (sg ** 2 + sd ** 2).reshape(-1) / (sg.reshape(-1) * sd) ** 2
  np.testing.assert_allclose(loss, w * np.mean((c_skip * x - np.asarray(x0)) ** 2, axis=(1, 2, 3)), rtol=1e-4)
  _, terms = jax.jit(lambda x0: losses.edm_loss(lambda xin, cn, c: xin, x0, jax.random.key(1)))(jnp.zeros((4000, 1)))
  ls = np.log(np.asarray(terms["sigma"]))
  assert abs(ls.mean() + 1.2) < 0.1 and abs(ls.std() - 1.2) < 0.1


def test_hybrid_loss_properties():
  """Exact eps and v = -1 (variance = clipped posterior variance) give zero KL for t > 0; the VLB gradient
  reaches only the variance channels (stop-gradient on the mean); t = 0 uses the discretised NLL (> 0)."""
  x0 = jnp.clip(jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 0.5, -1, 1)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 1, 2, 999])

  @jax.jit
  def run(v):
    f = lambda x, tt, c: jnp.concatenate([noise, jnp.full(x.shape, v)], -1)
    return losses.hybrid_loss(f, x0, jax.random.key(0), schedule=SCHED, t=t, noise=noise)

  loss, terms = run(-1.0)
  np.testing.assert_allclose(terms["mse"], 0.0, atol=1e-10)
  np.testing.assert_allclose(terms["vlb"][1:], 0.0, atol=1e-5)
  assert float(terms["vlb"][0]) > 0.0
  # Any other variance is worse than the true posterior variance for small t (where beta_tilde << beta; at
  # large t the two coincide and v hardly matters).
  vlbs = {v: np.asarray(run(v)[1]["vlb"]) for v in (-0.5, 0.0, 1.0)}
  for v in vlbs.values():
    assert np.all(v[1:3] > 1e-3)
  # Hand value: KL of two Gaussians with equal means, log variance gap d (per dim), in bits:
  # 0.5 (-1 - d + e^d) / ln 2, with d = model - true = 1.0 * (log beta - log var_clipped) at v = 1.
  tab = losses.posterior_tables(SCHED)
  d = tab["log_beta"][2] - tab["log_var_clipped"][2]
  np.testing.assert_allclose(vlbs[1.0][2], 0.5 * (-1 + d + np.exp(-d)) / math.log(2), rtol=1e-3)

  def total(out):
    f = lambda x, tt, c: out
    l, _ = losses.hybrid_loss(f, x0, jax.random.key(0), schedule=SCHED, t=t, noise=noise, lambda_vlb=1.0)
    return jnp.sum(l)

  out0 = jnp.concatenate([noise, jnp.zeros(x0.shape)], -1)
  g = jax.grad(total)(out0)
  np.testing.assert_allclose(g[..., :2], 0.0, atol=1e-6)  # eps is exact: MSE grad 0, VLB grad stopped
  assert float(jnp.abs(g[..., 2:]).max()) > 0
