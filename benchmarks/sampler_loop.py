"""Sampler-loop overhead: a 50-step DDIM run of a small Flax network, the whole loop inside one jit
(`diffusion_jax.core.ddim_sample`, lax.scan) versus the same jitted network called 50 times from Python
with the same update math (a jitted DDIM step per iteration); then every sampler of `core.SAMPLERS` (each a
whole loop in one jit) against (network evaluations) x (network time).

    python benchmarks/sampler_loop.py [--steps 50] [--batch 64] [--width 1024] [--depth 4] [--repeats 10]
                                      [--samplers all | ddim,unipc,...]

Prints per-call network time, loop times and each loop's overhead over NFE x (network time), as markdown
tables. The methods are timed in interleaved rounds and the minimum is reported (robust to machine load).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax import core
from diffusion_jax.core.schedules import spacing_timesteps


class MLPDenoiser(nn.Module):
  """A small time-conditioned residual MLP (eps prediction)."""
  width: int = 1024
  depth: int = 4

  @nn.compact
  def __call__(self, x, t, cond=None):
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(64) / 64)
    temb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    h = nn.Dense(self.width)(x) + nn.Dense(self.width)(temb)
    for _ in range(self.depth):
      h = h + nn.Dense(self.width)(nn.gelu(nn.LayerNorm()(h)))
    return nn.Dense(x.shape[-1])(nn.gelu(h))


def _time_interleaved(fns, rounds):
  """Runs every function once per round, in turn, so machine-load changes hit all of them alike.
  Returns ({name: [wall seconds per round]}, {name: [process CPU seconds per round]})."""
  res = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(f())
      res[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  return {k: np.asarray(v) for k, v in res.items()}, {k: np.asarray(v) for k, v in cpu.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--width", type=int, default=1024)
  ap.add_argument("--depth", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--samplers", default="all", help="comma-separated names from SAMPLER_RUNS, or 'all' / 'none'")
  args = ap.parse_args()

  model = MLPDenoiser(args.width, args.depth)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.dim))
  params = model.init(jax.random.key(1), x, jnp.zeros(args.batch))
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  sched = core.make_schedule("linear")
  n = args.steps

  # (1) The network alone, jitted, n calls back to back.
  net = jax.jit(model.apply)
  tb = jnp.full((args.batch,), 500.0)
  jax.block_until_ready(net(params, x, tb))

  def net_only():
    y = x
    for _ in range(n):
      y = net(params, y, tb)
    return y

  # (2) The whole loop in one jit (the library sampler), rolled (default) and fully unrolled.
  denoise = Partial(model.apply, params)
  scan1 = lambda: core.ddim_sample(denoise, x, num_steps=n, schedule=sched)
  scan_u = lambda: core.ddim_sample(denoise, x, num_steps=n, schedule=sched, unroll=n)
  for f in (scan1, scan_u):
    jax.block_until_ready(f())

  # (3) Python loop: same network, same DDIM math (diffusers' coefficients), one jitted update per step.
  ts = spacing_timesteps(1000, n, "leading")
  ac = sched.alphas_cumprod.astype(np.float32)
  prev = ts - 1000 // n
  a_t = ac[ts]
  a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(1.0))

  @jax.jit
  def update(xc, eps, at, ap):
    x0 = (xc - jnp.sqrt(1 - at) * eps) / jnp.sqrt(at)
    return jnp.sqrt(ap) * x0 + jnp.sqrt(1 - ap) * eps

  tvals = [jnp.full((args.batch,), float(t)) for t in ts]
  coefs = [(jnp.float32(a), jnp.float32(b)) for a, b in zip(a_t, a_p)]

  def py_loop():
    xc = x
    for i in range(n):
      eps = net(params, xc, tvals[i])
      xc = update(xc, eps, *coefs[i])
    return xc

  ref = py_loop()
  for f in (scan1, scan_u):  # same math
    np.testing.assert_allclose(np.asarray(ref), np.asarray(f()), rtol=1e-3, atol=1e-3)

  raw, cpu = _time_interleaved({"net": net_only, "scan1": scan1, "scan_u": scan_u, "py": py_loop}, args.repeats)
  r = {k: (float(np.median(v)), float(np.min(v))) for k, v in raw.items()}
  # Same-round ratio to the network-alone time: cancels load changes slower than one round.
  ratio = {k: float(np.median(v / raw["net"])) for k, v in raw.items()}
  # Process CPU time (all threads): the work done, insensitive to time spent waiting for a core.
  cpu_min = {k: float(np.min(v)) for k, v in cpu.items()}
  net_min = r["net"][1]
  print(f"machine: {platform.machine()}, {jax.devices()[0].platform} ({len(os.sched_getaffinity(0))} cores "
        f"visible, load average {os.getloadavg()[0]:.1f}), JAX {jax.__version__}; MLP width {args.width} depth "
        f"{args.depth} ({n_params / 1e6:.2f} M params), batch {args.batch}x{args.dim}, {n} steps, "
        f"{args.repeats} interleaved rounds")
  print(f"| {'what':40s} | {'min ms':>8s} | {'median ms':>9s} | {'overhead (min)':>14s} | "
        f"{'overhead (median per-round ratio)':>33s} | {'CPU ms (min)':>12s} | {'CPU overhead':>12s} |")
  print(f"|{'-' * 42}|{'-' * 10}|{'-' * 11}|{'-' * 16}|{'-' * 35}|{'-' * 14}|{'-' * 14}|")
  print(f"| {'network alone, per call':40s} | {net_min / n * 1e3:8.3f} | {r['net'][0] / n * 1e3:9.3f} | {'':14s} | "
        f"{'':33s} | {cpu_min['net'] / n * 1e3:12.3f} | {'':12s} |")
  rows = [("net", f"network alone, {n} calls from Python"), ("scan1", f"jitted scan loop, {n} steps (unroll=1)"),
          ("scan_u", f"jitted scan loop, {n} steps (unroll={n})"),
          ("py", f"Python loop: {n} x (jitted net + update)")]
  for k, label in rows:
    print(f"| {label:40s} | {r[k][1] * 1e3:8.2f} | {r[k][0] * 1e3:9.2f} | {(r[k][1] / net_min - 1) * 100:13.1f}% | "
          f"{(ratio[k] - 1) * 100:32.1f}% | {cpu_min[k] * 1e3:12.2f} | "
          f"{(cpu_min[k] / cpu_min['net'] - 1) * 100:11.1f}% |")
  if args.samplers != "none":
    sampler_table(args, model, params, x, sched, net, tb)


# name -> (label, sampler, kwargs, network evaluations for n steps). Stochastic ones draw their noise inside the jit.
SAMPLER_RUNS = {
    "ddim": ("DDIM", "ddim", {}, lambda n: n),
    "ddpm": ("DDPM (ancestral)", "ddpm", {}, lambda n: n),
    "dpmpp_2m": ("DPM-Solver++ 2M", "dpmpp_2m", {}, lambda n: n),
    "dpmpp_3m_karras": ("DPM-Solver++ 3M Karras", "dpmpp", dict(solver_order=3, use_karras_sigmas=True), lambda n: n),
    "sde_dpmpp_2m_karras": ("SDE-DPM-Solver++ 2M Karras", "dpmpp",
                            dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), lambda n: n),
    "unipc": ("UniPC (bh2, order 2)", "unipc", {}, lambda n: n),
    "euler_karras": ("Euler Karras", "euler", {}, lambda n: n),
    "euler_ancestral": ("Euler ancestral", "euler_ancestral", {}, lambda n: n),
    "heun": ("Heun (2n - 1 evaluations)", "heun", {}, lambda n: 2 * n - 1),
    "lcm": ("LCM", "lcm", {}, lambda n: n),
    "edm_heun": ("EDM Heun (2n - 1, discrete VP model)", "edm_heun", dict(prediction_type="epsilon"),
                 lambda n: 2 * n - 1),
}


def sampler_table(args, model, params, x, sched, net, tb):
  """Every sampler's jitted loop vs NFE x (the jitted network alone, called back to back from Python)."""
  names = list(SAMPLER_RUNS) if args.samplers == "all" else [k.strip() for k in args.samplers.split(",")]
  unknown = [k for k in names if k not in SAMPLER_RUNS]
  if unknown:
    raise SystemExit(f"Unknown --samplers {unknown}; valid: {', '.join(SAMPLER_RUNS)}, all, none.")
  n = args.steps
  denoise = Partial(model.apply, params)
  fns = {}
  for k in names:
    _, name, kw, _ = SAMPLER_RUNS[k]
    kw = dict(kw)
    if name == "lcm":
      kw["original_inference_steps"] = max(50, n)
    fns[k] = functools.partial(core.sample, name, denoise, x, num_steps=n, schedule=sched, rng=jax.random.key(2), **kw)
  for f in fns.values():  # compile
    jax.block_until_ready(f())

  def net_calls():
    y = x
    for _ in range(n):
      y = net(params, y, tb)
    return y

  raw, cpu = _time_interleaved({"net": net_calls, **fns}, args.repeats)
  net1 = float(np.min(raw["net"])) / n
  cpu1 = float(np.min(cpu["net"])) / n
  print()
  print(f"Every sampler, whole loop in one jit, {n} steps; overhead = loop time / (NFE x network-alone time) - 1 "
        f"(network alone: {net1 * 1e3:.3f} ms per call min, {cpu1 * 1e3:.3f} ms CPU).")
  print(f"| {'sampler':38s} | {'NFE':>4s} | {'min ms':>8s} | {'median ms':>9s} | {'overhead (min)':>14s} | "
        f"{'overhead (median per-round ratio)':>33s} | {'CPU overhead':>12s} |")
  print(f"|{'-' * 40}|{'-' * 6}|{'-' * 10}|{'-' * 11}|{'-' * 16}|{'-' * 35}|{'-' * 14}|")
  for k in names:
    label, _, _, nfe_of = SAMPLER_RUNS[k]
    nfe = nfe_of(n)
    per_round = np.median(raw[k] / (raw["net"] / n * nfe))
    print(f"| {label:38s} | {nfe:4d} | {np.min(raw[k]) * 1e3:8.2f} | {np.median(raw[k]) * 1e3:9.2f} | "
          f"{(np.min(raw[k]) / (net1 * nfe) - 1) * 100:13.1f}% | {(per_round - 1) * 100:32.1f}% | "
          f"{(np.min(cpu[k]) / (cpu1 * nfe) - 1) * 100:11.1f}% |")


if __name__ == "__main__":
  main()
