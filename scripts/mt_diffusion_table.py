"""MT-Diffusion's measured table (issue #15): the four shapes experiments and their baselines over seeds.

    python scripts/mt_diffusion_table.py run   --root RUNS [--seeds 0 1] [--steps 800] [--net NET16]
    python scripts/mt_diffusion_table.py floor --root RUNS --net NET16 [--seeds 0 1] [--floor_n 128]
    python scripts/mt_diffusion_table.py table --root RUNS [--seeds 0 1]

`run` trains and evaluates every variant of `configs/mt_diffusion_shapes.py` (label, segmentation, inpaint,
inpaint_recon, clip, image) for each seed, one subprocess at a time

    python -m diffusion_jax.main --config configs/mt_diffusion_shapes.py:<variant>,seed<N> \\
        --workdir RUNS/<variant>_s<N> --config.train.num_steps=STEPS [--config.eval.shapes_fd_path=NET] \\
        [--config.stages.clip.path=RUNS/clip] [OVERRIDES]

seed-major (all variants at seed 0 first, so a stopped sweep leaves whole seeds; within a seed `RUN_ORDER`:
the image-only baseline and (c)'s pair first), skipping runs whose
RUNS/<variant>_s<N>/eval_results.json (written by the training run's final evaluation) is at step STEPS, so it
resumes (an interrupted training resumes from its checkpoint). Before them, once: the shapes CLIP of the clip
variant (`configs/clip_shapes.py`, the stage `clip` of that variant, trained in RUNS/clip and shared by every
seed through `--config.stages.clip.path`), and, with `--net` naming a file that does not exist, the 16 px
ShapesNet (`scripts/shapes_fd.py train --image_size 16`) whose features give precision / recall and the shapes
FD. Wall and CPU time (user + sys of the subprocess) and the load average before / after go to
RUNS/<variant>_s<N>/wall.json.

`floor` writes RUNS/floor.json: per seed, the shapes FD and precision / recall between the evaluation's real
reference set and the next test images of the same size (a perfect generator's scores at that n).
`table` prints markdown: per experiment, the joint MT-Diffusion model's metrics next to its baseline's (the
reconstruction-only model for (c), the image-only model of the same size and budget for the image metrics),
mean ± sample std over the seeds that finished (their list shown), the real-vs-real floor (when RUNS/floor.json exists), then the
per-run values, then the runs that are missing (no eval_results.json) or at another step.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from scripts.diffit_ablation_table import _ms  # noqa: E402

CONFIG = "configs/mt_diffusion_shapes.py"
VARIANTS = ("label", "segmentation", "inpaint", "inpaint_recon", "clip", "image")
# the order `run` trains them in within a seed: the image-only baseline (the reference of three experiments) and
# (c)'s pair first, so a sweep stopped by time loses the least
RUN_ORDER = ("image", "inpaint", "inpaint_recon", "label", "segmentation", "clip")
NAMES = {"label": "MT joint image + label", "segmentation": "MT joint image + segmentation",
         "inpaint": "MT joint image + masked image", "inpaint_recon": "reconstruction-only baseline",
         "clip": "MT joint image + CLIP embedding", "image": "image-only baseline (1 modality)"}
IMAGE_METRICS = (("precision", "precision of joint samples ↑"), ("recall", "recall of joint samples ↑"),
                 ("shapes_fd", "shapes FD of joint samples ↓"))
# experiment -> (title, joint variant, [(metric, label, baseline variant or None)])
EXPERIMENTS = (
    ("(a) image + label", "label",
     [("label_image_agreement", "label / image agreement (parser) ↑", None),
      ("label_to_image_accuracy", "label given -> parser class of the image ↑", None),
      ("image_to_label_accuracy", "image given -> generated label correct ↑", None)]
     + [(k, lab, "image") for k, lab in IMAGE_METRICS]),
    ("(b) image + segmentation", "segmentation",
     [("seg_image_iou", "mask / image IoU (parser) ↑", None),
      ("seg_to_image_iou", "mask given -> IoU of the image's parse ↑", None),
      ("image_to_seg_iou", "image given -> IoU of the generated mask ↑", None)]
     + [(k, lab, "image") for k, lab in IMAGE_METRICS]),
    ("(c) inpainting", "inpaint",
     [("inpaint_mse", "masked-region MSE ↓", "inpaint_recon"),
      ("inpaint_mse_outside", "MSE outside the box ↓", "inpaint_recon"),
      ("inpaint_class_accuracy", "parser class of the filled image ↑", "inpaint_recon")]
     + [(k, lab, "image") for k, lab in IMAGE_METRICS]),
    ("(d) image + CLIP embedding", "clip",
     [("emb_image_cosine", "cos(generated embedding, CLIP(generated image)) ↑", None),
      ("emb_image_cosine_shuffled", "the same against another sample's image (chance)", None),
      ("emb_to_image_cosine", "embedding given -> cos(CLIP(image), true embedding) ↑", None)]
     + [(k, lab, "image") for k, lab in IMAGE_METRICS]),
)


def workdir(root: str, variant: str, seed: int) -> str:
  return os.path.join(root, f"{variant}_s{seed}")


def train_command(root: str, variant: str, seed: int, steps: int, net: str = "", clip: str = "", overrides=()):
  cmd = [sys.executable, "-m", "diffusion_jax.main", "--config", f"{CONFIG}:{variant},seed{seed}",
         "--workdir", workdir(root, variant, seed), f"--config.train.num_steps={steps}"]
  if net:
    cmd.append(f"--config.eval.shapes_fd_path={net}")
  if variant == "clip":
    cmd.append(f"--config.stages.clip.path={clip or os.path.join(root, 'clip')}")
  return cmd + list(overrides)


def clip_command(root: str):
  return [sys.executable, "-m", "diffusion_jax.main", "--config", "configs/clip_shapes.py",
          "--workdir", os.path.join(root, "clip")]


def net_command(net: str):
  return [sys.executable, os.path.join(ROOT, "scripts", "shapes_fd.py"), "train", "--out", net, "--image_size", "16"]


def _load():
  return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _run_cmd(cmd, log):
  """Runs cmd (cwd = the repository), output appended to log; returns wall / CPU seconds and the load."""
  r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0, load0 = time.time(), _load()
  with open(log, "a") as f:
    f.write(" ".join(cmd) + "\n")
    f.flush()
    subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
  r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
  return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu, 1), "load_before": load0, "load_after": _load()}


def read_eval(root: str, variant: str, seed: int):
  p = os.path.join(workdir(root, variant, seed), "eval_results.json")
  if not os.path.exists(p):
    return None
  with open(p) as f:
    return json.load(f)


def is_done(root: str, variant: str, seed: int, steps: int) -> bool:
  ev = read_eval(root, variant, seed)
  return ev is not None and int(ev.get("step", -1)) == steps


def run_all(root, seeds, steps, variants=VARIANTS, net="", clip="", stop_after=None, overrides=()):
  """stop_after: a time.time() after which no new training run starts."""
  os.makedirs(root, exist_ok=True)
  if net and not os.path.exists(net):
    print(f"training the 16 px ShapesNet -> {net}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(net)), exist_ok=True)
    w = _run_cmd(net_command(net), os.path.join(root, "shapes_net.log"))
    json.dump(w, open(os.path.join(root, "shapes_net_wall.json"), "w"))
  if "clip" in variants and not clip:
    cd = os.path.join(root, "clip")
    if not (os.path.isdir(os.path.join(cd, "export")) and os.path.exists(os.path.join(cd, "eval_results.json"))):
      print(f"training the shapes CLIP (stage clip) in {cd}", flush=True)
      os.makedirs(cd, exist_ok=True)
      w = _run_cmd(clip_command(root), os.path.join(root, "clip.log"))
      json.dump(w, open(os.path.join(cd, "wall.json"), "w"))
  for seed in seeds:
    for variant in sorted(variants, key=RUN_ORDER.index):
      wd = workdir(root, variant, seed)
      if is_done(root, variant, seed, steps):
        print(f"skip {variant} seed {seed}: evaluated at step {steps}", flush=True)
        continue
      if stop_after is not None and time.time() > stop_after:
        print(f"stop: not starting {variant} seed {seed}", flush=True)
        return
      os.makedirs(wd, exist_ok=True)
      print(f"run {variant} seed {seed} ({steps} steps), load {_load()}", flush=True)
      w = _run_cmd(train_command(root, variant, seed, steps, net, clip, overrides), os.path.join(wd, "log.txt"))
      w["steps"], w["overrides"] = steps, list(overrides)
      json.dump(w, open(os.path.join(wd, "wall.json"), "w"))
      print(f"done {variant} seed {seed}: {w}", flush=True)


def floor(root, net, seeds, n=None):
  """RUNS/floor.json: per seed, the shapes FD and precision / recall (ShapesNet `net`, k = 3) between the
  evaluation's real reference set (the first n test images of the seed, n = config.eval.num_samples) and the
  next n test images: what a perfect generator would score at this n."""
  from configs import mt_diffusion_shapes
  from diffusion_jax.data import make_image_source
  from diffusion_jax.eval.fid import precision_recall
  from diffusion_jax.eval.shapes_fd import ShapesFD
  from diffusion_jax.experiments.generation import feature_statistics, frechet_distance
  m = ShapesFD(net)
  rows = []
  for seed in seeds:
    c = mt_diffusion_shapes.get_config(f"image,seed{seed}")  # every variant shares data and eval settings
    k = int(n or c.eval.num_samples)
    src = make_image_source(c.data, "test", seed)
    im = np.stack([np.asarray(src[i]["image"]) for i in range(2 * k)])
    im = im.astype(np.float32) / 127.5 - 1.0 if im.dtype == np.uint8 else im.astype(np.float32)
    ref, other = m.features(im[:k]), m.features(im[k:])
    rows.append({"seed": seed, "n": k, "shapes_fd": float(frechet_distance(*feature_statistics(other),
                                                                         *feature_statistics(ref))),
                 **{key: float(v) for key, v in precision_recall(ref, other, k=int(c.eval.pr_k)).items()}})
  out = {"net_sha256": m.sha256, "rows": rows}
  with open(os.path.join(root, "floor.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


def collect(root, seeds=None):
  """{variant: {"seeds": [...], "step": [...], "eval": [dict per seed], "wall": [...]}} over RUNS/<variant>_s<N>
  with an eval_results.json (seeds restricted to `seeds` when given), and the list of missing runs."""
  found = {}
  for wd in sorted(glob.glob(os.path.join(root, "*_s*"))):
    variant, _, seed = os.path.basename(wd).rpartition("_s")
    if variant in VARIANTS and seed.isdigit() and (seeds is None or int(seed) in seeds):
      found.setdefault(variant, set()).add(int(seed))
  wanted = sorted(set(seeds) if seeds is not None else set().union(*found.values()) if found else set())
  res, missing = {}, []
  for variant in VARIANTS:
    for seed in wanted:
      ev = read_eval(root, variant, seed)
      if ev is None:
        missing.append(f"{variant}_s{seed}")
        continue
      r = res.setdefault(variant, {"seeds": [], "step": [], "eval": [], "wall": []})
      r["seeds"].append(seed)
      r["step"].append(int(ev.get("step", -1)))
      r["eval"].append(ev)
      wp = os.path.join(workdir(root, variant, seed), "wall.json")
      r["wall"].append(json.load(open(wp)) if os.path.exists(wp) else {})
  return res, missing


def _cell(res, variant, metric):
  """'mean ± std (seeds)' of one metric of one variant, or why there is none."""
  if variant not in res:
    return "missing", ""
  vals = [ev[metric] for ev in res[variant]["eval"] if isinstance(ev.get(metric), (int, float))]
  if not vals:
    return "—", ""
  return _ms(vals), ",".join(str(s) for s, ev in zip(res[variant]["seeds"], res[variant]["eval"])
                             if isinstance(ev.get(metric), (int, float)))


def _num(v) -> str:
  return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def table(root, seeds=None) -> str:
  res, missing = collect(root, seeds)
  lines = ["| experiment | metric | MT-Diffusion (joint) | seeds | baseline | baseline value | seeds |",
           "|---|---|---|---|---|---|---|"]
  for title, joint, rows in EXPERIMENTS:
    for metric, label, base in rows:
      v, s = _cell(res, joint, metric)
      bv, bs = _cell(res, base, metric) if base else ("", "")
      if v == "—" and bv in ("", "—"):
        continue  # not measured by any finished run (e.g. the conditional metrics with config.eval.conditional=False)
      lines.append(f"| {title} | {label} | {v} | {s} | {NAMES[base] if base else '—'} | {bv or '—'} | {bs} |")
  # (c): the paper's claim is about the ratio baseline / joint of the masked-region error
  if "inpaint" in res and "inpaint_recon" in res:
    j = {s: ev["inpaint_mse"] for s, ev in zip(res["inpaint"]["seeds"], res["inpaint"]["eval"])}
    b = {s: ev["inpaint_mse"] for s, ev in zip(res["inpaint_recon"]["seeds"], res["inpaint_recon"]["eval"])}
    both = sorted(set(j) & set(b))
    if both:
      ratio = [b[s] / j[s] for s in both]
      lines += ["", f"(c) masked-region MSE, baseline / joint (> 1: the joint model is better; the paper: ~10): "
                    f"{_ms(ratio)} over seeds {','.join(map(str, both))}"]
  fp = os.path.join(root, "floor.json")
  if os.path.exists(fp):
    fl = [r for r in json.load(open(fp))["rows"] if seeds is None or r["seed"] in seeds]
    if fl:
      lines += ["", "real vs real (the reference set against the next test images, same n = "
                    f"{','.join(sorted({str(r['n']) for r in fl}))}; seeds {','.join(str(r['seed']) for r in fl)}): "
                    + ", ".join(f"{k} {_ms([r[k] for r in fl])}" for k, _ in IMAGE_METRICS)]
  pr = sorted({ev.get("pr_features", "?").split(" ")[0] for r in res.values() for ev in r["eval"]
               if "pr_features" in ev})
  if pr:
    lines += ["", f"precision / recall features: {', '.join(pr)}"]
  lines += ["", "| run | seed | step | " + " | ".join(k for k, _ in IMAGE_METRICS) + " | own metrics | wall s | CPU s | load before / after |",
            "|---|---|---|" + "---|" * len(IMAGE_METRICS) + "---|---|---|---|"]
  own = {joint: [m for m, _, b in rows if b != "image"] for _, joint, rows in EXPERIMENTS}
  own["inpaint_recon"] = own["inpaint"]
  own["image"] = []
  for variant, r in res.items():
    for seed, step, ev, w in zip(r["seeds"], r["step"], r["eval"], r["wall"]):
      img = [_num(ev[k]) if isinstance(ev.get(k), (int, float)) else "—" for k, _ in IMAGE_METRICS]
      o = ", ".join(f"{k} {_num(ev[k])}" for k in own[variant] if isinstance(ev.get(k), (int, float)))
      lines.append(f"| {variant} | {seed} | {step} | " + " | ".join(img) + f" | {o or '—'} | "
                   f"{w.get('wall_s', '?')} | {w.get('cpu_s', '?')} | {w.get('load_before', '?')} / "
                   f"{w.get('load_after', '?')} |")
  steps = sorted({s for r in res.values() for s in r["step"]})
  if len(steps) > 1:
    lines += ["", f"WARNING: runs at different steps: {steps}"]
  lines += ["", "missing runs (no eval_results.json): " + (", ".join(missing) if missing else "none")]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("cmd", choices=("run", "floor", "table"))
  p.add_argument("--root", required=True)
  p.add_argument("--seeds", type=int, nargs="+", default=None, help="run: default 0 1; table: default all found")
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument("--net", default="", help="16 px ShapesNet weights (trained here first if the file is missing)")
  p.add_argument("--clip", default="", help="a finished shapes-CLIP run / export (default: train RUNS/clip once)")
  p.add_argument("--override", action="append", default=[],
                 help="an extra flag for every training command, e.g. --override=--config.eval.num_samples=128")
  p.add_argument("--floor_n", type=int, default=None, help="floor: n (default config.eval.num_samples)")
  p.add_argument("--stop_after_s", type=float, default=None, help="no new training run after this many seconds")
  a = p.parse_args(argv)
  if a.cmd == "run":
    run_all(a.root, a.seeds or [0, 1], a.steps, a.variants, a.net, a.clip,
            None if a.stop_after_s is None else time.time() + a.stop_after_s, a.override)
  elif a.cmd == "floor":
    print(json.dumps(floor(a.root, a.net, a.seeds or [0, 1], a.floor_n), indent=1))
  else:
    print(table(a.root, a.seeds))


if __name__ == "__main__":
  main()
