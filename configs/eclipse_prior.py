"""ECLIPSE text-to-image prior (Patel et al., CVPR 2024) on the shapes world; the project's main command.

    python -m diffusion_jax.main --config configs/eclipse_prior.py --workdir runs/eclipse

Stages and steps (a finished stage is reused, a killed one resumes; `diffusion_jax/stages.py`):
  1. stage `clip` in `WORKDIR/clip`: a small CLIP trained on the shapes world (`configs/clip_shapes.py`);
     or a local Hugging Face CLIP directory given as `--config.stages.clip.path=/path/to/clip`;
  2. `WORKDIR/cache`: CLIP embeddings of the (caption, image) pairs, computed once (text hidden states,
     pooled text embedding, image embedding; for the test split also the colour- and position-swapped
     counterfactual images);
  3. the prior, trained by the generic trainer; then `evaluate` writes `results.md` and `eval_results.json`
     (text->image R@1/R@5, cosine(pred, true), binding accuracy for colour / position swaps) and the prior
     is exported in diffusers' PriorTransformer layout to `WORKDIR/export`.
  Optional stage `decoder` (`configs/unclip_decoder_shapes.py`, or `--config.stages.decoder.path` to a
  finished decoder run): adds end-to-end unCLIP images scored by the shapes parser
  (`scripts/eclipse_table.py` sets it).

Variants (`configs/eclipse_prior.py:<arg>`): "" (default, the main job behind `make demo`: the CLIP without
nuisance, temperature from 1/0.07, and the projection-only baseline as stage `projection`), "gap" (the shapes
world with nuisance, a CLIP with a modality gap, and the projection baseline; about 20 min measured in parts on
a loaded 2-core CPU, docs/eclipse.md), "clean" (the default without the baseline stage), "tiny" (seconds, tests),
and objectives via `--config.prior.objective=eclipse|projection|diffusion`:
  * eclipse:    L_proj + lambda * L_CLS (Eq. 5), lambda = 0.2, single forward pass from Gaussian noise;
  * projection: lambda = 0 (the projection-only baseline of Table 2);
  * diffusion:  DALL-E-2 prior: time embedding, 1000-step linear schedule, x0 prediction, 10% condition
                dropout; sampled with 25 DDPM steps and classifier-free guidance 4.0.

Temperature tau of L_CLS is not given by the paper: we use a fixed tau = 0.07 (CLIP's initial value;
`prior.learn_tau=True` makes it a learned scalar initialised there instead).
"""

from __future__ import annotations

import ml_collections

from configs import _base, clip_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  if arg not in ("", "tiny", "clean", "gap"):
    raise ValueError(f"Unknown eclipse_prior variant {arg!r}. Valid variants: '' (default), 'gap', 'clean', 'tiny'.")
  c = _config(arg == "tiny", clean=arg in ("", "clean"))
  return with_baseline(c, arg == "tiny") if arg in ("", "gap") else c


def with_baseline(c: ml_collections.ConfigDict, tiny: bool = False) -> ml_collections.ConfigDict:
  """`c` with the projection-only baseline (lambda = 0) as stage "projection": the same CLIP (the stage is
  shared), the same cache (the parent run's, unless `c` names one), shapes options, architecture and steps; its
  scores are the middle column of results.md. On in the default and `gap` variants."""
  base = _config(tiny)
  base.data.shapes = ml_collections.ConfigDict(c.data.shapes.to_dict())
  base.prior.objective = "projection"
  base.data.embedding_cache = c.data.embedding_cache or "{workdir}/../cache"
  base.stages.clip = c.stages.clip
  c.stages.projection = _base.stage(base, kind="diffusers_prior")
  return c


