"""Claim (c): ECLIPSE vs the diffusion prior at equal training compute and at equal quality (shapes world).

    python scripts/eclipse_compute.py --workdir runs/eclipse_compute [--seeds 0,1]
        [--steps eclipse=800,diffusion=3200] [--eval-every 100] [--target 0.25] [--variant gap|clean|tiny]
        [--clip-workdir DIR --cache DIR] [--set key=value ...] [--plot docs/images/eclipse_compute.png]

One shapes CLIP (stage `clip` of `configs/eclipse_prior.py`, trained once in DIR/clip unless `--clip-workdir`
names a finished one) and one embedding cache are shared by every prior. Each (objective, seed) prior trains in
DIR/<objective>_seed<k> with the same architecture, data, batch and optimizer, for its own number of steps, and
is evaluated every `--eval-every` steps (`train.eval_every`; R@1 / R@5 / cosine / binding on the held-out
captions). For every evaluation the script reads, from the run's own records:

* **train FLOPs**: steps x XLA's FLOP count of the compiled train step (`run_info.json` `step_flops`, per
  device, times the devices): the compute axis, independent of the machine's load;
* **train seconds**: steps / `steps_per_sec` summed over the log windows (`metrics.jsonl`; train steps only,
  evaluation excluded), so "wall time to reach an R@1" counts training, not the evaluations on the way.

Writes DIR/compute.md (the R@1 curve against steps; R@1 of each prior at equal training FLOPs; steps, FLOPs and
train seconds to first reach the target R@1, default: 0.95 x the lower of the two priors' best mean R@1, so both
can reach it), DIR/compute.json and the plot (R@1 against train FLOPs, mean and spread over seeds, the text
embedding used as the query as a dashed line), and prints the table. Finished runs are reused; an interrupted
one resumes.

The learning rate is constant after the warm-up by default (`--schedule`): with a cosine that decays over each
run's own length, the longer run's early evaluations would be taken at a high learning rate and the shorter
run's last one fully annealed, which favours the shorter run at equal compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from scripts.eclipse_curve import NAMES, _cell  # noqa: E402

METRICS = ("R@1", "R@5", "cosine", "binding_colour", "binding_position")


def read_curve(run_wd: str) -> List[Dict[str, float]]:
  """[{step, R@1, ..., train_s, train_flops, eval_s}] of one run, one entry per evaluation, from its
  metrics.jsonl and run_info.json. Train seconds: the log windows' steps / steps_per_sec summed up to the
  evaluation's step (a window is the steps since the previous log row)."""
  with open(os.path.join(run_wd, "run_info.json")) as f:
    info = json.load(f)
  flops = info.get("step_flops")
  if not flops:
    raise ValueError(f"{run_wd}/run_info.json has no step_flops (XLA gave no cost analysis): no compute axis.")
  total_flops = float(flops) * int(info.get("num_devices", 1))
  rows = []
  with open(os.path.join(run_wd, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        rows.append(json.loads(line))
  windows, prev = [], 0  # (end step, seconds) of each train log window
  for r in sorted((r for r in rows if "steps_per_sec" in r), key=lambda r: r["step"]):
    windows.append((r["step"], (r["step"] - prev) / max(float(r["steps_per_sec"]), 1e-12)))
    prev = r["step"]
  curve = []
  for r in sorted((r for r in rows if "eval/R@1" in r), key=lambda r: r["step"]):
    s = int(r["step"])
    logged = [w for w in windows if w[0] <= s]
    if not logged or logged[-1][0] != s:
      raise ValueError(f"{run_wd}: no train log row at evaluation step {s}; train.log_every must divide "
                       f"train.eval_every.")
    point = {"step": s, "train_s": float(sum(sec for _, sec in logged)), "train_flops": s * total_flops,
             "eval_s": float(r.get("eval_sec", float("nan")))}
    point.update({k: float(r[f"eval/{k}"]) for k in METRICS if f"eval/{k}" in r})
    curve.append(point)
  return curve


def at_flops(curve, budget: float) -> Optional[dict]:
  """The last evaluation within `budget` training FLOPs (None if the first is already over it)."""
  within = [p for p in curve if p["train_flops"] <= budget * (1 + 1e-9)]
  return within[-1] if within else None


def first_reaching(curve, target: float) -> Optional[dict]:
  """The first evaluation with R@1 >= target, or None."""
  return next((p for p in curve if p.get("R@1", -1.0) >= target), None)


def summarize(curves: Dict[str, Dict[int, list]], target: Optional[float] = None, text_r1: Optional[float] = None
              ) -> dict:
  """The three tables as data: the mean R@1 curve per objective, R@1 at equal FLOPs (the budget: the smallest
  final training FLOPs of any objective), and the cost of reaching `target` R@1 (default 0.95 x the lower of the
  objectives' best mean R@1)."""
  objectives = list(curves)
  mean_curve = {}
  for obj in objectives:
    steps = sorted({p["step"] for c in curves[obj].values() for p in c})
    mean_curve[obj] = [{"step": s, "train_flops": next(p["train_flops"] for c in curves[obj].values() for p in c
                                                       if p["step"] == s),
                        "R@1": [p["R@1"] for c in curves[obj].values() for p in c if p["step"] == s]}
                       for s in steps]
  best = {o: max(float(np.mean(p["R@1"])) for p in mean_curve[o]) for o in objectives}
  if target is None:
    target = 0.95 * min(best.values())
  budget = min(c[-1]["train_flops"] for o in objectives for c in curves[o].values())
  equal_compute, equal_quality = {}, {}
  for obj in objectives:
    pts = [at_flops(c, budget) for c in curves[obj].values()]
    equal_compute[obj] = {k: [p[k] if p else None for p in pts] for k in ("step", "train_flops", *METRICS)}
    hits = [first_reaching(c, target) for c in curves[obj].values()]
    equal_quality[obj] = {"reached": sum(h is not None for h in hits), "of": len(hits),
                          **{k: [h[k] if h else None for h in hits] for k in ("step", "train_flops", "train_s")}}
  return {"target": float(target), "best_mean_R@1": best, "flops_budget": float(budget), "text_R@1": text_r1,
          "mean_curve": mean_curve, "equal_compute": equal_compute, "equal_quality": equal_quality}


def write_outputs(wd: str, curves, summary: dict, plot: str = "") -> str:
  objectives = list(curves)
  seeds = sorted({s for o in objectives for s in curves[o]})
  out = [f"Seeds {','.join(map(str, seeds))}; mean ± sample std over seeds. Train FLOPs: steps x XLA's count of "
         f"the compiled train step; train s: training only (evaluations excluded).", "",
         "**R@1 against training steps**", "",
         "| step | " + " | ".join(f"{NAMES.get(o, o)} R@1 | TFLOP" for o in objectives) + " |",
         "|---|" + "---|---|" * len(objectives)]
  steps = sorted({p["step"] for o in objectives for p in summary["mean_curve"][o]})
  for s in steps:
    cells = []
    for o in objectives:
      p = next((p for p in summary["mean_curve"][o] if p["step"] == s), None)
      cells += [_cell(p["R@1"]) if p else "-", f"{p['train_flops'] / 1e12:.2f}" if p else "-"]
    out.append(f"| {s} | " + " | ".join(cells) + " |")
  if summary["text_R@1"] is not None:
    out += ["", f"CLIP text embedding used directly as the query: R@1 {summary['text_R@1']:.3f}."]
  out += ["", f"**Equal training compute** ({summary['flops_budget'] / 1e12:.2f} TFLOP, the smallest final budget; "
          "each prior's last evaluation within it)", "",
          "| prior | step | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
  for o in objectives:
    e = summary["equal_compute"][o]
    out.append(f"| {NAMES.get(o, o)} | {_cell(e['step'], '{:.0f}')} | " +
               " | ".join(_cell(e[k]) for k in METRICS) + " |")
  out += ["", f"**Equal quality**: cost of first reaching R@1 ≥ {summary['target']:.3f} (evaluated every few steps; "
          "the first evaluation at or above it)", "",
          "| prior | reached | steps | train TFLOP | train s |", "|---|---|---|---|---|"]
  for o in objectives:
    q = summary["equal_quality"][o]
    tf = [None if v is None else v / 1e12 for v in q["train_flops"]]
    out.append(f"| {NAMES.get(o, o)} | {q['reached']}/{q['of']} | {_cell(q['step'], '{:.0f}')} | "
               f"{_cell(tf, '{:.2f}')} | {_cell(q['train_s'], '{:.1f}')} |")
  text = "\n".join(out) + "\n"
  with open(os.path.join(wd, "compute.md"), "w") as f:
    f.write(text)
  with open(os.path.join(wd, "compute.json"), "w") as f:
    json.dump({"curves": {o: {str(s): c for s, c in v.items()} for o, v in curves.items()}, **summary}, f,
              indent=1, default=float)
  if plot:
    draw(summary, plot)
  return text


def draw(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for o, pts in summary["mean_curve"].items():
    x = np.array([p["train_flops"] for p in pts]) / 1e12
    r = [p["R@1"] for p in pts]
    m, lo, hi = (np.array([np.mean(v) for v in r]), np.array([np.min(v) for v in r]),
                 np.array([np.max(v) for v in r]))
    ax.plot(x, m, marker="o", ms=3, label=NAMES.get(o, o))
    ax.fill_between(x, lo, hi, alpha=0.2)
  if summary["text_R@1"] is not None:
    ax.axhline(summary["text_R@1"], ls="--", c="gray", label="CLIP text embedding as the query")
  ax.axhline(summary["target"], ls=":", c="k", lw=0.8, label=f"target R@1 {summary['target']:.3f}")
  ax.set_xlabel("training TFLOP (XLA count)")
  ax.set_ylabel("text→image R@1")
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--steps", default="eclipse=800,diffusion=3200", help="objective=steps, comma-separated")
  ap.add_argument("--eval-every", type=int, default=100)
  ap.add_argument("--target", type=float, default=None, help="R@1 to reach (default: 0.95 x the lower best)")
  ap.add_argument("--variant", default="gap", help="config variant of eclipse_prior (gap, clean or tiny)")
  ap.add_argument("--clip-workdir", default="", help="a finished shapes-CLIP stage dir to share (default DIR/clip)")
  ap.add_argument("--cache", default="", help="an embedding cache root to share (default DIR/cache)")
  ap.add_argument("--schedule", default="constant", choices=("constant", "warmup_cosine"),
                  help="learning-rate schedule after the warm-up (default constant: every evaluation is a fair "
                       "any-time point for both priors; a cosine decays over each run's own length)")
  ap.add_argument("--set", nargs="*", default=[], help="overrides of the prior config, key=value")
  ap.add_argument("--plot", default="", help="where to write the plot (default DIR/compute.png)")
  args = ap.parse_args(argv)

  steps = {}
  for item in args.steps.split(","):
    obj, _, n = item.partition("=")
    if not n.isdigit() or int(n) <= 0:
      ap.error(f"--steps: {item!r} is not objective=steps (e.g. eclipse=800,diffusion=3200).")
    steps[obj] = int(n)
  if any(n % args.eval_every for n in steps.values()):
    ap.error(f"--steps {args.steps}: every step count must be a multiple of --eval-every {args.eval_every}.")

  from absl import flags, logging
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  from configs import eclipse_prior
  from diffusion_jax import stages
  from scripts.eclipse_table import _finished, _set

  wd = os.path.abspath(args.workdir)
  os.makedirs(wd, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",") if s]
  clip_wd = args.clip_workdir or os.path.join(wd, "clip")
  cache = args.cache or os.path.join(wd, "cache")
  if not args.clip_workdir:
    stages.resolve(eclipse_prior.without_baseline(eclipse_prior.get_config(args.variant or None)), wd)

  curves: Dict[str, Dict[int, list]] = {o: {} for o in steps}
  text_r1 = None
  t_start = time.time()
  for seed in seeds:
    for obj, n in steps.items():
      cfg = eclipse_prior.without_baseline(eclipse_prior.get_config(args.variant or None))
      cfg.stages.clip.path, cfg.data.embedding_cache = clip_wd, cache
      cfg.prior.objective, cfg.seed = obj, seed
      cfg.train.num_steps, cfg.train.eval_every = n, args.eval_every
      cfg.train.log_every = int(np.gcd(int(cfg.train.log_every), args.eval_every))
      cfg.optim.schedule = args.schedule
      _set(cfg, args.set)
      run_wd = os.path.join(wd, f"{obj}_seed{seed}")
      res = _finished(run_wd, n)
      if res is None:
        print(f"[compute] {obj} prior, seed {seed}, {n} steps, evaluated every {args.eval_every}, in {run_wd}",
              flush=True)
        stages.run(cfg, run_wd)
        res = _finished(run_wd, n)
        if res is None:
          raise SystemExit(f"[compute] {run_wd} stopped before its last step; run the command again to resume.")
      text_r1 = res.get("clip_text_R@1", text_r1)
      curves[obj][seed] = read_curve(run_wd)
    done = {o: {s: c for s, c in v.items() if s in seeds[:seeds.index(seed) + 1]} for o, v in curves.items()}
    summary = summarize(done, args.target, text_r1)
    text = write_outputs(wd, done, summary, args.plot or os.path.join(wd, "compute.png"))
  print(text)
  print(f"[compute] {time.time() - t_start:.0f} s for the priors", flush=True)
  return summary


if __name__ == "__main__":
  main()
