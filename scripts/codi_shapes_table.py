"""The CoDi shapes-world table: CoDi (1/2/4 steps), PE-CoDi (1/2/4), the undistilled conditional baseline (4 / 50
DDIM, 4 DPM-Solver++) and the paper's two ablations, on one base, several seeds, one command:

    python scripts/codi_shapes_table.py --base runs/sd_shapes/export --task sr --seeds 0,1,2 \
        --workdir runs/codi_table [--steps 1500] [--variants codi,pe,diffusion,no_consistency,true_eps]

Each (variant, seed) is a normal run of `configs/codi_shapes.py:<task>,<variant words>` in
WORKDIR/<task>/<variant>/seed<k> (a finished run is reused, an interrupted one resumes); the table (mean +- std
over seeds of pixel MSE, PSNR and the parser's scores) is printed and written to WORKDIR/<task>/table.md, the raw
numbers to WORKDIR/<task>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

VARIANT_WORDS = {"codi": "", "pe": "pe", "diffusion": "diffusion", "pe_diffusion": "pe,diffusion",
                 "no_consistency": "no_consistency", "true_eps": "true_eps", "base_ode": "base_ode"}
METRICS = ("pixel_mse", "psnr", "class_accuracy", "binding", "shape_recall", "colour_recall", "count_accuracy")


def run_one(task, variant, seed, base, workdir, steps, extra):
  from configs import codi_shapes
  from diffusion_jax import stages
  words = ",".join(w for w in (task, VARIANT_WORDS[variant]) if w)
  cfg = codi_shapes.get_config(words)
  cfg.seed = int(seed)
  cfg.stages.pipeline.path = base
  if steps:
    cfg.train.num_steps = int(steps)
  if cfg.codi.objective == "codi":
    cfg.eval.settings = ["consistency:1", "consistency:2", "consistency:4"]
  for k, v in extra.items():
    node = cfg
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = type(node[last])(v) if node[last] is not None else v
  wd = os.path.join(workdir, task, variant, f"seed{seed}")
  out = stages.run(cfg, wd)
  return {k[len("eval/"):]: v for k, v in out.items() if k.startswith("eval/")}


def table(results):
  rows = []
  for variant, per_seed in results.items():
    settings = sorted({_setting(k) for r in per_seed for k in r})
    for s in settings:
      cells = []
      for m in METRICS:
        vals = [r.get(f"{s}_{m}") for r in per_seed]
        vals = [v for v in vals if v is not None and np.isfinite(v)]
        cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "-")
      rows.append(f"| {variant} | {s} | " + " | ".join(cells) + " |")
  head = "| variant | sampler:steps | " + " | ".join(METRICS) + " |\n|" + "---|" * (len(METRICS) + 2)
  return head + "\n" + "\n".join(rows)


def _setting(key):
  for m in sorted(METRICS + ("relation_accuracy", "binding_given_shape", "scene_binding"), key=len, reverse=True):
    if key.endswith("_" + m):
      return key[:-len(m) - 1]
  return key


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--base", required=True, help="the sd_shapes export (a diffusers pipeline directory)")
  ap.add_argument("--task", default="sr", choices=("sr", "depth", "edge", "inpaint"))
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--variants", default="codi,pe,diffusion,no_consistency,true_eps")
  ap.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--set", action="append", default=[], help="extra config override key=value (repeatable)")
  a = ap.parse_args(argv)
  extra = dict(kv.split("=", 1) for kv in a.set)
  results = {}
  for variant in a.variants.split(","):
    results[variant] = [run_one(a.task, variant, int(s), a.base, a.workdir, a.steps, extra)
                        for s in a.seeds.split(",")]
  md = table(results)
  os.makedirs(os.path.join(a.workdir, a.task), exist_ok=True)
  with open(os.path.join(a.workdir, a.task, "table.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(a.workdir, a.task, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(md)


if __name__ == "__main__":
  main()
