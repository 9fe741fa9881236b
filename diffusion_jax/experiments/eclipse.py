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

Stages behind `python -m diffusion_jax.main --config configs/eclipse_prior.py --workdir DIR` (each reused when
done): a small CLIP trained on the shapes world in DIR/clip (`config.clip.train`, unless
`config.clip.pretrained_dir` names a local transformers CLIP); the CLIP embedding cache in DIR/cache
(`data/clip_cache.py`); the prior (the generic trainer); `evaluate` on the held-out split: text->image
retrieval R@1/R@5 against the true image embeddings, cosine(pred, true), binding accuracy (colour swap,
position swap) and, with `config.eval.decoder_workdir`, end-to-end unCLIP images scored by the shapes parser.
Results go to DIR/results.md, DIR/eval_results.json and the console.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax.data import clip_cache
from diffusion_jax.eval import retrieval
from diffusion_jax.experiments.base import EXPERIMENTS, Experiment, ExperimentState
from diffusion_jax.models import prior as prior_lib
from diffusion_jax.registry import check_choice

OBJECTIVES = ("eclipse", "projection", "diffusion")
PRIOR_EXPORT = "prior_export"  # diffusers PriorTransformer layout (ECLIPSE variant without time embedding)
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


def resolve_workdir(experiment: Experiment) -> Optional[str]:
  """Where the experiment's stages live: `experiment.workdir` if the trainer set it, else the `--workdir`
  flag of `diffusion_jax.main` when it is running, else None."""
  wd = getattr(experiment, "workdir", None)
  if wd:
    return wd
  try:
    from absl import flags
    if flags.FLAGS.is_parsed() and "workdir" in flags.FLAGS and flags.FLAGS.workdir:
      return flags.FLAGS.workdir
  except Exception:  # pragma: no cover - flags not defined
    pass
  return None


def ensure_clip(config: ml_collections.ConfigDict, root: Optional[str]) -> str:
  """The transformers-layout CLIP directory to use: `config.clip.pretrained_dir`, or the shapes CLIP in
  `config.clip.workdir` (default `<root>/clip`), trained there first with `config.clip.train` unless its
  export already exists."""
  pre = config.clip.get("pretrained_dir", "")
  if pre:
    if not os.path.isdir(pre):
      raise FileNotFoundError(f"config.clip.pretrained_dir={pre!r} is not a directory. Point it at a local "
                              "transformers CLIP (config.json + model.safetensors), or leave it empty to train "
                              "a small CLIP on the shapes world.")
    return pre
  if config.clip.get("require_pretrained", False):
    raise ValueError(f"This config needs a pretrained CLIP ({config.clip.get('name', 'see the config docstring')}): "
                     "download it once and pass --config.clip.pretrained_dir=/path/to/the/transformers/dir.")
  from diffusion_jax.experiments import clip_pretrain
  clip_wd = config.clip.get("workdir", "") or (os.path.join(root, "clip") if root else "")
  if not clip_wd:
    raise ValueError("No place for the shapes CLIP: set config.clip.workdir (or run through diffusion_jax.main "
                     "with --workdir), or set config.clip.pretrained_dir.")
  if not clip_pretrain.is_trained(clip_wd):
    if "train" not in config.clip or not config.clip.train:
      raise ValueError(f"No trained CLIP in {clip_wd} and no config.clip.train to train one.")
    from diffusion_jax.train.trainer import train
    logging.info("Stage 1/3: training the shapes CLIP in %s", clip_wd)
    print(f"[eclipse] stage 1/3: training a small CLIP on the shapes world in {clip_wd}", flush=True)
    train(config.clip.train, clip_wd)
    if not clip_pretrain.is_trained(clip_wd):
      raise RuntimeError(f"CLIP training in {clip_wd} ended without an export (was it preempted?). Rerun.")
  else:
    print(f"[eclipse] stage 1/3: reusing the CLIP in {clip_pretrain.export_dir(clip_wd)}", flush=True)
  return clip_pretrain.export_dir(clip_wd)


