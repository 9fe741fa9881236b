"""Prompt Diffusion benchmark at the shapes scale: train-step time, sampling images/s, and the ControlNet's
overhead (the compiled ControlNet + UNet denoiser call against the base UNet alone, same inputs).

    python scripts/prompt_diffusion_benchmark.py --base runs/sd_shapes/export [--variant ""] [--batch 32]
        [--repeats 5] [--sample_batch 16]

`--base`: a finished sd_shapes run (its export directory), the frozen base of configs/prompt_diffusion_shapes.py.
Rows (each jitted, compile excluded, interleaved A B A B ... where two programs are compared, medians):
* `forward_pd_ms` / `forward_base_ms`: one denoiser call (ControlNet with the pair and query hint encoders, its
  13 residuals added to the UNet) vs the base UNet alone, batch `--batch`; their ratio `controlnet_overhead`;
* `train_step_pd_ms` / `train_step_base_ms`: loss + gradient of Prompt Diffusion's step (the ControlNet, and the
  UNet decoder unless `locked`) vs a text-to-image step of the base UNet alone on the same batch size; ratio;
* `sample_images_per_s`: `sample_images` with the config's sampler, steps and CFG, batch `--sample_batch`.
CPU seconds (user + system, all threads) per call are printed next to the wall times: on a shared machine they
say more. Prints a markdown table and one JSON line; state the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _cpu() -> float:
  t = os.times()
  return t.user + t.system


def interleaved(fns, repeats: int):
  """fns: name -> zero-argument callable returning jax arrays. Warms each (compile), then runs them in turn
  (A B A B ...) `repeats` times; returns name -> (median wall s, median CPU s)."""
  import jax
  for fn in fns.values():
    jax.block_until_ready(fn())
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for r in range(repeats):
    order = list(fns) if r % 2 == 0 else list(fns)[::-1]
    for k in order:
      c0, t0 = _cpu(), time.perf_counter()
      jax.block_until_ready(fns[k]())
      wall[k].append(time.perf_counter() - t0)
      cpu[k].append(_cpu() - c0)
  return {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in fns}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--base", required=True, help="the sd_shapes export directory (or finished run directory)")
  ap.add_argument("--variant", default="", help="configs/prompt_diffusion_shapes.py variant, e.g. '' or 'locked'")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--sample_batch", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "prompt_diffusion_benchmark_cache"))
  a = ap.parse_args(argv)
  if a.batch < 1 or a.sample_batch < 1 or a.repeats < 1:
    raise SystemExit("--batch, --sample_batch and --repeats must be >= 1")
  base_dir = os.path.join(a.base, "export") if os.path.isdir(os.path.join(a.base, "export")) else a.base
  if not os.path.isdir(base_dir):
    raise SystemExit(f"--base {a.base}: no such directory. Give a finished sd_shapes run or its export.")

  load_before = os.getloadavg()[0]
  import jax
  import jax.numpy as jnp
  from configs import prompt_diffusion_shapes
  from diffusion_jax.core.losses import diffusion_loss
  from diffusion_jax.experiments.base import get_experiment

  cfg = prompt_diffusion_shapes.get_config(a.variant or None)
  cfg.stages.pipeline.path = base_dir
  cfg.data.cache_dir = a.cache_dir
  n = max(a.batch, a.sample_batch)
  cfg.data.num_train = cfg.data.num_test = max(n, 16)
  cfg.data.batch_size = a.batch
  exp = get_experiment(cfg, stages={"pipeline": base_dir})
  exp.workdir = tempfile.mkdtemp(prefix="pd_bench_")
  frozen = jax.tree.map(jnp.asarray, exp.load_frozen())
  batch = next(iter(exp.make_dataset("train", seed=0)))
  batch = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}  # arrays only (no captions)
  params = jax.jit(exp.init)(jax.random.PRNGKey(0), batch, frozen)

  # One denoiser call: Prompt Diffusion (ControlNet + UNet) vs the base UNet alone, same x, t, text states.
  model, unet = exp.model_fn(), exp.unet
  x = jax.random.normal(jax.random.PRNGKey(1), (a.batch,) + tuple(exp.latent_shape))
  t = jnp.full((a.batch,), 500.0, jnp.float32)
  ctx = jax.jit(lambda f, b: exp._context(f, b))(frozen, batch)
  c = dict(exp._hints(batch), ctx=ctx)
  fwd_pd = jax.jit(lambda p, base, x, t, c: model(p, base, x, t, c))
  fwd_base = jax.jit(lambda base, x, t, ctx: unet.apply({"params": base}, x, t, ctx))

  # Train steps: Prompt Diffusion's loss + gradient vs the base UNet's text-to-image loss + gradient.
  step_pd = jax.jit(jax.value_and_grad(lambda p, b, r: exp.loss(p, frozen, {}, b, r, 0), has_aux=True))

  def base_loss(unet_params, b, r):
    k_lat, k_loss = jax.random.split(r)
    x0 = jax.lax.stop_gradient(exp._target_x0(frozen, b["target"], k_lat)).astype(jnp.float32)
    cc = jax.lax.stop_gradient(exp._context(frozen, b))
    fn = lambda xx, tt, ccc: unet.apply({"params": unet_params}, xx, tt, ccc)
    per_ex, _ = diffusion_loss(fn, x0, k_loss, schedule=exp.schedule, prediction_type=exp.prediction_type, cond=cc)
    return jnp.mean(per_ex)

  step_base = jax.jit(jax.value_and_grad(base_loss))
  rng = jax.random.PRNGKey(2)
  timed = interleaved({
      "forward_pd": lambda: fwd_pd(params, frozen["unet"], x, t, c),
      "forward_base": lambda: fwd_base(frozen["unet"], x, t, ctx),
  }, a.repeats)
  timed.update(interleaved({
      "train_step_pd": lambda: step_pd(params, batch, rng),
      "train_step_base": lambda: step_base(frozen["unet"], batch, rng),
  }, a.repeats))
  sb = {k: v[:a.sample_batch] for k, v in batch.items() if k in ("ids", "example_source", "example_target", "query")}
  timed.update(interleaved({"sample": lambda: exp.sample_images(params, frozen, sb, jax.random.PRNGKey(3))},
                           a.repeats))

  s = cfg.sample
  res = {"variant": a.variant or "default", "batch": a.batch, "sample_batch": a.sample_batch,
         "sampler": f"{s.sampler} {int(s.steps)} steps, CFG {float(s.guidance)}", "repeats": a.repeats,
         "trainable_params": int(sum(np.size(v) for v in jax.tree.leaves(params))),
         "device": str(jax.devices()[0]), "load_before": load_before}
  for k, (w, cpu) in timed.items():
    res[f"{k}_ms"], res[f"{k}_cpu_s"] = 1e3 * w, cpu
  res["controlnet_overhead"] = res["forward_pd_ms"] / res["forward_base_ms"]
  res["train_step_ratio"] = res["train_step_pd_ms"] / res["train_step_base_ms"]
  res["sample_images_per_s"] = a.sample_batch / (res["sample_ms"] / 1e3)
  res["load_after"] = os.getloadavg()[0]
  rows = [("denoiser call, ControlNet + UNet", "forward_pd"), ("denoiser call, base UNet alone", "forward_base"),
          ("train step, Prompt Diffusion", "train_step_pd"), ("train step, base UNet alone", "train_step_base"),
          (f"sampling ({res['sampler']}, batch {a.sample_batch})", "sample")]
  print(f"| row (batch {a.batch}) | wall ms | CPU s |\n|---|---:|---:|")
  for name, k in rows:
    print(f"| {name} | {res[k + '_ms']:.1f} | {res[k + '_cpu_s']:.2f} |")
  print(f"\nControlNet overhead {res['controlnet_overhead']:.2f}x, train step {res['train_step_ratio']:.2f}x the "
        f"base's, sampling {res['sample_images_per_s']:.2f} images/s; load {res['load_before']:.1f} -> "
        f"{res['load_after']:.1f}")
  print(json.dumps(res))
  return res


if __name__ == "__main__":
  main()
