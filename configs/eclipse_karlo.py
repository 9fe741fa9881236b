"""ECLIPSE prior for Karlo (kakaobrain/karlo-v1-alpha): paper scale (ECLIPSE App. A Table 3, §4.1).

    python -m diffusion_jax.main --config configs/eclipse_karlo.py --workdir /ckpt/eclipse_karlo \
        --config.stages.clip.path=/models/clip-vit-large-patch14 \
        --config.data.data_dir=/data/tfds --config.data.tfds_name=coco_captions

Prior: PriorTransformer layout without time embedding, 10 layers, 16 heads x 32 (width 512), 77 text tokens,
embedding dim 768 (CLIP ViT-L/14), 3 additional embeddings: 33.1M parameters ("33M"). Trained with
L_proj + 0.2 * L_CLS (tau = 0.07, our choice: the paper does not give it), lr 5e-5, global batch 1024 (4 GPUs x
256), CosineAnnealingWarmRestarts (cycles of 15k steps: the paper does not give T_0) for 60k iterations; AdamW
(the paper does not name the optimiser). Data: MSCOCO / CC3M / CC12M captions through TFDS (array_record) or
an image folder; CLIP embeddings are extracted once into WORKDIR/cache (unnormalised, as Karlo's decoder
expects them). The trained prior is exported to WORKDIR/export in the diffusers PriorTransformer layout
(ECLIPSE variant) for the ECLIPSE Karlo pipeline.

Variants: "" (paper), "tiny" (a few steps on the shapes world with a small prior; set
--config.stages.clip.path to any local transformers CLIP; used by the tests).
"""

from __future__ import annotations

import ml_collections

from configs import _base, eclipse_prior


def paper_config(embedding_dim: int, clip_name: str, arg: str | None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny"):
    raise ValueError(f"Unknown variant {arg!r}. Valid variants: '' (paper scale), 'tiny'.")
  tiny = arg == "tiny"
  c = eclipse_prior.get_config("tiny")
  # Stage "clip" has no run to train: it must be given as a local transformers CLIP directory.
  c.stages.clip = _base.stage(path="", kind="hf_clip")
  c.clip.name = clip_name
  c.clip.max_length = 0              # the CLIP's own 77-token context

  c.model.num_layers = 10
  c.model.num_attention_heads = 16
  c.model.attention_head_dim = 32
  c.model.dropout = 0.0
  c.model.embedding_dim = embedding_dim   # checked against the CLIP's projection dim
  c.model.num_embeddings = 77             # checked against the CLIP's context length

  c.prior.objective = "eclipse"
  c.prior.lam = 0.2
  c.prior.tau = 0.07
  c.prior.proj_reduction = "sum"

  c.data.name = "tfds"
  c.data.tfds_name = "coco_captions"
  c.data.caption_key = "captions/text"
  c.data.train_split = "train"
  c.data.test_split = "val"
  c.data.num_train = 0               # 0 = the whole split
  c.data.num_test = 5000
  c.data.normalize = False           # the decoders consume raw CLIP image embeddings
  c.data.batch_size = 1024
  c.data.encode_batch_size = 256
  c.data.num_workers = 0

  c.optim.name = "adamw"
  c.optim.lr = 5e-5
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine_restarts"
  c.optim.warmup_steps = 0
  c.optim.restart_period = 15000
  c.optim.grad_clip = 1.0

  c.train.num_steps = 60000
  c.train.log_every = 100
  c.train.ckpt_every = 5000
  c.train.eval_every = 0
  c.eval.num_examples = 5000
  c.eval.export_prior = True

  if tiny:  # same code path, seconds on a CPU
    c.model.num_layers = 1
    c.model.num_attention_heads = 2
    c.model.attention_head_dim = 8
    c.model.embedding_dim = 0        # 0 = whatever the given CLIP has
    c.model.num_embeddings = 0
    c.data.name = "shapes"
    c.data.num_train = 64
    c.data.num_test = 32
    c.data.batch_size = 16
    c.data.encode_batch_size = 32
    c.optim.lr = 1e-3
    c.optim.restart_period = 4
    c.train.num_steps = 8
    c.train.log_every = 4
    c.train.ckpt_every = 8
    c.eval.num_examples = 32
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return paper_config(768, "openai/clip-vit-large-patch14 (CLIP ViT-L/14)", arg)
