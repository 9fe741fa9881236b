"""Shapes FD as a metric, on a briefly trained ShapesNet: two independent real sets are closer than any tested
degradation, and the distance grows monotonically with noise, blur and colour shift; save/load; errors."""

import importlib

import numpy as np
import pytest

from diffusion_jax.data import shapes as S
from diffusion_jax.eval import shapes_fd as F


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
  cfg = S.ShapesConfig(image_size=16)
  params, info = F.train(cfg, steps=300, batch_size=64, num_examples=2048, width=8, log=None)
  assert info["test_accuracy_num_objects"] > 0.6  # it learned something
  path = str(tmp_path_factory.mktemp("sfd") / "net16.safetensors")
  F.save(params, info, path)
  return F.ShapesFD(path), cfg, path


def _real(cfg, n, offset):
  src = S.ShapesSource(offset + n, seed=0, cfg=cfg, split="test")
  return np.stack([src[i]["image"] for i in range(offset, offset + n)]).astype(np.float32) / 127.5 - 1.0


def test_shapes_fd_validates_as_a_metric(metric):
  m, cfg, _ = metric
  a, b = _real(cfg, 500, 0), _real(cfg, 500, 500)
  assert m.features(a).shape == (500, 14 * 8)
  base = m.distance(a, b)
  curves = {"noise": (0.1, 0.2, 0.4), "blur": (0.75, 1.5, 2.5), "colour": (0.2, 0.35, 0.5)}
  for name, levels in curves.items():
    d = [m.distance(a, F.DEGRADATIONS[name](b, lv)) for lv in levels]
    print(f"\nSHAPES_FD base={base:.4g} {name}={[round(v, 4) for v in d]}")
    assert base < d[0], (name, base, d)
    assert all(x < y for x, y in zip(d, d[1:])), (name, d)
  assert abs(m.distance(a, a)) < 1e-6 * (1 + base)


def test_shapes_fd_errors_and_experiment_hook(metric, tmp_path):
  m, cfg, path = metric
  with pytest.raises(ValueError, match="trained at 16px"):
    m.features(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    m.features(np.full((2, 16, 16, 3), 255.0, np.float32))
  from diffusion_jax.experiments.base import get_experiment
  c = importlib.import_module("configs.diffit_shapes").get_config("tiny")
  c.eval.fid_feature = "shapes_fd"
  c.eval.shapes_fd_path = str(tmp_path / "missing.safetensors")
  with pytest.raises(FileNotFoundError, match="scripts/shapes_fd.py train"):
    get_experiment(c)
  c.eval.shapes_fd_path = path
  exp = get_experiment(c)
  assert exp._shapes_fd.info["image_size"] == 16 == exp.image_size
