"""The CoDi shapes-world table: CoDi (1/2/4 steps), PE-CoDi (1/2/4), the undistilled conditional baseline (4 / 50
DDIM, 4 DPM-Solver++) and the paper's two ablations, on one base, several seeds, one command:

    python scripts/codi_shapes_table.py --base runs/sd_shapes/export --task sr --seeds 0,1,2 \
        --workdir runs/codi_table [--steps 1500] [--variants codi,pe,diffusion,no_consistency,true_eps] \
        [--shapes_fd runs/shapes_fd/net32.safetensors]

Each (variant, seed) is a normal run of `configs/codi_shapes.py:<task>,<variant words>` in
WORKDIR/<task>/<variant>/seed<k> (a run trained and evaluated with the same steps and shapes-FD setting is read
from its eval_results.json, an interrupted one resumes); the table (mean +- std
over seeds of pixel MSE, PSNR, the parser's scores and, with --shapes_fd, the shapes FD of the outputs to the
ground truth, with its real-vs-real floor at the same count) is printed and written to WORKDIR/<task>/table.md,
the raw numbers to WORKDIR/<task>/results.json; both are rewritten after every finished run, so an interrupted
table is readable (the seeds each row has are in its "n" column).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

VARIANT_WORDS = {"codi": "", "pe": "pe", "diffusion": "diffusion", "pe_diffusion": "pe,diffusion",
                 "no_consistency": "no_consistency", "true_eps": "true_eps", "base_ode": "base_ode"}
METRICS = ("pixel_mse", "psnr", "shapes_fd", "class_accuracy", "binding", "shape_recall", "colour_recall",
           "count_accuracy")
FORMATS = {"pixel_mse": "{:.4f}", "psnr": "{:.2f}", "shapes_fd": "{:.1f}"}  # the parser's scores: {:.3f}
SETTING = re.compile(r"^(consistency|ddim|dpmpp_2m)(\d+)_(.+)$")


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
  done = _evaluated(wd, cfg)
  if done is not None:
    return done
  out = stages.run(cfg, wd)
  return {k[len("eval/"):]: v for k, v in out.items() if k.startswith("eval/")}


def _evaluated(wd, cfg):
  """The results of a run already trained to cfg.train.num_steps and evaluated with the same settings (its
  eval_results.json, exported), else None. Delete that file to evaluate again."""
  p = os.path.join(wd, "eval_results.json")
  if not (os.path.exists(p) and os.path.isdir(os.path.join(wd, "export"))):
    return None
  with open(p) as f:
    res = json.load(f)
  if int(res.pop("step", -1)) != int(cfg.train.num_steps):
    return None
  want_fd = bool(cfg.eval.get("shapes_fd_path", ""))
  if want_fd != ("real_shapes_fd" in res):
    return None
  return res


def _cell(metric, vals):
  vals = [float(v) for v in vals if v is not None and np.isfinite(v)]
  if not vals:
    return "-"
  f = FORMATS.get(metric, "{:.3f}")
  return f"{f.format(np.mean(vals))} ± {f.format(np.std(vals))}"


def table(results):
  """Markdown: one row per (variant, sampler:steps), mean ± std (population std) over the seeds run so far."""
  rows = []
  for variant, per_seed in results.items():
    keys = sorted({(m.group(1), int(m.group(2))) for r in per_seed for k in r for m in [SETTING.match(k)] if m})
    for sampler, steps in keys:
      s = f"{sampler}{steps}"
      cells = [_cell(m, [r.get(f"{s}_{m}") for r in per_seed]) for m in METRICS]
      rows.append(f"| {variant} | {sampler}:{steps} | {len(per_seed)} | " + " | ".join(cells) + " |")
  head = ("| variant | sampler:steps | n | " + " | ".join(METRICS) + " |\n|" + "---|" * (len(METRICS) + 3))
  lines = [head] + rows
  all_runs = [r for per_seed in results.values() for r in per_seed]
  floor = [r["real_shapes_fd"] for r in all_runs if "real_shapes_fd" in r]
  if floor:
    n = sorted({int(r["shapes_fd_num"]) for r in all_runs if "shapes_fd_num" in r})
    lines.append(f"\nshapes FD floor (real train-split images vs the same ground truth, n = {n}): "
                 f"{float(floor[0]):.1f} (the same two sets and network for every run)")
  status = sorted({r["shapes_fd_status"] for r in all_runs if "shapes_fd_status" in r})
  if status:
    lines.append("\nshapes FD: " + "; ".join(status))
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--base", required=True, help="the sd_shapes export (a diffusers pipeline directory)")
  ap.add_argument("--task", default="sr", choices=("sr", "depth", "edge", "inpaint"))
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--variants", default="codi,pe,diffusion,no_consistency,true_eps")
  ap.add_argument("--steps", type=int, default=0, help="training steps (0: the config's)")
  ap.add_argument("--shapes_fd", default="", help="ShapesNet weights (scripts/shapes_fd.py train): the shapes FD "
                  "column (config.eval.shapes_fd_path); empty: not computed")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--set", action="append", default=[], help="extra config override key=value (repeatable)")
  a = ap.parse_args(argv)
  extra = dict(kv.split("=", 1) for kv in a.set)
  if a.shapes_fd:
    extra["eval.shapes_fd_path"] = a.shapes_fd
  out_dir = os.path.join(a.workdir, a.task)
  os.makedirs(out_dir, exist_ok=True)
  results = {}
  md = ""
  for seed in a.seeds.split(","):  # seed-major: after each seed every variant has a row
    for variant in a.variants.split(","):
      t0 = time.time()
      r = run_one(a.task, variant, int(seed), a.base, a.workdir, a.steps, extra)
      r.update(seed=int(seed), wall_s=round(time.time() - t0, 1))
      results.setdefault(variant, []).append(r)
      md = table(results)
      with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(md + "\n")
      with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
      print(f"[codi table] {a.task} {variant} seed {seed}: {r['wall_s']} s", flush=True)
  print(md)


if __name__ == "__main__":
  main()
