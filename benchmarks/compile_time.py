"""Compile time of the DiT / latent DiffiT train steps, blocks unrolled vs one `nn.scan` (`model.scan_blocks`).

    python benchmarks/compile_time.py [--models dit,diffit] [--size XL/2] [--batch 8] [--dtype bfloat16]

The step is benchmarks/device.py's (the experiment's ADM loss, gradient, AdamW, EMA) on 32x32x4 latents;
params, optimizer state and batch are abstract (`jax.ShapeDtypeStruct`), so no weights are made and any
size compiles on a laptop. Each variant runs in its own subprocess (no shared compilation caches; the
persistent cache is off); printed: trace + lower s, XLA compile s, process CPU s of both, and the size of
the optimised HLO text. Interleaved: unrolled, scanned, unrolled, scanned, ... (`--repeats`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "COMPILE_TIME_JSON "


def child(model: str, size: str, batch: int, dtype: str, scan: bool) -> dict:
  sys.path.insert(0, ROOT)
  import importlib.util
  import jax
  import jax.numpy as jnp
  import optax
  spec = importlib.util.spec_from_file_location("benchmarks_device", os.path.join(ROOT, "benchmarks", "device.py"))
  device = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(device)
  from diffusion_jax.experiments.base import get_experiment
  from diffusion_jax.models.dit import dit_kwargs
  config = device._train_config(model, False, dtype, scan)
  config.model.update(dit_kwargs(size))
  exp = get_experiment(config)
  s, c = int(config.model.input_size), int(config.model.in_channels)
  x1 = jnp.zeros((1, s, s, c))
  params = jax.eval_shape(lambda k: exp.model.init(k, x1, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"],
                          jax.random.key(0))
  tx = optax.adamw(1e-4, weight_decay=0.0)
  state = (params, jax.eval_shape(tx.init, params), params)
  batch = {"moments": jax.ShapeDtypeStruct((batch, s, s, 2 * c), jnp.float32),
           "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  step = jax.jit(device.train_step_fn(exp, tx), donate_argnums=(0,))
  w0, c0 = time.perf_counter(), time.process_time()
  lowered = step.lower(state, batch, jax.random.key(0))
  w1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  w2, c2 = time.perf_counter(), time.process_time()
  hlo = len(compiled.as_text() or "")
  n = sum(int(a.size) for a in jax.tree.leaves(params))
  return dict(model=model, size=size, scan=scan, lower_s=w1 - w0, compile_s=w2 - w1, lower_cpu_s=c1 - c0,
              compile_cpu_s=c2 - c1, hlo_mb=hlo / 1e6, params_m=n / 1e6, backend=jax.default_backend())


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default="dit,diffit")
  ap.add_argument("--size", default="XL/2", help="DiT size spec for both models (depth / width / heads / patch)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
  ap.add_argument("--_scan", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args._child:
    print(TAG + json.dumps(child(args._child, args.size, args.batch, args.dtype, bool(args._scan))), flush=True)
    return None
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  results = {}
  for model in [m for m in args.models.split(",") if m]:
    for _ in range(args.repeats):
      for scan in (0, 1):
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", model, "--_scan", str(scan), "--size",
               args.size, "--batch", str(args.batch), "--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in out.stdout.splitlines() if l.startswith(TAG)]
        if not line:
          raise SystemExit(f"{model} scan={scan} failed:\n{out.stderr[-3000:]}")
        r = json.loads(line[0][len(TAG):])
        results.setdefault((model, scan), []).append(r)
        print(f"[done] {model} scan={scan}: compile {r['compile_s']:.1f} s (load average "
              f"{os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
  print(f"\n{args.size} train step, batch {args.batch}, {args.dtype}, backend "
        f"{next(iter(results.values()))[0]['backend']}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; medians of {args.repeats}\n")
  print("| model | blocks | trace + lower s (CPU s) | XLA compile s (CPU s) | optimised HLO MB |")
  print("|---|---|---:|---:|---:|")
  for (model, scan), rs in results.items():
    med = lambda k: statistics.median(r[k] for r in rs)
    print(f"| {model} ({rs[0]['params_m']:.1f}M) | {'scan' if scan else 'unrolled'} | {med('lower_s'):.1f} "
          f"({med('lower_cpu_s'):.1f}) | {med('compile_s'):.1f} ({med('compile_cpu_s'):.1f}) | {med('hlo_mb'):.2f} |")
  return results


if __name__ == "__main__":
  main()
