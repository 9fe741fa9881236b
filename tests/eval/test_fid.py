"""FID pieces against their references: resizes (torch F.interpolate / clean-fid's own resizer), the Frechet
distance (pytorch-fid's calculate_frechet_distance), streaming statistics (np.cov), sharded extraction,
input checks, and precision / recall (a brute-force loop)."""

import jax
import numpy as np
import pytest

from reference_packages import import_reference

from diffusion_jax.eval import fid, inception


def test_pytorch_fid_resize_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
  got = np.asarray(fid.resize_299(x, "pytorch_fid"))
  t = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2) / 255.0), size=(299, 299),
                                      mode="bilinear", align_corners=False)
  want = 2 * t.numpy().transpose(0, 2, 3, 1) - 1
  assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("size", [32, 64, 512])
def test_clean_fid_resize_matches_clean_fid(size):
  resize = import_reference("cleanfid.resize")
  x = np.random.default_rng(1).integers(0, 256, (size, size, 3)).astype(np.uint8)
  want = resize.make_resizer("PIL", False, "bicubic", (299, 299))(x)  # clean-fid's "clean" mode resizer
  got = (np.asarray(fid.resize_299(x[None].astype(np.float32), "clean_fid"))[0] + 1) * 127.5
  err = np.abs(got - want).max()
  print(f"\nCLEAN_RESIZE size={size} max_abs_diff={err:.3g} (0..255 scale)")
  assert err < 1e-2  # of 255 (measured <= 2.3e-3): PIL rounds its float filter coefficients its own way


def test_frechet_distance_matches_pytorch_fid():
  fs = import_reference("pytorch_fid.fid_score")
  rng = np.random.default_rng(0)
  d = 64
  a = rng.normal(size=(500, d))
  b = rng.normal(size=(400, d)) @ (np.eye(d) + 0.2 * rng.normal(size=(d, d))) + 0.3
  mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
  want = fs.calculate_frechet_distance(mu1, s1, mu2, s2)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  print(f"\nFRECHET got={got:.10g} pytorch_fid={want:.10g} rel={abs(got - want) / want:.2e}")
  assert abs(got - want) <= 1e-6 * abs(want)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_streaming_stats_match_numpy_cov():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(1000, 16)) * 3 + 100  # large offset: the shifted sums keep precision
  st = fid.FeatureStats(16)
  for chunk in np.array_split(f, 7):
    st.update(chunk)
  assert st.n == 1000
  np.testing.assert_allclose(st.mean(), f.mean(0), rtol=0, atol=1e-10)
  np.testing.assert_allclose(st.cov(), np.cov(f, rowvar=False), rtol=0, atol=1e-9)
  with pytest.raises(ValueError, match=r"\[n, 16\]"):
    st.update(np.zeros((3, 8)))


def test_cached_reference_statistics(tmp_path):
  calls = []
  f = np.random.default_rng(0).normal(size=(50, 4))

  def compute():
    calls.append(1)
    return fid.FeatureStats(4).update(f)

  p = str(tmp_path / "ref.npz")
  a = fid.cached_reference_statistics(p, {"data": "x", "n": 50}, compute)
  b = fid.cached_reference_statistics(p, {"data": "x", "n": 50}, compute)
  assert len(calls) == 1 and b[2] == 50
  np.testing.assert_array_equal(a[1], b[1])
  fid.cached_reference_statistics(p, {"data": "y", "n": 50}, compute)  # other meta: recomputed
  assert len(calls) == 2


def test_check_images_errors():
  u8 = np.zeros((2, 8, 8, 3), np.uint8)
  assert fid.check_images(u8).dtype == np.uint8
  with pytest.raises(ValueError, match="NCHW"):
    fid.check_images(np.zeros((2, 3, 8, 8), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    fid.check_images(np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"declared in \[-1, 1\] have values in \[255, 255\]"):
    fid.check_images(np.full((2, 8, 8, 3), 255.0, np.float32), "-1,1")
  x = np.linspace(-1, 1, 2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  u = fid.check_images(x, "-1,1")
  assert u.min() == 0 and u.max() == 255
  with pytest.raises(ValueError, match="50,000"):
    fid.check_num_samples(1000)
  fid.check_num_samples(1000, allow_few=True)


def test_sharded_extraction_matches_single_device():
  """Random weights; batch over 4 (fake CPU) devices == the same on one device; padding of the last batch."""
  assert len(jax.devices()) >= 4
  from diffusion_jax.pretrained import io
  rng = np.random.default_rng(0)  # random params from the abstract tree (an eager Flax init costs ~1 min here)
  params = io.unflatten({k: (rng.normal(size=v.shape) * np.sqrt(2.0 / np.prod(v.shape[:-1]))).astype(np.float32)
                         if k.endswith("kernel") else np.full(v.shape, 0.5 if "var" in k else 0.1, np.float32)
                         for k, v in io.flatten(inception.abstract_params()).items()})
  imgs = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  a = fid.InceptionFeatures(params, batch_size=4, mesh=mesh)(imgs)
  b = fid.InceptionFeatures(params, batch_size=8)(imgs)
  assert a.shape == (5, 2048)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def _brute_pr(real, fake, k):
  def radii(x):
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return np.sort(d, 1)[:, k]  # column 0 is the point itself

  def cov(q, ref, r):
    d = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1))
    return np.mean([(d[i] <= r).any() for i in range(len(q))])

  return cov(fake, real, radii(real)), cov(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(120, 5))
  fake = rng.normal(size=(90, 5)) * 0.5 + 0.8  # narrower, shifted: precision != recall
  got = fid.precision_recall(real, fake, k=3, block=32)
  p, r = _brute_pr(real, fake, 3)
  assert 0.05 < p < 0.999 and 0.05 < r < 0.95 and abs(p - r) > 0.05
  assert got["precision"] == pytest.approx(p, abs=1e-9)
  assert got["recall"] == pytest.approx(r, abs=1e-9)
  far = fid.precision_recall(real, fake + 100.0, k=3)
  assert far == {"precision": 0.0, "recall": 0.0}
