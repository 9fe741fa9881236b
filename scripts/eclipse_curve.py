"""ECLIPSE vs the projection-only prior vs the CLIP text embedding, over training-set sizes (shapes world).

    python scripts/eclipse_curve.py --workdir runs/eclipse_curve [--sizes 1000,3000,10000,20000] [--seeds 0,1]
        [--objectives projection,eclipse] [--variant gap|clean|tiny] [--clip-workdir DIR --cache DIR] [--set key=value ...]
        [--plot docs/images/eclipse_curve.png]

One shapes CLIP (stage `clip` of `configs/eclipse_prior.py`, trained once in DIR/clip unless `--clip-workdir`
names a finished one) and one embedding cache (DIR/cache) are shared by every prior. Each (size, objective,
seed) prior trains on the first `size` cached training pairs (`config.data.train_subset`) in
DIR/n<size>/<objective>_seed<k>, with the same architecture and the same number of steps (equal compute:
smaller sets are seen for more epochs). Finished runs are reused. Writes DIR/curve.md, DIR/curve.json and the
plot (R@1 and position binding against the number of training pairs, mean and sample std over seeds, the
text-embedding reference as a dashed line), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

METRICS = (("R@1", "R@1"), ("R@5", "R@5"), ("cosine", "cos"), ("binding_colour", "bind. colour"),
           ("binding_position", "bind. position"))
NAMES = {"projection": "Projection (λ = 0)", "eclipse": "ECLIPSE (λ = 0.2)", "diffusion": "Diffusion-Baseline"}


def _stats(vals):
  vals = np.asarray([v for v in vals if v is not None and np.isfinite(v)], np.float64)
  if not len(vals):
    return float("nan"), float("nan")
  return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0


def _cell(vals, fmt: str = "{:.3f}") -> str:
  """mean ± sample std of the finite values (just the value when there is one), or "-"."""
  m, s = _stats(vals)
  if not np.isfinite(m):
    return "-"
  n = len([v for v in vals if v is not None and np.isfinite(v)])
  return fmt.format(m) if n == 1 else f"{fmt.format(m)} ± {fmt.format(s)}"


def write_outputs(wd: str, results, sizes, seeds, objectives, plot: str = "") -> str:
  """curve.md / curve.json (and the plot) from results[size][objective][seed] -> eval_results dict."""
  lines = ["| train pairs | prior | " + " | ".join(n for _, n in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
  diffs = {}
  for n in sizes:
    for obj in objectives:
      runs = list(results[n][obj].values())
      lines.append(f"| {n} | {NAMES.get(obj, obj)} | " + " | ".join(_cell([r.get(k) for r in runs])
                                                                    for k, _ in METRICS) + " |")
    ref = next(iter(results[n][objectives[0]].values()))
    lines.append(f"| {n} | *CLIP text embedding as the query* | " + " | ".join(
        _cell([ref.get(f"clip_text_{k}")]) for k, _ in METRICS) + " |")
    if "eclipse" in objectives and "projection" in objectives:
      common = sorted(set(results[n]["eclipse"]) & set(results[n]["projection"]))
      diffs[n] = {k: [results[n]["eclipse"][s][k] - results[n]["projection"][s][k] for s in common]
                  for k, _ in METRICS}
  text = (f"Shapes world, seeds {','.join(map(str, seeds))}, mean ± sample std over seeds; "
          f"{int(ref.get('num_examples', 0))} held-out captions.\n\n" + "\n".join(lines) + "\n")
  if diffs:
    text += ("\nPer-seed difference ECLIPSE − Projection, mean (min, max):\n\n| train pairs | "
             + " | ".join(n for _, n in METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n")
    for n, d in diffs.items():
      text += f"| {n} | " + " | ".join(f"{np.mean(v):+.3f} ({np.min(v):+.3f}, {np.max(v):+.3f})"
                                       for v in d.values()) + " |\n"
  with open(os.path.join(wd, "curve.md"), "w") as f:
    f.write(text)
  with open(os.path.join(wd, "curve.json"), "w") as f:
    json.dump({"runs": {str(n): {o: {str(s): r for s, r in v.items()} for o, v in results[n].items()} for n in sizes},
               "eclipse_minus_projection": {str(n): d for n, d in diffs.items()}}, f, indent=1, default=float)
  if plot:
    draw(results, sizes, objectives, plot)
  print("\n" + text, flush=True)
  return text


def draw(results, sizes, objectives, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(8, 2.9), dpi=80)
  for ax, (key, name) in zip(axes, (("R@1", "text→image R@1"), ("binding_position", "position binding"))):
    for obj, style in zip(objectives, ("o-", "s-", "^-")):
      stats = [_stats([r.get(key) for r in results[n][obj].values()]) for n in sizes]
      ax.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], fmt=style, ms=4, capsize=3,
                  label=NAMES.get(obj, obj))
    ref = [next(iter(results[n][objectives[0]].values())).get(f"clip_text_{key}") for n in sizes]
    ax.plot(sizes, ref, "k--", lw=1, label="CLIP text emb. as query")
    if key == "binding_position":
      ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("training pairs")
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--sizes", default="1000,3000,10000,20000")
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--objectives", default="projection,eclipse")
  ap.add_argument("--variant", default="gap", help="config variant of eclipse_prior (gap, the CLIP with a modality gap; or tiny, clean)")
  ap.add_argument("--clip-workdir", default="", help="a finished shapes-CLIP stage dir to share (default DIR/clip)")
  ap.add_argument("--cache", default="", help="an embedding cache root to share (default DIR/cache)")
  ap.add_argument("--set", nargs="*", default=[], help="overrides of the prior config, key=value")
  ap.add_argument("--plot", default="", help="where to write the plot (default DIR/curve.png)")
  args = ap.parse_args(argv)

  from absl import flags, logging
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  from configs import eclipse_prior
  from diffusion_jax import stages
  from scripts.eclipse_table import _finished, _set

  wd = os.path.abspath(args.workdir)
  os.makedirs(wd, exist_ok=True)
  sizes = [int(s) for s in args.sizes.split(",") if s]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  objectives = [o for o in args.objectives.split(",") if o]
  clip_wd = args.clip_workdir or os.path.join(wd, "clip")
  cache = args.cache or os.path.join(wd, "cache")
  if not args.clip_workdir:
    stages.resolve(eclipse_prior.without_baseline(eclipse_prior.get_config(args.variant or None)), wd)

  results: Dict[int, Dict[str, Dict[int, dict]]] = {n: {o: {} for o in objectives} for n in sizes}
  t_start = time.time()
  for seed in seeds:  # seed outermost: an interrupted sweep still has whole curves for the first seeds
    for n in sizes:
      for obj in objectives:
        cfg = eclipse_prior.without_baseline(eclipse_prior.get_config(args.variant or None))
        cfg.stages.clip.path, cfg.data.embedding_cache = clip_wd, cache
        cfg.prior.objective, cfg.seed = obj, seed
        if n > int(cfg.data.num_train):
          raise ValueError(f"--sizes: {n} is more than the {cfg.data.num_train} cached training pairs.")
        cfg.data.train_subset = n
        _set(cfg, args.set)
        run_wd = os.path.join(wd, f"n{n}", f"{obj}_seed{seed}")
        res = _finished(run_wd, int(cfg.train.num_steps))
        if res is None:
          t0 = time.time()
          print(f"[curve] {obj} prior, seed {seed}, {n} training pairs, in {run_wd}", flush=True)
          stages.run(cfg, run_wd)
          res = _finished(run_wd, int(cfg.train.num_steps))
          if res is None:
            raise SystemExit(f"[curve] {run_wd} stopped before its last step; run the command again to resume.")
          res["wall_s"] = time.time() - t0
          with open(os.path.join(run_wd, "eval_results.json"), "w") as f:
            json.dump(res, f, indent=1)
        results[n][obj][seed] = res
    done = seeds[:seeds.index(seed) + 1]
    text = write_outputs(wd, {n: {o: {s: results[n][o][s] for s in done} for o in objectives} for n in sizes},
                         sizes, done, objectives, args.plot or os.path.join(wd, "curve.png"))
  print(f"[curve] {time.time() - t_start:.0f} s for the priors", flush=True)
  return text


if __name__ == "__main__":
  main()
