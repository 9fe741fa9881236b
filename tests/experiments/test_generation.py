"""The generation experiment: configs' tiny variants through the trainer, Frechet distance, latent helpers."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.experiments import generation as G
from diffusion_jax.experiments.base import get_experiment
from diffusion_jax.train.trainer import train


def test_tiny_latent_config_trains_and_evaluates(tmp_path):
  """Latent mode (cached space-to-depth latents), ADM hybrid loss with learned sigma, DDPM learned-range sampler
  with 3-channel power-cosine CFG, parser + Frechet evaluation, through the real trainer."""
  cfg = importlib.import_module("configs.diffit_imagenet256").get_config("tiny")
  out = train(cfg, str(tmp_path))
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["loss"])
  assert out["eval/num_samples"] == cfg.eval.num_samples
  assert 0.0 <= out["eval/class_accuracy"] <= 1.0  # a barely trained model; the value is tested below
  assert np.isfinite(out["eval/frechet_distance"]) and out["eval/frechet_distance"] > 0


def _known_generator(exp, shift: int):
  """A stand-in for the sampler that returns real test images of class (label + shift) % K."""
  src = exp._source("test", 0)
  bank = {}
  for i in range(len(src)):
    ex = src[i]
    bank.setdefault(int(ex["label"]), np.asarray(ex["image"], np.float32) / 127.5 - 1.0)
    if len(bank) == exp.num_classes:
      break

  def generate(params, frozen, rng, labels=None, num=None, **kw):
    return jnp.asarray(np.stack([bank[(int(l) + shift) % exp.num_classes] for l in labels]))
  return generate, bank


@pytest.mark.parametrize("shift", [0, 1])
def test_evaluate_scores_a_known_generator(shift, monkeypatch, tmp_path):
  """evaluate() on a generator whose output is known: real images of the asked class give class / colour /
  shape accuracy 1 exactly; images of the next class (same shape, next colour) give class and colour
  accuracy 0 and shape accuracy 1 for all but the colour wrap-around."""
  cfg = importlib.import_module("configs.diffit_shapes").get_config("tiny")
  cfg.data.num_test = 2000
  cfg.eval.num_samples = 70
  cfg.eval.batch_size = 32   # 70 = 32 + 32 + 6: the last batch is padded
  cfg.eval.fid_feature = "none"
  exp = get_experiment(cfg)
  generate, bank = _known_generator(exp, shift)
  labels = np.arange(cfg.eval.num_samples) % exp.num_classes
  missing = sorted(set(labels) - set(bank))
  assert not missing, f"test split lacks classes {missing}"
  monkeypatch.setattr(exp, "generate", generate)
  out = exp.evaluate(None, {}, jax.random.key(0), str(tmp_path))
  assert out["num_samples"] == 70
  if shift == 0:
    assert (out["class_accuracy"], out["colour_accuracy"], out["shape_accuracy"]) == (1.0, 1.0, 1.0)
  else:
    ncol = 7
    wrap = np.mean(labels % ncol == ncol - 1)  # the next class of a last colour is the next shape
    assert out["class_accuracy"] == 0.0 and out["colour_accuracy"] == 0.0
    assert out["shape_accuracy"] == pytest.approx(1.0 - wrap)


@pytest.mark.parametrize("name", ["diffit_shapes", "diffit_cifar10", "diffit_ffhq64", "diffit_imagenet512",
                                  "dit_imagenet256", "dit_shapes"])
def test_other_tiny_configs_build_and_trace(name):
  """The other tiny variants: data -> init -> loss and the sampler, traced abstractly (no compile)."""
  cfg = importlib.import_module(f"configs.{name}").get_config("tiny")
  exp = get_experiment(cfg)
  batch = next(iter(exp.make_dataset("train", seed=0)))
  params = jax.eval_shape(lambda r, b: exp.init(r, b, exp.load_frozen()), jax.random.key(0), batch)
  loss, metrics = jax.eval_shape(exp.loss, params, {}, {}, batch, jax.random.key(1), 0)
  assert loss.shape == () and "mse" in metrics
  y = jnp.arange(2) % max(1, exp.num_classes) if exp.num_classes else None
  x = jax.eval_shape(lambda p, r: exp.sample_latents(p, r, labels=y, num=2), params, jax.random.key(2))
  assert x.shape == (2,) + exp.latent_shape()


def test_paper_configs_hyperparameters():
  c = importlib.import_module("configs.diffit_imagenet256").get_config()
  assert (c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.patch_size) == (28, 1152, 16, 2)
  assert (c.optim.lr, c.data.batch_size, dict(c.train.ema), c.train.sample_with) == (3e-4, 256, {"ema": 0.9999}, "ema")
  assert (c.sample.guidance_schedule, c.sample.guidance_channels, c.sample.num_steps) == ("power_cosine", 3, 250)
  c = importlib.import_module("configs.diffit_imagenet512").get_config()
  assert (c.model.input_size, c.optim.lr, c.data.batch_size) == (64, 1e-4, 512)
  assert (c.sample.guidance_scale, c.sample.guidance_schedule) == (1.49, "constant")
  c = importlib.import_module("configs.diffit_cifar10").get_config()
  assert (tuple(c.model.channels), c.model.window_size, c.optim.lr, c.data.batch_size) == ((128, 256, 256), 4, 1e-3, 512)
  assert c.sample.num_steps == 18
  c = importlib.import_module("configs.diffit_ffhq64").get_config()
  assert (tuple(c.model.num_blocks), c.model.window_size, c.optim.lr, c.sample.num_steps) == ((1, 2, 2, 2), 8, 2e-4, 40)
  with pytest.raises(ValueError, match="Valid variants"):
    importlib.import_module("configs.diffit_cifar10").get_config("huge")


def test_frechet_distance_closed_form():
  rng = np.random.RandomState(0)
  mu1, mu2 = rng.randn(5), rng.randn(5)
  v1, v2 = rng.rand(5) + 0.1, rng.rand(5) + 0.1
  want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()   # commuting (diagonal) case
  assert G.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
  a = rng.randn(200, 4)
  q = np.linalg.qr(rng.randn(4, 4))[0]                       # a rotation leaves the distance unchanged
  m1, s1 = G.feature_statistics(a)
  m2, s2 = G.feature_statistics(a @ q + 1.0)
  assert G.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)
  d = G.frechet_distance(m1, s1, m2, s2)
  assert d == pytest.approx(G.frechet_distance(m1 @ q, q.T @ s1 @ q, m2 @ q, q.T @ s2 @ q), rel=1e-6)


def test_space_to_depth_round_trip():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 3))
  z = G.space_to_depth(x, 2)
  assert z.shape == (2, 4, 4, 12)
  np.testing.assert_array_equal(np.asarray(z[0, 1, 2, :3]), np.asarray(x[0, 2, 4]))
  np.testing.assert_array_equal(np.asarray(G.depth_to_space(z, 2)), np.asarray(x))


def test_bad_config_names_fail_early():
  cfg = importlib.import_module("configs.diffit_shapes").get_config("tiny")
  cfg.diffusion.objective = "flow"
  with pytest.raises(ValueError, match="Valid diffusion objective"):
    get_experiment(cfg)
  cfg = importlib.import_module("configs.diffit_imagenet256").get_config()
  with pytest.raises(ValueError, match="vae_path"):
    get_experiment(cfg)


@pytest.mark.parametrize("key,value,match", [
    ("sample.sampler", "dpm", r"Unknown sampler for objective 'edm'.*edm_heun"),
    ("sample.guidance_schedule", "bogus", r"Unknown guidance schedule.*constant, power_cosine"),
])
def test_sample_names_are_checked_at_start_up(key, value, match):
  """A wrong sampler / guidance-schedule name fails when the experiment is built, not after training."""
  cfg = importlib.import_module("configs.diffit_shapes").get_config("tiny")
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(ValueError, match=match):
    get_experiment(cfg)


def test_sample_keys_the_sampler_does_not_read_are_rejected():
  cfg = importlib.import_module("configs.diffit_shapes").get_config("tiny")
  cfg.sample.timestep_spacing = "trailing"  # a DDPM option; the EDM sampler never reads it
  with pytest.raises(ValueError, match=r"\['timestep_spacing'\].*does not read"):
    get_experiment(cfg)
