"""Text-to-image sampling throughput: the project's jitted pipeline (text encoder + whole sampler loop with batched
classifier-free guidance + VAE decoder in one jit) against diffusers' `StableDiffusionPipeline` (PyTorch) with the
same weights, prompts and initial latents, and the shapes base (a trained `configs/sd_shapes.py` export, JAX only).

    python benchmarks/t2i_sampling.py --tiny                        # a tiny random SD pipeline made here
    python benchmarks/t2i_sampling.py --pipeline /path/to/sd-pipeline --image_size 512 --batch 8 --bf16
    python benchmarks/t2i_sampling.py --shapes runs/sd_shapes/export   # the shapes base, images/s

For each step count (25, 50) the two pipelines and one batched (cond + uncond) UNet call of each are timed in
interleaved rounds (JAX loop, PyTorch loop, JAX UNet, PyTorch UNet, ...) after a warm-up; the tables give the
best round (the least disturbed by other load on the machine), images/s and the ratio. "Step / UNet call" is
(loop time / steps) over one UNet call: what a sampler step costs beyond the network (text encoder and VAE
decoder included, spread over the steps). torch and
diffusers come from the `test` extra; the package never imports them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests", "experiments")):
  if p not in sys.path:
    sys.path.insert(0, p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

PROMPTS = ("a large red circle left of a small blue square", "a green triangle above a small white cross",
           "a small cyan diamond", "a large yellow square below a small magenta circle")


def _prompts(n):
  return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def _best_time(fn, rounds):
  return min(_timed(fn) for _ in range(rounds))


def _timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _experiment(config, pipeline_dir):
  from diffusion_jax.experiments.base import get_experiment
  exp = get_experiment(config, stages={"pipeline": pipeline_dir})
  frozen = jax.tree.map(jnp.asarray, exp.load_frozen())
  params = jax.tree.map(jnp.asarray, exp.load_params(None))
  return exp, frozen, params


def _unet_call(exp, params, frozen, batch):
  """One batched (cond + uncond) UNet evaluation, jitted."""
  from diffusion_jax.experiments.text_to_image import _unet_fn
  h, w, c = exp.latent_shape
  x = jnp.ones((2 * batch, h, w, c))
  t = jnp.full((2 * batch,), 500.0)
  ctx = jnp.ones((2 * batch, exp.host.max_length, exp.unet_config.cross_attention_dim))
  f = jax.jit(lambda p, x, t, ctx: _unet_fn(exp.unet, p, x, t, ctx))
  f(params, x, t, ctx).block_until_ready()
  return lambda: f(params, x, t, ctx).block_until_ready()


def bench_vs_diffusers(pipeline_dir, config, batch, steps_list, rounds, sampler, guidance):
  import diffusers
  import torch
  exp, frozen, params = _experiment(config, pipeline_dir)
  h, w, c = exp.latent_shape
  prompts = _prompts(batch)
  ids = exp.host.tokenize(prompts)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
  pipe.set_progress_bar_config(disable=True)
  cls = getattr(diffusers, {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                            "euler": "EulerDiscreteScheduler"}[sampler])
  pipe.scheduler = cls.from_config(pipe.scheduler.config)
  lat = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0))
  x_T = jnp.asarray(lat.numpy().transpose(0, 2, 3, 1))
  size = exp.image_size
  rows = []
  unet_jax = _unet_call(exp, params, frozen, batch)
  with torch.no_grad():
    emb = torch.ones(2 * batch, exp.host.max_length, exp.unet_config.cross_attention_dim)
    xt = torch.ones(2 * batch, c, h, w)

    def unet_torch():
      with torch.no_grad():
        pipe.unet(xt, 500, emb)
    unet_torch()
  for steps in steps_list:
    def run_jax():
      np.asarray(exp.sample_images(params, frozen, ids, jax.random.PRNGKey(0), x_T=x_T, sampler=sampler,
                                   steps=steps, guidance=guidance))

    def run_torch():
      with torch.no_grad():
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, latents=lat.clone(),
             output_type="np", height=size, width=size)

    t0 = time.perf_counter()
    run_jax()
    compile_s = time.perf_counter() - t0
    run_torch()
    times = {"jax": [], "torch": [], "unet_jax": [], "unet_torch": []}
    for _ in range(rounds):
      for name, fn in (("jax", run_jax), ("torch", run_torch), ("unet_jax", unet_jax), ("unet_torch", unet_torch)):
        times[name].append(_timed(fn))
    mj, mt, uj, ut = (min(times[k]) for k in ("jax", "torch", "unet_jax", "unet_torch"))
    rows.append((steps, batch / mj, batch / mt, mt / mj, mj / steps / uj, mt / steps / ut, compile_s, uj, ut))
  return rows


def bench_shapes(export_dir, batch, steps_list, rounds, guidance):
  from configs import sd_shapes
  cfg = sd_shapes.get_config()
  del cfg.model["pixel_patch"]  # read from the export
  del cfg.model["unet"]  # the export's unet/config.json and weights
  exp, frozen, params = _experiment(cfg, export_dir)
  ids = exp.host.tokenize(_prompts(batch))
  unet = _unet_call(exp, params, frozen, batch)
  rows = []
  for steps in steps_list:
    def run():
      np.asarray(exp.sample_images(params, frozen, ids, jax.random.PRNGKey(0), sampler="ddim", steps=steps,
                                   guidance=guidance))
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    loop, call = [], []
    for _ in range(rounds):
      loop.append(_timed(run))
      call.append(_timed(unet))
    m, u = min(loop), min(call)
    rows.append((steps, batch / m, m / steps / u, compile_s, u))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pipeline", default="", help="a diffusers SD pipeline directory")
  p.add_argument("--tiny", action="store_true", help="make a tiny random SD pipeline (tests' sizes) and use it")
  p.add_argument("--shapes", default="", help="a configs/sd_shapes.py export directory (JAX only)")
  p.add_argument("--config", default="sd15", choices=("sd15", "sd21"))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", default="25,50")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--sampler", default="ddim", choices=("ddim", "dpmpp_2m", "euler"))
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--image_size", type=int, default=0)
  p.add_argument("--bf16", action="store_true")
  a = p.parse_args(argv)
  steps_list = [int(s) for s in a.steps.split(",")]
  import torch
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} "
        f"({jax.devices()[0].device_kind}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.1f}")
  if a.shapes:
    rows = bench_shapes(a.shapes, a.batch, steps_list, a.rounds, 3.0)
    print(f"\nShapes base ({a.shapes}), batch {a.batch}, DDIM, CFG 3\n")
    print("| steps | images/s | step / UNet call | one batched UNet call, ms | compile s |\n|---|---|---|---|---|")
    for steps, ips, per, comp, u in rows:
      print(f"| {steps} | {ips:.2f} | {per:.2f} | {u * 1e3:.1f} | {comp:.1f} |")
  if a.tiny or a.pipeline:
    from configs import sd15, sd21
    mod = sd15 if a.config == "sd15" else sd21
    cfg = mod.get_config("tiny" if a.tiny else None)
    if a.image_size:
      cfg.data.image_size = a.image_size
    if a.bf16:
      cfg.dtype = "bfloat16"
    cfg.diffusion.prediction_type = ""  # the pipeline's
    with tempfile.TemporaryDirectory() as tmp:
      d = a.pipeline
      if a.tiny:
        import sd_testlib
        d = sd_testlib.make_tiny_pipeline(tmp, prediction_type="epsilon")
      rows = bench_vs_diffusers(d, cfg, a.batch, steps_list, a.rounds, a.sampler, a.guidance)
    print(f"\n{'tiny random' if a.tiny else d} SD pipeline, batch {a.batch}, {a.sampler}, CFG {a.guidance}, "
          f"{cfg.data.image_size}px, {cfg.get('dtype', 'float32')}\n")
    print("| steps | JAX images/s | PyTorch images/s | JAX speed-up | JAX step / UNet call | PyTorch step / UNet "
          "call | UNet call JAX / PyTorch, ms | JAX compile s |\n|---|---|---|---|---|---|---|---|")
    for steps, ij, it, ratio, pj, pt, comp, uj, ut in rows:
      print(f"| {steps} | {ij:.2f} | {it:.2f} | {ratio:.2f}x | {pj:.2f} | {pt:.2f} | {uj * 1e3:.1f} / {ut * 1e3:.1f} "
            f"| {comp:.1f} |")


if __name__ == "__main__":
  main()
