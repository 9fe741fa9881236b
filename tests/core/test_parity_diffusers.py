"""Parity with diffusers' schedulers (PyTorch, CPU): same schedule, same analytic model on both sides, same
initial noise (and the same per-step noise for stochastic samplers) -> final samples agree to 1e-5 (fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from core_testlib import analytic_jax, analytic_torch, analytic_var_jax, analytic_var_torch  # noqa: E402

from diffusion_jax import core  # noqa: E402
from diffusion_jax.core.schedules import spacing_timesteps  # noqa: E402

TOL = 1e-5
SHAPE = (6, 4)
STEPS = (10, 25, 50)
PREDS = ("epsilon", "v_prediction")


def _noise(seed=0, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _jfn(schedule, pred, learned=False):
  ac = np.asarray(schedule.alphas_cumprod, np.float32)
  f = analytic_var_jax if learned else analytic_jax
  return lambda x, t, cond: f(x, t, ac, pred)


def _run_torch(sched, x, pred, learned=False, step_kwargs=None, per_step=None):
  x = torch.from_numpy(x)
  ac = sched.alphas_cumprod.to(torch.float32)
  f = analytic_var_torch if learned else analytic_torch
  for i, t in enumerate(sched.timesteps):
    xin = sched.scale_model_input(x, t)
    out = f(xin, t.float().reshape(1).expand(x.shape[0]), ac, pred)
    kw = dict(step_kwargs or {})
    if per_step is not None:
      kw.update(per_step(i))
    x = sched.step(out, t, x, **kw).prev_sample
  return x.numpy()


def _check(ours, ref, tol=TOL):
  ours = np.asarray(ours)
  assert ours.shape == ref.shape and ours.dtype == np.float32
  assert np.all(np.isfinite(ref)) and np.abs(ref).max() > 0.1  # a meaningful comparison
  err = float(np.max(np.abs(ours - ref)))
  print(f"max abs diff {err:.2e} (max |x| {np.abs(ref).max():.2f})")
  assert err <= tol


def _schedule(**kw):
  return core.make_schedule(kw.pop("name", "linear"), **kw)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [7, 10, 50])
def test_spacings_match_diffusers(spacing, n):
  for cls, variant in [(diffusers.DDPMScheduler, "ddpm"), (diffusers.DDIMScheduler, "ddpm"),
                       (diffusers.DPMSolverMultistepScheduler, "dpm"), (diffusers.EulerDiscreteScheduler, "euler")]:
    s = cls(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=1)
    s.set_timesteps(n)
    ours = spacing_timesteps(1000, n, spacing, steps_offset=1, variant=variant)
    np.testing.assert_allclose(ours, s.timesteps.numpy().astype(np.float64), atol=1e-4, err_msg=cls.__name__)


@pytest.mark.parametrize("name,kw", [("linear", {}), ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
                                     ("cosine", {}), ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012,
                                                                            rescale_zero_snr=True))])
def test_schedules_match_diffusers(name, kw):
  ours = core.make_schedule(name, **kw)
  dname = "squaredcos_cap_v2" if name == "cosine" else name
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=dname,
                                beta_start=kw.get("beta_start", 1e-4), beta_end=kw.get("beta_end", 0.02),
                                rescale_betas_zero_snr=kw.get("rescale_zero_snr", False))
  ac = ref.alphas_cumprod.numpy().astype(np.float64)
  if kw.get("rescale_zero_snr"):
    # Betas near the end are ratios of tiny numbers (ill-conditioned): compare the well-conditioned alphas_cumprod.
    np.testing.assert_allclose(ours.alphas_cumprod, ac, rtol=1e-5, atol=1e-7)
    assert ours.alphas_cumprod[-1] == 0.0 and ac[-1] == 0.0
  else:
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, ac, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("n", STEPS)
def test_ddpm_fixed_small(pred, n):
  x = _noise()
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=pred,
                                  clip_sample=False)
  sched.set_timesteps(n)
  gen = torch.Generator().manual_seed(123)
  ref = _run_torch(sched, x, pred, step_kwargs=dict(generator=gen))
  # Reproduce diffusers' noise draws: one randn per step with t > 0, in order.
  gen2 = torch.Generator().manual_seed(123)
  noise = np.stack([torch.randn(SHAPE, generator=gen2).numpy() if int(t) > 0 else np.zeros(SHAPE, np.float32)
                    for t in sched.timesteps])
  sch = _schedule()
  ours = core.ddpm_sample(_jfn(sch, pred), jnp.asarray(x), num_steps=n, schedule=sch, prediction_type=pred,
                          step_noise=noise)
  _check(ours, ref)


@pytest.mark.parametrize("variance_type,spacing,pred", [("fixed_large", "trailing", "epsilon"),
                                                        ("learned_range", "leading", "epsilon"),
                                                        ("learned_range", "linspace", "v_prediction")])
def test_ddpm_variants(variance_type, spacing, pred):
  n = 25
  x = _noise(1)
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=pred,
                                  clip_sample=False, variance_type=variance_type, timestep_spacing=spacing)
  sched.set_timesteps(n)
  learned = variance_type == "learned_range"
  gen = torch.Generator().manual_seed(7)
  ref = _run_torch(sched, x, pred, learned, step_kwargs=dict(generator=gen))
  gen2 = torch.Generator().manual_seed(7)
  noise = np.stack([torch.randn(SHAPE, generator=gen2).numpy() if int(t) > 0 else np.zeros(SHAPE, np.float32)
                    for t in sched.timesteps])
  sch = _schedule()
  ours = core.ddpm_sample(_jfn(sch, pred, learned), jnp.asarray(x), num_steps=n, schedule=sch,
                          prediction_type=pred, variance_type=variance_type, timestep_spacing=spacing,
                          step_noise=noise)
  _check(ours, ref)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("n", STEPS)
def test_ddim(pred, n):
  x = _noise(2)
  kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  sched = diffusers.DDIMScheduler(num_train_timesteps=1000, prediction_type=pred, clip_sample=False,
                                  steps_offset=1, **kw)
  sched.set_timesteps(n)
  ref = _run_torch(sched, x, pred)
  sch = _schedule(name="scaled_linear", beta_start=0.00085, beta_end=0.012)
  ours = core.ddim_sample(_jfn(sch, pred), jnp.asarray(x), num_steps=n, prediction_type=pred, steps_offset=1,
                          schedule=sch)
  _check(ours, ref)


@pytest.mark.parametrize("pred,spacing", [("epsilon", "trailing"), ("v_prediction", "leading")])
def test_ddim_eta_and_clip(pred, spacing):
  n = 25
  x = _noise(3)
  sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=pred,
                                  clip_sample=True, timestep_spacing=spacing)
  sched.set_timesteps(n)
  noise = np.random.default_rng(5).standard_normal((n,) + SHAPE).astype(np.float32)
  ref = _run_torch(sched, x, pred, step_kwargs=dict(eta=0.5),
                   per_step=lambda i: dict(variance_noise=torch.from_numpy(noise[i])))
  sch = _schedule()
  ours = core.ddim_sample(_jfn(sch, pred), jnp.asarray(x), num_steps=n, schedule=sch, prediction_type=pred, eta=0.5,
                          clip_sample=1.0, timestep_spacing=spacing, step_noise=noise)
  _check(ours, ref)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("n", STEPS)
def test_dpmpp_2m(pred, n):
  x = _noise(4)
  sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                prediction_type=pred)
  sched.set_timesteps(n)
  ref = _run_torch(sched, x, pred)
  sch = _schedule()
  ours = core.dpmpp_2m_sample(_jfn(sch, pred), jnp.asarray(x), num_steps=n, schedule=sch, prediction_type=pred)
  _check(ours, ref)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("n", STEPS)
def test_euler_karras(pred, n):
  x = _noise(5)
  kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  sched = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, prediction_type=pred, use_karras_sigmas=True,
                                           **kw)
  sched.set_timesteps(n)
  ref = _run_torch(sched, x * float(sched.init_noise_sigma), pred)
  sch = _schedule(name="scaled_linear", beta_start=0.00085, beta_end=0.012)
  ours = core.euler_sample(_jfn(sch, pred), jnp.asarray(x), num_steps=n, prediction_type=pred, use_karras_sigmas=True,
                           schedule=sch)
  _check(ours, ref)


@pytest.mark.parametrize("pred,spacing", [("epsilon", "leading"), ("v_prediction", "trailing")])
def test_euler_plain(pred, spacing):
  n = 25
  x = _noise(6)
  sched = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=pred,
                                           timestep_spacing=spacing, steps_offset=1)
  sched.set_timesteps(n)
  ref = _run_torch(sched, x * float(sched.init_noise_sigma), pred)
  sch = _schedule()
  ours = core.euler_sample(_jfn(sch, pred), jnp.asarray(x), num_steps=n, schedule=sch, prediction_type=pred,
                           use_karras_sigmas=False, timestep_spacing=spacing, steps_offset=1)
  _check(ours, ref)


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_zero_terminal_snr_trailing_v(cls):
  """Zero-SNR schedule (Lin et al. 2023) with "trailing" spacing and v-prediction: sampling starts at SNR 0."""
  n = 10
  x = _noise(8)
  kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
            timestep_spacing="trailing", prediction_type="v_prediction")
  sched = getattr(diffusers, cls)(num_train_timesteps=1000, **kw)
  sched.set_timesteps(n)
  init = float(sched.init_noise_sigma)
  sch = core.make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_snr=True)
  name = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m", "EulerDiscreteScheduler": "euler"}[cls]
  extra = dict(use_karras_sigmas=False) if name == "euler" else {}
  if name == "ddim":
    sched.config.clip_sample = False
  # diffusers' Euler/DPM use alphas_cumprod[-1] = 2^-24 for the model too; give the torch model the same table.
  ref = _run_torch(sched, x * init, "v_prediction")
  jfn = _jfn(sch, "v_prediction")
  if name != "ddim":
    ac = np.maximum(sch.alphas_cumprod, 2.0 ** -24).astype(np.float32)
    from core_testlib import analytic_jax
    jfn = lambda xx, t, c: analytic_jax(xx, t, ac, "v_prediction")
  ours = core.sample(name, jfn, jnp.asarray(x), num_steps=n, schedule=sch, prediction_type="v_prediction",
                     timestep_spacing="trailing", **extra)
  # Euler's state starts at sigma_max = 4096 here, where one float32 ulp is 4.9e-4; agreement is limited by
  # rounding/FMA differences at that scale, so this extra case gets 5e-5 (observed 1.7e-5).
  _check(ours, ref, tol=5e-5 if name == "euler" else TOL)
