"""Time and memory of one SD-size UNet forward (default: SD-1.5, 64x64 latents, batch 1, fp32, CPU).

  python benchmarks/unet_forward.py [--config sd15|sd21] [--size 64] [--batch 1] [--dtype float32] [--iters 3]

Weights are random (fan-in-scaled normal, generated with numpy from the abstract param shapes, so no
init is compiled); the text context is (batch, 77, cross_attention_dim). The forward is compiled ahead of time
(`jit(...).lower(...).compile()`), and compile time is reported separately from the run time (median of
`--iters` runs after one warm-up run).

Memory, two measurements:
* `xla temp`: XLA's own buffer assignment for the compiled forward (`compiled.memory_analysis()`): the peak of
  temporaries, besides the arguments (weights + inputs) and the output;
* `RSS`: process peak resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), read after the weights are
  built, after compiling, and after the runs; the growth over the runs is the forward's extra peak host memory
  beyond what compilation already touched.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.unet import (UNet2DConditionModel, abstract_unet_params, count_params, sd15_unet_config,
                                       sd21_unet_config)

CONFIGS = {"sd15": sd15_unet_config, "sd21": sd21_unet_config}


def rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def random_params(abstract, seed=0):
  rng = np.random.default_rng(seed)

  def make(path, a):
    name = str(path[-1].key)
    if name == "bias":
      return jnp.zeros(a.shape, jnp.float32)
    if name == "scale":
      return jnp.ones(a.shape, jnp.float32)
    fan_in = math.prod(a.shape[:-1]) if len(a.shape) > 1 else a.shape[0]
    return jnp.asarray(rng.standard_normal(a.shape, np.float32) / np.sqrt(fan_in))

  return jax.tree_util.tree_map_with_path(make, abstract)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--iters", type=int, default=3)
  # The machine's 1-minute load average is printed: on a shared machine, times scale with it.
  args = ap.parse_args()

  load_start = os.getloadavg()[0]
  cfg = CONFIGS[args.config]()
  dtype = jnp.dtype(args.dtype)
  rss0 = rss_gib()
  params = random_params(abstract_unet_params(cfg))
  jax.block_until_ready(params)
  n = count_params(params)
  rss_params = rss_gib()
  x = jnp.asarray(np.random.default_rng(1).standard_normal((args.batch, args.size, args.size, cfg.in_channels),
                                                            np.float32))
  t = jnp.full((args.batch,), 500.0)
  ctx = jnp.asarray(np.random.default_rng(2).standard_normal((args.batch, 77, cfg.cross_attention_dim), np.float32))
  model = UNet2DConditionModel(cfg, dtype=dtype)
  fwd = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))

  t0 = time.perf_counter()
  compiled = fwd.lower(params, x, t, ctx).compile()
  compile_s = time.perf_counter() - t0
  rss_compiled = rss_gib()
  mem = compiled.memory_analysis()
  temp_gib = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**30 if mem is not None else float("nan")
  arg_gib = getattr(mem, "argument_size_in_bytes", float("nan")) / 2**30 if mem is not None else float("nan")

  jax.block_until_ready(compiled(params, x, t, ctx))  # warm-up
  times = []
  for _ in range(args.iters):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, x, t, ctx))
    times.append(time.perf_counter() - t0)
  rss_run = rss_gib()
  assert out.shape == x.shape[:3] + (cfg.out_channels,) and bool(jnp.isfinite(out).all())

  print(f"config={args.config} params={n / 1e6:.1f}M latents={args.batch}x{args.size}x{args.size}x{cfg.in_channels} "
        f"dtype={args.dtype} backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__} "
        f"cpus={os.cpu_count()} load-average(1 min) start/end={load_start:.1f}/{os.getloadavg()[0]:.1f}")
  print("| quantity | value |")
  print("|---|---|")
  print(f"| compile (lower + XLA compile) | {compile_s:.1f} s |")
  print(f"| forward, median of {args.iters} (min / max) | {statistics.median(times):.2f} s "
        f"({min(times):.2f} / {max(times):.2f}) |")
  print(f"| XLA arguments (weights + inputs) | {arg_gib:.2f} GiB |")
  print(f"| XLA temporaries (peak working memory of the forward) | {temp_gib:.2f} GiB |")
  print(f"| RSS peak: start / weights built / compiled / after runs | {rss0:.2f} / {rss_params:.2f} / "
        f"{rss_compiled:.2f} / {rss_run:.2f} GiB |")


if __name__ == "__main__":
  main()
