"""Sampling, evaluation and latent caching compile once per shape: repeated calls compile nothing, and short
last batches are padded instead of compiling a new shape (counted with jax.monitoring's compile event)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.experiments.base import get_experiment

diffusers = pytest.importorskip("diffusers")

VAE_KW = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=16, latent_channels=4)


@pytest.fixture(scope="module")
def sd_vae_config(tmp_path_factory):
  """The tiny latent DiffiT config with a real (tiny, random) diffusers AutoencoderKL as its frozen VAE."""
  d = tmp_path_factory.mktemp("vae")
  diffusers.AutoencoderKL(**VAE_KW).save_pretrained(d, safe_serialization=True)
  cfg = importlib.import_module("configs.diffit_imagenet256").get_config("tiny")
  cfg.latent.vae, cfg.latent.vae_path, cfg.latent.cache = "sd", str(d), True
  cfg.latent.encode_batch_size = 16
  cfg.data.image_size = 16
  cfg.model.input_size = 8
  cfg.model.in_channels = 4
  cfg.data.num_train = 40  # 16 + 16 + 8: a short last batch
  cfg.eval.fid_feature = "none"
  return cfg


def test_vae_decoder_and_latent_cache_compile_once(sd_vae_config, compiles):
  exp = get_experiment(sd_vae_config)
  frozen = jax.tree.map(jnp.asarray, exp.load_frozen())
  z = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 4), jnp.float32)
  outs = []
  with compiles() as c:
    outs.append(exp.decode(frozen, z))
  first = c.count
  assert first >= 1
  with compiles() as c:
    for _ in range(3):
      outs.append(exp.decode(frozen, z))
  assert c.count == 0, "decode compiled again for the same shape"
  np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[-1]))
  # Latent cache: 40 examples in batches of 16 -> one compiled encoder (the last batch is padded).
  ds = exp.make_dataset("train", seed=0)
  encode = exp._load_vae()[2]
  assert encode._cache_size() == 1
  batch = next(iter(ds))
  assert batch["moments"].shape[1:] == (8, 8, 8)


def test_generation_evaluate_compiles_nothing_the_second_time(compiles, tmp_path):
  cfg = importlib.import_module("configs.diffit_shapes").get_config("tiny")
  cfg.eval.num_samples, cfg.eval.batch_size, cfg.eval.fid_feature = 20, 8, "none"   # 8 + 8 + 4
  cfg.sample.num_steps = 2
  exp = get_experiment(cfg)
  batch = next(iter(exp.make_dataset("train", seed=0)))
  params = jax.jit(exp.init)(jax.random.key(0), batch, {})
  with compiles() as c:
    a = exp.evaluate(params, {}, jax.random.key(1), str(tmp_path))
  assert c.count >= 1
  with compiles() as c:
    b = exp.evaluate(params, {}, jax.random.key(1), str(tmp_path))
  assert c.count == 0
  assert a == b
  # Fewer samples than a batch: padded to the compiled batch shape, nothing new to compile.
  cfg.eval.num_samples = 5
  with compiles() as c:
    exp.evaluate(params, {}, jax.random.key(1), str(tmp_path))
  assert c.count == 0


def test_clip_pretrain_evaluate_compiles_nothing_the_second_time(compiles, tmp_path):
  cfg = importlib.import_module("configs.clip_shapes").get_config("tiny")
  cfg.eval.num_examples = 20
  exp = get_experiment(cfg)
  batch = next(iter(exp.make_dataset("train", seed=0)))
  params = jax.jit(exp.init)(jax.random.key(0), batch, {})
  exp.evaluate(params, {}, jax.random.key(1), str(tmp_path))
  with compiles() as c:
    exp.evaluate(params, {}, jax.random.key(1), str(tmp_path))
  assert c.count == 0
