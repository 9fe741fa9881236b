"""The schedule tail that the sigma-space samplers read, and zero or negative steps refused before sampling."""

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
  ts = S.spacing_timesteps(1000, 25, "linspace", variant="dpm")
  tab = sch.solver_sigmas()
  assert ts[0] == 999 and ts[1] == 959 and tab[999] > tab[959] > 4096  # 4096: the floored value
  out = core.dpmpp_2m_sample(_const_x0(0.5), X, num_steps=25, schedule=sch, prediction_type="sample")
  assert bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------------------- zero / negative steps

def _flat_schedule():
  """A custom schedule whose alphas_cumprod is constant over t = 500..599 (zero betas): equal sigmas there."""
  betas = np.linspace(1e-4, 0.02, 1000)
  betas[500:600] = 0.0
  return core.schedule_from_betas(betas, name="flat")


@pytest.mark.parametrize("sampler,kw,match", [
    ("dpmpp_2m", dict(num_steps=1000, timestep_spacing="leading"), "timestep 0 is followed by 0"),
    ("dpmpp_2m", dict(num_steps=1000, timestep_spacing="linspace"), "zero or negative step"),
    ("ddim", dict(num_steps=1000, steps_offset=1), r"outside \[0, 999\]"),
    ("euler", dict(num_steps=1000, steps_offset=1, timestep_spacing="leading"), r"outside \[0, 999\]"),
    ("dpmpp_2m", dict(schedule=_flat_schedule(), num_steps=50), "zero or negative step"),
    ("euler", dict(schedule=_flat_schedule(), num_steps=50, use_karras_sigmas=False), "zero or negative step"),
])
def test_zero_or_negative_steps_are_refused_before_sampling(sampler, kw, match):
  kw = dict(dict(num_steps=7, schedule=SCHED, rng=jax.random.key(0)), **kw)
  with pytest.raises(ValueError, match=match):
    core.sample(sampler, _never_called, X, **kw)
