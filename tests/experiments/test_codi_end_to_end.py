"""CoDi end to end through the stages on the shapes world: the tiny sd_shapes base (trained once per session,
tests/conftest.py) reused as stage `pipeline`,
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


def _shapes_net(path, image_size=16):
  """An untrained (random-init) 16px ShapesNet file: enough to test the wiring of the shapes FD (not its
  quality, which tests/eval/test_shapes_fd.py checks on a trained net)."""
  from diffusion_jax.data import shapes as S
  from diffusion_jax.eval import shapes_fd as F
  n = len(S.SHAPES) * len(S.COLOUR_NAMES)
  params = F.ShapesNet(n, 8).init(jax.random.key(0), np.zeros((1, image_size, image_size, 3), np.float32))
  F.save(params["params"], {"num_classes": n, "width": 8, "image_size": image_size}, path)
  return path


@pytest.fixture(scope="module")
def codi_run(tmp_path_factory, sd_shapes_tiny_stage):
  """The tiny base is the session's (tests/conftest.py), copied into the work dir, where the stage runner reuses
  it (its record asserted below); CoDi trains on it."""
  wd = str(tmp_path_factory.mktemp("codi_shapes"))
  sd_shapes_tiny_stage.copy_to(wd)
  cfg = codi_shapes.get_config("tiny,inpaint")
  cfg.eval.shapes_fd_path = _shapes_net(os.path.join(wd, "net16.safetensors"))
  return wd, cfg, stages.run(cfg, wd)


def test_codi_shapes_tiny_end_to_end(codi_run):
  wd, cfg, out = codi_run
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["loss"])
  assert np.isfinite(out["consistency"]) and out["guidance"] > 0
  assert out["mu"] != 0.0  # the gate moved from 0 (it has a gradient at mu = 0)
  for setting in ("consistency2_",):
    assert 0 < out[f"eval/{setting}pixel_mse"] < 1
    assert np.isfinite(out[f"eval/{setting}shapes_fd"]) and out[f"eval/{setting}shapes_fd"] > 0
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


def test_shapes_fd_compares_outputs_with_the_ground_truth(codi_run):
  """evaluate's shapes FD is the distance of the outputs to the test split's ground truth: ~0 when the outputs
  are the ground truth, larger for noise outputs (the sampler is replaced by both); its floor (real train-split
  images vs the ground truth) is reported; without the key, the result says it is not computed."""
  from diffusion_jax.experiments.base import get_experiment
  wd, cfg, _ = codi_run
  cfg = cfg.copy_and_resolve_references()
  cfg.data.cache_dir = os.path.join(wd, "cache")
  cfg.eval.settings = ["consistency:1", "consistency:2"]
  exp = get_experiment(cfg, stages={"pipeline": os.path.join(wd, "pipeline", "export")})
  gt = np.load(os.path.join(exp.cache("test"), "image.npy"))[:cfg.eval.num_examples].astype(np.float32) / 255.0
  noise = np.random.default_rng(0).uniform(size=gt.shape).astype(np.float32)

  def fake_sampler(params, frozen, ids, cond, rng, *, steps, **kw):  # 1 step: the ground truth; 2: noise
    assert len(ids) == len(gt) == cfg.eval.batch_size  # one batch
    return gt if steps == 1 else noise

  exp.sample_images = fake_sampler
  res = exp.evaluate(None, None, jax.random.PRNGKey(0), "")
  assert res["consistency1_pixel_mse"] < 1e-5
  assert abs(res["consistency1_shapes_fd"]) < 1e-4 * (1 + res["consistency2_shapes_fd"])
  print(f"\nSHAPES_FD gt={res['consistency1_shapes_fd']:.3g} noise={res['consistency2_shapes_fd']:.3g} "
        f"real={res['real_shapes_fd']:.3g}")
  # noise outputs are further from the ground truth than independent real images are (6.4 vs 0.30 measured)
  assert res["consistency2_shapes_fd"] > res["real_shapes_fd"] > 0
  assert res["shapes_fd_num"] == cfg.eval.num_examples and "shapes_fd_status" not in res
  exp._shapes_fd = None  # what config.eval.shapes_fd_path = "" gives (the missing-file error: test_codi.py)
  res = exp.evaluate(None, None, jax.random.PRNGKey(0), "")
  assert "not computed" in res["shapes_fd_status"] and not any(k.endswith("shapes_fd") for k in res)


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
