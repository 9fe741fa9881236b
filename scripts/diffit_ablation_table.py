"""The DiffiT / DiT shapes runs and the TMSA-vs-adaLN ablation over seeds, scored with the shapes FD.

    python scripts/shapes_fd.py train --out NET16 --image_size 16 --steps 2000
    python scripts/diffit_ablation_table.py run   --root RUNS --net NET16 [--seeds 0 1] [--models tmsa dit unet]
    python scripts/diffit_ablation_table.py floor --root RUNS --net NET16 [--seeds 0 1]
    python scripts/diffit_ablation_table.py table --root RUNS

`run` trains each (model, seed) in RUNS/<model>_s<seed> (skipping finished steps), keeps the training run's
unguided evaluation as eval_guidance1.json, then evaluates the checkpoint with classifier-free guidance scale 3
(eval_guidance3.json), and records wall times in wall.json. Runs go seed-major (all models at seed 0 first), so
a stopped sweep leaves balanced seeds. `floor` writes RUNS/floor.json: the shapes FD between the evaluation's
real reference set (the first n test images of the run's seed) and an independent real set of the same size,
and the parser's class accuracy on the reference set. `table` prints markdown: per model and guidance, mean
+- std over seeds of the shapes FD and the parser's accuracies, next to the real-vs-real floor at the same n.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# name -> (label, config file, variant); the DiT run is the ablation's adaLN arm (dit_shapes.py = :adaln)
MODELS = {
    "tmsa": ("DiffiT (TMSA, patch transformer)", "configs/diffit_shapes.py", "tmsa"),
    "dit": ("DiT (adaLN-Zero) = adaLN arm", "configs/dit_shapes.py", ""),
    "unet": ("DiffiT image-space U-net", "configs/diffit_shapes.py", ""),
}
GUIDANCE = (1.0, 3.0)
METRICS = ("shapes_fd", "class_accuracy", "colour_accuracy", "shape_accuracy")


def config_spec(model: str, seed: int) -> str:
  _, path, variant = MODELS[model]
  return f"{path}:" + ",".join(p for p in (variant, f"seed{seed}") if p)


def commands(model: str, seed: int, workdir: str, net: str):
  """(train command, guided-eval command) as argument lists."""
  base = [sys.executable, "-m", "diffusion_jax.main", "--config", config_spec(model, seed), "--workdir", workdir,
          "--config.eval.fid_feature=shapes_fd", f"--config.eval.shapes_fd_path={net}"]
  return base, base + ["--mode", "eval", "--config.sample.guidance_scale=3.0"]


def _run_cmd(cmd, log):
  t0 = time.time()
  with open(log, "a") as f:
    f.write(" ".join(cmd) + "\n")
    f.flush()
    subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
  return round(time.time() - t0, 1)


def run_all(root, net, models, seeds, stop_after=None):
  """stop_after: a time.time() after which no new training run starts."""
  for seed in seeds:
    for model in models:
      wd = os.path.join(root, f"{model}_s{seed}")
      os.makedirs(wd, exist_ok=True)
      wall_path = os.path.join(wd, "wall.json")
      wall = json.load(open(wall_path)) if os.path.exists(wall_path) else {}
      train_cmd, eval_cmd = commands(model, seed, wd, net)
      log = os.path.join(wd, "log.txt")
      g1, g3 = os.path.join(wd, "eval_guidance1.json"), os.path.join(wd, "eval_guidance3.json")
      if not os.path.exists(g1):
        if stop_after is not None and time.time() > stop_after:
          print(f"stop: not starting {model} seed {seed}", flush=True)
          return
        wall["train_s"] = _run_cmd(train_cmd, log)  # training + its unguided evaluation
        shutil.copy(os.path.join(wd, "eval_results.json"), g1)
        json.dump(wall, open(wall_path, "w"))
      if not os.path.exists(g3):
        wall["eval_guided_s"] = _run_cmd(eval_cmd, log)
        shutil.copy(os.path.join(wd, "eval_results.json"), g3)
        json.dump(wall, open(wall_path, "w"))
      print(f"done {model} seed {seed}: {wall}", flush=True)


def floor(root, net, seeds, n=None):
  """Real-vs-real shapes FD at the evaluation's n, per seed (the reference set depends on config.seed)."""
  from configs import diffit_shapes
  from diffusion_jax.data import make_image_source
  from diffusion_jax.data import shapes as S
  from diffusion_jax.eval import shapes_parser as P
  from diffusion_jax.eval.shapes_fd import ShapesFD
  from diffusion_jax.experiments.generation import feature_statistics, frechet_distance
  m = ShapesFD(net)
  out = {"net_sha256": m.sha256, "rows": []}
  for seed in seeds:
    c = diffit_shapes.get_config(f"tmsa,seed{seed}")  # all three models share data and eval settings
    n = n or int(c.eval.num_samples)
    src = make_image_source(c.data, "test", seed)
    imgs = np.stack([np.asarray(src[i]["image"]) for i in range(2 * n)])
    imgs = imgs.astype(np.float32) / 127.5 - 1.0 if imgs.dtype == np.uint8 else imgs.astype(np.float32)
    labels = np.array([int(src[i]["label"]) for i in range(n)])
    ref, other = imgs[:n], imgs[n:]
    fd = frechet_distance(*feature_statistics(m.features(other)), *feature_statistics(m.features(ref)))
    cfg = S.ShapesConfig.from_dict(dict(c.data.shapes), image_size=c.data.image_size)
    acc = float(P.class_accuracy_parsed(P.parse_batch(ref, cfg=cfg, value_range="-1,1"), labels))
    out["rows"].append({"seed": seed, "n": n, "shapes_fd": float(fd), "class_accuracy": acc})
  with open(os.path.join(root, "floor.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


def collect(root):
  """{model: {guidance: {metric: [values over seeds]}, "seeds": [...], "wall": [...]}} from RUNS/<model>_s<seed>."""
  res = {}
  for wd in sorted(glob.glob(os.path.join(root, "*_s*"))):
    model, _, seed = os.path.basename(wd).rpartition("_s")
    if model not in MODELS or not seed.isdigit():
      continue
    r = res.setdefault(model, {"seeds": [], "wall": [], **{g: {k: [] for k in METRICS + ("num_samples",)}
                                                           for g in GUIDANCE}})
    files = {g: os.path.join(wd, f"eval_guidance{g:g}.json") for g in GUIDANCE}
    if not all(os.path.exists(p) for p in files.values()):
      continue  # unfinished run
    r["seeds"].append(int(seed))
    for g, p in files.items():
      ev = json.load(open(p))
      for k in METRICS + ("num_samples",):
        r[g][k].append(float(ev[k]))
    wall_path = os.path.join(wd, "wall.json")
    r["wall"].append(json.load(open(wall_path)) if os.path.exists(wall_path) else {})
  return {k: v for k, v in res.items() if v["seeds"]}


def _ms(v, pct=False):
  v = np.asarray(v, np.float64) * (100 if pct else 1)
  fmt = ".1f" if pct or abs(v.mean()) < 100 else ".0f"
  s = f"{v.mean():{fmt}}" if pct or fmt == ".0f" else f"{v.mean():.3g}"
  if len(v) > 1:
    s += f" ± {v.std(ddof=1):{fmt}}" if pct or fmt == ".0f" else f" ± {v.std(ddof=1):.2g}"
  return s + ("%" if pct else "")


def spearman(a, b):
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def table(root) -> str:
  res = collect(root)
  fl_path = os.path.join(root, "floor.json")
  fl = json.load(open(fl_path))["rows"] if os.path.exists(fl_path) else []
  lines = ["| model | CFG scale | seeds | shapes FD | real-vs-real FD (same n) | class acc | colour acc | shape acc |",
           "|---|---|---|---|---|---|---|---|"]
  for model, r in res.items():
    fl_m = [x["shapes_fd"] for x in fl if x["seed"] in r["seeds"]]
    for g in GUIDANCE:
      m = r[g]
      lines.append(f"| {MODELS[model][0]} | {g:g} | {','.join(map(str, r['seeds']))} (n={int(m['num_samples'][0])})"
                   f" | {_ms(m['shapes_fd'])} | {_ms(fl_m) if fl_m else '-'} | {_ms(m['class_accuracy'], True)}"
                   f" | {_ms(m['colour_accuracy'], True)} | {_ms(m['shape_accuracy'], True)} |")
  lines += ["", "| model | seed | CFG scale | shapes FD | class acc | colour acc | shape acc |",
            "|---|---|---|---|---|---|---|"]
  for model, r in res.items():
    for i, seed in enumerate(r["seeds"]):
      for g in GUIDANCE:
        m = r[g]
        lines.append(f"| {MODELS[model][0]} | {seed} | {g:g} | {m['shapes_fd'][i]:.0f}"
                     f" | {100 * m['class_accuracy'][i]:.1f}% | {100 * m['colour_accuracy'][i]:.1f}%"
                     f" | {100 * m['shape_accuracy'][i]:.1f}% |")
  lines.append("")
  for g in GUIDANCE:  # does the FD order the runs as the parser does? (lower FD <-> higher accuracy)
    fd = [v for r in res.values() for v in r[g]["shapes_fd"]]
    if len(fd) > 2:
      for k in ("class_accuracy", "colour_accuracy"):
        acc = [v for r in res.values() for v in r[g][k]]
        lines.append(f"CFG {g:g}: Spearman(shapes FD, -{k}) over {len(fd)} runs = {spearman(fd, -np.asarray(acc)):.2f}")
      by_fd = sorted(res, key=lambda mm: np.mean(res[mm][g]["shapes_fd"]))
      by_acc = sorted(res, key=lambda mm: -np.mean(res[mm][g]["class_accuracy"]))
      lines.append(f"CFG {g:g}: model order by mean FD {by_fd}, by mean class accuracy {by_acc}")
  walls = [f"{mm} s{s}: train+eval {w.get('train_s', '?')} s, guided eval {w.get('eval_guided_s', '?')} s"
           for mm, r in res.items() for s, w in zip(r["seeds"], r["wall"])]
  lines += ["", "wall times: " + "; ".join(walls)]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("cmd", choices=("run", "floor", "table"))
  p.add_argument("--root", required=True)
  p.add_argument("--net", default="")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--stop_after_s", type=float, default=None, help="no new training run after this many seconds")
  a = p.parse_args(argv)
  if a.cmd == "run":
    run_all(a.root, a.net, a.models, a.seeds,
            None if a.stop_after_s is None else time.time() + a.stop_after_s)
  elif a.cmd == "floor":
    print(json.dumps(floor(a.root, a.net, a.seeds), indent=1))
  else:
    print(table(a.root))


if __name__ == "__main__":
  main()
