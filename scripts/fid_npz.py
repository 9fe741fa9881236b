"""FID (and optionally precision / recall) between two .npz files, each either images (`arr_0`, uint8 NHWC: the
ADM evaluator's layout and what `--mode eval` writes) or statistics (`mu`, `sigma`: pytorch-fid's / ours).

    python scripts/fid_npz.py --inception inception_fid.safetensors samples.npz reference.npz \\
        [--resize pytorch_fid|clean_fid] [--batch 64] [--precision_recall] [--save_stats ref_stats.npz]

Prints one JSON line (fid, resize, counts). `--save_stats` writes the second file's statistics for reuse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _side(path, ext, keep):
  from diffusion_jax.eval import fid
  with np.load(path, allow_pickle=False) as z:
    if "mu" in z and "sigma" in z:
      if keep:
        raise ValueError(f"{path} holds statistics only; precision / recall needs images.")
      return np.asarray(z["mu"]), np.asarray(z["sigma"]), int(z["num"]) if "num" in z else -1, None, None
    if "arr_0" not in z:
      raise ValueError(f"{path}: expected images under 'arr_0' or statistics 'mu'/'sigma', found {list(z.keys())}.")
    imgs = fid.check_images(z["arr_0"], "uint8")
  st = fid.FeatureStats(2048)
  feats = []
  for i in range(0, len(imgs), 1024):  # stream in chunks of 1024 images
    f = ext(imgs[i:i + 1024])
    st.update(f)
    if keep:
      feats.append(f)
  return st.mean(), st.cov(), st.n, (np.concatenate(feats) if keep else None), st


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("a")
  p.add_argument("b")
  p.add_argument("--inception", required=True)
  p.add_argument("--resize", default="pytorch_fid")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--precision_recall", action="store_true")
  p.add_argument("--allow_few_samples", action="store_true")
  p.add_argument("--save_stats", default="")
  p.add_argument("--no_shard", action="store_true", help="one device instead of all local devices")
  a = p.parse_args(argv)
  from diffusion_jax.eval import fid
  ext = fid.InceptionFeatures.from_file(a.inception, resize=a.resize, batch_size=a.batch, mesh=None if a.no_shard else fid.local_data_mesh())
  mu1, s1, n1, f1, _ = _side(a.a, ext, a.precision_recall)
  mu2, s2, n2, f2, st2 = _side(a.b, ext, a.precision_recall)
  for n in (n1, n2):
    if n >= 0:
      fid.check_num_samples(n, allow_few=a.allow_few_samples)
  out = {"fid": fid.frechet_distance(mu1, s1, mu2, s2), "resize": a.resize, "num_a": n1, "num_b": n2,
         "network": "pytorch-fid Inception-v3 pool_3 (2048)", "inception_sha256": fid.file_sha256(a.inception)}
  if a.precision_recall:
    out.update({f"{k}_k3": v for k, v in fid.precision_recall(f2, f1, k=3).items()})
  if a.save_stats and st2 is not None:
    st2.save(a.save_stats, {"source": os.path.abspath(a.b), "resize": a.resize,
                            "inception_sha256": out["inception_sha256"]})
  print(json.dumps(out))


if __name__ == "__main__":
  main()
