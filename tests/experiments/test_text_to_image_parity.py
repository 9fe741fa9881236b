"""The text-to-image sampling path against diffusers' StableDiffusionPipeline, end to end, on tiny random
components saved to a temporary pipeline directory: same prompts and initial latents in, same images out, for
DDIM, DPM-Solver++(2M), Euler and UniPC (SD-1-style epsilon and SD-2-style v-prediction), with classifier-free
guidance; each scheduler built by diffusers' `<Class>.from_config(pipe.scheduler.config)`."""

import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
  if p not in sys.path:
    sys.path.insert(0, p)

import sd_testlib  # noqa: E402
from configs import sd15, sd21  # noqa: E402
from diffusion_jax.experiments.base import get_experiment  # noqa: E402

PROMPTS = ["a large red circle left of a small blue square", "a green triangle"]
STEPS, GUIDANCE = 4, 3.0
# Tolerance on images in [0, 1]: both sides run float32; the differences come from the order of float32 ops
# in convolutions / attention (oneDNN vs XLA), carried through 4 sampler steps with guidance 3 and the VAE
# decoder. Measured max abs diff 5.4e-7 (eps, DPM++), 6.6e-7 (eps, DDIM), 7.8e-7 (v, DPM++); 1e-5 leaves a 13x
# margin and is 390x below one 8-bit grey level (1/255), while a wrong timestep, coefficient, guidance branch or
# tokenisation moves the images by >= 1e-2 (the unguided check below).
ATOL = 1e-5


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def setup(request, tmp_path_factory):
  sd2 = request.param == "sd2"
  d = str(tmp_path_factory.mktemp(request.param))
  sd_testlib.make_tiny_pipeline(d, prediction_type="v_prediction" if sd2 else "epsilon", sd2=sd2)
  cfg = (sd21 if sd2 else sd15).get_config("tiny")
  exp = get_experiment(cfg, stages={"pipeline": d})
  frozen = exp.load_frozen()
  params = exp.load_params(None)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(d, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  lat = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
  return exp, frozen, params, pipe, lat


def _diffusers_images(pipe, lat, scheduler_cls):
  pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
  with torch.no_grad():
    out = pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=lat.clone(),
               output_type="np", height=sd_testlib.IMAGE_SIZE, width=sd_testlib.IMAGE_SIZE)
  return np.asarray(out.images, np.float32)


@pytest.mark.parametrize("sampler,cls", [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler"),
                                         ("euler", "EulerDiscreteScheduler"), ("unipc", "UniPCMultistepScheduler")])
def test_matches_stable_diffusion_pipeline(setup, sampler, cls):
  exp, frozen, params, pipe, lat = setup
  ref = _diffusers_images(pipe, lat, getattr(diffusers, cls))
  ids = exp.host.tokenize(PROMPTS)
  # The tokeniser pads like the pipeline's (49407 for SD-1, "!" = 0 for SD-2).
  want = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ids, want["input_ids"])
  x_T = jnp.asarray(lat.numpy().transpose(0, 2, 3, 1))
  ours = np.asarray(exp.sample_images(params, frozen, ids, jax.random.PRNGKey(0), x_T=x_T, sampler=sampler,
                                      steps=STEPS, guidance=GUIDANCE))
  assert ours.shape == ref.shape == (len(PROMPTS), 16, 16, 3)
  assert ref.std() > 1e-3  # the images are not constant: the comparison means something
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
  print(f"{exp.prediction_type} {sampler}: max abs diff {np.abs(ours - ref).max():.2e}")
  if sampler != "ddim":
    return
  # Guidance matters at this tolerance: the unguided images differ.
  unguided = np.asarray(exp.sample_images(params, frozen, ids, jax.random.PRNGKey(0), x_T=x_T, sampler=sampler,
                                          steps=STEPS, guidance=1.0))
  assert np.abs(unguided - ref).max() > 100 * ATOL


def test_bfloat16_sampling_stays_close(setup):
  """config.dtype=bfloat16 runs the text encoder, UNet and VAE in bf16 (params fp32): the images stay within
  bf16 rounding of diffusers' float32 ones, and really differ from our float32 ones (bf16 is in effect)."""
  exp, frozen, params, pipe, lat = setup
  if exp.prediction_type != "epsilon":
    pytest.skip("bf16 is checked on the SD-1 pipeline only")
  from configs import sd15 as sd15_cfg
  cfg = sd15_cfg.get_config("tiny")
  cfg.dtype = "bfloat16"
  exp16 = get_experiment(cfg, stages={"pipeline": exp.stages["pipeline"]})
  frozen16 = exp16.load_frozen()
  ref = _diffusers_images(pipe, lat, diffusers.DDIMScheduler)
  ids = exp16.host.tokenize(PROMPTS)
  x_T = jnp.asarray(lat.numpy().transpose(0, 2, 3, 1))
  ours = np.asarray(exp16.sample_images(params, frozen16, ids, jax.random.PRNGKey(0), x_T=x_T, sampler="ddim",
                                        steps=STEPS, guidance=GUIDANCE))
  diff = np.abs(ours - ref).max()
  print(f"bf16 ddim: max abs diff {diff:.2e}, mean {np.abs(ours - ref).mean():.2e}")
  # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per op); through 4 guided steps and the decoder
  # the measured max error is 9.5e-3 (mean 1.6e-3); 5e-2 (13 grey levels) bounds it, > 1e-3 shows bf16 is in effect.
  assert 1e-3 < diff < 5e-2
