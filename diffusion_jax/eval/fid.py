"""FID (Heusel et al. 2017) with the FID Inception-v3, streaming feature statistics, precision / recall.

Pipeline: images -> `check_images` (uint8 NHWC, or float with a stated range; anything else is an error) ->
quantised to uint8 (what a PNG / the ADM evaluator's .npz holds) -> resized to 299x299 by the selected
convention (`RESIZES`) -> scaled to [-1, 1] -> `inception.InceptionV3` -> 2048-d pool features ->
`FeatureStats` (running mean / covariance in float64 on the host, O(d^2) memory whatever the number of
images) -> `frechet_distance`.

Resize conventions (the number moves by a few % between them on real data; every result names its own):

* "pytorch_fid": what pytorch-fid's `InceptionV3(resize_input=True)` does: bilinear, half-pixel centres
  (`F.interpolate(mode="bilinear", align_corners=False)`), no antialiasing, on [0, 1] floats.
* "clean_fid": clean-fid's "clean" mode: PIL bicubic on float32 [0, 255] per channel (antialiased when
  downsampling; Keys a = -0.5), clipped to [0, 255]. Here done by `jax.image.resize(..., "bicubic")`, which uses
  the same kernel and the same border renormalisation (parity with clean-fid's resizer is tested).
  Note: clean-fid then feeds its TorchScript Inception, which scales by (x - 128) / 128; this module always
  uses pytorch-fid's network and 2 x - 1 scaling, so "clean_fid" here is clean-fid's *resize* only.

Feature extraction is one jitted function (one compilation per batch size; the last batch is padded), with the
batch sharded over the mesh's "data" axis and the params replicated when a mesh is given.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Dict, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.eval import inception as inception_lib

RESIZES = ("pytorch_fid", "clean_fid")
VALUE_RANGES = ("uint8", "0,1", "-1,1")
# Below d + 1 samples the covariance of d-dim features is singular; FID is also biased upward for small n
# (Chong & Forsyth 2020). Papers report FID on 50,000 samples (CIFAR-10 / ImageNet "FID-50k").
RECOMMENDED_SAMPLES = 50_000


# ------------------------------------------------------------------------------------------ inputs


def check_images(images, value_range: str = "uint8") -> np.ndarray:
  """Validates a batch of images and returns it as uint8 NHWC (float inputs rounded as when saved as PNG).

  `value_range`: "uint8" (uint8 0..255), "0,1" or "-1,1" (floats). Raises ValueError naming the problem
  (layout, channels, dtype, values outside the stated range)."""
  if value_range not in VALUE_RANGES:
    raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}.")
  x = np.asarray(images)
  if x.ndim != 4:
    raise ValueError(f"Images must be a 4-d NHWC array [N, H, W, 3], got shape {x.shape}.")
  if x.shape[-1] != 3:
    hint = " It looks NCHW: transpose to NHWC (x.transpose(0, 2, 3, 1))." if x.shape[1] == 3 else ""
    raise ValueError(f"Images must be NHWC with 3 (RGB) channels last, got shape {x.shape}.{hint}")
  if value_range == "uint8":
    if x.dtype != np.uint8:
      raise ValueError(f"value_range='uint8' needs a uint8 array, got {x.dtype}; pass value_range='0,1' or "
                       "'-1,1' for float images.")
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"value_range={value_range!r} needs float images, got {x.dtype}.")
  lo, hi = (0.0, 1.0) if value_range == "0,1" else (-1.0, 1.0)
  mn, mx = float(x.min()), float(x.max())
  tol = 1e-3
  if not (np.isfinite(mn) and np.isfinite(mx)) or mn < lo - tol or mx > hi + tol:
    raise ValueError(f"Images declared in [{lo:g}, {hi:g}] have values in [{mn:.4g}, {mx:.4g}]; "
                     "check the value range (uint8 0..255 -> value_range='uint8').")
  u = (x - lo) / (hi - lo)
  return np.clip(np.round(u * 255.0), 0, 255).astype(np.uint8)


def resize_299(x255: jnp.ndarray, resize: str) -> jnp.ndarray:
  """float [B, H, W, 3] in [0, 255] -> float [B, 299, 299, 3] in [-1, 1], by the named convention."""
  b = x255.shape[0]
  if resize == "pytorch_fid":
    x = jax.image.resize(x255 / 255.0, (b, 299, 299, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0
  if resize == "clean_fid":
    x = jax.image.resize(x255, (b, 299, 299, 3), "bicubic", antialias=True)
    return jnp.clip(x, 0.0, 255.0) / 127.5 - 1.0
  raise ValueError(f"Unknown resize convention {resize!r}; valid: {', '.join(RESIZES)}.")


def _features(params, images_u8, *, resize: str, logits: bool):
  x = resize_299(images_u8.astype(jnp.float32), resize)
  return inception_lib.InceptionV3().apply({"params": params}, x, logits=logits)


_JITTED: Dict[tuple, object] = {}


def _jitted_features(resize: str, logits: bool, mesh):
  """One jitted function per (resize, logits, mesh), shared by every extractor: a second extractor (another
  evaluate() call, a script in the same process) reuses the compiled programs."""
  key = (resize, logits, mesh)
  if key not in _JITTED:
    fn = functools.partial(_features, resize=resize, logits=logits)
    if mesh is None:
      _JITTED[key] = jax.jit(fn)
    else:
      from jax.sharding import NamedSharding, PartitionSpec as P
      rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
      _JITTED[key] = jax.jit(fn, in_shardings=(rep, data), out_shardings=data)
  return _JITTED[key]


class InceptionFeatures:
  """Jitted, batched (and mesh-sharded) FID Inception features of uint8 NHWC images.

  `mesh`: a `jax.sharding.Mesh` with a "data" axis (or None: the default device); the batch is split over
  "data", the params replicated. `batch_size` is rounded up to a multiple of the data-axis size."""

  def __init__(self, params, *, resize: str = "pytorch_fid", batch_size: int = 64, mesh=None,
               logits: bool = False):
    if resize not in RESIZES:
      raise ValueError(f"Unknown resize convention {resize!r}; valid: {', '.join(RESIZES)}.")
    self.resize, self.logits, self.mesh = resize, logits, mesh
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec as P
      nd = int(mesh.shape["data"])
      batch_size = int(math.ceil(batch_size / nd) * nd)
      rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
      self.params = jax.device_put(params, rep)
      self._data_sharding = data
    else:
      self.params = jax.device_put(params)
      self._data_sharding = None
    self._fn = _jitted_features(resize, logits, mesh)
    self.batch_size = int(batch_size)

  @classmethod
  def from_file(cls, path: str, *, allow_pickle: bool = False, **kw) -> "InceptionFeatures":
    return cls(inception_lib.load_params(path, allow_pickle=allow_pickle), **kw)

  def batches(self, images: np.ndarray) -> Iterable[Dict[str, np.ndarray]]:
    """Yields {"pool": [b, 2048] (, "logits": [b, 1008])} per batch of uint8 NHWC `images` (validated)."""
    images = check_images(images, "uint8")
    bs = self.batch_size
    for start in range(0, len(images), bs):
      chunk = images[start:start + bs]
      k = len(chunk)
      if k < bs:  # pad: every batch runs the same compiled program
        chunk = np.concatenate([chunk, np.zeros((bs - k,) + chunk.shape[1:], np.uint8)])
      x = jax.device_put(chunk, self._data_sharding) if self._data_sharding is not None else chunk
      out = self._fn(self.params, x)
      yield {name: np.asarray(v)[:k] for name, v in out.items()}

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """[N, 2048] float32 pool features of uint8 NHWC images."""
    return np.concatenate([o["pool"] for o in self.batches(images)]) if len(images) else np.zeros((0, 2048))

  def statistics(self, images: np.ndarray, stats: Optional["FeatureStats"] = None) -> "FeatureStats":
    stats = stats or FeatureStats(inception_lib.FEATURE_DIM)
    for o in self.batches(images):
      stats.update(o["pool"])
    return stats


# ------------------------------------------------------------------------------------------ statistics


class FeatureStats:
  """Streaming mean / covariance of feature vectors: float64 sums of shifted features and of their outer
  products (shift = the first batch's mean, for conditioning), so memory is O(d^2) whatever the count:
  2 d^2 * 8 bytes = 64 MiB at d = 2048 (sum of outer products + the covariance when read)."""

  def __init__(self, dim: int):
    self.dim = int(dim)
    self.n = 0
    self.shift = None
    self.s = np.zeros(self.dim, np.float64)
    self.ss = np.zeros((self.dim, self.dim), np.float64)

  def update(self, feats) -> "FeatureStats":
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"Expected features [n, {self.dim}], got {f.shape}.")
    if not len(f):
      return self
    if self.shift is None:
      self.shift = f.mean(0)
    g = f - self.shift
    self.s += g.sum(0)
    self.ss += g.T @ g
    self.n += len(f)
    return self

  def mean(self) -> np.ndarray:
    if not self.n:
      raise ValueError("No features accumulated.")
    return self.shift + self.s / self.n

  def cov(self) -> np.ndarray:
    if self.n < 2:
      raise ValueError(f"A covariance needs at least 2 samples, got {self.n}.")
    return (self.ss - np.outer(self.s, self.s) / self.n) / (self.n - 1)

  def save(self, path: str, meta: Optional[dict] = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=self.mean(), sigma=self.cov(), num=np.int64(self.n), meta=json.dumps(meta or {}))
    os.replace(tmp, path)


def load_statistics(path: str) -> Tuple[np.ndarray, np.ndarray, int, dict]:
  """(mu, sigma, num, meta) from a statistics .npz (`FeatureStats.save`; pytorch-fid's mu/sigma .npz too)."""
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(str(z["meta"])) if "meta" in z else {}
    num = int(z["num"]) if "num" in z else -1
    return np.asarray(z["mu"]), np.asarray(z["sigma"]), num, meta


def cached_reference_statistics(path: str, meta: dict, compute) -> Tuple[np.ndarray, np.ndarray, int]:
  """Reads the statistics at `path` if its meta equals `meta` (same network weights, resize, data, count);
  else calls `compute() -> FeatureStats` and saves them there. Returns (mu, sigma, num)."""
  if os.path.exists(path):
    mu, sigma, num, have = load_statistics(path)
    if have == meta:
      return mu, sigma, num
  st = compute()
  st.save(path, meta)
  return st.mean(), st.cov(), st.n


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

  Tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)) (symmetric PSD, so no complex sqrtm as
  in pytorch-fid's `scipy.linalg.sqrtm`; the two agree to ~1e-6 relative, tested)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"Frechet distance needs matching statistics, got {mu1.shape}/{s1.shape} vs "
                     f"{mu2.shape}/{s2.shape}.")
  w, v = np.linalg.eigh((s1 + s1.T) / 2)
  r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = r1 @ s2 @ r1
  ev = np.linalg.eigvalsh((m + m.T) / 2)
  tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def check_num_samples(n: int, dim: int = inception_lib.FEATURE_DIM, allow_few: bool = False) -> None:
  """FID of d-dim features needs more than d samples (else the covariance is singular)."""
  if n <= dim and not allow_few:
    raise ValueError(
        f"FID with {dim}-d Inception features needs more than {dim} samples (got {n}): below that the "
        f"covariance is singular. Papers report FID on {RECOMMENDED_SAMPLES:,} samples (10,000 at the least for "
        "numbers comparable within a paper); set config.eval.num_samples, or config.eval.allow_few_samples=True "
        "for a smoke test whose number is not comparable to anything.")


