"""CoDi benchmark: sample latency of 4-step CoDi vs 50-step DDIM of the same base (same batch, one jit each,
compile excluded, median of --repeats), and the train-step time of CoDi and PE-CoDi (loss + gradient, jitted).

    python scripts/codi_benchmark.py --base runs/sd_shapes/export [--batch 16] [--repeats 5]

The paper (codi.md A5): 107 ms vs 977 ms on TPUv5 (9.1x). Prints one JSON line; state the machine and its load.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _time(fn, repeats):
  import jax
  jax.block_until_ready(fn())  # compile + warm
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  ts.sort()
  return ts[len(ts) // 2]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--base", required=True)
  ap.add_argument("--task", default="sr")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "codi_benchmark_cache"))
  a = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from configs import codi_shapes
  from diffusion_jax.core import samplers
  from diffusion_jax.experiments import codi as C
  from diffusion_jax.experiments.base import get_experiment

  res = {"batch": a.batch, "devices": str(jax.devices()[0]), "load": os.getloadavg()[0]}
  for adapter in ("codi", "pe"):
    cfg = codi_shapes.get_config(a.task + (",pe" if adapter == "pe" else ""))
    cfg.stages.pipeline.path = a.base
    cfg.data.cache_dir = a.cache_dir
    cfg.data.num_train = cfg.data.num_test = max(a.batch, 16)
    cfg.data.batch_size = a.batch
    exp = get_experiment(cfg, stages={"pipeline": a.base})
    frozen = jax.tree.map(jnp.asarray, exp.load_frozen())
    batch = next(iter(exp.make_dataset("train", seed=0)))
    params = jax.jit(exp.init)(jax.random.PRNGKey(0), batch, frozen)
    step = jax.jit(jax.value_and_grad(
        lambda p, b, r: exp.loss(p, frozen, {"target": p, "ema": p}, b, r, 0), has_aux=True))
    res[f"train_step_s_{adapter}"] = _time(lambda: step(params, batch, jax.random.PRNGKey(1)), a.repeats)
    if adapter == "codi":
      ids, cond = batch["ids"], batch["cond"]
      x_T = jax.random.normal(jax.random.PRNGKey(2), (a.batch,) + exp.latent_shape)
      res["codi_4step_s"] = _time(lambda: exp.sample_images(params, frozen, ids, cond, None, x_T=x_T,
                                                            sampler="consistency", steps=4, guidance=1.0), a.repeats)
      sched, opts = exp.schedule_settings("ddim")
      schedule = exp.schedule
      text_module, unet, patch = exp.host.text_module, exp.unet, int(getattr(exp, "pixel_patch", 1))

      @jax.jit
      def base50(base_params, text, ids, x_T):
        from diffusion_jax.experiments import text_to_image as t2i
        ctx = t2i._text_states(text_module, text, ids)
        fn = jax.tree_util.Partial(functools.partial(C._base_apply, unet), base_params)
        x = samplers.sample("ddim", fn, x_T, num_steps=50, schedule=schedule,
                            prediction_type=sched["prediction_type"], cond={"ctx": ctx}, **opts)
        if patch > 1:
          x = t2i.from_model_space(x, patch)
        return jnp.clip(x / 2 + 0.5, 0, 1)

      res["base_50step_ddim_s"] = _time(lambda: base50(frozen["unet"], frozen["text"], jnp.asarray(ids), x_T),
                                        a.repeats)
      res["ratio"] = res["base_50step_ddim_s"] / res["codi_4step_s"]
  res["load_after"] = os.getloadavg()[0]
  print(json.dumps(res))
  return res


if __name__ == "__main__":
  main()
