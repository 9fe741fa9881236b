"""Train-step benchmark for the generation experiment: step time, images/s, achieved FLOP/s and MFU.

    python benchmarks/train_step.py --config configs/diffit_shapes.py --batch 64 --steps 10
    python benchmarks/train_step.py --config configs/diffit_imagenet256.py --batch 32 --dtype bfloat16 \
        --set latent.vae=space_to_depth --set latent.factor=8 --set latent.scale_factor=1.0

The step is the real training computation: loss (the experiment's `loss`, one network call) + gradient + AdamW
update, jitted, params donated. Inputs are random arrays of the batch's shapes (no data pipeline, no VAE in
the loop: latent configs are benchmarked on latents of the model's input shape, as with cached latents).

FLOPs are analytic: every `dot_general` (2 M N K) and `conv_general_dilated` (2 x output size x kernel
window x input features / groups) in the jaxpr of one forward pass of the network, summed (attention
included), times 3 for forward + backward. MFU = FLOPs per step / step time / peak, the peak taken from
`PEAK_FLOPS` by device kind and dtype; on CPU the peak is *measured* (best of a few large fp32 matmuls).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

# Dense peak FLOP/s per device: (device-kind substring, dtype) -> FLOP/s. fp32 on NVIDIA counts TF32 tensor cores.
PEAK_FLOPS = {
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 494e12,
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 494e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 156e12,
    ("L4", "bfloat16"): 121e12, ("L4", "float32"): 60e12,
    ("TPU v5p", "bfloat16"): 459e12, ("TPU v5 lite", "bfloat16"): 197e12, ("TPU v4", "bfloat16"): 275e12,
}


def measure_cpu_peak(n: int = 1024, reps: int = 5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def peak_flops(dtype: str):
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return measure_cpu_peak(), "measured fp32 1024^3 matmul"
  for (kind, dt), v in PEAK_FLOPS.items():
    if kind.lower() in dev.device_kind.lower() and dt == dtype:
      return v, f"table: {kind} {dt}"
  return float("nan"), f"unknown device kind {dev.device_kind!r}"


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    vals = v if isinstance(v, (tuple, list)) else (v,)
    for x in vals:
      if hasattr(x, "jaxpr") and hasattr(x, "consts"):       # ClosedJaxpr
        yield x.jaxpr
      elif hasattr(x, "eqns"):                                # Jaxpr
        yield x


def jaxpr_flops(jaxpr) -> float:
  """Analytic matmul + conv FLOPs of a jaxpr (recursing into sub-jaxprs; scan bodies x length)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      k = math.prod(lhs[i] for i in lc)
      total += 2.0 * math.prod(out) * k
    elif name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      spatial = math.prod(rhs[i] for i in dn.rhs_spec[2:])
      cin = rhs[dn.rhs_spec[1]]
      total += 2.0 * math.prod(out) * spatial * cin
    else:
      mult = eqn.params.get("length", 1) if name == "scan" else 1
      if name == "cond":
        total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        continue
      for sub in _sub_jaxprs(eqn):
        total += mult * jaxpr_flops(sub)
  return total


def model_forward_flops(exp, params, batch_size: int) -> float:
  shape = (batch_size,) + exp.latent_shape()
  x = jnp.zeros(shape, jnp.float32)
  t = jnp.zeros((batch_size,), jnp.float32)
  y = jnp.zeros((batch_size,), jnp.int32) if exp.num_classes else None
  closed = jax.make_jaxpr(lambda p: exp.model.apply({"params": p}, x, t, y))(params)
  return jaxpr_flops(closed.jaxpr)


def _set(config, assignment: str):
  key, value = assignment.split("=", 1)
  node = config
  parts = key.split(".")
  for p in parts[:-1]:
    node = node[p]
  old = node[parts[-1]] if parts[-1] in node else None
  if isinstance(old, bool):
    value = value.lower() in ("1", "true", "yes")
  elif isinstance(old, int):
    value = int(value)
  elif isinstance(old, float):
    value = float(value)
  elif isinstance(old, tuple):
    value = tuple(int(v) for v in value.strip("()").split(",") if v)
  with config.unlocked() if hasattr(config, "unlocked") else _null():
    node[parts[-1]] = value


class _null:
  def __enter__(self):
    return None

  def __exit__(self, *a):
    return False


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True, help="configs/<name>.py[:variant]")
  ap.add_argument("--batch", type=int, default=None, help="global batch (default: config.data.batch_size)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: config.dtype)")
  ap.add_argument("--remat", default=None, help="none | full | dots | dots_no_batch (default: config.remat)")
  ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  args = ap.parse_args(argv)

  import importlib.util
  path, _, variant = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(variant or None)
  if args.batch:
    config.data.batch_size = args.batch
  if args.dtype:
    config.dtype = args.dtype
  if args.remat:
    config.remat = args.remat
  for s in args.set:
    _set(config, s)
  config.latent.cache = False

  from diffusion_jax.experiments.base import get_experiment
  exp = get_experiment(config)
  b = int(config.data.batch_size)
  rng = np.random.RandomState(0)
  shape = exp.latent_shape()
  if exp.vae_kind == "none":
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (b,) + shape), jnp.float32)}
  else:   # benchmark on latents: moments = [mean, logvar] with a tiny variance
    mom = np.concatenate([rng.randn(b, *shape), np.full((b, *shape), -30.0)], -1)
    batch = {"moments": jnp.asarray(mom, jnp.float32)}
  batch["label"] = jnp.asarray(rng.randint(0, max(1, exp.num_classes), b), jnp.int32)
  params = jax.jit(exp.init)(jax.random.key(0), batch, {})
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  tx = optax.adamw(1e-4)
  opt = tx.init(params)

  def step(params, opt, batch, rng):
    (loss, _), g = jax.value_and_grad(lambda p: exp.loss(p, {}, {}, batch, rng, 0), has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  jstep = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = jstep.lower(params, opt, batch, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  for i in range(args.warmup):
    params, opt, loss = compiled(params, opt, batch, jax.random.key(i))
  loss.block_until_ready()
  times = []
  for i in range(args.steps):
    t = time.perf_counter()
    params, opt, loss = compiled(params, opt, batch, jax.random.key(100 + i))
    loss.block_until_ready()
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  fwd = model_forward_flops(exp, params, b)
  flops = 3.0 * fwd
  peak, peak_src = peak_flops(str(config.dtype))
  dev = jax.devices()[0]
  print(f"config            {args.config}  (model {config.model.name}, {n_params / 1e6:.2f}M params, "
        f"input {(b,) + shape}, dtype {config.dtype}, remat {config.remat})")
  print(f"device            {dev.platform} / {dev.device_kind} x{jax.device_count()}, JAX {jax.__version__}")
  print(f"compile           {compile_s:.1f} s")
  print(f"step time         {step_s * 1e3:.1f} ms (median of {args.steps}; min {min(times) * 1e3:.1f})")
  print(f"images/s          {b / step_s:.1f}")
  print(f"FLOPs/step        {flops / 1e9:.2f} GFLOP (3 x {fwd / 1e9:.2f} forward)")
  print(f"achieved          {flops / step_s / 1e12:.4f} TFLOP/s")
  print(f"peak              {peak / 1e12:.4f} TFLOP/s ({peak_src})")
  print(f"MFU               {100 * flops / step_s / peak:.1f} %")
  return dict(step_s=step_s, images_per_s=b / step_s, flops=flops, mfu=flops / step_s / peak)


if __name__ == "__main__":
  main()
