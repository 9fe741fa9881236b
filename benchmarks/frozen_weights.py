"""A train step with a frozen ~100M-parameter teacher: program size and compile time when the frozen weights are
constants of the compiled program (what loading them inside a jitted `init` or closing over them does) versus
arguments of it (what the trainer does with `Experiment.load_frozen`).

    python benchmarks/frozen_weights.py [--params 100e6] [--batch 8] [--repeats 1]

The step: a small student MLP trained to match a frozen teacher MLP (`--params` parameters, fp32) on random
inputs; the teacher forward runs every step. "captured": `jax.jit` of the step with the teacher params closed
over; "argument": the same step with the teacher params as a (non-donated) argument, placed on the device
once. Prints a markdown table: StableHLO text size of the lowered step, compile time, steady-state step time,
peak host RSS.
"""

from __future__ import annotations

import argparse
import gc
import platform
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
  width: int
  depth: int
  dim: int = 64

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.width)(x)
    for _ in range(self.depth):
      h = h + nn.Dense(self.width)(nn.gelu(h))
    return nn.Dense(self.dim)(h)


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--params", type=float, default=100e6, help="teacher parameters")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)

  depth = 4
  width = int(round(np.sqrt(args.params / depth)))
  teacher = MLP(width=width, depth=depth)
  student = MLP(width=256, depth=2)
  x = jnp.asarray(np.random.RandomState(0).randn(args.batch, 64), jnp.float32)
  t_params = jax.jit(teacher.init)(jax.random.key(0), x)
  n_teacher = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t_params))
  s_params = student.init(jax.random.key(1), x)
  tx = optax.adam(1e-3)
  opt = tx.init(s_params)

  def step(state, frozen, xb):
    params, opt_state = state

    def loss_fn(p):
      target = jax.lax.stop_gradient(teacher.apply(frozen, xb))
      return jnp.mean(jnp.square(student.apply(p, xb) - target))
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt_state = tx.update(g, opt_state, params)
    return (optax.apply_updates(params, upd), opt_state), loss

  rows = []
  host_teacher = jax.device_get(t_params)
  del t_params
  gc.collect()
  for mode in ("captured", "argument"):
    if mode == "captured":
      const = jax.tree.map(jnp.asarray, host_teacher)
      fn = jax.jit(lambda state, xb: step(state, const, xb), donate_argnums=(0,))
      call_args = ()
    else:
      frozen = jax.device_put(host_teacher)
      fn = jax.jit(step, donate_argnums=(0,))
      call_args = (frozen,)
    state = (jax.tree.map(jnp.copy, s_params), jax.tree.map(jnp.copy, opt))
    t0 = time.perf_counter()
    lowered = fn.lower(state, *call_args, x)
    text_mb = len(lowered.as_text()) / 2 ** 20
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    state, loss = compiled(state, *call_args, x)
    loss.block_until_ready()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      state, loss = compiled(state, *call_args, x)
      loss.block_until_ready()
      times.append(time.perf_counter() - t0)
    rows.append((mode, text_mb, lower_s, compile_s, min(times), _rss_gib()))
    del fn, lowered, compiled, state
    gc.collect()

  print(f"\nTeacher: {n_teacher / 1e6:.1f}M fp32 parameters ({n_teacher * 4 / 2 ** 20:.0f} MB), batch {args.batch}; "
        f"JAX {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} device(s).\n")
  print("| frozen weights | program text (MB) | lower (s) | compile (s) | step (ms) | peak RSS so far (GiB) |")
  print("|---|---|---|---|---|---|")
  for mode, mb, lo, co, st, rss in rows:
    print(f"| {mode} | {mb:.2f} | {lo:.2f} | {co:.2f} | {st * 1e3:.1f} | {rss:.2f} |")


if __name__ == "__main__":
  main()
