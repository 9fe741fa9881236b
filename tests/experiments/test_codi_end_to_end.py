"""CoDi end to end through the stages on the shapes world: the tiny sd_shapes base trained as stage `pipeline`,
then CoDi (and PE-CoDi as a plain diffusion baseline) trained, evaluated, exported and sampled (`--mode sample`:
condition | output | ground truth)."""

import json
import os
import sys

import numpy as np
import pytest

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import codi_shapes  # noqa: E402
from diffusion_jax import stages  # noqa: E402
from diffusion_jax.experiments import codi as C  # noqa: E402

PARSER_KEYS = ("class_accuracy", "binding", "shape_recall", "colour_recall", "count_accuracy")


@pytest.fixture(scope="module")
def codi_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("codi_shapes"))
  cfg = codi_shapes.get_config("tiny,inpaint")
  return wd, cfg, stages.run(cfg, wd)


def test_codi_shapes_tiny_end_to_end(codi_run):
  wd, cfg, out = codi_run
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["loss"])
  assert np.isfinite(out["consistency"]) and out["guidance"] > 0
  assert out["mu"] != 0.0  # the gate moved from 0 (it has a gradient at mu = 0)
  for setting in ("consistency2_",):
    assert 0 < out[f"eval/{setting}pixel_mse"] < 1
    for k in PARSER_KEYS:
      assert 0.0 <= out[f"eval/{setting}{k}"] <= 1.0, (setting, k)
  rec = stages.read_record(os.path.join(wd, "pipeline"))
  assert rec["complete"] and rec["kind"] == "sd_pipeline"
  C.check_codi_export(out["export"])
  info = json.load(open(os.path.join(out["export"], "codi.json")))
  sched = json.load(open(os.path.join(wd, "pipeline", "export", "scheduler", "scheduler_config.json")))
  assert info["task"] == "inpaint" and info["adapter"] == "codi"
  assert info["prediction_type"] == sched["prediction_type"]  # the base's parameterisation, not always v
  assert os.path.exists(os.path.join(wd, "samples", "codi_eval.png"))
  # the cached condition is the shapes world's masked image + mask of each scene
  from diffusion_jax.data import shapes as S
  cache = [d for d in os.listdir(os.path.join(wd, "cache")) if d.startswith("codi_inpaint_t2i_test")][0]
  cond = np.load(os.path.join(wd, "cache", cache, "cond.npy"))
  objs = np.load(os.path.join(wd, "cache", cache, "objects.npy"))
  r = S.render(S.Scene.from_array(objs[1], 16), S.ShapesConfig(image_size=16))
  np.testing.assert_array_equal(cond[1, ..., :3], r["masked_image"])
  np.testing.assert_array_equal(cond[1, ..., 3], r["mask"] * 255)


def test_mode_sample_sheet(codi_run):
  """`--mode sample` from the checkpoint: condition | output | ground truth; the ground truth is the test image."""
  from diffusion_jax.train import trainer
  wd, cfg, out = codi_run
  res = trainer.sample(cfg, wd, num=4, stages={"pipeline": os.path.join(wd, "pipeline", "export")})
  assert res["outputs"]["output"] == [4, 16, 16, 3] and res["outputs"]["ground_truth"] == [4, 16, 16, 3]
  arr = np.load(os.path.splitext(res["path"])[0] + ".npz")
  cache = [d for d in os.listdir(os.path.join(wd, "cache")) if d.startswith("codi_inpaint_t2i_test")][0]
  np.testing.assert_array_equal(arr["ground_truth"], np.load(os.path.join(wd, "cache", cache, "image.npy"))[:4])
  assert os.path.exists(res["path"]) and np.isfinite(arr["output"]).all()


def test_pe_codi_diffusion_baseline_tiny(codi_run, tmp_path):
  """PE-CoDi as the plain conditional diffusion baseline on the same base (given as a path): only the ControlNet
  trains (the base stays frozen; it exports as a diffusers ControlNet), evaluated with DDIM."""
  base_wd = codi_run[0]
  cfg = codi_shapes.get_config("tiny,depth,pe,diffusion")
  cfg.stages.pipeline.path = os.path.join(base_wd, "pipeline", "export")
  wd = str(tmp_path / "pe")
  out = stages.run(cfg, wd)
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["loss"]) and "consistency" not in out
  assert 0 < out["eval/ddim2_pixel_mse"] < 1
  assert os.path.exists(os.path.join(out["export"], "controlnet", "config.json"))
  info = json.load(open(os.path.join(wd, "run_info.json")))
  assert set(info["param_groups"]) == {"controlnet"} and info["num_frozen"] > info["num_params"]
