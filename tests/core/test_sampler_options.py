"""Sampler options and bad input: unknown options / values name the valid ones, zero or negative steps are refused
before sampling, one-step limits (including the corners where diffusers returns NaN), the schedule tail that the
sigma-space samplers read, and the old DPM-Solver++(2M) call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import core
from diffusion_jax.core import samplers as S

SCHED = core.make_schedule("linear")
COS = core.make_schedule("cosine")
X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32))


def _const_x0(c):
  return lambda x, t, cond: jnp.full(x.shape, c, x.dtype)


def _never_called(x, t, cond):
  raise AssertionError("the network was called although the request is invalid")


# ----------------------------------------------------------------------------- the schedule tail

def test_schedule_tail_is_not_floored():
  """Only a zero-SNR terminal value becomes 2^-24 (diffusers); every other small value is kept."""
  ac = COS.solver_alphas_cumprod
  assert 2e-9 < ac[-1] < 3e-9 and ac[-1] == COS.alphas_cumprod[-1]
  np.testing.assert_array_equal(ac, COS.alphas_cumprod)
  np.testing.assert_allclose(COS.solver_sigmas()[-1], np.sqrt((1 - ac[-1]) / ac[-1]), rtol=1e-6)  # 2.03e4, not 4096
  lin04 = core.make_schedule("linear", beta_end=0.04)
  assert np.sum(lin04.alphas_cumprod < 2.0 ** -24) > 90
  np.testing.assert_array_equal(lin04.solver_alphas_cumprod, lin04.alphas_cumprod)
  z = core.make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_snr=True)
  assert z.alphas_cumprod[-1] == 0 and z.solver_alphas_cumprod[-1] == 2.0 ** -24
  np.testing.assert_array_equal(z.solver_alphas_cumprod[:-1], z.alphas_cumprod[:-1])
  # The JAX path (a traced schedule) agrees.
  np.testing.assert_allclose(jax.jit(lambda s: s.ve_sigmas)(z), z.ve_sigmas, rtol=1e-5)


def test_distinct_tail_sigmas_give_finite_dpmpp():
  """Linear betas to 0.04 with 25 steps: t = 999 and 959 both lie below 2^-24; floored, they gave a zero step and
  all-NaN output."""
  sch = core.make_schedule("linear", beta_end=0.04)
  ts, sig = S.dpm_sigmas(sch, 25)
  assert np.all(np.diff(sig) < 0) and sig[0] > 2e4
  out = core.dpmpp_2m_sample(_const_x0(0.5), X, num_steps=25, schedule=sch, prediction_type="sample")
  assert bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------------------- unknown options and values

def test_unknown_option_names_the_valid_ones():
  with pytest.raises(TypeError) as e:
    core.dpmpp_sample(_never_called, X, num_steps=5, schedule=SCHED, use_karas_sigmas=True)
  msg = str(e.value)
  assert "'use_karas_sigmas'" in msg and "did you mean 'use_karras_sigmas'" in msg
  assert "Valid options:" in msg and "final_sigmas_type" in msg and "solver_order" in msg
  with pytest.raises(TypeError, match="(?s)unknown option.*'eta'.*Valid options"):
    core.sample("unipc", _never_called, X, num_steps=5, schedule=SCHED, eta=0.5)


@pytest.mark.parametrize("fn,kw,valid", [
    (core.dpmpp_sample, dict(algorithm_type="dpmsolver"), ["dpmsolver++, sde-dpmsolver++"]),
    (core.dpmpp_sample, dict(solver_order=4), ["1, 2, 3"]),
    (core.dpmpp_sample, dict(solver_type="bh2"), ["midpoint", "heun"]),
    (core.dpmpp_sample, dict(final_sigmas_type="last"), ["zero", "sigma_min"]),
    (core.dpmpp_sample, dict(use_karras_sigmas="yes"), ["True or False"]),
    (core.unipc_sample, dict(solver_type="midpoint"), ["bh1", "bh2"]),
    (core.unipc_sample, dict(solver_order=0), ["1, 2, 3"]),
    (core.unipc_sample, dict(disable_corrector="all"), ["list of step indices"]),
    (core.euler_sample, dict(final_sigmas_type="min"), ["zero", "sigma_min"]),
    (core.heun_sample, dict(timestep_spacing="uniform"), ["leading", "trailing", "linspace"]),
    (core.euler_ancestral_sample, dict(prediction_type="eps"), ["epsilon", "v_prediction", "sample"]),
    (core.lcm_sample, dict(num_steps=60), ["original_inference_steps=50"]),
])
def test_unknown_values_list_the_valid_ones(fn, kw, valid):
  kw = dict(dict(num_steps=5, schedule=SCHED, rng=jax.random.key(0)), **kw)
  with pytest.raises(ValueError) as e:
    fn(_never_called, X, **kw)
  for v in valid:
    assert v in str(e.value), (v, str(e.value))


# ----------------------------------------------------------------------------- zero / negative steps

def _flat_schedule():
  """A custom schedule whose alphas_cumprod is constant over t = 500..599 (zero betas): equal sigmas there."""
  betas = np.linspace(1e-4, 0.02, 1000)
  betas[500:600] = 0.0
  return core.schedule_from_betas(betas, name="flat")


@pytest.mark.parametrize("sampler,kw,match", [
    ("dpmpp", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), "zero or negative step"),
    ("unipc", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), "final_sigmas_type='zero'"),
    ("euler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), "zero or negative step"),
    ("dpmpp", dict(num_steps=1000, timestep_spacing="leading"), "timestep 0 is followed by 0"),
    ("unipc", dict(num_steps=1000, timestep_spacing="linspace"), "zero or negative step"),
    ("ddim", dict(num_steps=1000, steps_offset=1), r"outside \[0, 999\]"),
    ("heun", dict(num_steps=1000, steps_offset=1, timestep_spacing="leading"), r"outside \[0, 999\]"),
    ("unipc", dict(lower_order_final=False), "lower_order_final=True"),
    ("dpmpp", dict(schedule=_flat_schedule(), num_steps=50), "zero or negative step"),
    ("euler_ancestral", dict(schedule=_flat_schedule(), num_steps=50), "zero or negative step"),
    ("heun", dict(schedule=_flat_schedule(), num_steps=50), "zero or negative step"),
])
def test_zero_or_negative_steps_are_refused_before_sampling(sampler, kw, match):
  kw = dict(dict(num_steps=7, schedule=SCHED, rng=jax.random.key(0)), **kw)
  with pytest.raises(ValueError, match=match):
    core.sample(sampler, _never_called, X, **kw)


def test_diffusers_repeats_the_last_karras_sigma():
  """The refused Karras + sigma_min grids really end with a zero-length step in diffusers (a wasted network call,
  an update of size 0)."""
  diffusers = pytest.importorskip("diffusers")
  for cls in (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler,
              diffusers.EulerDiscreteScheduler):
    s = cls(use_karras_sigmas=True, final_sigmas_type="sigma_min")
    s.set_timesteps(7)
    assert float(s.sigmas[-1]) == float(s.sigmas[-2]), cls.__name__


# ----------------------------------------------------------------------------- one-step limits

@pytest.mark.parametrize("sampler,kw", [
    ("dpmpp", dict(solver_order=1)), ("dpmpp", dict(solver_order=3)),
    ("dpmpp", dict(algorithm_type="sde-dpmsolver++", step_noise=np.ones((1, 3, 4), np.float32))),
    ("unipc", {}), ("unipc", dict(solver_type="bh1")), ("unipc", dict(predict_x0=False)),
    ("unipc", dict(predict_x0=False, solver_type="bh1", solver_order=3)),
    ("heun", {}), ("heun", dict(use_karras_sigmas=True)), ("euler", {}),
    ("euler_ancestral", dict(step_noise=np.ones((1, 3, 4), np.float32))), ("lcm", {}),
])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_one_step_to_sigma_zero_lands_on_the_x0_prediction(sampler, kw, spacing):
  """One step from t = 999 to sigma = 0 returns the model's x0 exactly. diffusers' UniPC returns NaN for its "bh1"
  and noise-prediction variants here (B_h = -inf times a zero correction; 0 * expm1(inf))."""
  kw = dict(kw)
  if sampler != "lcm":
    kw["timestep_spacing"] = spacing
  out = core.sample(sampler, _const_x0(0.7), X, num_steps=1, schedule=COS, prediction_type="sample", **kw)
  # Euler-type states are x_T * 2.0e4 here, and UniPC's noise-prediction form goes through x / alpha (alpha = 4.9e-5):
  # the x0 they return is exact to the float32 rounding of a 2e4-sized value.
  coarse = sampler in ("euler", "heun", "euler_ancestral") or kw.get("predict_x0") is False
  np.testing.assert_allclose(out, 0.7, atol=1e-2 if coarse else 1e-5)


def test_euler_ancestral_uses_the_exact_ancestral_split():
  """sigma_down = sigma_next^2 / sigma, sigma_up = sigma_next sqrt(1 - (sigma_next / sigma)^2) in float64: finite on
  the cosine schedule with 3 trailing steps, where diffusers' float32 sqrt(sigma_next^2 - sigma_up^2) is NaN."""
  ts, sig = S.euler_sigmas(COS, 3, "trailing", 0, False)
  z = np.random.default_rng(1).standard_normal((3,) + X.shape).astype(np.float32)
  c = 0.3
  out = core.euler_ancestral_sample(_const_x0(c), X, num_steps=3, schedule=COS, prediction_type="sample",
                                    timestep_spacing="trailing", step_noise=z)
  x = np.asarray(X, np.float64) * sig[0]
  for i in range(3):
    s, s2 = sig[i], sig[i + 1]
    down, up = s2 * s2 / s, s2 * np.sqrt(1 - (s2 / s) ** 2)
    x = c + (x - c) * down / s + up * z[i]
  np.testing.assert_allclose(out, x, atol=2e-3)  # the float32 state starts at 2.0e4 * x_T
  f = np.float32
  s, s2 = f(sig[0]), f(sig[1])
  up32 = (s2 ** 2 * (s ** 2 - s2 ** 2) / s ** 2) ** f(0.5)
  with np.errstate(invalid="ignore"):
    assert np.isnan((s2 ** 2 - up32 ** 2) ** f(0.5))  # what the float32 formula gives


