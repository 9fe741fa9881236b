"""AutoencoderKL: parity with diffusers (encode moments, posterior, decode), export round trip, param count."""

import numpy as np
import pytest

import jax

from diffusion_jax.models.vae import (AutoencoderKL, DiagonalGaussian, abstract_vae_params, count_params,
                                      decode_latents, encode_to_latents, sd_vae_config)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax.pretrained.diffusers_io import load_vae, save_vae  # noqa: E402

VAE_TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                norm_num_groups=8, latent_channels=4, sample_size=16, scaling_factor=0.5)


def randomize_(module, seed=0, scale=0.05):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return module


def nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  torch.manual_seed(0)
  tm = randomize_(diffusers.AutoencoderKL(**VAE_TINY).eval())
  d = tmp_path_factory.mktemp("vae")
  tm.save_pretrained(d / "ref", safe_serialization=True)
  return tm, d


def test_vae_parity_encode_decode_and_export(ref):
  tm, d = ref
  cfg, params = load_vae(str(d / "ref"))
  assert cfg.scaling_factor == 0.5
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    dist = tm.encode(nchw(x)).latent_dist
    want_moments, want_mean, want_logvar, want_std = (to_nhwc(a) for a in (dist.parameters, dist.mean,
                                                                            dist.logvar, dist.std))
    want_dec = to_nhwc(tm.decode(nchw(z)).sample)
  model = AutoencoderKL(cfg)
  enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
  dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
  moments = enc(params, x)
  np.testing.assert_allclose(np.asarray(moments), want_moments, atol=1e-4, rtol=0)
  post = DiagonalGaussian(moments)
  np.testing.assert_allclose(np.asarray(post.mean), want_mean, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(post.logvar), want_logvar, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(post.std), want_std, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(dec(params, z)), want_dec, atol=1e-4, rtol=0)
  # scaling helpers: latents = mode * scaling_factor, decode_latents divides it back out.
  np.testing.assert_allclose(np.asarray(encode_to_latents(params, cfg, x)), want_mean * 0.5, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(decode_latents(params, cfg, z * 0.5)), want_dec, atol=1e-4, rtol=0)
  # Export round trip.
  save_vae(str(d / "export"), cfg, params)
  back = diffusers.AutoencoderKL.from_pretrained(str(d / "export")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(to_nhwc(back.decode(nchw(z)).sample), want_dec, atol=1e-5, rtol=0)
    np.testing.assert_allclose(to_nhwc(back.encode(nchw(x)).latent_dist.parameters), want_moments, atol=1e-5,
                               rtol=0)


def test_diagonal_gaussian_clip_and_sample():
  m = np.zeros((1, 2, 2, 8), np.float32)
  m[..., 4:] = 50.0  # logvar above the clip
  post = DiagonalGaussian(m)
  assert float(post.logvar.max()) == 20.0
  s = post.sample(jax.random.PRNGKey(0))
  assert s.shape == (1, 2, 2, 4) and float(abs(s).max()) > 1.0


def test_param_count_sd_vae():
  """SD VAE (KL-f8): 83.7M parameters, built abstractly."""
  assert round(count_params(abstract_vae_params(sd_vae_config())) / 1e6, 1) == 83.7