# ------------------------------------------------------------------------------------------ precision / recall


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_nn_dist(rows, all_feats, row_offset, k):
  """Squared distance of each row to its k-th nearest neighbour among all_feats, excluding itself."""
  d = _sqdist(rows, all_feats)
  idx = row_offset + jnp.arange(rows.shape[0])
  d = d.at[jnp.arange(rows.shape[0]), idx].set(jnp.inf)  # not its own neighbour
  return -jax.lax.top_k(-d, k)[0][:, k - 1]


def _sqdist(a, b):
  hp = jax.lax.Precision.HIGHEST
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * jnp.matmul(a, b.T, precision=hp)
  return jnp.maximum(d, 0.0)


@jax.jit
def _covered(queries, refs, radii):
  return jnp.any(_sqdist(queries, refs) <= radii[None, :], axis=1)


def _radii(feats, k, block):
  f = jnp.asarray(feats, jnp.float32)
  return jnp.concatenate([_kth_nn_dist(f[i:i + block], f, i, k) for i in range(0, len(f), block)])


def _coverage(queries, refs, radii, block):
  q, r = jnp.asarray(queries, jnp.float32), jnp.asarray(refs, jnp.float32)
  return float(np.mean(np.concatenate([np.asarray(_covered(q[i:i + block], r, radii))
                                       for i in range(0, len(q), block)])))


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> Dict[str, float]:
  """Improved precision / recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls around
  its points with radius = distance to the k-th nearest other point of the same set; precision = share of
  fake points inside the real manifold, recall = share of real points inside the fake manifold (<= radius
  counts as inside). Memory O(block * n)."""
  real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall needs features [n, d] of the same d, got {real.shape} and {fake.shape}.")
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision_recall with k={k} needs more than {k} samples per set.")
  r_real, r_fake = _radii(real, k, block), _radii(fake, k, block)
  return {"precision": _coverage(fake, real, r_real, block), "recall": _coverage(real, fake, r_fake, block)}