def without_baseline(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` without the projection-baseline stage (scripts that train every objective themselves)."""
  c.stages.projection = _base.stage(kind="diffusers_prior", optional=True)
  return c


def _config(tiny: bool, clean: bool = False) -> ml_collections.ConfigDict:
  c = _base.base_config()
  c.experiment = "eclipse_prior"
  c.seed = 0

  # (caption, image) pairs -> cached CLIP embeddings.
  c.data.name = "shapes"            # shapes | image_folder | tfds
  c.data.batch_size = 32 if tiny else 128
  c.data.num_train = 64 if tiny else 20000
  c.data.num_test = 32 if tiny else 1000
  c.data.image_size = 32
  c.data.data_dir = ""              # image_folder: folder of images + captions; tfds: TFDS data_dir
  c.data.captions_file = ""         # image_folder: jsonl/tsv of (file, caption); default <data_dir>/captions.jsonl
  c.data.tfds_name = ""             # tfds: e.g. "coco_captions" (array_record build in data_dir)
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.image_key = "image"
  c.data.caption_key = "caption"
  c.data.embedding_cache = ""             # default: <workdir>/cache; "{workdir}" is replaced by the run dir
  c.data.encode_batch_size = 64 if tiny else 250
  c.data.normalize = True           # L2-normalise the cached image / pooled text embeddings
  c.data.seed = 0                   # data stream (fixed across prior seeds so runs share one cache)
  c.data.train_subset = 0           # > 0: train on the first N cached training pairs only (training-set curves)
  # Shapes-world options (nuisance the captions do not describe); must match the CLIP stage's data.
  c.data.shapes = ml_collections.ConfigDict(dict(clip_shapes.NUISANCE) if not (tiny or clean) else {})

  # The CLIP that defines the embedding spaces: stage "clip" (trained here, or a local HF CLIP dir as its path).
  c.stages.clip = _base.stage(clip_shapes.get_config("tiny" if tiny else "clean" if clean else None), kind="hf_clip")
  # Optional unCLIP decoder for end-to-end scores: unset here; scripts/eclipse_table.py sets its config.
  c.stages.decoder = _base.stage(kind="unclip_decoder", optional=True)
  # Optional projection-only baseline (set in the default variant by get_config).
  c.stages.projection = _base.stage(kind="diffusers_prior", optional=True)
  c.clip = ml_collections.ConfigDict()
  c.clip.max_length = 0             # 0: the CLIP's own context length

  # Prior network: PriorTransformer layout (ECLIPSE App. A). num_embeddings / embedding_dim come from the
  # cached CLIP embeddings.
  c.model.name = "prior_transformer"
  c.model.num_layers = 2 if tiny else 4
  c.model.num_attention_heads = 2 if tiny else 4
  c.model.attention_head_dim = 16
  c.model.dropout = 0.0

  c.prior = ml_collections.ConfigDict()
  c.prior.objective = "eclipse"      # eclipse | projection | diffusion
  c.prior.lam = 0.2                  # lambda of Eq. 5 (forced to 0 for objective=projection)
  c.prior.tau = 0.07                 # temperature of L_CLS (not in the paper; our choice)
  c.prior.learn_tau = False
  c.prior.proj_reduction = "sum"     # "sum": ||.||_2^2 of Eq. 3; "mean": per-element MSE
  c.prior.num_timesteps = 1000       # diffusion baseline
  c.prior.beta_schedule = "linear"
  c.prior.cond_drop = 0.1
  c.prior.sample_steps = 25
  c.prior.guidance_scale = 4.0

  c.optim.name = "adamw"
  c.optim.lr = 1e-3 if not tiny else 1e-3
  c.optim.weight_decay = 0.0
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 10 if tiny else 100
  c.optim.grad_clip = 1.0

  c.train.num_steps = 10 if tiny else 400
  c.train.log_every = 5 if tiny else 100
  c.train.ckpt_every = 10 if tiny else 200
  c.train.sample_every = 0
  c.train.eval_every = 0
  _base.set_ema(c)  # no EMA

  c.eval.num_examples = 32 if tiny else 1000
  c.eval.ks = (1, 5)
  c.eval.num_decoded = 16 if tiny else 200
  c.eval.decoder_steps = 25
  c.eval.decoder_guidance = 3.0
  return c
