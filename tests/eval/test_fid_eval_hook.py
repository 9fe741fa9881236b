"""--mode eval of the generation experiment with Inception weights: uint8 .npz dump (ADM layout), FID against
cached reference statistics, and the start-up errors (missing weights, too few samples, bad resize name)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.eval import fid, inception
from diffusion_jax.experiments.base import get_experiment
from diffusion_jax.pretrained import io


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """Random weights (He-scaled convs, random BN statistics) written as a torch-layout safetensors file."""
  rng = np.random.default_rng(0)
  flat = {}
  for k, v in io.flatten(inception.abstract_params()).items():
    if k.endswith("kernel"):
      flat[k] = rng.normal(size=v.shape) * np.sqrt(2.0 / np.prod(v.shape[:-1]))
    elif k.endswith(("bn_scale", "bn_var")):
      flat[k] = 0.5 + rng.random(v.shape)
    else:
      flat[k] = 0.1 * rng.normal(size=v.shape)
  params = io.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
  sd = inception.flax_to_torch(params)
  assert "Mixed_7c.branch_pool.conv.weight" in sd and sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  back = inception.torch_to_flax(sd)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  path = str(tmp_path_factory.mktemp("w") / "inception.safetensors")
  io.save_state_dict(sd, path)
  return path


def _cfg(weights, n=4):
  cfg = importlib.import_module("configs.diffit_shapes").get_config("tiny")
  cfg.data.num_test = 200
  cfg.eval.num_samples = n
  cfg.eval.batch_size = 2   # the sampler's batches (two of them)
  cfg.eval.fid_batch_size = 4
  cfg.eval.fid_feature = "none"
  cfg.eval.inception_path = weights
  cfg.eval.allow_few_samples = True
  cfg.eval.fid_shard = False  # sharded extraction: tests/eval/test_fid.py (a 4-device compile costs ~1 min here)
  return cfg


def test_eval_writes_npz_and_fid_against_cached_reference(weights, monkeypatch, tmp_path, capsys):
  """Samples := test images 100..103, reference := test images 0..3. Checks the .npz, that FID equals
  features -> np.cov -> Frechet computed directly, and that the reference statistics are cached."""
  exp = get_experiment(_cfg(weights))
  src = exp._source("test", 0)
  other = np.stack([np.asarray(src[100 + i]["image"]) for i in range(4)])
  ref = np.stack([np.asarray(src[i]["image"]) for i in range(4)])
  assert other.dtype == np.uint8 and other.shape[1:] == (exp.image_size, exp.image_size, 3)
  batches = iter([other[:2], other[2:]])
  monkeypatch.setattr(exp, "generate", lambda p, f, r, labels=None, num=None, **k:
                      jnp.asarray(next(batches) / 127.5 - 1.0, jnp.float32))
  calls = []
  orig = exp._reference_batches
  monkeypatch.setattr(exp, "_reference_batches", lambda n, bs: (calls.append(n), orig(n, bs))[1])
  out = exp.evaluate(None, {}, jax.random.key(0), str(tmp_path))

  with np.load(out["samples_npz"]) as z:
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == other.shape
    np.testing.assert_array_equal(z["arr_0"], other)  # uint8 -> [-1, 1] -> uint8 is exact
    np.testing.assert_array_equal(z["arr_1"], np.arange(4) % exp.num_classes)
  assert out["fid_resize"] == "pytorch_fid" and out["fid_num_samples"] == 4 and out["fid_num_reference"] == 4
  ext = exp._fid.extractor
  a, b = ext(other).astype(np.float64), ext(ref).astype(np.float64)
  want = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
  assert want > 0
  assert out["fid"] == pytest.approx(want, rel=1e-6)

  # the standalone script on the dumped .npz and a reference .npz gives the same number
  import importlib.util, json, os  # noqa: E401
  spec = importlib.util.spec_from_file_location(
      "_fid_npz", os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "fid_npz.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  np.savez(tmp_path / "ref.npz", arr_0=ref)
  script.main([out["samples_npz"], str(tmp_path / "ref.npz"), "--inception", weights, "--batch", "4",
               "--allow_few_samples", "--no_shard"])
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert res["fid"] == pytest.approx(want, rel=1e-6) and res["resize"] == "pytorch_fid"

  assert calls == [4]
  cache = [p for p in (tmp_path / "eval").iterdir() if p.name.startswith("reference_stats")]
  assert len(cache) == 1
  meta = {"data": exp.data_name, "split": "test"}
  mu, sigma, n, _ = exp._fid.reference(lambda: iter([ref]), meta, str(cache[0]))  # other meta: recomputed
  mu2, _, _, _ = exp._fid.reference(lambda: pytest.fail("cache not used"), meta, str(cache[0]))
  np.testing.assert_allclose(mu, b.mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mu, mu2)


def test_startup_errors(weights, tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    get_experiment(_cfg(str(tmp_path / "missing.safetensors")))
  cfg = _cfg(weights)
  cfg.eval.allow_few_samples = False
  with pytest.raises(ValueError, match="50,000"):
    get_experiment(cfg)
  cfg = _cfg(weights)
  cfg.eval.fid_resize = "bilinear"
  with pytest.raises(ValueError, match="clean_fid"):
    get_experiment(cfg)


def test_no_weights_says_so(monkeypatch, tmp_path):
  """A non-shapes config without Inception weights reports plainly that FID was not measured."""
  cfg = importlib.import_module("configs.diffit_shapes").get_config("tiny")
  exp = get_experiment(cfg)
  monkeypatch.setattr(exp, "data_name", "folder")
  out = exp._dump_and_fid(np.zeros((2, 8, 8, 3), np.uint8), None, str(tmp_path), 2)
  assert out["fid_status"].startswith("not measured: no Inception weights")
  with np.load(out["samples_npz"]) as z:
    assert list(z.keys()) == ["arr_0"] and z["arr_0"].shape == (2, 8, 8, 3)
