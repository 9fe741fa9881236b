"""Paper-scale accelerator rows of issue 18: training throughput / MFU of latent DiffiT-XL/2 and DiT-XL/2, SD-1.5
512x512 DDIM-50 sampling with CFG, peak device memory, next to the PyTorch reference figures.

    python benchmarks/device.py                         # on a GPU / TPU host: every row, a few minutes
    python benchmarks/vs_pytorch.py --device            # the same
    python benchmarks/device.py --tiny                  # the same code path with tiny models (CPU, seconds)
    python benchmarks/device.py --rows dit --train_batch 256 --steps 10

Rows (bf16 compute; training keeps fp32 params and AdamW state, as the trainer does):
* `dit`, `diffit`: one training step of configs/dit_imagenet256.py / configs/diffit_imagenet256.py (DiT-XL/2
  675M, latent DiffiT-XL/2 561M) on 256 px ImageNet latents (32x32x4): the experiment's own loss (ADM hybrid:
  eps MSE + learned-range VLB, label dropout), gradient, AdamW, EMA update, jitted, state donated. Inputs
  are random latents of the right shape (cached latents: no VAE, no data pipeline in the step, as fast-DiT's
  pre-extracted features). images/s = batch / median step time; MFU = 3 x analytic forward FLOPs
  (`transformer_forward_flops`: 2 per multiply-add of every matmul / conv, attention included) x images/s /
  the device's dense bf16 peak (`PEAK_FLOPS` of benchmarks/train_step.py).
* `sd15`: SD-1.5 UNet (860M, random weights, bf16) sampling 512x512 images (64x64x4 latents), DDIM 50 steps,
  classifier-free guidance 7.5 batched as one 2B-row UNet call per step (`core.ddim_sample`, the whole loop in
  one jit); text embeddings are given (no CLIP encoder) and the VAE decoder is not run. images/s = batch /
  median loop time. FLOPs for its MFU come from the jaxpr of one UNet call (benchmarks/train_step.py
  `jaxpr_flops`) x steps.

Each row runs in its own subprocess (so "peak memory" is that row's: the allocator's peak_bytes_in_use on an
accelerator, the process peak RSS on a CPU) under a hard `--time_cap`; inside, warm-up steps follow the
compile (reported separately), then `--steps` timed steps, stopping early at 70% of the cap. A row that runs
out of memory is retried at half the batch. `--in_process` runs the rows in this process instead.
`--scan_blocks` runs DiT / DiffiT with their blocks as one `nn.scan` (`model.scan_blocks`: compiles one
block instead of 28).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

ROWS = ("dit", "diffit", "sd15")
ROW_TAG = "DEVICE_ROW_JSON "

# Published PyTorch figures the rows are read against (the README's anchors).
ANCHORS = (
    dict(row="dit", what="fast-DiT (PyTorch), DiT-XL/2 256 px, 1x A100, fp16 AMP + grad checkpointing + "
                         "pre-extracted latents, batch 128: 0.84 steps/s, 27.5 GB",
         images_per_s=0.84 * 128, mfu=None, device="A100", source="chuanyangjin/fast-DiT README"),
    dict(row="sd15", what="diffusers (torch 2.1, SDPA, fp16), SD-1.5 512x512, 50 steps, CFG 7.5, batch 1, "
                          "end to end (CLIP + UNet + VAE), A100 80GB SXM: 1.59 s/image",
         images_per_s=1 / 1.59, mfu=None, device="A100", source="fal-ai/stable-diffusion-benchmarks README"),
    dict(row="sd15", what="same, TensorRT 9.0 (CUDA graphs, static shapes): 0.82 s/image",
         images_per_s=1 / 0.82, mfu=None, device="A100", source="fal-ai/stable-diffusion-benchmarks README"),
)
A100_BF16_PEAK = 312e12


# ------------------------------------------------------------------------------------------------ FLOPs


def transformer_forward_flops(name: str, *, input_size: int, patch_size: int, in_channels: int,
                              hidden_size: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                              learn_sigma: bool = True, num_classes: int = 1000, window_size=None,
                              frequency_dim: int = 256, **unused) -> float:
  """Analytic FLOPs (2 per multiply-add) of one forward pass for ONE image of `models/dit.py` ("dit") or
  `models/diffit.py` DiffiTLatent ("diffit_latent"): every matmul and convolution, attention included;
  norms, activations, biases, softmax and embedding gathers are not counted (the usual MFU convention, as
  the DiT paper's Gflops, which count multiply-adds, i.e. half of this: DiT-XL/2 118.6 -> 237.2 GFLOP).

  Per image, N = (input_size / patch)^2 tokens of width D, MLP width r D:
    patch embed     2 N p^2 C_in D
    time embedder   2 (f D + D^2)                  (f = frequency_dim; the label embedder is a gather)
    per block       2 N D^2 (3 + 1 + 2 r)          qkv, proj, MLP
                    + 4 N S D                      QK^T and PV (S keys per query: N, or w^2 in windows)
                    dit: + 2 D (6 D)               adaLN-Zero modulation of c
                    diffit: + 2 D (3 D)            TMSA time-token projection (qkv_temb)
    head            dit: 2 D (2 D) + 2 N D p^2 C_out;  diffit: 2 N D p^2 C_out
  """
  del num_heads, num_classes, unused   # heads split D, they do not change the count
  if name not in ("dit", "diffit_latent"):
    raise ValueError(f"transformer_forward_flops knows 'dit' and 'diffit_latent', not {name!r}.")
  p, d = patch_size, hidden_size
  g = input_size // p
  n = g * g
  s = n if window_size is None else min(n, window_size * window_size)
  r = mlp_ratio
  c_out = in_channels * (2 if learn_sigma else 1)
  total = 2 * n * p * p * in_channels * d + 2 * (frequency_dim * d + d * d)
  block = 2 * n * d * d * (3 + 1 + 2 * r) + 4 * n * s * d
  block += 2 * d * 6 * d if name == "dit" else 2 * d * 3 * d
  total += depth * block
  total += 2 * n * d * p * p * c_out + (2 * d * 2 * d if name == "dit" else 0)
  return float(total)


def _train_step_module():
  spec = importlib.util.spec_from_file_location("benchmarks_train_step", os.path.join(ROOT, "benchmarks",
                                                                                       "train_step.py"))
  mod = sys.modules.get("benchmarks_train_step")
  if mod is None:
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_train_step"] = mod
    spec.loader.exec_module(mod)
  return mod


def peak_flops(dtype: str):
  """(dense peak FLOP/s of device 0 for `dtype`, where it came from); NaN for an unknown accelerator."""
  import jax
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return _train_step_module().measure_cpu_peak(512, 3), "measured: fp32 512^3 matmul"
  for (kind, dt), v in _train_step_module().PEAK_FLOPS.items():
    if kind.lower() in dev.device_kind.lower() and dt == dtype:
      return v, f"{kind} {dt} dense"
  return float("nan"), f"unknown device kind {dev.device_kind!r}"


# ------------------------------------------------------------------------------------------------ memory


def peak_memory():
  """(GiB, source): the device allocator's peak on an accelerator, else this process's peak RSS."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2 ** 30, "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "host RSS"


def _is_oom(e: BaseException) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


# ------------------------------------------------------------------------------------------------ rows


def _timed_steps(run, steps: int, deadline: float):
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
    if time.perf_counter() > deadline:
      break
  return times


def _train_config(row: str, tiny: bool, dtype: str, scan_blocks: bool = False):
  path = os.path.join(ROOT, "configs", "dit_imagenet256.py" if row == "dit" else "diffit_imagenet256.py")
  spec = importlib.util.spec_from_file_location(f"device_bench_{row}_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  # Latents given directly (as cached latents): the "VAE" is only named so that no VAE weights are needed.
  c.latent.vae, c.latent.cache, c.latent.factor, c.latent.scale_factor = "space_to_depth", False, 8, 1.0
  c.dtype = dtype
  c.eval.fid_feature = "none"
  if tiny:
    c.model.update(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)
  c.model.scan_blocks = bool(scan_blocks)
  return c


def train_step_fn(exp, tx):
  """(params, opt, ema), batch, rng -> new state, loss: the experiment's loss, gradient, AdamW, EMA 0.9999."""
  import jax
  import optax

  def step(state, batch, rng):
    params, opt, ema = state
    (loss, _), g = jax.value_and_grad(lambda p: exp.loss(p, {}, {}, batch, rng, 0), has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
    ema = jax.tree.map(lambda e, p: e + (1 - 0.9999) * (p - e), ema, params)
    return (params, opt, ema), loss

  return step


def row_train(row: str, args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from diffusion_jax.experiments.base import get_experiment
  from diffusion_jax.models import attention as attn_lib
  t_start = time.perf_counter()
  deadline = t_start + 0.7 * args.time_cap
  config = _train_config(row, args.tiny, args.dtype, args.scan_blocks)
  mc = dict(config.model)
  exp = get_experiment(config)
  s, c = int(mc["input_size"]), int(mc["in_channels"])
  batch_size = args.train_batch or (2 if args.tiny else 128)
  fwd = transformer_forward_flops(mc["name"], **{k: v for k, v in mc.items() if k not in ("name", "scan_blocks")})
  n_params = None
  while True:
    try:
      rng = np.random.RandomState(0)
      moments = np.concatenate([rng.randn(batch_size, s, s, c), np.full((batch_size, s, s, c), -30.0)], -1)
      batch = {"moments": jnp.asarray(moments, jnp.float32),
               "label": jnp.asarray(rng.randint(0, int(mc["num_classes"]), batch_size), jnp.int32)}
      model = exp.model
      x1 = jnp.zeros((1, s, s, c), jnp.float32)
      params = jax.jit(lambda k: model.init(k, x1, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"])(
          jax.random.key(0))
      n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
      tx = optax.adamw(1e-4, weight_decay=0.0)
      state = (params, tx.init(params), jax.tree.map(jnp.copy, params))
      step = train_step_fn(exp, tx)
      t0 = time.perf_counter()
      compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batch, jax.random.key(0)).compile()
      compile_s = time.perf_counter() - t0
      holder = [state, 0]

      def run():
        holder[0], loss = compiled(holder[0], batch, jax.random.key(holder[1]))
        holder[1] += 1
        loss.block_until_ready()

      for _ in range(args.warmup):
        run()
      times = _timed_steps(run, args.steps, deadline)
      break
    except Exception as e:  # pylint: disable=broad-except
      if _is_oom(e) and batch_size > 1:
        print(f"[{row}] out of memory at batch {batch_size}; retrying at {batch_size // 2}", file=sys.stderr,
              flush=True)
        batch_size //= 2
        state = holder = compiled = None
        continue
      raise
  step_s = statistics.median(times)
  mem, mem_src = peak_memory()
  label = "DiT-XL/2" if row == "dit" else "DiffiT-XL/2 (latent)"
  if args.tiny:
    label = f"tiny {label.split()[0].split('-')[0]} (D={mc['hidden_size']}, depth {mc['depth']})"
  tokens = (s // int(mc["patch_size"])) ** 2
  impl = attn_lib.resolve(None, (batch_size, tokens, int(mc["num_heads"]), 0), tokens)
  label += ", scanned blocks" if args.scan_blocks else ""
  return dict(row=row, label=f"{label} train step, {s}x{s}x{c} latents", batch=batch_size, seconds=step_s,
              images_per_s=batch_size / step_s, flops_per_image=3 * fwd, compile_s=compile_s,
              timed=len(times), peak_gib=mem, mem_source=mem_src, params_m=n_params / 1e6,
              attention=impl, wall_s=time.perf_counter() - t_start)


def row_sd15(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from diffusion_jax import core
  from diffusion_jax.models.unet import (UNet2DConditionModel, abstract_unet_params, sd15_unet_config,
                                         tiny_unet_config)
  t_start = time.perf_counter()
  deadline = t_start + 0.7 * args.time_cap
  cfg = tiny_unet_config(sample_size=8) if args.tiny else sd15_unet_config()
  hw = 8 if args.tiny else 64
  steps = args.sample_steps or (3 if args.tiny else 50)
  dtype = jnp.dtype(args.dtype)
  model = UNet2DConditionModel(cfg, dtype=dtype)
  shapes = abstract_unet_params(cfg)
  leaves, treedef = jax.tree.flatten(shapes)
  # Random weights made on the host (one compile-free pass; 860M normals take seconds), in the compute dtype.
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(treedef, [
      jax.device_put((rng.standard_normal(a.shape, np.float32) / np.float32(
          math.sqrt(math.prod(a.shape[:-1]) if len(a.shape) > 1 else a.shape[0]))).astype(dtype))
      for a in leaves])
  n_params = sum(int(np.prod(a.shape)) for a in leaves)
  sched = core.make_schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
  batch_size = args.sample_batch or (1 if args.tiny else 8)
  ctx_len, ctx_dim = 77, cfg.cross_attention_dim
  while True:
    try:
      r = np.random.default_rng(0)
      x = jnp.asarray(r.standard_normal((batch_size, hw, hw, 4)), jnp.float32)
      ctx = jnp.asarray(r.standard_normal((batch_size, ctx_len, ctx_dim)), dtype)
      uctx = jnp.asarray(r.standard_normal((batch_size, ctx_len, ctx_dim)), dtype)

      def sample(p, x, c, u):
        fn = lambda x, t, c: model.apply({"params": p}, x.astype(dtype), t, c).astype(jnp.float32)
        return core.ddim_sample(fn, x, num_steps=steps, schedule=sched, cond=c, uncond=u, guidance_scale=7.5,
                                steps_offset=1, set_alpha_to_one=False)

      t0 = time.perf_counter()
      compiled = jax.jit(sample).lower(params, x, ctx, uctx).compile()
      compile_s = time.perf_counter() - t0
      run = lambda: compiled(params, x, ctx, uctx).block_until_ready()
      for _ in range(max(1, args.warmup - 1)):
        run()
      times = _timed_steps(run, max(2, args.steps // 2), deadline)
      break
    except Exception as e:  # pylint: disable=broad-except
      if _is_oom(e) and batch_size > 1:
        print(f"[sd15] out of memory at batch {batch_size}; retrying at {batch_size // 2}", file=sys.stderr,
              flush=True)
        batch_size //= 2
        compiled = None
        continue
      raise
  mem, mem_src = peak_memory()
  # FLOPs of one (cond + uncond) UNet call, from its jaxpr, x steps.
  jaxpr_flops = _train_step_module().jaxpr_flops
  sd = lambda a: jax.ShapeDtypeStruct(a.shape, dtype)
  unet_call = jax.make_jaxpr(lambda p, x, t, c: model.apply({"params": p}, x, t, c))(
      jax.tree.map(sd, shapes), jax.ShapeDtypeStruct((2, hw, hw, 4), dtype), jax.ShapeDtypeStruct((2,), jnp.int32),
      jax.ShapeDtypeStruct((2, ctx_len, ctx_dim), dtype))
  per_image = jaxpr_flops(unet_call.jaxpr) / 2 * 2 * steps   # a 2-row call is one image with CFG
  sample_s = statistics.median(times)
  label = "tiny UNet" if args.tiny else "SD-1.5 UNet"
  return dict(row="sd15", label=f"{label} DDIM-{steps} + CFG 7.5, {hw * 8}x{hw * 8} ({hw}x{hw}x4 latents)",
              batch=batch_size, seconds=sample_s, images_per_s=batch_size / sample_s, flops_per_image=per_image,
              compile_s=compile_s, timed=len(times), peak_gib=mem, mem_source=mem_src, params_m=n_params / 1e6,
              wall_s=time.perf_counter() - t_start)


def run_row(name: str, args) -> dict:
  if name in ("dit", "diffit"):
    return row_train(name, args)
  if name == "sd15":
    return row_sd15(args)
  raise ValueError(f"Unknown device row {name!r}; valid: {', '.join(ROWS)}.")


# ------------------------------------------------------------------------------------------------ driver


def _child_cmd(name: str, args):
  cmd = [sys.executable, os.path.abspath(__file__), "--_row", name, "--dtype", args.dtype, "--steps",
         str(args.steps), "--warmup", str(args.warmup), "--time_cap", str(args.time_cap), "--attention",
         args.attention] + (["--scan_blocks"] if args.scan_blocks else [])
  for flag in ("train_batch", "sample_batch", "sample_steps"):
    if getattr(args, flag):
      cmd += [f"--{flag}", str(getattr(args, flag))]
  return cmd + (["--tiny"] if args.tiny else [])


def run_in_child(name: str, args) -> dict:
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # one row per process: let it use the device
  try:
    proc = subprocess.run(_child_cmd(name, args), capture_output=True, text=True, timeout=args.time_cap, env=env)
  except subprocess.TimeoutExpired:
    return dict(row=name, label=name, error=f"stopped at the time cap ({args.time_cap:.0f} s)")
  for line in proc.stdout.splitlines():
    if line.startswith(ROW_TAG):
      return json.loads(line[len(ROW_TAG):])
  tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
  return dict(row=name, label=name, error=f"exit {proc.returncode}: {tail[:200]}")


def format_table(results, peak, peak_src, args) -> str:
  import jax
  dev = jax.devices()[0]
  lines = [f"Device: {dev.platform} / {dev.device_kind} (x{jax.device_count()}), JAX {jax.__version__}, "
           f"{args.dtype}, attention={args.attention}; peak {peak / 1e12:.1f} TFLOP/s ({peak_src}); "
           f"host {platform.machine()} {os.cpu_count()} cores, load average "
           f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
           "",
           "| row | batch | time | images/s | model TFLOP/s | MFU | peak memory | compile s | timed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['label']} | | | | | | | | {r['error']} |")
      continue
    tflops = r["flops_per_image"] * r["images_per_s"] / 1e12
    mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if math.isfinite(peak) else "n/a"
    unit = "step" if r["row"] != "sd15" else "sample"
    lines.append(f"| {r['label']} ({r['params_m']:.1f}M) | {r['batch']} | {r['seconds'] * 1e3:.1f} ms / {unit} | "
                 f"{r['images_per_s']:.2f} | {tflops:.2f} | {mfu} | {r['peak_gib']:.2f} GiB ({r['mem_source']}) | "
                 f"{r['compile_s']:.1f} | {r['timed']} |")
  lines += ["", "PyTorch references (the README's anchors):", "",
            "| reference | images/s | MFU | on this device at the reference's MFU |", "|---|---:|---:|---:|"]
  by_row = {r["row"]: r for r in results if "error" not in r}
  for a in ANCHORS:
    r = by_row.get(a["row"])
    mfu = at_mfu = ""
    if r is not None:
      a_mfu = a["images_per_s"] * r["flops_per_image"] / A100_BF16_PEAK
      mfu = f"{100 * a_mfu:.1f}%"
      if math.isfinite(peak) and not args.tiny:
        at_mfu = f"{a_mfu * peak / r['flops_per_image']:.2f} images/s"
    lines.append(f"| {a['what']} ({a['source']}) | {a['images_per_s']:.2f} | {mfu} | {at_mfu} |")
  lines += ["", "MFU = model FLOPs (3 x analytic forward for training; jaxpr count x steps for sampling) x images/s "
            "/ peak; the references' MFU uses the same FLOPs and the A100's 312 TFLOP/s (bf16/fp16 dense)."]
  if args.tiny:
    lines += ["(--tiny: tiny models on this host; the figures say nothing about speed.)"]
  return "\n".join(lines)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
  ap.add_argument("--tiny", action="store_true", help="tiny models (CPU, seconds): proves the code path runs")
  ap.add_argument("--dtype", default="bfloat16", help="compute dtype (training params stay float32)")
  ap.add_argument("--train_batch", type=int, default=0, help="DiT / DiffiT batch (default 128; tiny 2)")
  ap.add_argument("--sample_batch", type=int, default=0, help="SD-1.5 images per sampling run (default 8; tiny 1)")
  ap.add_argument("--sample_steps", type=int, default=0, help="DDIM steps (default 50; tiny 3)")
  ap.add_argument("--steps", type=int, default=6, help="timed train steps (sampling: half as many runs, >= 2)")
  ap.add_argument("--warmup", type=int, default=2, help="steps run after compiling, before timing")
  ap.add_argument("--time_cap", type=float, default=200.0, help="seconds per row, compile included (hard in a "
                  "subprocess; timing stops at 70%% of it)")
  ap.add_argument("--attention", default="auto", help="attention implementation (models/attention.py)")
  ap.add_argument("--scan_blocks", action="store_true", help="DiT / DiffiT blocks as one nn.scan (compiles "
                  "one block instead of 28)")
  ap.add_argument("--in_process", action="store_true", help="run the rows in this process (peak memory is then "
                  "the maximum so far, not per row)")
  ap.add_argument("--_row", default="", help=argparse.SUPPRESS)
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  from diffusion_jax.models import attention as attn_lib
  attn_lib.set_default(args.attention)
  if args._row:
    print(ROW_TAG + json.dumps(run_row(args._row, args)), flush=True)
    return None
  rows = [r for r in args.rows.split(",") if r]
  bad = sorted(set(rows) - set(ROWS))
  if bad:
    raise SystemExit(f"Unknown --rows {bad}; valid: {', '.join(ROWS)}.")
  results = []
  for name in rows:
    t0 = time.perf_counter()
    r = run_row(name, args) if args.in_process else run_in_child(name, args)
    results.append(r)
    print(f"[done] {name} in {time.perf_counter() - t0:.0f} s{(': ' + r['error']) if 'error' in r else ''}",
          file=sys.stderr, flush=True)
  peak, peak_src = peak_flops(args.dtype)
  print("\n" + format_table(results, peak, peak_src, args), flush=True)
  return results


if __name__ == "__main__":
  main()
