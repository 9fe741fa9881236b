"""What the tiny-UNet AdamW train step's gap to PyTorch is made of: the step split into forward, backward and
optimizer, timed side by side, then per-op profiles of forward + backward of both frameworks.

    python benchmarks/unet_step_profile.py [--repeats 5] [--threads 1] [--model unet|dit]

The tiny UNet2DCondition of benchmarks/vs_pytorch.py (same weights both sides, batch 8, 32x32x4, 77-token
context), epsilon MSE, AdamW. Phases (interleaved medians, JAX jitted, torch eager):
  forward      the loss (torch: autograd recording on, as in training);
  fwd + bwd    loss and gradients (JAX `value_and_grad`; torch `loss.backward()`);
  optimizer    AdamW on the gradients (optax `adamw` + `apply_updates`; torch `AdamW.step()`, foreach);
  step         all of it (JAX one jit, params donated).
Profiles: `jax.profiler` trace of fwd + bwd (XLA:CPU thunk events, summed by op class) and
`torch.profiler` of the same (self CPU time by aten op, summed by op class).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# the ops a fusion name can be made of that only move data ("dynamic_update_slice" splits into three of them)
LAYOUT_OPS = ("transpose", "copy", "bitcast", "concatenate", "slice", "pad", "reverse", "dynamic", "update",
              "broadcast", "reshape")


def _jax_class(name: str, in_loop: bool) -> str:
  """XLA:CPU thunk -> op class. Everything inside a `while` thunk is the chunked attention (the UNet has no
  other loop); `ynn_fusion` are YNNPACK kernels (convolutions and matmuls, with fused neighbours)."""
  if in_loop or name == "while":
    return "attention"
  if name.startswith("ynn") or name in ("dot", "convolution") or name.startswith("dot_"):
    return "convolutions + matmuls"
  ops = [k for k in name.split("_") if k and k != "fusion"]  # XLA names a fusion after the ops in it
  if ops and all(k in LAYOUT_OPS for k in ops):  # only data movement (an add_bitcast_fusion is an add)
    return "copies / layout / transposes"
  return "elementwise + norms + reductions"


def _torch_class(name: str) -> str:
  n = name.lower()
  if "scaled_dot_product" in n or "attention" in n or "softmax" in n:
    return "attention"
  if "conv" in n or n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"):
    return "convolutions + matmuls"
  if any(k in n for k in ("copy", "cat", "clone", "contiguous", "transpose", "permute", "slice", "pad", "index")):
    return "copies / layout / transposes"
  return "elementwise + norms + reductions"


def jax_self_times(events, runs):
  """Self time (ms per run) per (op class, thunk name) of complete ('X') trace events, nesting per thread."""
  skip = re.compile(r"^(ThreadpoolListener|ThunkExecutor|SlinkyThreadPool|end: |Pjit|CommonPjRt|Parse|Handle|"
                    r"Allocate|Wait|PythonRef|\$)")
  by_tid = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and not skip.match(str(e.get("name", ""))):
      by_tid[(e.get("pid"), e.get("tid"))].append(e)
  out = collections.Counter()
  for evs in by_tid.values():
    evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    stack = []  # [end, name, child_time, in_loop]

    def close(item):
      end, name, child, in_loop, dur = item
      out[(_jax_class(name, in_loop), name)] += (dur - child) / 1e3 / runs
      if stack:
        stack[-1][2] += dur

    for e in evs:
      while stack and e["ts"] >= stack[-1][0]:
        close(stack.pop())
      name = re.sub(r"[.\d]+$", "", str(e["name"]))
      in_loop = bool(stack) and (stack[-1][1] == "while" or stack[-1][3])
      stack.append([e["ts"] + e.get("dur", 0), name, 0.0, in_loop, e.get("dur", 0)])
    while stack:
      close(stack.pop())
  return out


def _interleave(fns, repeats):
  times = {k: [] for k in fns}
  keys = list(fns)
  for i in range(repeats):
    for k in (keys if i % 2 == 0 else keys[::-1]):
      t0 = time.perf_counter()
      fns[k]()
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--profile_runs", type=int, default=3)
  ap.add_argument("--profile_only", action="store_true", help="skip the timed phases")
  ap.add_argument("--model", choices=("unet", "dit"), default="unet",
                  help="the tiny UNet2DCondition or the 7.4M DiT of benchmarks/vs_pytorch.py")
  args = ap.parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                             f"intra_op_parallelism_threads={args.threads}").strip()
  os.environ["OMP_NUM_THREADS"] = str(args.threads)
  import torch
  torch.set_num_threads(args.threads)
  sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location("benchmarks_vs_pytorch", os.path.join(ROOT, "benchmarks",
                                                                                     "vs_pytorch.py"))
  vs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(vs)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  if args.model == "unet":
    cfg, model, params, tm, x, ctx = vs._tiny_unet(8)
    r = np.random.default_rng(3)
    noise = r.standard_normal(x.shape, np.float32)
    t = r.integers(0, 1000, (8,)).astype(np.int32)
    jb = tuple(map(jnp.asarray, (x, t, ctx)))
    tb = (vs._nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx))
    call_torch = lambda a, b, c: tm(a, b, c).sample
    label = "Tiny UNet AdamW train step, batch 8"
  else:  # the DiT row of vs_pytorch.py (diffusers' DiTTransformer2DModel of the same architecture)
    import diffusers
    from diffusion_jax.models.dit import DiT
    model = DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=256, depth=6, num_heads=4, num_classes=10)
    r = np.random.default_rng(4)
    x = r.standard_normal((8, 32, 32, 4), np.float32)
    t = r.integers(0, 1000, (8,)).astype(np.float32)
    y = r.integers(0, 10, (8,)).astype(np.int32)
    noise = r.standard_normal((8, 32, 32, 8), np.float32)
    jb = tuple(map(jnp.asarray, (x, t, y)))
    params = model.init(jax.random.PRNGKey(0), *jb)["params"]
    tm = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=64, in_channels=4,
                                         out_channels=8, num_layers=6, sample_size=32, patch_size=2,
                                         num_embeds_ada_norm=10)
    tb = (vs._nchw(x), torch.from_numpy(t), torch.from_numpy(y).long())
    call_torch = lambda a, b, c: tm(a, timestep=b, class_labels=c).sample
    label = "DiT (7.4M) AdamW train step, batch 8"
  jn = jnp.asarray(noise)
  loss_fn = lambda p: jnp.mean((model.apply({"params": p}, *jb) - jn) ** 2)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  j_fwd = jax.jit(loss_fn)
  j_grad = jax.jit(jax.value_and_grad(loss_fn))

  @jax.jit
  def j_opt(g, opt, p):
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt

  _, j_step = vs._jax_train_step(lambda p, a, b, c, n: (model.apply({"params": p}, a, b, c), n))
  opt = tx.init(params)
  g = j_grad(params)[1]
  comp = {}
  for name, f in () if args.profile_only else (("forward", lambda: j_fwd(params)), ("fwd + bwd", lambda: j_grad(params)),
                  ("optimizer", lambda: j_opt(g, opt, params))):
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    comp[name] = time.perf_counter() - t0
  state = [jax.tree.map(jnp.copy, params), tx.init(params)]

  def jax_step():
    state[0], state[1], loss = j_step(state[0], state[1], *jb, jn)
    loss.block_until_ready()

  if not args.profile_only:
    t0 = time.perf_counter()
    jax_step()
    comp["step"] = time.perf_counter() - t0

  tm.train()
  topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  tn = vs._nchw(noise)

  def t_fwd():
    return torch.nn.functional.mse_loss(call_torch(*tb), tn)

  def t_grad():
    topt.zero_grad(set_to_none=True)
    t_fwd().backward()

  def t_step():
    t_grad()
    topt.step()

  t_step()
  if args.profile_only:
    jax.block_until_ready(j_grad(params))
    return _profiles(args, jax, j_grad, params, t_grad)
  fns = {("jax", "forward"): lambda: jax.block_until_ready(j_fwd(params)),
         ("torch", "forward"): t_fwd,
         ("jax", "fwd + bwd"): lambda: jax.block_until_ready(j_grad(params)),
         ("torch", "fwd + bwd"): t_grad,
         ("jax", "optimizer"): lambda: jax.block_until_ready(j_opt(g, opt, params)),
         ("torch", "optimizer"): topt.step,
         ("jax", "step"): jax_step,
         ("torch", "step"): t_step}
  med = _interleave(fns, args.repeats)
  print(f"\n{label}, fp32, {args.threads} thread(s), JAX {jax.__version__}, torch "
        f"{torch.__version__}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; median of "
        f"{args.repeats} interleaved runs\n")
  print("| phase | JAX ms | PyTorch ms | JAX / PyTorch | JAX compile s |")
  print("|---|---:|---:|---:|---:|")
  rows = [("forward", med[("jax", "forward")], med[("torch", "forward")]),
          ("backward (fwd + bwd - fwd)", med[("jax", "fwd + bwd")] - med[("jax", "forward")],
           med[("torch", "fwd + bwd")] - med[("torch", "forward")]),
          ("fwd + bwd", med[("jax", "fwd + bwd")], med[("torch", "fwd + bwd")]),
          ("optimizer (AdamW)", med[("jax", "optimizer")], med[("torch", "optimizer")]),
          ("whole step", med[("jax", "step")], med[("torch", "step")])]
  compiles = {"forward": comp["forward"], "fwd + bwd": comp["fwd + bwd"], "optimizer (AdamW)": comp["optimizer"],
              "whole step": comp["step"]}
  for name, a, b in rows:
    c = compiles.get(name)
    print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f} | {'' if c is None else f'{c:.1f}'} |")

  # ---------------------------------------------------------------- per-op profiles of fwd + bwd
  return _profiles(args, jax, j_grad, params, t_grad)


def _profiles(args, jax, j_grad, params, t_grad):
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(args.profile_runs):
      jax.block_until_ready(j_grad(params))
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    ev = json.load(gzip.open(files[-1]))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
  jself = jax_self_times(ev, args.profile_runs)
  jcls, tcls, tnames = collections.Counter(), collections.Counter(), collections.Counter()
  for (cls, _), v in jself.items():
    jcls[cls] += v
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(args.profile_runs):
      t_grad()
  for ka in prof.key_averages():
    if ka.key.startswith("aten::"):
      tnames[ka.key] += ka.self_cpu_time_total / 1e3 / args.profile_runs
      tcls[_torch_class(ka.key)] += ka.self_cpu_time_total / 1e3 / args.profile_runs
  print(f"\nfwd + bwd by op class, self time in ms per call ({args.profile_runs} profiled calls; JAX: XLA:CPU "
        f"thunk events of the jax.profiler trace, {sum(jcls.values()):.1f} ms; torch: self CPU time of aten "
        f"ops, {sum(tcls.values()):.1f} ms)\n")
  print("| op class | JAX ms | PyTorch ms | JAX / PyTorch |")
  print("|---|---:|---:|---:|")
  for k in sorted(set(jcls) | set(tcls), key=lambda k: -(jcls[k] + tcls[k])):
    print(f"| {k} | {jcls[k]:.1f} | {tcls[k]:.1f} | {jcls[k] / tcls[k] if tcls[k] else float('nan'):.2f} |")
  print(f"| total | {sum(jcls.values()):.1f} | {sum(tcls.values()):.1f} | "
        f"{sum(jcls.values()) / sum(tcls.values()):.2f} |")
  top = sorted(jself.items(), key=lambda kv: -kv[1])[:14]
  print("\nTop JAX thunks (class: name ms):", "; ".join(f"{c}: {n} {v:.1f}" for (c, n), v in top))
  print("Top torch ops (ms):", "; ".join(f"{k} {v:.1f}" for k, v in tnames.most_common(12)))


if __name__ == "__main__":
  main()
