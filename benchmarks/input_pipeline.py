"""Input-pipeline benchmark.

1. Throughput (examples/s) of the shapes-world grain pipeline (render -> uint8 -> float [-1, 1] -> batch)
   with 0, 1 and 2 worker processes.
2. Train-step time with the real pipeline vs. a synthetic batch already on the device, for a config:
   ratio = real / synthetic (<= 1.05 means the input pipeline is not the bottleneck).

    python benchmarks/input_pipeline.py --config configs/diffit_shapes.py:tiny --steps 30 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def pipeline_throughput(workers: int, batch_size: int, image_size: int, num_batches: int, num_examples: int):
  import ml_collections
  from diffusion_jax.data import make_image_source
  from diffusion_jax.data.pipeline import SelectKeys, ToFloatImage, make_pipeline
  dc = ml_collections.ConfigDict(dict(name="shapes", image_size=image_size, num_train=num_examples))
  src = make_image_source(dc, "train", 0)
  ds = make_pipeline(src, [ToFloatImage(), SelectKeys(("image", "label"))], batch_size=batch_size, seed=0,
                     num_workers=workers, prefetch=4)
  it = iter(ds)
  next(it)  # start-up (worker processes) not counted.
  t0 = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  dt = time.perf_counter() - t0
  close = getattr(it, "close", None)
  if close:
    close()
  return num_batches * batch_size / dt


def step_time_ratio(config_spec: str, steps: int, workers: int | None):
  import jax
  from diffusion_jax.train import load_config, trainer
  overrides = {"train.progress_bar": False}
  if workers is not None:
    overrides["data.num_workers"] = workers
  config = load_config(config_spec, overrides)
  import tempfile
  run = trainer._Run(config, tempfile.mkdtemp(prefix="bench_"))
  dyn = run.init_state()
  frozen = run.frozen
  compiled = run.lower_step().compile()  # the trainer's own step: (state, frozen, batch) -> (state, metrics)
  fixed = run.to_device(run.first_batch)

  def timed(real: bool):
    nonlocal dyn
    for _ in range(3):  # warm-up
      b = run.to_device(next(run.iterator)) if real else fixed
      dyn, m = compiled(dyn, frozen, b)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      b = run.to_device(next(run.iterator)) if real else fixed
      dyn, m = compiled(dyn, frozen, b)
    jax.block_until_ready((dyn, m))
    return (time.perf_counter() - t0) / steps

  # interleave to average out machine-load drift.
  synth, real = [], []
  for _ in range(2):
    synth.append(timed(False))
    real.append(timed(True))
  run.close()
  s, r = min(synth), min(real)
  return {"config": config_spec, "batch_size": int(config.data.batch_size),
          "num_workers": int(config.data.get("num_workers", 0)), "synthetic_step_s": s, "real_step_s": r,
          "ratio": r / s}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="", help="config for the step-time comparison (empty = skip)")
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--workers", default="0,1,2", help="worker counts for the throughput table")
  p.add_argument("--step_workers", type=int, default=None, help="data.num_workers for the step-time run")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--num_batches", type=int, default=40)
  p.add_argument("--skip_throughput", action="store_true")
  args = p.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  import jax
  print(f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs")
  if not args.skip_throughput:
    print(f"\nshapes-world pipeline, {args.image_size}x{args.image_size}, batch {args.batch_size}:")
    print("| workers | examples/s |\n|---|---|")
    for w in [int(x) for x in args.workers.split(",") if x != ""]:
      eps = pipeline_throughput(w, args.batch_size, args.image_size, args.num_batches, 100_000)
      print(f"| {w} | {eps:,.0f} |", flush=True)
  if args.config:
    res = step_time_ratio(args.config, args.steps, args.step_workers)
    print("\nstep time, real pipeline vs synthetic on-device batch:")
    print("| config | batch | workers | synthetic ms/step | real ms/step | ratio |\n|---|---|---|---|---|---|")
    print(f"| {res['config']} | {res['batch_size']} | {res['num_workers']} | {1e3 * res['synthetic_step_s']:.1f} | "
          f"{1e3 * res['real_step_s']:.1f} | {res['ratio']:.3f} |")
    print(json.dumps(res))


if __name__ == "__main__":
  main()