# ----------------------------------------------------------------------------- compatibility, stochastic samplers

def test_dpmpp_2m_keeps_its_old_call_and_is_solver_order_2():
  fn = lambda x, t, c: 0.1 * x + jnp.sin(x) * (t[:, None] / 1000.0)
  old = core.dpmpp_2m_sample(fn, X, num_steps=12, schedule=SCHED, prediction_type="epsilon",
                             timestep_spacing="linspace", steps_offset=0, lower_order_final=True)
  new = core.dpmpp_sample(fn, X, num_steps=12, schedule=SCHED, solver_order=2)
  np.testing.assert_array_equal(old, new)
  assert not np.allclose(new, core.dpmpp_sample(fn, X, num_steps=12, schedule=SCHED, solver_order=3))


@pytest.mark.parametrize("sampler,kw", [("dpmpp", dict(algorithm_type="sde-dpmsolver++")), ("euler_ancestral", {}),
                                        ("lcm", {})])
def test_stochastic_samplers_need_noise_and_use_it(sampler, kw):
  fn = lambda x, t, c: 0.2 * x
  with pytest.raises(ValueError, match="rng"):
    core.sample(sampler, fn, X, num_steps=4, schedule=SCHED, **kw)
  a = core.sample(sampler, fn, X, num_steps=4, schedule=SCHED, rng=jax.random.key(1), **kw)
  b = core.sample(sampler, fn, X, num_steps=4, schedule=SCHED, rng=jax.random.key(1), **kw)
  c = core.sample(sampler, fn, X, num_steps=4, schedule=SCHED, rng=jax.random.key(2), **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  with pytest.raises(ValueError, match="step_noise must have shape"):
    core.sample(sampler, fn, X, num_steps=4, schedule=SCHED, step_noise=np.zeros((3, 3, 4), np.float32), **kw)


def test_lambda_min_clipped_matches_diffusers():
  diffusers = pytest.importorskip("diffusers")
  for spacing in ("linspace", "leading", "trailing"):
    s = diffusers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
                                              timestep_spacing=spacing)
    s.set_timesteps(10)
    ts, sig = S.dpm_sigmas(COS, 10, spacing, lambda_min_clipped=-5.1)
    np.testing.assert_array_equal(ts, s.timesteps.numpy())
    np.testing.assert_allclose(sig, s.sigmas.numpy(), rtol=1e-6)
    assert ts[0] < 999  # the clipped tail is skipped