# ------------------------------------------------------------------------------------------ for experiments


def file_sha256(path: str) -> str:
  import hashlib
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def local_data_mesh():
  """A 1-axis ("data") mesh over this host's devices (None on multi-host runs: one device per host then)."""
  if jax.process_count() > 1:
    return None
  return jax.make_mesh((jax.local_device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices())


class FIDEvaluator:
  """FID (+ optional precision / recall) for an experiment's `evaluate()`, configured by `config.eval`:

  inception_path (safetensors from scripts/convert_inception.py; required), fid_resize ("pytorch_fid" |
  "clean_fid"), batch_size (feature batch), allow_few_samples, precision_recall (keeps the features: 8 KiB
  per image), reference_stats (a path for the cached reference statistics), fid_shard (default True: the
  batch split over all local devices).

  Construction checks the weights file, the resize name and the sample count, so a mistake ends the run
  before any sampling; the network is loaded on first use."""

  def __init__(self, eval_config, num_samples: int):
    ec = eval_config or {}
    get = lambda k, d: ec[k] if k in ec else d  # noqa: E731
    self.path = str(get("inception_path", "") or "")
    if not self.path or not os.path.exists(self.path):
      inception_lib.load_params(self.path)  # raises the FileNotFoundError that says how to make the file
    self.resize = str(get("fid_resize", "pytorch_fid"))
    if self.resize not in RESIZES:
      raise ValueError(f"config.eval.fid_resize={self.resize!r}; valid: {', '.join(RESIZES)}.")
    check_num_samples(int(num_samples), allow_few=bool(get("allow_few_samples", False)))
    self.batch_size = int(get("fid_batch_size", get("batch_size", 64)))
    self.with_pr = bool(get("precision_recall", False))
    self.reference_path = str(get("reference_stats", "") or "")
    self.shard = bool(get("fid_shard", True))  # False: one device (no mesh)
    self._ext = None
    self._sha = None

  @property
  def extractor(self) -> InceptionFeatures:
    if self._ext is None:
      self._ext = InceptionFeatures.from_file(self.path, resize=self.resize, batch_size=self.batch_size,
                                              mesh=local_data_mesh() if self.shard else None)
    return self._ext

  def weights_sha256(self) -> str:
    if self._sha is None:
      self._sha = file_sha256(self.path)
    return self._sha

  def features_and_stats(self, batches: Iterable[np.ndarray]):
    """Streams uint8 NHWC batches -> (FeatureStats, features [n, 2048] or None when P/R is off)."""
    st, keep = FeatureStats(inception_lib.FEATURE_DIM), []
    for b in batches:
      f = self.extractor(b)
      st.update(f)
      if self.with_pr:
        keep.append(f)
    return st, (np.concatenate(keep) if keep else None)

  def reference(self, batches_fn, meta: dict, default_path: str):
    """(mu, sigma, n, features|None) of the reference set, cached at config.eval.reference_stats (or
    `default_path`) under `meta` + this network's sha256 and resize; recomputed when those differ."""
    path = self.reference_path or default_path
    meta = dict(meta, inception_sha256=self.weights_sha256(), resize=self.resize, with_features=self.with_pr)
    if os.path.exists(path):
      with np.load(path, allow_pickle=False) as z:
        if "meta" in z and json.loads(str(z["meta"])) == meta:
          feats = np.asarray(z["features"]) if "features" in z else None
          return np.asarray(z["mu"]), np.asarray(z["sigma"]), int(z["num"]), feats
    st, feats = self.features_and_stats(batches_fn())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {"features": feats} if feats is not None else {}
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=st.mean(), sigma=st.cov(), num=np.int64(st.n), meta=json.dumps(meta), **extra)
    os.replace(tmp, path)
    return st.mean(), st.cov(), st.n, feats

  def score(self, fake: FeatureStats, fake_feats, ref) -> Dict[str, object]:
    mu, sigma, n, ref_feats = ref
    out: Dict[str, object] = {"fid": frechet_distance(fake.mean(), fake.cov(), mu, sigma),
                              "fid_num_samples": float(fake.n), "fid_num_reference": float(n),
                              "fid_resize": self.resize, "fid_network": "pytorch-fid Inception-v3 pool_3 (2048)"}
    if self.with_pr and fake_feats is not None and ref_feats is not None:
      out.update({f"{k}_k3": v for k, v in precision_recall(ref_feats, fake_feats, k=3).items()})
    return out
