"""ECLIPSE: a non-diffusion text-to-image prior trained with projection + contrastive loss (Patel et al.,
CVPR 2024), and its two same-architecture baselines: experiment "eclipse_prior".

The unCLIP stack maps a CLIP text embedding z_y to a CLIP image embedding z_x with a prior g, and a frozen
decoder renders z_x (ECLIPSE §3.1). `config.prior.objective` picks how g is trained:

* "eclipse" (§3.3, Eq. 3-5): one forward pass from Gaussian noise, L = L_proj + lambda * L_CLS with
  L_proj = E ||z_x - g(eps, z_y)||^2 and L_CLS the text->image InfoNCE of cos(g(eps, z_y_i), z_y_j) / tau
  over the batch (predicted image embeddings against the ground-truth CLIP *text* embeddings, positives on
  the diagonal); lambda = 0.2.
* "projection": the same with lambda = 0 (Table 2's "Projection" baseline).
* "diffusion": the DALL-E-2-style diffusion prior (Eq. 1): a time embedding, a 1000-step linear schedule,
  x0 (clean-embedding) prediction, the text condition replaced by the empty caption's encoding 10% of the
  time; sampled with 25 DDPM steps and classifier-free guidance 4.0 (§4.1).

Network: the PriorTransformer layout (`models/prior.py`): [per-token text states, pooled text embedding,
(time embedding), noise / noised embedding, learned prd token], causal mask, prd token -> z_x. Without a
time embedding for eclipse/projection (ECLIPSE App. A, additional_embeddings 3).

Behind `python -m diffusion_jax.main --config configs/eclipse_prior.py --workdir DIR`: stage "clip" (a small
CLIP trained on the shapes world in DIR/clip by `clip_pretrain`, or a local transformers CLIP given as
`--config.stages.clip.path`), reused when finished; the CLIP embedding cache in DIR/cache, built on first use
(`experiments/clip_stage.py`); the prior (the generic trainer); `evaluate` on the held-out split:
text->image retrieval R@1/R@5 against the true image embeddings, cosine(pred, true), binding accuracy
(colour swap, position swap) and, with the optional stage "decoder" (an `unclip_decoder` run), end-to-end
unCLIP images scored by the shapes parser. Results go to DIR/results.md, DIR/eval_results.json and the
console; `export` writes the prior in diffusers' PriorTransformer layout (export kind "diffusers_prior").
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.data import clip_cache
from diffusion_jax.eval import retrieval
from diffusion_jax.images import save_grid
from diffusion_jax.experiments import clip_stage
from diffusion_jax.experiments.base import EXPERIMENTS, EXPORT_KINDS, Experiment, require_files
from diffusion_jax.models import prior as prior_lib
from diffusion_jax.registry import check_choice

OBJECTIVES = ("eclipse", "projection", "diffusion")
LOGIT_SCALE_MAX = float(np.log(100.0))


# ---------------------------------------------------------------------------------------------- losses


def _l2n(x, eps: float = 1e-8):
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def projection_loss(pred, target, reduction: str = "sum"):
  """ECLIPSE Eq. 3, L_proj = E ||z_x - g(eps, z_y)||_2^2.

  `reduction="sum"` sums the squared error over the embedding dimension (the squared L2 norm of the
  equation) and averages over the batch; `"mean"` averages over every element (torch's `F.mse_loss`).
  """
  check_choice("projection loss reduction", reduction, ("sum", "mean"))
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  if reduction == "sum":
    return jnp.mean(jnp.sum(err, axis=-1))
  return jnp.mean(err)


def contrastive_loss_y2x(pred_image_emb, text_emb, tau):
  """ECLIPSE Eq. 4, the one-direction (text -> image) CLIP contrastive loss over a batch of N pairs:

    L_CLS = -(1/N) sum_i log( exp(<x_i, y_i>/tau) / sum_j exp(<x_i, y_j>/tau) )

  with x_i the *predicted* image embedding for caption i, y_j the ground-truth CLIP text embeddings of the
  batch and <.,.> the cosine similarity; positives on the diagonal.
  """
  x = _l2n(pred_image_emb.astype(jnp.float32))
  y = _l2n(text_emb.astype(jnp.float32))
  logits = (x @ y.T) / tau
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits))


def eclipse_loss(pred, image_emb, text_emb, *, lam: float, tau, reduction: str = "sum"):
  """L_ECLIPSE = L_proj + lambda * L_CLS (ECLIPSE Eq. 5); lambda = 0 is the projection-only baseline."""
  l_proj = projection_loss(pred, image_emb, reduction)
  l_cls = contrastive_loss_y2x(pred, text_emb, tau)
  return l_proj + lam * l_cls, {"loss_proj": l_proj, "loss_cls": l_cls}


# ---------------------------------------------------------------------------------------------- helpers


@EXPORT_KINDS.register("diffusers_prior")
def check_diffusers_prior(path: str) -> None:
  require_files(path, ["config.json", "diffusion_pytorch_model.safetensors"], "a diffusers PriorTransformer")


def prior_config_for(model_cfg, objective: str, text_len: int, embed_dim: int) -> prior_lib.PriorConfig:
  diffusion = objective == "diffusion"
  return prior_lib.PriorConfig(
      num_attention_heads=int(model_cfg.num_attention_heads), attention_head_dim=int(model_cfg.attention_head_dim),
      num_layers=int(model_cfg.num_layers), embedding_dim=int(embed_dim), num_embeddings=int(text_len),
      additional_embeddings=4 if diffusion else 3, dropout=float(model_cfg.get("dropout", 0.0)),
      use_timestep=diffusion).validate()


# ---------------------------------------------------------------------------------------------- experiment


@EXPERIMENTS.register("eclipse_prior")
class EclipsePrior(Experiment):
  """ECLIPSE / projection / diffusion prior on cached CLIP embeddings (see the module docstring)."""
  export_kind = "diffusers_prior"

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    subset, num = int(config.data.get("train_subset", 0) or 0), config.data.get("num_train", None)
    if subset < 0 or (num is not None and subset > int(num)):
      raise ValueError(f"config.data.train_subset={subset} must be 0 (all pairs) or in [1, config.data.num_train="
                       f"{num}] (the training pairs the cache holds). Lower it or raise config.data.num_train.")

  def __init__(self, config: ml_collections.ConfigDict, stages=None):
    super().__init__(config, stages)
    p = config.prior
    self.objective = check_choice("prior objective (config.prior.objective)", p.objective, OBJECTIVES)
    self.lam = 0.0 if self.objective == "projection" else float(p.get("lam", 0.2))
    self.tau = float(p.get("tau", 0.07))
    self.learn_tau = bool(p.get("learn_tau", False))
    self.reduction = check_choice("config.prior.proj_reduction", p.get("proj_reduction", "sum"), ("sum", "mean"))
    self.dtype = jnp.dtype(config.get("dtype", "float32"))
    self._dirs: Dict[str, str] = {}
    self._denoise_base = functools.partial(_diffusion_denoise, self)  # one cache key for the sampler
    self.clip_dir = self.stage("clip")
    self._module = None
    self._decoder = None
    self._schedule = None
    self._predict_jit = jax.jit(self._predict_batch)
    if self.objective == "diffusion":
      from diffusion_jax.core.schedules import make_schedule
      self._schedule = make_schedule(p.get("beta_schedule", "linear"), int(p.get("num_timesteps", 1000)))

  # -- data ---------------------------------------------------------------------------------------------

  def cache(self, split: str) -> str:
    """The embedding cache of `split`, built on first use (`clip_stage.embedding_caches`)."""
    if split not in self._dirs:
      self._dirs.update(clip_stage.embedding_caches(self.config, self.clip_dir, self.workdir, [split]))
      if self._module is None:
        self._set_up(self._dirs[split])
    return self._dirs[split]

  def _set_up(self, cache_dir: str) -> None:
    meta = clip_cache.load_meta(cache_dir)
    self.text_len, self.embed_dim = int(meta["text_len"]), int(meta["embed_dim"])
    self.normalized = bool(meta["normalize"])
    for key, have in (("embedding_dim", self.embed_dim), ("num_embeddings", self.text_len)):
      want = int(self.config.model.get(key, 0) or 0)
      if want and want != have:
        raise ValueError(f"config.model.{key}={want} but the CLIP in {self.clip_dir} gives {have}; use the CLIP the "
                         f"config names ({self.config.clip.get('name', '')}) or set config.model.{key}=0.")
    self.prior_config = prior_config_for(self.config.model, self.objective, self.text_len, self.embed_dim)
    self._module = prior_lib.PriorTransformer(self.prior_config, dtype=self.dtype,
                                              remat=self.config.get("remat", "none") != "none")
    null = clip_cache.load_arrays(cache_dir, ["null_text_hidden", "null_text_mask", "null_text_emb"], mmap=False)
    self._null = {k: np.asarray(v, np.float32) for k, v in null.items()}
    # DALL-E 2 / DALLE2-pytorch scale unit-norm image embeddings to norm sqrt(d) for the diffusion prior.
    self.diff_scale = float(np.sqrt(self.embed_dim)) if self.normalized else 1.0
    print(f"[eclipse] prior objective={self.objective} lambda={self.lam} tau={self.tau}"
          f"{' (learned)' if self.learn_tau else ''} text_len={self.text_len} embed_dim={self.embed_dim}",
          flush=True)

  @property
  def module(self):
    if self._module is None:
      raise RuntimeError("The prior network is defined by the CLIP's embedding sizes: call make_dataset (or "
                         "cache(split)) first.")
    return self._module

  # -- trainer interface -------------------------------------------------------------------------------

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    from diffusion_jax.data.pipeline import make_pipeline
    cache_dir = self.cache(split)
    d = self.config.data
    keys = clip_cache.EmbeddingSource.DEFAULT_KEYS
    if split != "train" and "image" in clip_cache.load_meta(cache_dir)["keys"]:
      keys = keys + ("image",)  # shown next to the decoded samples
    source = clip_cache.EmbeddingSource(cache_dir, keys)
    subset = int(d.get("train_subset", 0) or 0)
    if split == "train" and subset:
      source = FirstN(source, subset)
    return make_pipeline(source, (), batch_size=int(d.batch_size) // shard_count,
                         seed=seed, shuffle=split == "train", num_workers=int(d.get("num_workers", 0)),
                         prefetch=int(d.get("prefetch", 2)), shard_index=shard_index, shard_count=shard_count)

  def load_frozen(self):
    self.module  # noqa: B018  (raises when no cache was prepared)
    return dict(self._null) if self.objective == "diffusion" else {}

  def init(self, rng, batch, frozen):
    b = 2
    x = jnp.zeros((b, self.embed_dim), jnp.float32)
    kw = {"timestep": jnp.zeros((b,), jnp.float32)} if self.objective == "diffusion" else {}
    variables = self.module.init(rng, x, batch["text_emb"][:b], batch["text_hidden"][:b], batch["text_mask"][:b], **kw)
    params = {"prior": variables["params"]}
    if self.learn_tau:
      params["logit_scale"] = jnp.asarray(np.log(1.0 / self.tau), jnp.float32)
    return params

  def _tau(self, params):
    if self.learn_tau:
      return 1.0 / jnp.exp(jnp.minimum(params["logit_scale"], LOGIT_SCALE_MAX))
    return self.tau

  def apply(self, params, x, text_emb, text_hidden, text_mask, t=None):
    kw = {"timestep": t} if self.objective == "diffusion" else {}
    return self.module.apply({"params": params["prior"]}, x, text_emb, text_hidden, text_mask, **kw).astype(jnp.float32)

  def loss(self, params, frozen, ema, batch, rng, step):
    z_x = batch["image_emb"].astype(jnp.float32)
    z_y = batch["text_emb"].astype(jnp.float32)
    hid, mask = batch["text_hidden"], batch["text_mask"]
    b = z_x.shape[0]
    if self.objective != "diffusion":
      noise = jax.random.normal(rng, z_x.shape, jnp.float32)
      pred = self.apply(params, noise, z_y, hid, mask)
      tau = self._tau(params)
      loss, m = eclipse_loss(pred, z_x, z_y, lam=self.lam, tau=tau, reduction=self.reduction)
      m["cos"] = jnp.mean(jnp.sum(_l2n(pred) * _l2n(z_x), -1))
      if self.learn_tau:
        m["tau"] = tau
      return loss, m
    # DALL-E-2 diffusion prior: x0 prediction with condition dropout.
    k_t, k_n, k_d = jax.random.split(rng, 3)
    sched = self._schedule
    t = jax.random.randint(k_t, (b,), 0, sched.num_train_timesteps)
    x0 = z_x * self.diff_scale
    eps = jax.random.normal(k_n, x0.shape, jnp.float32)
    a, s = sched.gather(t, x0)
    x_t = a * x0 + s * eps
    drop = jax.random.bernoulli(k_d, float(self.config.prior.get("cond_drop", 0.1)), (b,))
    z_y_in = jnp.where(drop[:, None], frozen["null_text_emb"], z_y)
    hid_in = jnp.where(drop[:, None, None], frozen["null_text_hidden"], hid.astype(jnp.float32))
    mask_in = jnp.where(drop[:, None], frozen["null_text_mask"], mask.astype(jnp.float32))
    pred = self.apply(params, x_t, z_y_in, hid_in, mask_in, t.astype(jnp.float32))
    loss = jnp.mean(jnp.square(pred - x0))  # per-element MSE in the sqrt(d)-scaled space
    cos = jnp.mean(jnp.sum(_l2n(pred) * _l2n(z_x), -1))
    return loss, {"mse_x0": loss, "cos": cos}

  # -- prediction ---------------------------------------------------------------------------------------

  def predict(self, params, rng, text_emb, text_hidden, text_mask, batch_size: int = 250) -> np.ndarray:
    """Predicted image embeddings for cached text encodings (host arrays), in batches of one shape (the last
    one padded): one compilation."""
    n = text_emb.shape[0]
    outs = []
    for i, s in enumerate(range(0, n, batch_size)):
      e = slice(s, min(n, s + batch_size))
      k = jax.random.fold_in(rng, i)
      pad = batch_size - (e.stop - e.start)
      args = [np.asarray(a[e], np.float32) for a in (text_emb, text_hidden, text_mask)]
      if pad:
        args = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in args]
      out = np.asarray(self._predict_jit(params, k, *args))
      outs.append(out[:batch_size - pad])
    return np.concatenate(outs)

  def _predict_batch(self, params, rng, z_y, hid, mask):
    b = z_y.shape[0]
    if self.objective != "diffusion":
      noise = jax.random.normal(rng, (b, self.embed_dim), jnp.float32)
      return self.apply(params, noise, z_y, hid, mask)
    from diffusion_jax.core import samplers
    p = self.config.prior
    null = {k: jnp.broadcast_to(v, (b,) + v.shape[1:]) for k, v in self._null.items()}
    cond = (z_y, hid, mask.astype(jnp.float32))
    uncond = (null["null_text_emb"], null["null_text_hidden"], null["null_text_mask"])
    fn = jax.tree_util.Partial(self._denoise_base, params)
    k_x, k_s = jax.random.split(rng)
    x_T = jax.random.normal(k_x, (b, self.embed_dim), jnp.float32)
    scale = float(p.get("guidance_scale", 4.0))
    x0 = samplers.ddpm_sample(fn, x_T, num_steps=int(p.get("sample_steps", 25)), schedule=self._schedule,
                              prediction_type="sample", rng=k_s, cond=cond,
                              uncond=uncond if scale != 1.0 else None,
                              guidance_scale=scale if scale != 1.0 else None)
    return x0 / self.diff_scale

  # -- evaluation ---------------------------------------------------------------------------------------

  def sample(self, params, frozen, batch, rng):
    """Predicted image embeddings for the captions of `batch`; decoded images too with a "decoder" stage."""
    k_p, k_d = jax.random.split(rng)
    pred = self.predict(params, k_p, batch["text_emb"], batch["text_hidden"], batch["text_mask"],
                        batch_size=len(batch["text_emb"]))
    out = {"image_emb": pred}
    if "decoder" in self.stages:
      imgs = self.decoder().decode(pred, k_d, steps=int(self.config.eval.get("decoder_steps", 25)),
                                   guidance=float(self.config.eval.get("decoder_guidance", 3.0)))
      out["decoded"] = imgs.astype(np.float32) / 255.0
    return out

  def export(self, params, frozen, directory: str) -> None:
    if self.config.eval.get("export_prior", True):
      from diffusion_jax.pretrained import prior as prior_io
      prior_io.save_prior(directory, jax.device_get(params["prior"]), self.prior_config)

  def decoder(self):
    if self._decoder is None:
      from diffusion_jax.experiments import unclip_decoder
      self._decoder = unclip_decoder.load_decoder(self.stage("decoder"))
    return self._decoder

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    test = self.cache("test")
    meta = clip_cache.load_meta(test)
    keys = ["text_hidden", "text_mask", "text_emb", "image_emb"]
    cf_keys = [k for k in meta["keys"] if k.startswith("cf_")]
    arrays = clip_cache.load_arrays(test, keys + cf_keys + (["objects"] if "objects" in meta["keys"] else []))
    n = min(int(self.config.eval.get("num_examples", meta["num"])), int(meta["num"]))
    sl = slice(0, n)
    pred = self.predict(params, rng, arrays["text_emb"][sl], arrays["text_hidden"][sl], arrays["text_mask"][sl])
    true = np.asarray(arrays["image_emb"][sl], np.float32)
    cfs = {kind: np.asarray(arrays[f"cf_{kind}_emb"][sl]) for kind in clip_cache.COUNTERFACTUALS
           if f"cf_{kind}_emb" in arrays}
    valid = {kind: np.asarray(arrays[f"cf_{kind}_valid"][sl]) for kind in cfs}
    ks = tuple(int(k) for k in self.config.eval.get("ks", (1, 5)))
    res = retrieval.embedding_metrics(pred, true, cfs, valid, ks)
    # Reference: the CLIP text embedding itself used as the image query (zero-shot CLIP retrieval).
    ref = retrieval.embedding_metrics(np.asarray(arrays["text_emb"][sl], np.float32), true, cfs, valid, ks)
    res.update({f"clip_text_{k}": v for k, v in ref.items()})
    # The CLIP's geometry on these pairs (paired / unpaired text-image cosine, modality gap).
    from diffusion_jax.experiments.clip_pretrain import modality_geometry
    res.update({f"clip_{k}": v for k, v in modality_geometry(true, np.asarray(arrays["text_emb"][sl])).items()})
    res["num_examples"] = float(n)
    if "projection" in self.stages:  # the projection-only baseline (stage "projection"), same CLIP and cache
      import json
      base_path = os.path.join(os.path.dirname(os.path.normpath(self.stage("projection"))), "eval_results.json")
      base = {}
      if os.path.exists(base_path):  # the stage's run directory holds its export and its evaluation
        with open(base_path) as f:
          base = json.load(f)
      else:  # e.g. a projection prior given as a bare export directory (config.stages.projection.path)
        from absl import logging
        logging.warning("ECLIPSE evaluate: no %s, so results.md has no projection-baseline column. Point "
                        "config.stages.projection.path at the baseline's run directory (it holds "
                        "eval_results.json), not at its export.", base_path)
      res.update({f"projection_{k}": float(base[k]) for k, _ in METRIC_ROWS if k in base})
    decoded = None
    if "decoder" in self.stages:
      e2e, decoded = self._end_to_end(pred, arrays.get("objects"), rng, workdir)
      res.update(e2e)
    rows = int(self.config.eval.get("sheet_rows", 6))
    if rows > 0 and "image" in meta["keys"] and jax.process_index() == 0:
      images = clip_cache.load_arrays(test, ["image"])["image"][sl]
      retrieval_sheet(os.path.join(workdir, "samples", "retrieval.png"), clip_cache.load_captions(test)[:n],
                      images, pred, true, rows=min(rows, n), k=5, decoded=decoded)
    write_results(workdir, res, self._description())
    return res

  def _description(self) -> Dict[str, Any]:
    return {"objective": self.objective, "lambda": self.lam, "tau": self.tau, "learn_tau": self.learn_tau,
            "clip": self.clip_dir, "steps": int(self.config.train.num_steps),
            "layers": int(self.config.model.num_layers),
            "width": int(self.config.model.num_attention_heads) * int(self.config.model.attention_head_dim)}

  def _end_to_end(self, pred, objects, rng, workdir: str) -> Dict[str, float]:
    from diffusion_jax.eval import shapes_parser
    if objects is None:
      raise ValueError("End-to-end scoring needs the shapes world (scene encodings in the cache).")
    num = min(int(self.config.eval.get("num_decoded", 200)), pred.shape[0])
    imgs = self.decoder().decode(pred[:num], jax.random.fold_in(rng, 7), steps=int(self.config.eval.get("decoder_steps", 25)),
                      guidance=float(self.config.eval.get("decoder_guidance", 3.0)))
    scores = shapes_parser.score_all(imgs, np.asarray(objects[:num]))
    save_grid(os.path.join(workdir, "samples", "end_to_end.png"), imgs[:64])
    return {f"e2e_{k}": float(v) for k, v in scores.items()}, imgs


class FirstN:
  """The first `n` examples of a random-access source (`config.data.train_subset`: smaller training sets
  drawn from one cache)."""

  def __init__(self, source, n: int):
    if not 1 <= int(n) <= len(source):
      raise ValueError(f"config.data.train_subset={n} must be in [1, {len(source)}] (the cached training pairs).")
    self.source, self.n = source, int(n)

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    if not 0 <= int(index) < self.n:
      raise IndexError(f"index {index} out of range [0, {self.n}).")
    return self.source[int(index)]


def retrieval_sheet(path: str, captions, images, pred, true, *, rows: int = 6, k: int = 5, decoded=None,
                    scale: int = 3) -> np.ndarray:
  """DIR/samples/retrieval.png: for the first `rows` held-out captions, the caption, the true image, the top-`k`
  held-out images by cosine between the predicted embedding and their CLIP image embeddings (the true image
  framed green when retrieved) and, with a decoder stage, the image decoded from the predicted embedding.
  `images` uint8 [N, H, W, 3] (the gallery, aligned with `true`); `decoded` floats in [0, 1] or None.
  Returns the sheet (uint8 [H, W, 3]) and writes it to `path`."""
  from PIL import Image, ImageDraw, ImageFont
  from diffusion_jax.images import save_png
  if decoded is not None and len(decoded) < rows:
    decoded = None  # fewer decoded images than rows (config.eval.num_decoded): no decoded column
  unit = lambda a: np.asarray(a, np.float32) / np.linalg.norm(np.asarray(a, np.float32), axis=-1,
                                                              keepdims=True).clip(1e-8)
  sims = unit(pred[:rows]) @ unit(true).T  # [rows, N]
  top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  up = lambda im: np.repeat(np.repeat(np.asarray(im), scale, 0), scale, 1)
  size = images.shape[1] * scale
  cols = ["true image"] + [f"top-{j + 1}" for j in range(k)] + (["decoded"] if decoded is not None else [])
  pad, head, cap = 4, 14, 13
  w, h = pad + len(cols) * (size + pad), head + rows * (size + cap + pad)
  sheet = Image.new("RGB", (w, h), (255, 255, 255))
  draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
  for c, name in enumerate(cols):
    draw.text((pad + c * (size + pad), 2), name, fill=(0, 0, 0), font=font)
  for r in range(rows):
    y = head + r * (size + cap + pad)
    cells = [images[r]] + [images[int(t)] for t in top[r]]
    if decoded is not None:
      cells.append((np.clip(np.asarray(decoded[r], np.float32), 0, 1) * 255 + 0.5).astype(np.uint8))
    for c, im in enumerate(cells):
      x = pad + c * (size + pad)
      sheet.paste(Image.fromarray(up(np.asarray(im, np.uint8))), (x, y))
      if 1 <= c <= k and int(top[r][c - 1]) == r:
        draw.rectangle([x, y, x + size - 1, y + size - 1], outline=(0, 200, 0), width=2)
    draw.text((pad, y + size), str(captions[r])[: max(8, w // 6)], fill=(0, 0, 0), font=font)
  arr = np.asarray(sheet)
  save_png(path, arr)
  return arr


def _diffusion_denoise(exp: "EclipsePrior", params, x, t, cond):
  z_y, hid, mask = cond
  return exp.apply(params, x, z_y, hid, mask, t)



METRIC_ROWS = (("R@1", "text->image R@1"), ("R@5", "text->image R@5"), ("cosine", "cos(pred, true image emb)"),
               ("binding_colour", "binding acc. (colour swap)"), ("binding_position", "binding acc. (position swap)"),
               ("e2e_binding", "end-to-end colour binding"), ("e2e_shape_recall", "end-to-end shape recall"),
               ("e2e_relation_accuracy", "end-to-end relation acc."), ("e2e_class_accuracy", "end-to-end class acc."))


def write_results(workdir: str, res: Dict[str, float], desc: Dict[str, Any]) -> str:
  """DIR/results.md: a short table of the prior's metrics next to zero-shot CLIP text retrieval."""
  lines = [f"# ECLIPSE prior results ({desc['objective']})", "",
           f"objective={desc['objective']}, lambda={desc['lambda']}, tau={desc['tau']}"
           f"{' (learned)' if desc.get('learn_tau') else ''}, prior {desc['layers']} layers x width "
           f"{desc['width']}, {desc['steps']} steps, {int(res.get('num_examples', 0))} held-out captions; "
           f"CLIP: {desc['clip']}", "",
           "| metric | prior | projection-only prior (lambda=0) | CLIP text emb. as query |", "|---|---|---|---|"]
  for key, name in METRIC_ROWS:
    if key in res:
      cells = [res.get(f"projection_{key}"), res.get(f"clip_text_{key}")]
      lines.append(f"| {name} | {res[key]:.4f} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in cells) + " |")
  if "clip_paired_cos" in res:
    lines += ["", "The CLIP's geometry on the held-out pairs (L2-normalised embeddings): paired text-image cosine "
              f"{res['clip_paired_cos']:.3f}, unpaired {res['clip_unpaired_cos']:.3f}, modality gap (distance between "
              f"the image and text centroids) {res['clip_gap']:.3f}."]
  text = "\n".join(lines) + "\n"
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(text)
  print("\n" + text, flush=True)
  return text
