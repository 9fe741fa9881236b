"""Contrastive pretraining of a small CLIP on (caption, image) pairs: experiment "clip_pretrain".

The built-in ECLIPSE run has no public CLIP offline, so it first trains one on the shapes world (captions are
generated with the images). Objective: CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3): cross-entropy
of `exp(logit_scale) * cos(image_i, text_j)` over the batch in both directions, positives on the diagonal;
`logit_scale` is learned from log(1/0.07) and clipped at log(100) as in CLIP. The text side uses the real
CLIP BPE tokenizer with a short context (`config.model.text.max_position_embeddings`).

At the end of training the model is exported (`export`, into `<workdir>/export`) in the transformers
`CLIPModel` layout (`config.json` + `model.safetensors` + the tokenizer files), which
`data/clip_cache.ClipEmbedder` loads like any public CLIP: export kind "hf_clip", what ECLIPSE's `clip`
stage hands on. `evaluate` reports image<->text retrieval on held-out pairs.
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.data import clip_cache
from diffusion_jax.eval import retrieval
from diffusion_jax.experiments.base import EXPERIMENTS, EXPORT_KINDS, Experiment, require_files
from diffusion_jax.models import clip as clip_lib
from diffusion_jax.registry import check_choice

LOGIT_SCALE_MAX = float(np.log(100.0))


def _unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-16))


def clip_symmetric_loss(image_emb, text_emb, logit_scale, hard_image_emb=None, hard_valid=None):
  """Symmetric CLIP InfoNCE: mean of the image->text and text->image cross-entropies of
  `logit_scale * cos(image_i, text_j)` (a multiplier, not its log), positives on the diagonal.

  `hard_image_emb` [B, K, D] (optional): K extra negative images per caption (NegCLIP-style hard negatives,
  here the caption's own scene with objects 0 and 1 swapped), added to caption i's text->image softmax only;
  `hard_valid` [B, K] masks slots without one (single-object scenes)."""
  x, y = _unit(image_emb), _unit(text_emb)
  logits = logit_scale * (x @ y.T)
  diag = jnp.diagonal(logits)
  l_i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
  t2i = logits.T  # row i: caption i against every image of the batch
  if hard_image_emb is not None:
    extra = logit_scale * jnp.einsum("bd,bkd->bk", y, _unit(hard_image_emb))
    if hard_valid is not None:
      extra = jnp.where(hard_valid > 0, extra, -1e9)
    t2i = jnp.concatenate([t2i, extra], axis=1)
  l_t2i = jnp.mean(jax.nn.logsumexp(t2i, axis=1) - diag)
  return 0.5 * (l_i2t + l_t2i)


def clip_config_from(model_cfg: ml_collections.ConfigDict) -> clip_lib.CLIPConfig:
  """`config.model` (text / vision sub-dicts with transformers names, projection_dim) -> CLIPConfig."""
  text = dict(model_cfg.text)
  vision = dict(model_cfg.vision)
  proj = int(model_cfg.projection_dim)
  extra = {}
  if model_cfg.get("logit_scale_init", None) is not None:  # log of the initial logit multiplier
    extra["logit_scale_init_value"] = float(model_cfg.logit_scale_init)
  return clip_lib.CLIPConfig(
      text=clip_lib.CLIPTextConfig(**{**text, "projection_dim": proj}),
      vision=clip_lib.CLIPVisionConfig(**{**vision, "projection_dim": proj}),
      projection_dim=proj, **extra)


class TokenizeAndNormalize:
  """Example transform: caption -> input_ids / attention_mask, uint8 image -> CLIP-normalised pixels.
  The tokenizer is built here, in the main thread (transformers' lazy imports are not thread-safe), and
  pickles with the transform for worker processes."""

  def __init__(self, max_length: int, shapes_cfg=None, hard_negatives=()):
    self.max_length = int(max_length)
    self._tok = clip_cache.load_tokenizer()
    self.shapes_cfg = shapes_cfg
    self.hard_negatives = tuple(hard_negatives)

  def __call__(self, ex: Dict[str, Any]) -> Dict[str, Any]:
    ids, mask = clip_cache.tokenize(self._tok, [str(ex["caption"])], self.max_length)
    size = np.asarray(ex["image"]).shape[0]
    pixels = clip_cache.preprocess_images(np.asarray(ex["image"])[None], size)[0]
    out = {"input_ids": ids[0], "attention_mask": mask[0], "pixels": pixels}
    if self.hard_negatives:  # the same scene with objects 0 and 1 swapped (colours / positions)
      from diffusion_jax.data import shapes as S
      sc = S.Scene.from_array(ex["objects"], size)
      two = len(sc.objects) >= 2
      swaps = {"colour": S.swap_colours, "position": S.swap_positions}
      imgs = [clip_cache.scene_image(swaps[k](sc), self.shapes_cfg) if two else np.asarray(ex["image"])
              for k in self.hard_negatives]
      out["hard_pixels"] = clip_cache.preprocess_images(np.stack(imgs), size)
      out["hard_valid"] = np.full((len(imgs),), float(two), np.float32)
    return out


@EXPORT_KINDS.register("hf_clip")
def check_hf_clip(path: str) -> None:
  """A transformers-layout CLIP directory (public checkpoint or a clip_pretrain export)."""
  require_files(path, ["config.json", "model.safetensors"], "a transformers CLIP (config.json + model.safetensors)")


@EXPERIMENTS.register("clip_pretrain")
class ClipPretrain(Experiment):
  """Small CLIP on the shapes world (symmetric InfoNCE)."""
  export_kind = "hf_clip"

  def __init__(self, config: ml_collections.ConfigDict, stages=None):
    super().__init__(config, stages)
    self.clip_config = clip_config_from(config.model)
    self.model = clip_lib.CLIPModel(self.clip_config, dtype=jnp.dtype(config.get("dtype", "float32")))
    self.max_length = int(self.clip_config.text.max_position_embeddings)
    self.hard_negatives = tuple(check_choice("config.model.hard_negatives entry", k, ("colour", "position"))
                                for k in config.model.get("hard_negatives", ()) or ())
    if self.clip_config.vision.image_size != int(config.data.image_size):
      raise ValueError(f"config.model.vision.image_size={self.clip_config.vision.image_size} must equal "
                       f"config.data.image_size={config.data.image_size}.")
    self._embed_jit = jax.jit(self._embed)  # one compilation per input shape, shared by every evaluation

  def _source(self, split: str, num: int, seed: int):
    from diffusion_jax.data import shapes as S
    if self.config.data.name != "shapes":
      raise ValueError(f"clip_pretrain trains on the shapes world only (config.data.name='shapes'), got "
                       f"{self.config.data.name!r}. Use a pretrained CLIP for other data.")
    del S
    return clip_cache.ShapesPairSource(num, seed=seed, cfg=clip_cache.shapes_config(self.config.data),
                                       split=split, memo=split == "train")

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    from diffusion_jax.data.pipeline import make_pipeline
    d = self.config.data
    num = int(d.num_train if split == "train" else d.num_test)
    src = self._source(split, num, seed)
    hard = self.hard_negatives if split == "train" else ()
    return make_pipeline(src, [TokenizeAndNormalize(self.max_length, src.cfg, hard)],
                         batch_size=int(d.batch_size) // shard_count, seed=seed, shuffle=split == "train",
                         num_workers=int(d.get("num_workers", 0)), prefetch=int(d.get("prefetch", 2)),
                         shard_index=shard_index, shard_count=shard_count)

  def init(self, rng, batch, frozen):
    return self.model.init(rng, batch["input_ids"][:2], batch["pixels"][:2], batch["attention_mask"][:2])["params"]

  def _embed(self, params, ids, mask, pixels):
    t = self.model.apply({"params": params}, ids, mask, method=clip_lib.CLIPModel.get_text_features)
    i = self.model.apply({"params": params}, pixels, method=clip_lib.CLIPModel.get_image_features)
    return i, t

  def loss(self, params, frozen, ema, batch, rng, step):
    img, txt = self._embed(params, batch["input_ids"], batch["attention_mask"], batch["pixels"])
    scale = jnp.exp(jnp.minimum(params["logit_scale"], LOGIT_SCALE_MAX))
    hard = valid = None
    if "hard_pixels" in batch:
      hp = batch["hard_pixels"]
      flat = hp.reshape((-1,) + hp.shape[2:])
      hard = self.model.apply({"params": params}, flat, method=clip_lib.CLIPModel.get_image_features)
      hard, valid = hard.reshape(hp.shape[:2] + hard.shape[-1:]), batch["hard_valid"]
    loss = clip_symmetric_loss(img, txt, scale, hard, valid)
    return loss, {"logit_scale": scale}

  def export(self, params, frozen, directory: str) -> None:
    save_hf_clip(directory, params, self.clip_config)

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    from diffusion_jax.data import shapes as S
    num = int(self.config.eval.get("num_examples", 500))
    src = self._source("test", num, int(self.config.seed))
    tok = clip_cache.load_tokenizer()
    size = int(self.config.data.image_size)
    scenes = [src.scene(i) for i in range(num)]
    two = np.array([len(sc.objects) >= 2 for sc in scenes])
    images = {"true": [clip_cache.scene_image(sc, src.cfg) for sc in scenes]}
    for kind, swap in (("colour", S.swap_colours), ("position", S.swap_positions)):
      images[kind] = [clip_cache.scene_image(swap(sc), src.cfg) if t else images["true"][i]
                      for i, (sc, t) in enumerate(zip(scenes, two))]
    captions = [S.caption(sc) for sc in scenes]
    emb = {k: [] for k in images}
    txt_e = []
    bs = min(250, num)
    for s in range(0, num, bs):
      idx = list(range(s, min(num, s + bs)))
      idx += [idx[-1]] * (bs - len(idx))  # pad the last batch: one compiled shape
      k = min(num, s + bs) - s
      ids, mask = clip_cache.tokenize(tok, [captions[i] for i in idx], self.max_length)
      for kind in images:
        pix = clip_cache.preprocess_images(np.stack([images[kind][i] for i in idx]), size)
        i, t = self._embed_jit(params, ids, mask, pix)
        emb[kind].append(np.asarray(i)[:k])
      txt_e.append(np.asarray(t)[:k])
    img_e, txt_e = np.concatenate(emb["true"]), np.concatenate(txt_e)
    t2i = retrieval.recall_at_k(txt_e, img_e, (1, 5))
    i2t = retrieval.recall_at_k(img_e, txt_e, (1, 5))
    out = {"t2i_R@1": t2i["R@1"], "t2i_R@5": t2i["R@5"], "i2t_R@1": i2t["R@1"], "i2t_R@5": i2t["R@5"],
           "logit_scale": float(np.exp(min(float(params["logit_scale"]), LOGIT_SCALE_MAX)))}
    out.update(modality_geometry(img_e, txt_e))
    # The CLIP's own zero-shot binding: does the caption prefer its image over the same scene with the
    # colours (positions) of objects 0 and 1 swapped? Two-object scenes only.
    for kind in ("colour", "position"):
      out[f"zero_shot_binding_{kind}"] = retrieval.binding_accuracy(txt_e, img_e, np.concatenate(emb[kind]), two)
    return out


def modality_geometry(image_emb, text_emb) -> Dict[str, float]:
  """Modality-gap figures of N paired (image, text) embeddings (rows i are a pair), on L2-normalised rows:

  * `paired_cos`: mean cos(image_i, text_i);
  * `unpaired_cos`: mean cos(image_i, text_j) over i != j;
  * `image_image_cos` / `text_text_cos`: mean cosine between different images / different captions;
  * `gap`: the modality gap of Liang et al. (2022), || mean_i image_i - mean_i text_i || (centroid distance);
  * `centroid_cos`: cosine between the two centroids.
  """
  x = retrieval.l2_normalize(image_emb)
  y = retrieval.l2_normalize(text_emb)
  n = x.shape[0]
  if n < 2 or y.shape != x.shape:
    raise ValueError(f"modality_geometry needs N >= 2 pairs of equal shape, got {x.shape} and {y.shape}.")
  off = ~np.eye(n, dtype=bool)
  xy, xx, yy = x @ y.T, x @ x.T, y @ y.T
  cx, cy = x.mean(0), y.mean(0)
  return {"paired_cos": float(np.mean(np.diagonal(xy))), "unpaired_cos": float(np.mean(xy[off])),
          "image_image_cos": float(np.mean(xx[off])), "text_text_cos": float(np.mean(yy[off])),
          "gap": float(np.linalg.norm(cx - cy)),
          "centroid_cos": float(cx @ cy / max(np.linalg.norm(cx) * np.linalg.norm(cy), 1e-12))}


def save_hf_clip(directory: str, params, config: clip_lib.CLIPConfig) -> None:
  """Writes our CLIPModel params in the transformers CLIPModel layout (+ the tokenizer files) into
  `directory` (the trainer's export directory, renamed into place when complete)."""
  from diffusion_jax.data import tokenizer as tok_lib
  from diffusion_jax.pretrained import clip as clip_io
  clip_io.save_clip(directory, jax.tree.map(np.asarray, jax.device_get(params)), config, kind="clip")
  tok_lib.write_tokenizer_files(directory)
