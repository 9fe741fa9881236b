"""Trained generation runs (DiffiT image / latent, DiT) export to a safetensors directory that
`pretrained.diffit.load_trained` reads back (and, for the latent DiffiT, `load_diffit` reads the released
layout written next to it)."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.experiments.base import EXPORT_KINDS, get_experiment
from diffusion_jax.pretrained import diffit as pretrained_diffit
from diffusion_jax.pretrained import io


def _experiment_and_params(name):
  cfg = importlib.import_module(f"configs.{name}").get_config("tiny")
  exp = get_experiment(cfg)
  batch = _numeric(next(iter(exp.make_dataset("train", seed=0))))
  # Random values of the params' shapes (no init compile); non-zero everywhere, so that a swapped or dropped
  # tensor changes the output.
  abstract = jax.eval_shape(lambda r, b: exp.init(r, b, {}), jax.random.key(0), batch)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
  return cfg, exp, params


def _numeric(batch):
  return {k: np.asarray(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}


def _forward(model, params, exp):
  x = jax.random.normal(jax.random.key(3), (2,) + exp.latent_shape())
  t = jnp.array([0.1, -0.7])
  y = jnp.array([1, 4]) if exp.num_classes else None
  return np.asarray(jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(params, x, t, y))


@pytest.mark.parametrize("name", ["diffit_shapes", "diffit_imagenet256", "dit_shapes"])
def test_export_round_trip(name, tmp_path):
  cfg, exp, params = _experiment_and_params(name)
  out = str(tmp_path / "export")
  os.makedirs(out)
  exp.export(params, {}, out)
  EXPORT_KINDS.get(exp.export_kind)(out)  # the stage checker accepts it
  model, loaded, meta = pretrained_diffit.load_trained(str(tmp_path))  # the run dir works as well as export/
  assert meta["model"]["name"] == cfg.model.name and meta["objective"] == exp.objective
  assert meta["latent_shape"] == list(exp.latent_shape()) and meta["num_classes"] == exp.num_classes
  want, got = io.flatten(jax.device_get(params)), io.flatten(loaded)
  assert set(want) == set(got)
  for k in want:
    np.testing.assert_array_equal(np.asarray(want[k]), got[k], err_msg=k)
  np.testing.assert_allclose(_forward(model, loaded, exp), _forward(exp.model, params, exp), rtol=1e-5, atol=1e-6)
  released = os.path.join(out, pretrained_diffit.EXPORT_RELEASED)
  if cfg.model.name == "diffit_latent":
    m2, p2 = pretrained_diffit.load_diffit(released)
    np.testing.assert_allclose(_forward(m2, p2, exp), _forward(exp.model, params, exp), rtol=1e-5, atol=1e-6)
  else:
    assert not os.path.exists(released)


def test_load_trained_checks_names_and_kind(tmp_path):
  cfg, exp, params = _experiment_and_params("diffit_shapes")
  out = str(tmp_path)
  exp.export(params, {}, out)
  flat = io.load_state_dict(os.path.join(out, "model.safetensors"))
  dropped = sorted(flat)[0]
  del flat[dropped]
  io.save_state_dict(flat, os.path.join(out, "model.safetensors"))
  with pytest.raises(io.CheckpointError, match="missing 1 name"):
    pretrained_diffit.load_trained(out)
  meta = json.load(open(os.path.join(out, "config.json")))
  meta["_class_name"] = "PriorTransformer"
  json.dump(meta, open(os.path.join(out, "config.json"), "w"))
  with pytest.raises(io.CheckpointError, match="not an exported generation run"):
    pretrained_diffit.load_trained(out)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    pretrained_diffit.load_trained(str(tmp_path / "nothing"))


def test_trained_run_writes_its_export(tmp_path):
  """Through the trainer: DIR/export holds the trained (not the initial) params."""
  from diffusion_jax.train.trainer import train
  cfg = importlib.import_module("configs.diffit_shapes").get_config("tiny")
  cfg.train.num_steps = 2
  cfg.eval.num_samples = 8
  res = train(cfg, str(tmp_path / "a"))
  assert res["export"] == str(tmp_path / "a" / "export")
  model, params, _ = pretrained_diffit.load_trained(res["export"])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  # DiffiTImage's output conv starts at zero (as EDM's): non-zero after two updates means trained params.
  assert np.abs(params["head_conv"]["kernel"]).max() > 0
  cfg.eval.export = False  # config.eval.export=False: nothing is written
  get_experiment(cfg).export(params, {}, str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("name", ["diffit_imagenet256", "dit_shapes"])
def test_scanned_run_exports_per_block_and_loads_either_way(name, tmp_path):
  """A `model.scan_blocks=True` run exports the per-block layout (`blocks_<i>`, and the released layout for the
  latent DiffiT); load_trained rebuilds the scanned network from it, or the per-block one with
  scan_blocks=False, and both compute what the trained network does."""
  cfg = importlib.import_module(f"configs.{name}").get_config("tiny")
  cfg.model.scan_blocks = True
  exp = get_experiment(cfg)
  batch = _numeric(next(iter(exp.make_dataset("train", seed=0))))
  abstract = jax.eval_shape(lambda r, b: exp.init(r, b, {}), jax.random.key(0), batch)
  assert "blocks" in abstract and "blocks_0" not in abstract
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
  out = str(tmp_path / "export")
  os.makedirs(out)
  exp.export(params, {}, out)
  names = set(io.load_state_dict(os.path.join(out, pretrained_diffit.EXPORT_WEIGHTS)))
  assert any(k.startswith("blocks_0/") for k in names) and not any(k.startswith("blocks/") for k in names)
  want = _forward(exp.model, params, exp)
  model, loaded, meta = pretrained_diffit.load_trained(out)
  assert meta["model"]["scan_blocks"] and "blocks" in loaded
  np.testing.assert_allclose(_forward(model, loaded, exp), want, rtol=1e-5, atol=1e-6)
  model, loaded, _ = pretrained_diffit.load_trained(out, scan_blocks=False)
  assert "blocks_0" in loaded
  np.testing.assert_allclose(_forward(model, loaded, exp), want, rtol=1e-5, atol=1e-6)
  if cfg.model.name == "diffit_latent":
    m2, p2 = pretrained_diffit.load_diffit(os.path.join(out, pretrained_diffit.EXPORT_RELEASED))
    np.testing.assert_allclose(_forward(m2, p2, exp), want, rtol=1e-5, atol=1e-6)

