"""FID feature-extraction throughput, JAX (this repo) vs pytorch-fid's InceptionV3, same random weights, one run;
and the host memory of the streaming statistics at 50k samples.

    python scripts/bench_fid.py [--num 64] [--batch 32] [--size 32] [--stats_samples 50000]

pytorch-fid is imported with the test-only torchvision re-statement (tests/eval/restated_torchvision), as in the
parity tests. Prints one JSON line. Times exclude the first (compiling / warm-up) batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "eval"))

import numpy as np  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--num", type=int, default=64)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--stats_samples", type=int, default=50000)
  p.add_argument("--no_torch", action="store_true")
  a = p.parse_args(argv)
  import jax
  from diffusion_jax.eval import fid, inception
  from diffusion_jax.pretrained import io
  rng = np.random.default_rng(0)
  flat = {}
  for k, v in io.flatten(inception.abstract_params()).items():
    flat[k] = (rng.normal(size=v.shape) * np.sqrt(2.0 / np.prod(v.shape[:-1])) if k.endswith("kernel")
               else 0.5 + rng.random(v.shape) if k.endswith(("bn_scale", "bn_var")) else 0.1 * rng.normal(size=v.shape))
  params = io.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
  imgs = rng.integers(0, 256, (a.num + a.batch, a.size, a.size, 3), dtype=np.uint8)
  res = {"devices": f"{jax.device_count()} x {jax.devices()[0].platform}", "jax": jax.__version__,
         "batch": a.batch, "image_size": a.size, "num_timed": a.num, "load_avg_start": os.getloadavg()[0]}
  ext = fid.InceptionFeatures(params, batch_size=a.batch)
  t0 = time.perf_counter()
  ext(imgs[:a.batch])
  res["jax_first_batch_s"] = round(time.perf_counter() - t0, 2)
  t0 = time.perf_counter()
  fj = ext(imgs[a.batch:])
  res["jax_img_per_s"] = round(a.num / (time.perf_counter() - t0), 2)
  if not a.no_torch:
    import torch
    from reference_packages import import_reference
    pf = import_reference("pytorch_fid.inception")
    sd = inception.flax_to_torch(params)
    pf.load_state_dict_from_url = lambda url, progress=True: {k: torch.from_numpy(v) for k, v in sd.items()}
    model = pf.InceptionV3([3]).eval()
    x = torch.from_numpy(imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    with torch.no_grad():
      model(x[:a.batch])
      t0 = time.perf_counter()
      ft = np.concatenate([model(x[i:i + a.batch])[0][:, :, 0, 0].numpy()
                           for i in range(a.batch, a.batch + a.num, a.batch)])
      res["torch_img_per_s"] = round(a.num / (time.perf_counter() - t0), 2)
    res["torch_threads"] = torch.get_num_threads()
    res["jax_over_torch"] = round(res["jax_img_per_s"] / res["torch_img_per_s"], 3)
    res["max_abs_diff_features"] = float(np.abs(fj - ft).max())
  # streaming statistics: peak host memory while accumulating stats_samples 2048-d features
  tracemalloc.start()
  st = fid.FeatureStats(2048)
  chunk = rng.normal(size=(1000, 2048)).astype(np.float32)
  base = tracemalloc.get_traced_memory()[0]
  t0 = time.perf_counter()
  for i in range(a.stats_samples // 1000):
    st.update(chunk + np.float32(i % 7))
  st.cov()
  res["stats_samples"] = st.n
  res["stats_peak_MiB"] = round((tracemalloc.get_traced_memory()[1] - base) / 2 ** 20, 1)
  res["stats_update_s"] = round(time.perf_counter() - t0, 1)
  tracemalloc.stop()
  res["load_avg_end"] = os.getloadavg()[0]
  print(json.dumps(res))


if __name__ == "__main__":
  main()
