"""Train-step time of one shared MT-Diffusion model with N modalities against N single-task models of the same
size (one modality each, the same backbone, code space and batch): is one shared model cheaper than N?

    python scripts/mt_diffusion_benchmark.py --modalities image,label,segmentation --batch 32 --steps 20

Each model is an `mt_diffusion` experiment built from `configs/mt_diffusion_shapes.py` (`--variant` picks the
backbone: "" = DiffiT, "unet" = the SD UNet port, "tiny" = the tiny DiffiT); a step is the jitted loss, gradient
and Adam update on one fixed batch (data loading excluded). Reported: the median of `--steps` timed steps after
two warm-up steps (compile excluded), wall and CPU time (`time.process_time`: user + sys of all threads, the
better figure on a shared machine), for each model, and the sum over the single-task models. The machine load
(`os.getloadavg`) is printed next to the figures; time on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def step_time(kinds, variant: str, batch: int, steps: int):
  import jax
  import jax.numpy as jnp
  import optax
  from configs import mt_diffusion_shapes
  from diffusion_jax.experiments.base import get_experiment
  cfg = mt_diffusion_shapes.get_config(variant)
  n = len(kinds)
  cfg.mt.modalities = tuple(kinds)
  cfg.mt.weights = tuple([1.0 / n] * n)
  cfg.mt.rec_weights = tuple([1.0] * n)
  cfg.data.num_test = max(batch, 16)
  exp = get_experiment(cfg)
  host, _ = next(exp.test_batches(batch, batch))
  b = {k: jnp.asarray(v) for k, v in host.items()}
  params = jax.jit(exp.init)(jax.random.key(0), b, {})
  nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  tx = optax.adam(1e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, rng):
    (loss, _), g = jax.value_and_grad(lambda p: exp.loss(p, {}, {}, b, rng, 0), has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  times, cpus = [], []
  for i in range(steps + 2):
    t0, c0 = time.perf_counter(), time.process_time()
    params, opt, loss = step(params, opt, jax.random.key(i))
    jax.block_until_ready(loss)
    if i >= 2:
      times.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
  return float(np.median(times)), float(np.median(cpus)), nparams


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--modalities", default="image,label,segmentation")
  ap.add_argument("--variant", default="", help="backbone variant of configs/mt_diffusion_shapes.py: '', unet, tiny")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args(argv)
  kinds = [k for k in args.modalities.split(",") if k]
  import jax
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; load before: "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  shared, shared_cpu, p_shared = step_time(kinds, args.variant, args.batch, args.steps)
  rows = [("shared: " + "+".join(kinds), shared, shared_cpu, p_shared)]
  total = total_cpu = 0.0
  for k in kinds:
    t, c, p = step_time([k], args.variant, args.batch, args.steps)
    total, total_cpu = total + t, total_cpu + c
    rows.append((f"single-task: {k}", t, c, p))
  rows.append((f"{len(kinds)} single-task models (sum)", total, total_cpu, sum(r[3] for r in rows[1:])))
  print(f"| model | params | wall ms / step (batch {args.batch}) | CPU ms / step (user + sys, all threads) |\n"
        "|---|---|---|---|")
  for name, t, c, p in rows:
    print(f"| {name} | {p:,} | {1000 * t:.1f} | {1000 * c:.1f} |")
  print(f"shared / sum of single-task: wall {shared / total:.2f}, CPU {shared_cpu / total_cpu:.2f}; load after: "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  main()