def ensure_caches(config, clip_dir: str, root: Optional[str], splits=("train", "test")) -> Dict[str, str]:
  cache_root = config.data.get("embedding_cache", "") or (os.path.join(root, "cache") if root else "")
  if not cache_root:
    raise ValueError("No place for the embedding cache: set config.data.embedding_cache (or run through "
                     "diffusion_jax.main with --workdir).")
  d = config.data
  nums = {s: int(d.num_train if s == "train" else d.num_test) or None for s in splits}
  # One directory per (split, size): runs with different sizes can share a cache root.
  dirs = {s: os.path.join(cache_root, f"{s}_{nums[s] or 'all'}") for s in splits}
  embedder = None
  for split in splits:
    num = nums[split]
    probe = {"split": split, "num": num, "clip_dir": os.path.abspath(clip_dir)}
    if clip_cache.is_complete(dirs[split], probe):
      continue
    if embedder is None:
      print(f"[eclipse] stage 2/3: caching CLIP embeddings in {cache_root}", flush=True)
      embedder = clip_cache.ClipEmbedder(clip_dir, int(config.clip.get("max_length", 0) or 0))
    clip_cache.ensure_cache(embedder, d, split, dirs[split], seed=int(d.get("seed", 0)), num=num,
                            batch_size=int(d.get("encode_batch_size", 256)),
                            normalize=bool(d.get("normalize", True)))
  return dirs


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

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    p = config.prior
    self.objective = check_choice("prior objective (config.prior.objective)", p.objective, OBJECTIVES)
    self.lam = 0.0 if self.objective == "projection" else float(p.get("lam", 0.2))
    self.tau = float(p.get("tau", 0.07))
    self.learn_tau = bool(p.get("learn_tau", False))
    self.reduction = check_choice("config.prior.proj_reduction", p.get("proj_reduction", "sum"), ("sum", "mean"))
    self.dtype = jnp.dtype(config.get("dtype", "float32"))
    self._dirs: Optional[Dict[str, str]] = None
    self._denoise_base = functools.partial(_diffusion_denoise, self)  # one cache key for the sampler
    self.clip_dir: Optional[str] = None
    self._module = None
    self._schedule = None
    if self.objective == "diffusion":
      from diffusion_jax.core.schedules import make_schedule
      self._schedule = make_schedule(p.get("beta_schedule", "linear"), int(p.get("num_timesteps", 1000)))

  # -- stages ------------------------------------------------------------------------------------------

  def prepare(self, workdir: Optional[str] = None) -> Dict[str, str]:
    """Stage 1 (CLIP) and stage 2 (embedding caches); idempotent."""
    if self._dirs is None:
      root = workdir or resolve_workdir(self)
      self.clip_dir = ensure_clip(self.config, root)
      self._dirs = ensure_caches(self.config, self.clip_dir, root)
      meta = clip_cache.load_meta(self._dirs["train"])
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
      null = clip_cache.load_arrays(self._dirs["train"], ["null_text_hidden", "null_text_mask", "null_text_emb"],
                                    mmap=False)
      self._null = {k: np.asarray(v, np.float32) for k, v in null.items()}
      # DALL-E 2 / DALLE2-pytorch scale unit-norm image embeddings to norm sqrt(d) for the diffusion prior.
      self.diff_scale = float(np.sqrt(self.embed_dim)) if self.normalized else 1.0
      print(f"[eclipse] stage 3/3: prior objective={self.objective} lambda={self.lam} tau={self.tau}"
            f"{' (learned)' if self.learn_tau else ''} text_len={self.text_len} embed_dim={self.embed_dim}",
            flush=True)
    return self._dirs

  @property
  def module(self):
    if self._module is None:
      self.prepare()
    return self._module

  # -- trainer interface -------------------------------------------------------------------------------

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    from diffusion_jax.data.pipeline import make_pipeline
    dirs = self.prepare()
    d = self.config.data
    return make_pipeline(clip_cache.EmbeddingSource(dirs[split]), (), batch_size=int(d.batch_size) // shard_count,
                         seed=seed, shuffle=split == "train", num_workers=int(d.get("num_workers", 0)),
                         prefetch=int(d.get("prefetch", 2)), shard_index=shard_index, shard_count=shard_count)

  def init(self, rng, batch) -> ExperimentState:
    b = 2
    x = jnp.zeros((b, self.embed_dim), jnp.float32)
    kw = {"timestep": jnp.zeros((b,), jnp.float32)} if self.objective == "diffusion" else {}
    variables = self.module.init(rng, x, batch["text_emb"][:b], batch["text_hidden"][:b], batch["text_mask"][:b], **kw)
    params = {"prior": variables["params"]}
    if self.learn_tau:
      params["logit_scale"] = jnp.asarray(np.log(1.0 / self.tau), jnp.float32)
    frozen = {}
    if self.objective == "diffusion":
      frozen = {k: jnp.asarray(v) for k, v in self._null.items()}
    return ExperimentState(params=params, frozen=frozen)

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
    """Predicted image embeddings for cached text encodings (host arrays), in batches."""
    if not hasattr(self, "_predict_jit"):
      self._predict_jit = jax.jit(self._predict_batch)
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
    null = {k: jnp.broadcast_to(jnp.asarray(v), (b,) + v.shape[1:]) for k, v in self._null.items()}
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

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    dirs = self.prepare(workdir)
    meta = clip_cache.load_meta(dirs["test"])
    keys = ["text_hidden", "text_mask", "text_emb", "image_emb"]
    cf_keys = [k for k in meta["keys"] if k.startswith("cf_")]
    arrays = clip_cache.load_arrays(dirs["test"], keys + cf_keys + (["objects"] if "objects" in meta["keys"] else []))
    n = min(int(self.config.eval.get("num_examples", meta["num"])), int(meta["num"]))
    sl = slice(0, n)
    params = jax.device_get(params)
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
    res["num_examples"] = float(n)
    dec_wd = self.config.eval.get("decoder_workdir", "")
    if dec_wd:
      res.update(self._end_to_end(pred, arrays.get("objects"), dec_wd, rng, workdir))
    if self.config.eval.get("export_prior", True) and jax.process_index() == 0:
      from diffusion_jax.pretrained import prior as prior_io
      prior_io.save_prior(os.path.join(workdir, PRIOR_EXPORT), params["prior"], self.prior_config)
    write_results(workdir, res, self._description())
    return res

  def _description(self) -> Dict[str, Any]:
    return {"objective": self.objective, "lambda": self.lam, "tau": self.tau, "learn_tau": self.learn_tau,
            "clip": self.clip_dir, "steps": int(self.config.train.num_steps),
            "layers": int(self.config.model.num_layers),
            "width": int(self.config.model.num_attention_heads) * int(self.config.model.attention_head_dim)}

  def _end_to_end(self, pred, objects, decoder_workdir: str, rng, workdir: str) -> Dict[str, float]:
    from diffusion_jax.eval import shapes_parser
    from diffusion_jax.experiments import unclip_decoder
    if objects is None:
      raise ValueError("End-to-end scoring needs the shapes world (scene encodings in the cache).")
    num = min(int(self.config.eval.get("num_decoded", 200)), pred.shape[0])
    dec = unclip_decoder.load_decoder(decoder_workdir)
    imgs = dec.decode(pred[:num], jax.random.fold_in(rng, 7), steps=int(self.config.eval.get("decoder_steps", 25)),
                      guidance=float(self.config.eval.get("decoder_guidance", 3.0)))
    scores = shapes_parser.score_all(imgs, np.asarray(objects[:num]))
    try:
      from diffusion_jax.train.metrics import image_grid, save_png
      save_png(os.path.join(workdir, "samples", "end_to_end.png"), image_grid(imgs[:64].astype(np.float32) / 255.0))
    except Exception as e:  # pragma: no cover - the picture is informational
      logging.warning("Could not save the end-to-end grid: %s", e)
    return {f"e2e_{k}": float(v) for k, v in scores.items()}


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
           "| metric | prior | CLIP text emb. as query |", "|---|---|---|"]
  for key, name in METRIC_ROWS:
    if key in res:
      ref = res.get(f"clip_text_{key}")
      lines.append(f"| {name} | {res[key]:.4f} | {'' if ref is None else f'{ref:.4f}'} |")
  text = "\n".join(lines) + "\n"
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(text)
  print("\n" + text, flush=True)
  return text
