"""ECLIPSE prior for Kandinsky 2.2: paper scale (ECLIPSE App. A Table 3, §4.1;
ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior config).

    python -m diffusion_jax.main --config configs/eclipse_kandinsky.py --workdir /ckpt/eclipse_kandinsky \
        --config.stages.clip.path=/models/CLIP-ViT-bigG-14-laion2B-39B-b160k \
        --config.data.data_dir=/data/tfds --config.data.tfds_name=coco_captions

Prior: 10 layers, 16 heads x 32 (width 512), 77 text tokens, embedding dim 1280 (laion CLIP ViT-bigG/14,
projection_dim 1280), no time embedding: 34.2M parameters ("34M"). Same recipe as `eclipse_karlo.py`
(L_proj + 0.2 L_CLS, tau 0.07, lr 5e-5, batch 1024, cosine warm restarts, 60k steps). The export in
WORKDIR/export plugs into kandinsky-community/kandinsky-2-2-prior's pipeline in place of its prior.

Variants: "" (paper), "tiny" (see eclipse_karlo.py).
"""

from __future__ import annotations

import ml_collections

from configs import eclipse_karlo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = eclipse_karlo.paper_config(1280, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k (CLIP ViT-bigG/14)", arg)
  if not (arg or ""):
    c.data.tfds_name = "coco_captions"   # the paper also uses a 5M LAION-HighRes subset (image folder)
  return c
