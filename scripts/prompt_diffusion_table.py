"""Prompt Diffusion's measured table (issue #14): Prompt Diffusion against per-task ControlNets (CN-FT, the
paper's Table 1) on the seen tasks, the unseen tasks, and the in-context test, over seeds.

    python scripts/prompt_diffusion_table.py run   --root RUNS --base BASE_EXPORT [--net NET32] [--seeds 0 1]
                                                   [--steps 600] [--cnft inv_depth,depth,...] [--override=...]
    python scripts/prompt_diffusion_table.py table --root RUNS [--seeds 0 1]

`run` trains and evaluates, one subprocess at a time and seed-major, Prompt Diffusion (all six seen tasks,
`configs/prompt_diffusion_shapes.py`) and one CN-FT baseline per seen task (`configs/prompt_diffusion_shapes.py:
cnft,<task>`: a plain ControlNet on the query, no example pair, the same steps, batch, lr and trained decoder):

    python -m diffusion_jax.main --config configs/prompt_diffusion_shapes.py[:cnft,<task>] \\
        --workdir RUNS/<pd | cnft_<task>>_s<N> --config.seed=N --config.train.num_steps=STEPS \\
        --config.stages.pipeline.path=BASE [--config.eval.shapes_fd_path=NET] [OVERRIDES]

Both evaluate on the same test scenes with the same initial noise per scene (the experiment's evaluate). A run
whose eval_results.json is at step STEPS is skipped, so `run` resumes; wall and CPU time (user + sys of the
subprocess) and the load average before / after go to the run's wall.json. BASE is a trained `sd_shapes`
export (`python -m diffusion_jax.main --config configs/sd_shapes.py --workdir runs/sd_shapes` -> runs/sd_shapes/
export); NET a 32 px shapes-FD network (`scripts/shapes_fd.py train --image_size 32`).

`table` prints markdown, mean ± sample std over the seeds that finished (their list shown): per seen task,
Prompt Diffusion next to its CN-FT (inverse tasks, image outputs: the shapes FD to the true images, the
parser's agreement of the output with the query map, its class accuracy; forward tasks, map outputs: RMSE to the
true map in [0, 1], the paper's protocol; RMSE for both); the unseen tasks (Prompt Diffusion only: CN-FT has no
example pair to be told a new task with); the in-context test (with the empty text, is the output nearest the
map the example asked for; the spread of outputs under different example pairs) and the mismatched-example
test (the change of the inverse tasks' metrics under an example from the forward task); then the per-run rows
and the runs that are missing or at another step.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from diffusion_jax.experiments.prompt_diffusion import FORWARD_TEXT, SEEN_TASKS as SEEN, UNSEEN_TASKS  # noqa: E402
from scripts.diffit_ablation_table import _ms  # noqa: E402
from scripts.mt_diffusion_table import _load, _run_cmd, is_done, read_eval, workdir  # noqa: E402

CONFIG = "configs/prompt_diffusion_shapes.py"
INVERSE = tuple(t for t in SEEN if t not in FORWARD_TEXT)
# the measured run's budget (docs/prompt_diffusion.md), the defaults of `run`
DEFAULT_OVERRIDES = ("--config.data.num_train=4000", "--config.data.num_test=50", "--config.eval.num_examples=50")
# (metric suffix in eval_results.json, row label)
INVERSE_METRICS = (("shapes_fd", "shapes FD to the true images ↓"), ("map_agreement", "agreement with the query map ↑"),
                   ("class_accuracy", "parser class accuracy ↑"), ("rmse", "RMSE [0, 1] ↓"))
FORWARD_METRICS = (("rmse", "RMSE to the true map [0, 1] ↓"),)


def train_command(root, variant, seed, steps, base, net="", overrides=DEFAULT_OVERRIDES):
  if variant == "pd":
    config = CONFIG
  elif variant.startswith("cnft_") and variant[5:] in SEEN:
    config = f"{CONFIG}:cnft,{variant[5:]}"
  else:
    raise ValueError(f"Unknown run {variant!r}: 'pd' or 'cnft_<task>' with a task of {', '.join(SEEN)}.")
  cmd = [sys.executable, "-m", "diffusion_jax.main", "--config", config, "--workdir", workdir(root, variant, seed),
         f"--config.seed={seed}", f"--config.train.num_steps={steps}", f"--config.stages.pipeline.path={base}"]
  if net:
    cmd.append(f"--config.eval.shapes_fd_path={net}")
  return cmd + list(overrides)


def run_all(root, seeds, steps, base, net="", cnft=SEEN, overrides=DEFAULT_OVERRIDES):
  if not os.path.isdir(base):
    raise SystemExit(f"--base {base!r} is not a directory: give a trained sd_shapes export "
                     "(python -m diffusion_jax.main --config configs/sd_shapes.py --workdir runs/sd_shapes).")
  if net and not os.path.exists(net):
    raise SystemExit(f"--net {net!r} does not exist: train one with scripts/shapes_fd.py train --image_size 32.")
  bad = sorted(set(cnft) - set(SEEN))
  if bad:
    raise SystemExit(f"--cnft {bad}: not seen tasks ({', '.join(SEEN)}).")
  os.makedirs(root, exist_ok=True)
  for seed in seeds:
    for variant in ["pd"] + [f"cnft_{t}" for t in SEEN if t in cnft]:
      if is_done(root, variant, seed, steps):
        print(f"skip {variant} seed {seed}: evaluated at step {steps}", flush=True)
        continue
      wd = workdir(root, variant, seed)
      os.makedirs(wd, exist_ok=True)
      print(f"run {variant} seed {seed} ({steps} steps), load {_load()}", flush=True)
      w = _run_cmd(train_command(root, variant, seed, steps, base, net, overrides), os.path.join(wd, "log.txt"))
      w["steps"], w["overrides"] = steps, list(overrides)
      with open(os.path.join(wd, "wall.json"), "w") as f:
        json.dump(w, f)
      print(f"done {variant} seed {seed}: {w}", flush=True)


def collect(root, seeds=None):
  """{run: {"seeds": [...], "eval": [...], "wall": [...]}} over RUNS/<run>_s<N> with an eval_results.json; the
  runs named by a directory but without results."""
  runs = {}
  for wd in sorted(glob.glob(os.path.join(root, "*_s*"))):
    variant, _, seed = os.path.basename(wd).rpartition("_s")
    if seed.isdigit() and (variant == "pd" or variant[5:] in SEEN) and (seeds is None or int(seed) in seeds):
      runs.setdefault(variant, set()).add(int(seed))
  wanted = sorted(set(seeds) if seeds is not None else set().union(*runs.values()) if runs else set())
  res, missing = {}, []
  for variant in ["pd"] + [f"cnft_{t}" for t in SEEN]:
    if variant not in runs and variant != "pd" and seeds is None:
      continue  # a CN-FT baseline never started is not "missing" unless seeds were asked for
    for seed in wanted:
      ev = read_eval(root, variant, seed)
      if ev is None:
        missing.append(f"{variant}_s{seed}")
        continue
      r = res.setdefault(variant, {"seeds": [], "eval": [], "wall": []})
      r["seeds"].append(seed)
      r["eval"].append(ev)
      wp = os.path.join(workdir(root, variant, seed), "wall.json")
      r["wall"].append(json.load(open(wp)) if os.path.exists(wp) else {})
  return res, missing


def _vals(res, variant, key):
  if variant not in res:
    return [], []
  pairs = [(s, ev[key]) for s, ev in zip(res[variant]["seeds"], res[variant]["eval"])
           if isinstance(ev.get(key), (int, float))]
  return [p[1] for p in pairs], [p[0] for p in pairs]


def _cell(res, variant, key):
  if variant not in res:
    return "missing"
  v, s = _vals(res, variant, key)
  return f"{_ms(v)} ({','.join(map(str, s))})" if v else "—"


def table(root, seeds=None) -> str:
  res, missing = collect(root, seeds)
  lines = ["Seen tasks: Prompt Diffusion (one model, six tasks) vs CN-FT (one ControlNet per task); mean ± std "
           "(seeds).", "",
           "| task | metric | Prompt Diffusion | CN-FT |", "|---|---|---|---|"]
  for t in SEEN:
    for m, label in (INVERSE_METRICS if t in INVERSE else FORWARD_METRICS):
      key = f"{t}/{m}"
      pd, cn = _cell(res, "pd", key), _cell(res, f"cnft_{t}", key)
      if pd == "—" and cn in ("—", "missing"):
        continue  # e.g. the shapes FD without a shapes-FD network
      lines.append(f"| {t} | {label} | {pd} | {cn} |")
  unseen = [t for t in UNSEEN_TASKS if _vals(res, "pd", f"{t}/rmse")[0]]
  if unseen:
    lines += ["", "Unseen tasks (Prompt Diffusion only: CN-FT has no example pair to be shown a new task with):", "",
              "| task | how far from the seen tasks | RMSE [0, 1] ↓ | class accuracy ↑ | shapes FD ↓ |",
              "|---|---|---|---|---|"]
    for t in unseen:
      lines.append(f"| {t} | {UNSEEN_TASKS[t]} | " + " | ".join(
          _cell(res, "pd", f"{t}/{m}") for m in ("rmse", "class_accuracy", "shapes_fd")) + " |")
  inc = sorted({k.split("/")[0] for ev in (res.get("pd", {}).get("eval") or []) for k in ev
                if k.startswith("incontext_") and k.endswith("/correct")})
  if inc:
    lines += ["", "In-context test (forward tasks, the same queries under the (image, depth / edge / seg) example "
              "pairs; chance for `correct` = 1/3):", "",
              "| text | correct ↑ | RMSE to own map ↓ | RMSE to the other maps | spread between examples |",
              "|---|---|---|---|---|"]
    for tag in inc:
      lines.append(f"| {tag[len('incontext_'):]} | " + " | ".join(
          _cell(res, "pd", f"{tag}/{m}") for m in ("correct", "rmse_own", "rmse_other", "spread")) + " |")
  mis = [t for t in INVERSE if _vals(res, "pd", f"mismatch_{t}/rmse")[0]]
  if mis:
    lines += ["", "Mismatched example (inverse query map under the forward task's (image, map) example): "
              "mismatched − matched, per seed then mean ± std (> 0 in RMSE / FD, < 0 in agreement: worse):", "",
              "| task | mean pixel change | Δ RMSE | Δ agreement with the query map | Δ shapes FD |",
              "|---|---|---|---|---|"]
    for t in mis:
      cells = []
      for m in ("rmse", "map_agreement", "shapes_fd"):
        a, sa = _vals(res, "pd", f"mismatch_{t}/{m}")
        b, sb = _vals(res, "pd", f"{t}/{m}")
        d = [x - y for (x, s1) in zip(a, sa) for (y, s2) in zip(b, sb) if s1 == s2]
        cells.append(_ms(d) if d else "—")
      lines.append(f"| {t} | {_cell(res, 'pd', f'mismatch/{t}_pixel_change')} | " + " | ".join(cells) + " |")
  lines += ["", "| run | seed | step | wall s | CPU s | load before / after |", "|---|---|---|---|---|---|"]
  for variant, r in res.items():
    for s, ev, w in zip(r["seeds"], r["eval"], r["wall"]):
      lines.append(f"| {variant} | {s} | {ev.get('step', '?')} | {w.get('wall_s', '—')} | {w.get('cpu_s', '—')} | "
                   f"{w.get('load_before', '—')} / {w.get('load_after', '—')} |")
  steps = {int(ev.get("step", -1)) for r in res.values() for ev in r["eval"]}
  if len(steps) > 1:
    lines.append(f"\nWARNING: the runs are at different steps {sorted(steps)}; the rows do not compare.")
  lines.append("\nmissing runs (no eval_results.json): " + (", ".join(missing) or "none"))
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("cmd", choices=("run", "table"))
  ap.add_argument("--root", required=True)
  ap.add_argument("--seeds", type=int, nargs="+", default=None)
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--base", default="", help="a trained sd_shapes export directory (run)")
  ap.add_argument("--net", default="", help="a 32 px shapes-FD network (scripts/shapes_fd.py train)")
  ap.add_argument("--cnft", default=",".join(SEEN), help="the seen tasks that get a CN-FT baseline")
  ap.add_argument("--override", action="append", default=None,
                  help=f"extra --config.* flags for every run (repeatable; default {' '.join(DEFAULT_OVERRIDES)})")
  a = ap.parse_args(argv)
  if a.cmd == "run":
    if not a.base:
      raise SystemExit("run needs --base (a trained sd_shapes export).")
    run_all(a.root, a.seeds or [0], a.steps, a.base, a.net, tuple(t for t in a.cnft.split(",") if t),
            tuple(a.override) if a.override is not None else DEFAULT_OVERRIDES)
  else:
    print(table(a.root, a.seeds))


if __name__ == "__main__":
  main()
