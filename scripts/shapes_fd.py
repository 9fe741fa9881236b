"""Shapes FD: train its network once, and validate it as a metric.

    python scripts/shapes_fd.py train --out runs/shapes_fd/net32.safetensors [--image_size 32] [--steps 800]
    python scripts/shapes_fd.py validate --net runs/shapes_fd/net32.safetensors [--num 2000] [--out table.json]

`validate` measures, on the test split: the distance between two independent real sample sets (should be ~0
relative to the others), and the distance of degraded real images (Gaussian noise, Gaussian blur, colour shift,
several strengths) to clean real ones, next to the shapes parser's class accuracy on the same images (the
distance should grow as the accuracy falls). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

LEVELS = {"noise": (0.05, 0.1, 0.2, 0.4), "blur": (0.5, 1.0, 1.5, 2.0), "colour": (0.1, 0.2, 0.35, 0.5)}


def _real(cfg, n, seed, split="test", offset=0):
  from diffusion_jax.data import shapes as S
  src = S.ShapesSource(offset + n, seed=seed, cfg=cfg, split=split)
  exs = [src[i] for i in range(offset, offset + n)]
  return (np.stack([e["image"] for e in exs]).astype(np.float32) / 127.5 - 1.0,
          np.array([e["label"] for e in exs]))


def validate(net_path, num, seed=0):
  from diffusion_jax.data import shapes as S
  from diffusion_jax.eval import shapes_fd as F
  from diffusion_jax.eval import shapes_parser as P
  m = F.ShapesFD(net_path)
  cfg = S.ShapesConfig(image_size=int(m.info["image_size"]))
  a, la = _real(cfg, num, seed)
  b, lb = _real(cfg, num, seed, offset=num)  # an independent set of the same distribution
  sa = m.statistics(a)
  mu, cov = sa.mean(), sa.cov()

  def dist(x):
    s = m.statistics(x)
    return F.frechet_distance(s.mean(), s.cov(), mu, cov)

  def acc(x, labels):
    return float(P.class_accuracy_parsed(P.parse_batch(x, cfg=cfg, value_range="-1,1"), labels))

  rows = [{"degradation": "none (independent real set)", "level": 0.0, "shapes_fd": dist(b),
           "parser_class_accuracy": acc(b, lb)}]
  for name, levels in LEVELS.items():
    for lv in levels:
      x = F.DEGRADATIONS[name](b, lv)
      rows.append({"degradation": name, "level": lv, "shapes_fd": dist(x), "parser_class_accuracy": acc(x, lb)})
  return {"net": net_path, "net_sha256": m.sha256, "net_info": m.info, "num": num, "rows": rows}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train")
  t.add_argument("--out", required=True)
  t.add_argument("--image_size", type=int, default=32)
  t.add_argument("--steps", type=int, default=800)
  t.add_argument("--width", type=int, default=32)
  t.add_argument("--seed", type=int, default=0)
  v = sub.add_parser("validate")
  v.add_argument("--net", required=True)
  v.add_argument("--num", type=int, default=2000)
  v.add_argument("--out", default="")
  a = p.parse_args(argv)
  if a.cmd == "train":
    from diffusion_jax.data import shapes as S
    from diffusion_jax.eval import shapes_fd as F
    t0 = time.time()
    params, info = F.train(S.ShapesConfig(image_size=a.image_size), steps=a.steps, width=a.width, seed=a.seed)
    info["train_seconds"] = round(time.time() - t0, 1)
    F.save(params, info, a.out)
    print(json.dumps(info))
    return
  res = validate(a.net, a.num)
  print("| degradation | level | shapes FD | parser class accuracy |\n|---|---|---|---|")
  for r in res["rows"]:
    print(f"| {r['degradation']} | {r['level']:g} | {r['shapes_fd']:.4g} | {r['parser_class_accuracy']:.3f} |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
