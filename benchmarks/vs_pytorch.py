"""JAX (this codebase) against the PyTorch references, side by side on the same machine and inputs.

    python benchmarks/vs_pytorch.py [--only attention,unet,ddim,train,dit,sd15] [--repeats 7]
                                    [--attention auto|xla|dot_product_attention|chunked]
    python benchmarks/vs_pytorch.py --device [--tiny] [benchmarks/device.py options]

`--device` runs the paper-scale accelerator rows instead (benchmarks/device.py: DiT-XL/2 and latent
DiffiT-XL/2 training throughput and MFU, SD-1.5 512x512 DDIM-50 sampling with CFG, peak device memory, next
to the published PyTorch figures); every other argument goes to that script.

Rows (fp32, CPU; torch uses its default intra-op threads, XLA its own pool):
* attention in isolation: (8, 1024 tokens, 2 heads x 16) self-attention, forward and forward + backward,
  `diffusion_jax.models.attention.dot_product_attention` vs `torch.nn.functional.scaled_dot_product_attention`;
* tiny UNet2DCondition (block channels 32/64, 32x32x4 latents, batch 4 with classifier-free guidance = 8 rows,
  77-token context of width 32): one forward; DDIM-50 sampling with CFG 7.5 (ours: `core.ddim_sample`, the
  whole loop in one jit; diffusers: `DDIMScheduler` + the UNet in a Python loop); an AdamW train step
  (epsilon MSE, batch 8). Same weights: the diffusers model is loaded with our params
  (`pretrained.diffusers_io.params_to_torch_state`); the table's `max|diff|` column checks the outputs agree;
* DiT (hidden 256, depth 6, 4 heads, patch 2, 32x32x4 latents, learned sigma, 10 classes, batch 8): forward and
  AdamW train step, against diffusers' `DiTTransformer2DModel` of the same architecture (its own random
  weights: the two ports name and lay out weights differently; speed does not depend on the values);
* SD-1.5-sized UNet forward at 64x64x4 latents, batch 1, 77-token context: each framework in its own
  subprocess, so the process peak RSS (`ru_maxrss`) is that framework's alone (weights + compile + run). JAX
  compiles from the parameters' shapes before the weights exist; both sides then return freed set-up memory
  to the OS (`diffusion_jax.host_memory.release()`, as our trainer does after compiling) before the runs.

Threads: `--threads N` pins both frameworks to N CPU threads (the fair setting on a shared machine; see
--help). Timing: every row runs both sides `--repeats` times interleaved (A B, then B A, ...), after warm-up (and, for
JAX, after compilation, reported separately), and reports medians and the ratio JAX / PyTorch (< 1: JAX is
faster). The machine is shared: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from diffusion_jax import host_memory

ROWS = ("attention", "unet", "ddim", "train", "dit", "sd15")


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _sync(x):
  import jax
  return jax.block_until_ready(x)


def interleave(fa, fb, repeats):
  """Medians (s) of `fa` and `fb` timed alternately: A B, B A, A B, ..."""
  ta, tb = [], []
  for i in range(repeats):
    order = ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta))
    for f, acc in order:
      t0 = time.perf_counter()
      f()
      acc.append(time.perf_counter() - t0)
  return statistics.median(ta), statistics.median(tb)


def _compile_time(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ rows


def row_attention(args):
  import jax
  import jax.numpy as jnp
  import torch
  from diffusion_jax.models import attention as A
  b, t, n, h = 8, 1024, 2, 16
  r = np.random.default_rng(0)
  q, k, v = (r.standard_normal((b, t, n, h), np.float32) for _ in range(3))
  jq, jk, jv = map(jnp.asarray, (q, k, v))
  tq, tk, tv = (torch.from_numpy(a.transpose(0, 2, 1, 3).copy()).requires_grad_() for a in (q, k, v))
  fwd = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v))
  loss = lambda q, k, v: jnp.sum(A.dot_product_attention(q, k, v) ** 2)
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  sdpa = torch.nn.functional.scaled_dot_product_attention
  c_f = _compile_time(lambda: _sync(fwd(jq, jk, jv)))
  c_b = _compile_time(lambda: _sync(bwd(jq, jk, jv)))
  got = np.asarray(fwd(jq, jk, jv))
  with torch.no_grad():
    want = sdpa(tq, tk, tv).numpy().transpose(0, 2, 1, 3)

  def torch_fwd():
    with torch.no_grad():
      sdpa(tq, tk, tv)

  def torch_bwd():
    for a in (tq, tk, tv):
      a.grad = None
    (sdpa(tq, tk, tv) ** 2).sum().backward()

  torch_fwd(), torch_bwd()
  impl = A.resolve(None, jq.shape, t)
  out = []
  a, bb = interleave(lambda: _sync(fwd(jq, jk, jv)), torch_fwd, args.repeats)
  out.append(dict(row=f"attention fwd (8x1024 tok, 2x16; {impl})", jax=a, torch=bb, compile=c_f,
                  diff=float(np.abs(got - want).max())))
  a, bb = interleave(lambda: _sync(bwd(jq, jk, jv)), torch_bwd, args.repeats)
  out.append(dict(row=f"attention fwd+bwd ({impl})", jax=a, torch=bb, compile=c_b))
  return out


def _tiny_unet(batch, hw=32, ctx_len=77):
  import diffusers
  import jax
  import jax.numpy as jnp
  import torch
  from diffusion_jax.models.unet import UNet2DConditionModel, init_unet, tiny_unet_config
  from diffusion_jax.pretrained.diffusers_io import params_to_torch_state
  cfg = tiny_unet_config(sample_size=hw)
  params = init_unet(jax.random.PRNGKey(0), cfg)
  params = jax.tree_util.tree_map(  # non-trivial values everywhere (zero-init convs would hide errors)
      lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(p.size % 997), p.shape), params)
  tm = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params_to_torch_state(params).items()}
  missing, unexpected = tm.load_state_dict(state, strict=False)
  if missing or unexpected:
    raise RuntimeError(f"weight transfer failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
  tm.eval()
  r = np.random.default_rng(1)
  x = r.standard_normal((batch, hw, hw, 4), np.float32)
  ctx = r.standard_normal((batch, ctx_len, cfg.cross_attention_dim), np.float32)
  model = UNet2DConditionModel(cfg)
  return cfg, model, params, tm, x, ctx


def _nchw(a):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def row_unet(args):
  import jax
  import jax.numpy as jnp
  import torch
  cfg, model, params, tm, x, ctx = _tiny_unet(8)
  t = np.full((8,), 500, np.int32)
  fwd = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  jx, jt, jc = jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)
  c = _compile_time(lambda: _sync(fwd(params, jx, jt, jc)))
  tx, tt, tc = _nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx)

  def torch_fwd():
    with torch.no_grad():
      return tm(tx, tt, tc).sample

  diff = float(np.abs(np.asarray(fwd(params, jx, jt, jc)) - torch_fwd().numpy().transpose(0, 2, 3, 1)).max())
  a, b = interleave(lambda: _sync(fwd(params, jx, jt, jc)), torch_fwd, args.repeats)
  return [dict(row="tiny UNet fwd (batch 8, 32x32x4)", jax=a, torch=b, compile=c, diff=diff)]


def row_ddim(args):
  import diffusers
  import jax
  import jax.numpy as jnp
  import torch
  from diffusion_jax import core
  cfg, model, params, tm, x, ctx = _tiny_unet(4)
  r = np.random.default_rng(2)
  uctx = r.standard_normal(ctx.shape, np.float32)
  steps, scale = 50, 7.5
  sched = core.make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)

  @jax.jit
  def sample(p, x, c, u):
    fn = lambda x, t, c: model.apply({"params": p}, x, t, c)
    return core.ddim_sample(fn, x, num_steps=steps, schedule=sched, cond=c, uncond=u, guidance_scale=scale,
                            steps_offset=1, set_alpha_to_one=False)

  jx, jc, ju = map(jnp.asarray, (x, ctx, uctx))
  comp = _compile_time(lambda: _sync(sample(params, jx, jc, ju)))
  ts = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  tctx = torch.from_numpy(np.concatenate([ctx, uctx]))

  def torch_sample():
    ts.set_timesteps(steps)
    lat = _nchw(x)
    with torch.no_grad():
      for t in ts.timesteps:
        eps = tm(torch.cat([lat, lat]), t, tctx).sample
        e_c, e_u = eps.chunk(2)
        lat = ts.step(e_u + scale * (e_c - e_u), t, lat).prev_sample
    return lat

  diff = float(np.abs(np.asarray(sample(params, jx, jc, ju)) - torch_sample().numpy().transpose(0, 2, 3, 1)).max())
  a, b = interleave(lambda: _sync(sample(params, jx, jc, ju)), torch_sample, max(3, args.repeats // 2))
  return [dict(row="tiny UNet DDIM-50 + CFG (batch 4)", jax=a, torch=b, compile=comp, diff=diff)]


def _jax_train_step(apply, lr=1e-4):
  import jax
  import jax.numpy as jnp
  import optax
  tx = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

  def step(params, opt, *batch):
    def loss_fn(p):
      pred, target = apply(p, *batch)
      return jnp.mean((pred - target) ** 2)
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  return tx, jax.jit(step, donate_argnums=(0, 1))


def _time_train(args, params, tx, step, jbatch, torch_step):
  import jax
  state = [params, tx.init(params)]

  def jax_step():
    state[0], state[1], loss = step(state[0], state[1], *jbatch)
    _sync(loss)

  comp = _compile_time(jax_step)
  torch_step()
  return interleave(jax_step, torch_step, args.repeats), comp


def row_train(args):
  import jax
  import jax.numpy as jnp
  import torch
  cfg, model, params, tm, x, ctx = _tiny_unet(8)
  r = np.random.default_rng(3)
  noise = r.standard_normal(x.shape, np.float32)
  t = r.integers(0, 1000, (8,)).astype(np.int32)
  apply = lambda p, x, t, c, n: (model.apply({"params": p}, x, t, c), n)
  tx, step = _jax_train_step(apply)
  jbatch = tuple(map(jnp.asarray, (x, t, ctx, noise)))
  tm.train()
  opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  tx_, tt, tc, tn = _nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx), _nchw(noise)

  def torch_step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(tm(tx_, tt, tc).sample, tn)
    loss.backward()
    opt.step()

  (a, b), comp = _time_train(args, params, tx, step, jbatch, torch_step)
  return [dict(row="tiny UNet AdamW train step (batch 8)", jax=a, torch=b, compile=comp)]


def row_dit(args):
  import diffusers
  import jax
  import jax.numpy as jnp
  import torch
  from diffusion_jax.models.dit import DiT
  kw = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=256, depth=6, num_heads=4, num_classes=10)
  model = DiT(**kw)
  r = np.random.default_rng(4)
  b = 8
  x = r.standard_normal((b, 32, 32, 4), np.float32)
  t = r.integers(0, 1000, (b,)).astype(np.float32)
  y = r.integers(0, 10, (b,)).astype(np.int32)
  noise = r.standard_normal((b, 32, 32, 8), np.float32)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))["params"]
  n_jax = sum(p.size for p in jax.tree_util.tree_leaves(params))
  tm = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=8,
                                       num_layers=6, sample_size=32, patch_size=2, num_embeds_ada_norm=10)
  n_torch = sum(p.numel() for p in tm.parameters())
  fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  jx, jt, jy, jn = map(jnp.asarray, (x, t, y, noise))
  comp = _compile_time(lambda: _sync(fwd(params, jx, jt, jy)))
  tx_, tt, ty, tn = _nchw(x), torch.from_numpy(t), torch.from_numpy(y).long(), _nchw(noise)
  tm.eval()

  def torch_fwd():
    with torch.no_grad():
      return tm(tx_, timestep=tt, class_labels=ty).sample

  torch_fwd()
  a, bb = interleave(lambda: _sync(fwd(params, jx, jt, jy)), torch_fwd, args.repeats)
  out = [dict(row=f"DiT fwd ({n_jax / 1e6:.1f}M vs {n_torch / 1e6:.1f}M params, batch 8)", jax=a, torch=bb,
              compile=comp)]
  apply = lambda p, x, t, y, n: (model.apply({"params": p}, x, t, y), n)
  tx, step = _jax_train_step(apply)
  tm.train()
  opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, weight_decay=0.01)

  def torch_step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(tm(tx_, timestep=tt, class_labels=ty).sample, tn)
    loss.backward()
    opt.step()

  (a, bb), comp = _time_train(args, params, tx, step, (jx, jt, jy, jn), torch_step)
  out.append(dict(row="DiT AdamW train step (batch 8)", jax=a, torch=bb, compile=comp))
  return out


# --------------------------------------------------------------------------- SD-1.5 forward (subprocesses)


def child_sd15(side, iters):
  """One SD-1.5 UNet forward benchmark in this process; prints one JSON line."""
  r = np.random.default_rng(0)
  x = r.standard_normal((1, 64, 64, 4), np.float32)
  ctx = r.standard_normal((1, 77, 768), np.float32)
  times, comp = [], 0.0
  if side == "jax":
    import jax
    import jax.numpy as jnp
    from diffusion_jax.models.unet import UNet2DConditionModel, abstract_unet_params, sd15_unet_config
    cfg = sd15_unet_config()
    rng = np.random.default_rng(1)

    def make(path, a):
      fan_in = math.prod(a.shape[:-1]) if len(a.shape) > 1 else a.shape[0]
      return jnp.asarray(rng.standard_normal(a.shape, np.float32) / np.sqrt(fan_in))

    abstract = abstract_unet_params(cfg)
    model = UNet2DConditionModel(cfg)
    fwd = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    inputs = (jnp.asarray(x), jnp.asarray([500]), jnp.asarray(ctx))
    # compiled from the parameters' shapes before the weights exist, and the compiler's freed memory handed
    # back, so the compiler's transient memory and the weights are not resident at the same time (the
    # weights' NumPy temporaries are handed back below, with torch's)
    t0 = time.perf_counter()
    compiled = fwd.lower(abstract, *inputs).compile()
    comp = time.perf_counter() - t0
    host_memory.release()
    args = (jax.tree_util.tree_map_with_path(make, abstract),) + inputs
    run = lambda: jax.block_until_ready(compiled(*args))
  else:
    import diffusers
    import torch
    from diffusion_jax.models.unet import sd15_unet_config
    d = {k: v for k, v in sd15_unet_config().to_diffusers().items() if not k.startswith("_")}
    tm = diffusers.UNet2DConditionModel(**d).eval()
    tx, tc = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ctx)

    def run():
      with torch.no_grad():
        tm(tx, torch.tensor([500]), tc)
  # both sides hand freed set-up memory (XLA's compile, the weights' construction) back to the OS before running
  host_memory.release()
  run()
  for _ in range(iters):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  print(json.dumps({"side": side, "times": times, "compile": comp, "rss_gib": _rss_gib(),
                    "torch_imported": "torch" in sys.modules}), flush=True)


def row_sd15(args):
  res = {"jax": [], "torch": []}
  rss = {}
  comp = 0.0
  for side in ("jax", "torch"):  # one process each (peak RSS per framework); runs inside each are medians
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", side, "--_iters", str(max(3, args.repeats // 2)),
           "--attention", args.attention, "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    d = json.loads(out)
    res[side] = d["times"]
    rss[side] = d["rss_gib"]
    if side == "jax" and d["torch_imported"]:
      raise RuntimeError("torch was imported in the JAX process of the SD-1.5 row: its peak RSS would not be JAX's.")
    comp = d["compile"] if side == "jax" else comp
  return [dict(row="SD-1.5 UNet fwd (64x64x4, batch 1)", jax=statistics.median(res["jax"]),
               torch=statistics.median(res["torch"]), compile=comp),
          dict(row="SD-1.5 UNet fwd: process peak RSS (GiB)", jax=rss["jax"], torch=rss["torch"], unit="GiB")]


def _device_main(argv):
  import importlib.util
  spec = importlib.util.spec_from_file_location("benchmarks_device",
                                                os.path.join(os.path.dirname(os.path.abspath(__file__)), "device.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.main(argv)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--device" in argv:  # the accelerator rows: benchmarks/device.py with the other arguments
    return _device_main([a for a in argv if a != "--device"])
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--device", action="store_true",
                  help="the paper-scale accelerator rows (benchmarks/device.py; other arguments go there)")
  ap.add_argument("--only", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--attention", default="auto", help="attention implementation for every JAX network")
  ap.add_argument("--threads", type=int, default=0,
                  help="> 0: both frameworks use this many CPU threads (torch.set_num_threads; XLA:CPU "
                       "intra-op threads). On a shared, oversubscribed machine torch's OpenMP threads spin and "
                       "stall (10x slower with 2 threads than 1 at load 9), so 1 is the fair setting there.")
  ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
  ap.add_argument("--_iters", type=int, default=3, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.threads > 0:  # before jax / torch are imported
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               f"intra_op_parallelism_threads={args.threads}").strip()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args._child != "jax":  # the JAX child of the SD-1.5 row must not carry torch (its peak RSS is JAX's alone)
      import torch
      torch.set_num_threads(args.threads)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from diffusion_jax.models import attention as A
  A.set_default(args.attention)
  if args._child:
    return child_sd15(args._child, args._iters)
  only = [s for s in args.only.split(",") if s]
  bad = sorted(set(only) - set(ROWS))
  if bad:
    raise SystemExit(f"Unknown --only row(s) {bad}; valid: {', '.join(ROWS)}.")
  import jax
  import torch
  rows = []
  for name in only:
    rows += globals()[f"row_{name}"](args)
    print(f"[done] {name}  (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
  print(f"\nMachine: {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, JAX {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"{'XLA threads ' + str(args.threads) + '; ' if args.threads else ''}attention={args.attention}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"median of {args.repeats} interleaved runs\n")
  print("| row | JAX | PyTorch | JAX / PyTorch | JAX compile s | max abs diff |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    unit = r.get("unit")
    fmt = (lambda v: f"{v:.2f} {unit}") if unit else (lambda v: f"{v * 1e3:.1f} ms")
    diff = f"{r['diff']:.1e}" if "diff" in r else ""
    comp = f"{r['compile']:.1f}" if "compile" in r else ""
    print(f"| {r['row']} | {fmt(r['jax'])} | {fmt(r['torch'])} | {r['jax'] / r['torch']:.2f} | {comp} | {diff} |")


if __name__ == "__main__":
  main()
