"""Small-scale ECLIPSE Table 2 on the shapes world: Projection vs Diffusion-Baseline vs ECLIPSE priors, several seeds.

    python scripts/eclipse_table.py --workdir runs/eclipse_table [--seeds 0,1,2] [--variant tiny]
        [--objectives eclipse,projection,diffusion] [--no-decoder] [--set prior.tau=0.1 ...]

One shapes CLIP and one embedding cache (DIR/clip, DIR/cache) and one unCLIP decoder (DIR/decoder,
`configs/unclip_decoder_shapes.py`) are shared by every prior (as the paths of its `clip` and `decoder`
stages); each (objective, seed) prior trains in
DIR/<objective>_seed<k> with `configs/eclipse_prior.py` (same architecture, data and steps; only the objective
and the seed change). Finished runs are reused. Writes DIR/table.md and DIR/table.json (mean +- std over seeds,
and per-seed differences ECLIPSE - Projection) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

COLUMNS = (("R@1", "R@1"), ("R@5", "R@5"), ("cosine", "cos"), ("binding_colour", "bind. colour"),
           ("binding_position", "bind. position"), ("e2e_binding", "e2e colour binding"),
           ("e2e_shape_recall", "e2e shape"), ("e2e_relation_accuracy", "e2e relation"))
NAMES = {"projection": "Projection (lambda=0)", "diffusion": "Diffusion-Baseline", "eclipse": "ECLIPSE"}


def _set(cfg, assignments: List[str]):
  import ml_collections  # noqa: F401
  for a in assignments:
    key, value = a.split("=", 1)
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    old = node[parts[-1]]
    node[parts[-1]] = type(old)(value) if not isinstance(old, bool) else value.lower() in ("1", "true", "yes")


def _finished(wd: str, num_steps: int):
  path = os.path.join(wd, "eval_results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    res = json.load(f)
  return res if int(res.get("step", -1)) >= num_steps else None


def _fmt(vals: List[float]) -> str:
  vals = [v for v in vals if v is not None and np.isfinite(v)]
  if not vals:
    return "-"
  if len(vals) == 1:
    return f"{vals[0]:.3f}"
  return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--objectives", default="projection,diffusion,eclipse")
  ap.add_argument("--variant", default="", help="config variant of eclipse_prior / unclip_decoder_shapes ('' or tiny)")
  ap.add_argument("--clip-workdir", default="", help="an existing shapes-CLIP work dir to share (default DIR/clip)")
  ap.add_argument("--cache", default="", help="an existing embedding cache root to share (default DIR/cache)")
  ap.add_argument("--no-decoder", action="store_true", help="skip the unCLIP decoder and the end-to-end scores")
  ap.add_argument("--set", nargs="*", default=[], help="overrides of the prior config, key=value")
  ap.add_argument("--decoder-set", nargs="*", default=[], help="overrides of the decoder config, key=value")
  args = ap.parse_args(argv)

  from absl import flags, logging
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  from configs import eclipse_prior, unclip_decoder_shapes
  from diffusion_jax import stages

  wd = os.path.abspath(args.workdir)
  os.makedirs(wd, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",") if s]
  objectives = [o for o in args.objectives.split(",") if o]
  shared = {"clip": args.clip_workdir or os.path.join(wd, "clip"), "cache": args.cache or os.path.join(wd, "cache")}
  if not args.clip_workdir:  # the shared CLIP: stage "clip" of the prior config, trained once in DIR/clip
    stages.resolve(eclipse_prior.without_baseline(eclipse_prior.get_config(args.variant or None)), wd)

  def prior_config(obj: str, seed: int):
    cfg = eclipse_prior.without_baseline(eclipse_prior.get_config(args.variant or None))
    cfg.stages.clip.path, cfg.data.embedding_cache = shared["clip"], shared["cache"]
    cfg.prior.objective = obj
    cfg.seed = seed
    _set(cfg, args.set)
    return cfg

  def write_table(results, dec_res, dec_cfg=None):
    header = "| prior | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for obj in objectives:
      runs = list(results[obj].values())
      cells = [_fmt([r.get(k) for r in runs]) for k, _ in COLUMNS]
      lines.append(f"| {NAMES.get(obj, obj)} | " + " | ".join(cells) + " |")
    any_run = next(iter(next(iter(results.values())).values()))
    lines.append("| CLIP text emb. as query (zero-shot, reference) | " + " | ".join(
        _fmt([any_run.get(f"clip_text_{k}")]) if not k.startswith("e2e") else "-" for k, _ in COLUMNS) + " |")
    if dec_res is not None:
      lines.append("| decoder on the true image embeddings (upper bound) | " + " | ".join(
          _fmt([dec_res.get(k.replace("e2e_", "true_emb_"))]) if k.startswith("e2e") else "-"
          for k, _ in COLUMNS) + " |")
    diffs = {}
    if "eclipse" in results and "projection" in results:
      common = sorted(set(results["eclipse"]) & set(results["projection"]))
      for k, name in COLUMNS:
        d = [results["eclipse"][s].get(k, np.nan) - results["projection"][s].get(k, np.nan) for s in common]
        diffs[k] = d
      lines += ["", "Per-seed difference ECLIPSE - Projection (seeds " + ",".join(map(str, common)) + "):", "",
                "| | " + " | ".join(name for _, name in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1),
                "| mean (min, max) | " + " | ".join(
                    f"{np.mean(v):+.3f} ({np.min(v):+.3f}, {np.max(v):+.3f})" if np.all(np.isfinite(v)) else "-"
                    for v in diffs.values()) + " |"]
    n = int(any_run.get("num_examples", 0))
    text = f"Shapes world, {len(seeds)} seed(s) per prior, {n} held-out captions (retrieval among {n} images)."
    if dec_res is not None:
      text += (f" End-to-end (e2e) columns: the first {int(dec_cfg.eval.num_examples)} of them decoded by one unCLIP "
               f"decoder ({int(dec_res.get('step', 0))} steps; DDIM {int(dec_cfg.sample.steps)} steps, guidance "
               f"{float(dec_cfg.sample.guidance):g}) and scored by the shapes parser.")
    text += "\n\n" + "\n".join(lines) + "\n"
    with open(os.path.join(wd, "table.md"), "w") as f:
      f.write(text)
    with open(os.path.join(wd, "table.json"), "w") as f:
      json.dump({"runs": {o: {str(s): r for s, r in v.items()} for o, v in results.items()}, "decoder": dec_res,
                 "eclipse_minus_projection": diffs}, f, indent=1, default=float)
    print("\n" + text, flush=True)


  # Phase 1: every prior (retrieval / binding evaluation at the end of its training).
  results: Dict[str, Dict[int, dict]] = {}
  for obj in objectives:
    for seed in seeds:
      cfg = prior_config(obj, seed)
      run_wd = os.path.join(wd, f"{obj}_seed{seed}")
      res = _finished(run_wd, int(cfg.train.num_steps))
      if res is None:
        print(f"[table] training the {obj} prior, seed {seed}, in {run_wd}", flush=True)
        stages.run(cfg, run_wd)
        res = _finished(run_wd, int(cfg.train.num_steps))
      results.setdefault(obj, {})[seed] = res

  write_table(results, None)  # retrieval / binding now; end-to-end columns after phase 2

  # Phase 2: one unCLIP decoder, then every prior decoded end to end and scored by the shapes parser.
  dec_wd = os.path.join(wd, "decoder")
  dec_res = None
  if not args.no_decoder:
    dcfg = unclip_decoder_shapes.get_config(args.variant or None)
    dcfg.stages.clip.path, dcfg.data.embedding_cache = shared["clip"], shared["cache"]
    _set(dcfg, args.decoder_set)
    dec_res = _finished(dec_wd, int(dcfg.train.num_steps))
    if dec_res is None:
      print(f"[table] training the unCLIP decoder in {dec_wd}", flush=True)
      stages.run(dcfg, dec_wd)
      dec_res = _finished(dec_wd, int(dcfg.train.num_steps))
    for obj in objectives:
      for seed in seeds:
        if "e2e_binding" in results[obj][seed]:
          continue
        cfg = prior_config(obj, seed)
        cfg.stages.decoder.path = dec_wd
        # Decode exactly as the decoder's own reference row does (same held-out captions, sampler, guidance).
        cfg.eval.num_decoded = int(dcfg.eval.num_examples)
        cfg.eval.decoder_steps = int(dcfg.sample.steps)
        cfg.eval.decoder_guidance = float(dcfg.sample.guidance)
        run_wd = os.path.join(wd, f"{obj}_seed{seed}")
        print(f"[table] end-to-end evaluation of {run_wd}", flush=True)
        stages.run(cfg, run_wd, mode="eval")
        results[obj][seed] = _finished(run_wd, int(cfg.train.num_steps))

  write_table(results, dec_res, None if args.no_decoder else dcfg)
  return results


if __name__ == "__main__":
  main()
