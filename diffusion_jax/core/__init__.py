"""Pure diffusion mathematics (no Flax modules): schedules, parameterisations, losses, samplers, guidance.

Submodules:

* `schedules`: `make_schedule(name, num_train_timesteps, beta_start, beta_end, rescale_zero_snr)` ->
  `Schedule`; `karras_sigmas`; continuous VP / cosine helpers; alpha/sigma/log-SNR conversions;
  `spacing_timesteps` (diffusers "leading"/"trailing"/"linspace").
* `parameterization`: eps / v / x0 conversions (`predict_x0_eps`, `prediction_from_x0_eps`), EDM
  preconditioning (`edm_scalings`, `edm_denoise`), CoDi boundary condition (`consistency_scalings`).
* `losses`: `diffusion_loss`, `edm_loss`, `hybrid_loss`, `min_snr_weight` (all return `(loss [B], terms)`).
* `samplers`: `ddpm_sample`, `ddim_sample`, `dpmpp_sample` (DPM-Solver++ orders 1-3, SDE variant),
  `dpmpp_2m_sample`, `euler_sample`, `euler_ancestral_sample`, `heun_sample`, `unipc_sample`, `lcm_sample`,
  `edm_sample`, `consistency_sample`, `sample(name, ...)`; every loop runs inside one `jax.jit`.
* `scheduler_config`: `from_diffusers_config(scheduler_config.json)` -> a sampler with its schedule and options.
* `guidance`: `guided_call`, `cfg_combine`, `power_cosine_scale`.
* `mt_diffusion`: MT-Diffusion's multi-modal forward process (weights `constant_weights` / `linear_weights`,
  `aggregate`, `q_step`, `q_marginal`, `q_posterior`), reverse step, ELBO terms and `mt_sample`.
"""

from diffusion_jax.core import (guidance, losses, mt_diffusion, parameterization, samplers,  # noqa: F401
                                scheduler_config, schedules)
from diffusion_jax.core.guidance import cfg_combine, guided_call, power_cosine_scale  # noqa: F401
from diffusion_jax.core.losses import diffusion_loss, edm_loss, hybrid_loss, min_snr_weight  # noqa: F401
from diffusion_jax.core.parameterization import (PREDICTION_TYPES, consistency_scalings, edm_denoise,  # noqa: F401
                                                 edm_scalings, predict_x0_eps, prediction_from_x0_eps)
from diffusion_jax.core.samplers import (SAMPLERS, consistency_sample, ddim_sample, ddpm_sample,  # noqa: F401
                                         dpmpp_2m_sample, dpmpp_sample, edm_sample, euler_ancestral_sample,
                                         euler_sample, heun_sample, lcm_sample, sample, unipc_sample)
from diffusion_jax.core.scheduler_config import DiffusersScheduler, from_diffusers_config  # noqa: F401
from diffusion_jax.core.schedules import (SCHEDULES, Schedule, karras_sigmas, make_schedule,  # noqa: F401
                                          schedule_from_betas, spacing_timesteps)
