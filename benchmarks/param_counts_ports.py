"""Parameter counts of the ported public networks, built abstractly with `jax.eval_shape` (no weights, no memory).

  python benchmarks/param_counts_ports.py

Rows: name, count, count in millions, the reference figure it should match. Other ports add rows to `ROWS`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.models import clip, prior
from diffusion_jax.pretrained.prior import abstract_prior_params


def _clip_rows():
  ids = jax.ShapeDtypeStruct((1, 77), jnp.int32)
  px = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  count = lambda m, *a: clip.count_params(clip.abstract_params(m, *a))
  l14, b32, g14 = (clip.clip_config(n) for n in ("vit-l-14", "vit-b-32", "vit-bigg-14"))
  return [
      ("CLIP ViT-L/14 text tower (CLIPTextModel)", count(clip.CLIPTextModel(l14.text), ids), "123.1M"),
      ("CLIP ViT-L/14 text + projection", count(clip.CLIPTextModel(l14.text, True), ids), ""),
      ("CLIP ViT-L/14 (CLIPModel)", count(clip.CLIPModel(l14), ids, px), "427.6M"),
      ("CLIP ViT-B/32 (CLIPModel)", count(clip.CLIPModel(b32), ids, px), "151.3M"),
      ("CLIP ViT-bigG/14 text + projection", count(clip.CLIPTextModel(g14.text, True), ids), "694.7M"),
  ]


def _prior_rows():
  rows = []
  for name, ref in (("eclipse-karlo", "33M (ECLIPSE Table 3)"), ("eclipse-kandinsky", "34M (ECLIPSE Table 3)"),
                    ("karlo", "~1B (ECLIPSE Table 3)"), ("kandinsky-2.2", "~1B")):
    rows.append((f"PriorTransformer {name}", clip.count_params(abstract_prior_params(prior.prior_config(name))),
                 ref))
  return rows


ROWS = [_clip_rows, _prior_rows]


def main():
  print(f"{'model':48s} {'params':>14s} {'M':>9s}  reference")
  for fn in ROWS:
    for name, n, ref in fn():
      print(f"{name:48s} {n:14,d} {n / 1e6:9.1f}  {ref}")


if __name__ == "__main__":
  main()
