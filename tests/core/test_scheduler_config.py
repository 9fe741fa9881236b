"""Samplers built from diffusers scheduler configs (`core.from_diffusers_config`): defaults tracked against
diffusers, parity through a saved `scheduler_config.json`, class conversion (Prompt Diffusion's UniPC from the
Stable Diffusion config), and one clear error for every unsupported key."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from parity_grid_lib import SHAPE, denoiser, run_diffusers  # noqa: E402

from diffusion_jax import core  # noqa: E402
from diffusion_jax.core import scheduler_config as SC  # noqa: E402

TOL = 1e-5  # well-conditioned schedules (linear / scaled_linear): float32 round-off only

# The Stable Diffusion v1.x scheduler config (PNDM), which Prompt Diffusion swaps for UniPC.
SD_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}


@pytest.mark.parametrize("cls", SC.SUPPORTED_CLASSES)
def test_defaults_track_diffusers(cls):
  """Our table of each class's keys and defaults is diffusers' own (a new or renamed diffusers key fails here)."""
  ref = {k: v for k, v in dict(getattr(diffusers, cls)().config).items() if not k.startswith("_")}
  ours = SC._CLASSES[cls]["defaults"]
  assert set(ours) == set(ref), (set(ours) ^ set(ref))
  for k, v in ref.items():
    assert ours[k] == v, k


# (class, non-default config, step count, noise) — one configuration per class, saved with diffusers' save_config.
CONFIGS = [
    ("DDPMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           variance_type="fixed_large", timestep_spacing="trailing", clip_sample=True,
                           clip_sample_range=1.5), 9, "scheduling_ddpm"),
    ("DDIMScheduler", dict(prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                           clip_sample=False), 9, None),
    ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         solver_order=3, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++",
                                         final_sigmas_type="zero", lower_order_final=False), 15, "variance_noise"),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", use_karras_sigmas=True,
                                    timestep_spacing="trailing"), 9, None),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1), 9,
     "scheduling_euler_ancestral_discrete"),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True, clip_sample=True, clip_sample_range=2.0), 9, None),
    ("UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min",
                                     disable_corrector=[1]), 9, None),
    ("LCMScheduler", dict(original_inference_steps=40, timestep_scaling=8.0), 4, "scheduling_lcm"),
]


def _parity(sched, spec, n, noise_mode, seed=0):
  sched.set_timesteps(n)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  noise = None
  kw = {}
  if noise_mode is not None:
    noise = rng.standard_normal((len(sched.timesteps),) + SHAPE).astype(np.float32)
    kw["step_noise"] = noise
  pred = sched.config.prediction_type
  ref = run_diffusers(sched, x, pred, noise, noise_mode)
  ours = np.asarray(spec.sample(denoiser(sched.alphas_cumprod.numpy(), pred), jnp.asarray(x), num_steps=n, **kw))
  err = float(np.max(np.abs(ours - ref)))
  print(f"{spec.class_name}: max abs diff {err:.2e}")
  assert np.all(np.isfinite(ref)) and np.abs(ref).max() > 0.1
  assert err <= TOL


@pytest.mark.parametrize("cls,cfg,n,noise_mode", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_config_file_parity(tmp_path, cls, cfg, n, noise_mode):
  sched = getattr(diffusers, cls)(**cfg)
  sched.save_config(tmp_path)  # writes scheduler_config.json, as in a model repository
  spec = core.from_diffusers_config(tmp_path)
  assert spec.class_name == cls and spec.ignored == ()
  assert spec.sampler == SC._CLASSES[cls]["sampler"]
  _parity(sched, spec, n, noise_mode)


def test_prompt_diffusion_unipc_from_stable_diffusion_config(tmp_path):
  """UniPCMultistepScheduler.from_config(sd_pndm_config): PNDM-only keys are dropped on both sides."""
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_CONFIG))
  with pytest.raises(ValueError, match="class_name='UniPCMultistepScheduler'"):
    core.from_diffusers_config(tmp_path)  # PNDM itself is not implemented: the message says what to do
  spec = core.from_diffusers_config(tmp_path, class_name="UniPCMultistepScheduler")
  assert set(spec.ignored) == {"skip_prk_steps", "set_alpha_to_one", "clip_sample"}
  assert spec.options["steps_offset"] == 1 and spec.schedule.name == "scaled_linear"
  sched = diffusers.UniPCMultistepScheduler.from_config(diffusers.PNDMScheduler.from_config(SD_CONFIG).config)
  _parity(sched, spec, 20, None)


def test_trained_betas_and_overrides():
  betas = np.linspace(2e-4, 0.03, 1000).tolist()
  cfg = dict(_class_name="DDIMScheduler", trained_betas=betas, clip_sample=False)
  spec = core.from_diffusers_config(cfg)
  np.testing.assert_allclose(spec.schedule.betas, np.float32(betas), rtol=0, atol=0)
  sched = diffusers.DDIMScheduler(trained_betas=betas, clip_sample=False)
  _parity(sched, spec, 7, None)
  # Call-time keyword arguments override config options (here the spacing): a different result.
  x = jnp.ones(SHAPE)
  fn = denoiser(spec.schedule.alphas_cumprod, "epsilon")
  a = spec.sample(fn, x, num_steps=7)
  b = spec(fn, x, num_steps=7, timestep_spacing="trailing")
  assert not np.allclose(a, b)


def test_unsupported_keys_are_named_in_one_error():
  cfg = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.30.0", "use_lu_lambdas": True,
         "thresholding": True, "dynamic_thresholding_ratio": 0.9, "algorithm_type": "dpmsolver", "solver_order": 4,
         "variance_type": "learned_range", "prediction_type": "flow_prediction", "karras": True,
         "beta_schedule": "exp"}
  with pytest.raises(ValueError) as e:
    core.from_diffusers_config(cfg)
  msg = str(e.value)
  assert "8 key(s) not supported" in msg
  for part in ("use_lu_lambdas=True", "thresholding=True", "algorithm_type='dpmsolver'", "'dpmsolver++'",
               "'sde-dpmsolver++'", "solver_order=4", "variance_type='learned_range'",
               "prediction_type='flow_prediction'", "'v_prediction'", "karras=True: not an option",
               "beta_schedule='exp'", "'squaredcos_cap_v2'", "ignore_keys"):
    assert part in msg, part
  assert "dynamic_thresholding_ratio" not in msg.split("its options")[0]  # inert without thresholding: accepted
  # ignore_keys drops them deliberately.
  spec = core.from_diffusers_config({"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous",
                                     "use_karras_sigmas": True}, ignore_keys=["timestep_type"])
  assert spec.ignored == ("timestep_type",) and spec.options["use_karras_sigmas"] is True


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="Supported classes: DDIMScheduler"):
    core.from_diffusers_config({"_class_name": "KDPM2DiscreteScheduler"})
  with pytest.raises(ValueError, match="no '_class_name'"):
    core.from_diffusers_config({"beta_start": 0.001})
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    core.from_diffusers_config(tmp_path)
  (tmp_path / "scheduler_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    core.from_diffusers_config(tmp_path)
  with pytest.raises(ValueError, match="(?s)Heun.*rescale_betas_zero_snr=True: not an option"):
    core.from_diffusers_config({"_class_name": "HeunDiscreteScheduler", "rescale_betas_zero_snr": True})
  # diffusers' own remaps when converting configs between classes (DPM solver types -> UniPC's bh2).
  spec = core.from_diffusers_config({"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun",
                                     "algorithm_type": "dpmsolver++", "euler_at_final": True},
                                    class_name="UniPCMultistepScheduler")
  assert spec.options["solver_type"] == "bh2" and set(spec.ignored) == {"algorithm_type", "euler_at_final"}
