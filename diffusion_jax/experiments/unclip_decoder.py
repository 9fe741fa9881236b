"""unCLIP decoder on the shapes world: a small diffusion model that renders an image from its CLIP image
embedding (experiment "unclip_decoder").

ECLIPSE trains only the prior; the decoder h(z_x) stays frozen (ECLIPSE §3.1). This experiment trains the
small stand-in decoder that the shapes-world evaluation drives with each prior's predicted embedding: an
epsilon-prediction DDPM (1000-step linear schedule) conditioned on the CLIP image embedding of the training
image (`models/unclip_decoder.py`), with the embedding dropped 10% of the time so that sampling can use
classifier-free guidance (DDIM, `config.sample.steps`, `config.sample.guidance`).

It shares the CLIP stage and the embedding cache with `eclipse_prior` (same `config.stages.clip` /
`config.data` keys, `experiments/clip_stage.py`; the shapes cache keeps the images). `evaluate` decodes the
*true* image embeddings of held-out captions and scores the images with the shapes parser (the upper bound
for end-to-end unCLIP); `export` writes the decoder (`params.safetensors` + `config.json`, export kind
"unclip_decoder") for `load_decoder` — what an `eclipse_prior` run's optional "decoder" stage hands on.
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
from diffusion_jax.experiments import clip_stage
from diffusion_jax.experiments.base import EXPERIMENTS, EXPORT_KINDS, Experiment, require_files
from diffusion_jax.images import save_grid
from diffusion_jax.models.unclip_decoder import UnCLIPDecoder


def _to_unit_range(ex: Dict[str, Any]) -> Dict[str, Any]:
  """uint8 image -> float32 in [-1, 1]."""
  return {"image": np.asarray(ex["image"], np.float32) / 127.5 - 1.0, "image_emb": ex["image_emb"]}


def _module_from(model_cfg, dtype=jnp.float32) -> UnCLIPDecoder:
  return UnCLIPDecoder(channels=tuple(int(c) for c in model_cfg.channels),
                       num_res_blocks=int(model_cfg.num_res_blocks), emb_dim=int(model_cfg.emb_dim), dtype=dtype)


def _denoise(module, params, x, t, cond):
  emb, keep = cond
  return module.apply({"params": params}, x, t, emb, keep)


_DECODE_FNS: Dict[Any, Any] = {}


def _decode_fn(module: UnCLIPDecoder, image_size: int, num_timesteps: int, beta_schedule: str, steps: int,
               guided: bool):
  """One jitted decode function per (network, schedule, steps, guidance on/off): every `Decoder` with the same
  network shares the compiled sampler."""
  key = (module, int(image_size), int(num_timesteps), str(beta_schedule), int(steps), bool(guided))
  if key not in _DECODE_FNS:
    from diffusion_jax.core import samplers
    from diffusion_jax.core.schedules import make_schedule
    schedule = make_schedule(beta_schedule, int(num_timesteps))
    base = functools.partial(_denoise, module)

    @jax.jit
    def fn(params, rng, emb, guidance):
      b = emb.shape[0]
      size = int(image_size)
      x_T = jax.random.normal(rng, (b, size, size, 3), jnp.float32)
      cond = (emb, jnp.ones((b,), jnp.float32))
      uncond = (jnp.zeros_like(emb), jnp.zeros((b,), jnp.float32))
      x = samplers.ddim_sample(jax.tree_util.Partial(base, params), x_T, num_steps=int(steps), schedule=schedule,
                               prediction_type="epsilon", cond=cond, uncond=uncond if guided else None,
                               guidance_scale=guidance if guided else None, clip_sample=1.0)
      return jnp.clip((x + 1.0) * 127.5, 0, 255)

    _DECODE_FNS[key] = fn
  return _DECODE_FNS[key]


class Decoder:
  """A trained decoder: `decode(image_embs, rng, steps, guidance)` -> uint8 images [N, H, W, 3]."""

  def __init__(self, module: UnCLIPDecoder, params, image_size: int, num_timesteps: int = 1000,
               beta_schedule: str = "linear"):
    self.module, self.params, self.image_size = module, params, int(image_size)
    self.num_timesteps, self.beta_schedule = int(num_timesteps), str(beta_schedule)

  def decode(self, image_embs, rng, steps: int = 25, guidance: float = 3.0, batch_size: int = 100) -> np.ndarray:
    embs = np.asarray(image_embs, np.float32)
    guided = float(guidance) != 1.0
    fn = _decode_fn(self.module, self.image_size, self.num_timesteps, self.beta_schedule, steps, guided)
    out = []
    for i, s in enumerate(range(0, len(embs), batch_size)):
      e = embs[s:s + batch_size]
      n = len(e)
      if n < batch_size and len(embs) > batch_size:
        e = np.concatenate([e, np.repeat(e[-1:], batch_size - n, 0)])
      imgs = fn(self.params, jax.random.fold_in(rng, i), e, jnp.float32(guidance))
      out.append(np.asarray(imgs)[:n])
    return np.round(np.concatenate(out)).astype(np.uint8)


@EXPORT_KINDS.register("unclip_decoder")
def check_decoder_export(path: str) -> None:
  require_files(path, ["params.safetensors", "config.json"], "an unCLIP decoder export")


def save_decoder(directory: str, params, model_cfg, image_size: int, sample_cfg) -> None:
  from diffusion_jax.pretrained import io
  os.makedirs(directory, exist_ok=True)
  io.save_state_dict(io.flatten(jax.tree.map(np.asarray, jax.device_get(params))),
                     os.path.join(directory, "params.safetensors"))
  io.write_json({"channels": [int(c) for c in model_cfg.channels], "num_res_blocks": int(model_cfg.num_res_blocks),
                 "emb_dim": int(model_cfg.emb_dim), "image_size": int(image_size),
                 "num_timesteps": int(sample_cfg.get("num_timesteps", 1000)),
                 "beta_schedule": str(sample_cfg.get("beta_schedule", "linear"))},
                os.path.join(directory, "config.json"))


def load_decoder(directory: str) -> Decoder:
  """Loads a decoder export (what `UnclipDecoderExperiment.export` writes; the "decoder" stage's path)."""
  from diffusion_jax.pretrained import io
  d = directory
  if not os.path.exists(os.path.join(d, "params.safetensors")):
    raise FileNotFoundError(f"No unCLIP decoder export in {directory}. Train one first: python -m diffusion_jax.main "
                            "--config configs/unclip_decoder_shapes.py --workdir DIR (its export is DIR/export)")
  cfg = io.read_json(os.path.join(d, "config.json"))
  module = UnCLIPDecoder(channels=tuple(cfg["channels"]), num_res_blocks=cfg["num_res_blocks"], emb_dim=cfg["emb_dim"])
  params = jax.tree.map(jnp.asarray, io.unflatten(io.load_state_dict(os.path.join(d, "params.safetensors"))))
  return Decoder(module, params, cfg["image_size"], cfg["num_timesteps"], cfg["beta_schedule"])


@EXPERIMENTS.register("unclip_decoder")
class UnclipDecoderExperiment(Experiment):
  """Image-embedding-conditioned diffusion decoder trained on shapes images and their CLIP embeddings."""
  export_kind = "unclip_decoder"

  def __init__(self, config: ml_collections.ConfigDict, stages=None):
    super().__init__(config, stages)
    from diffusion_jax.core.schedules import make_schedule
    if config.data.name != "shapes":
      raise ValueError(f"unclip_decoder trains on the shapes world (config.data.name='shapes'), got "
                       f"{config.data.name!r}.")
    self.module = _module_from(config.model, jnp.dtype(config.get("dtype", "float32")))
    s = config.sample
    self.schedule = make_schedule(s.get("beta_schedule", "linear"), int(s.get("num_timesteps", 1000)))
    self._dirs: Dict[str, str] = {}
    self._fn = functools.partial(_denoise, self.module)
    self.clip_dir = self.stage("clip")

  def cache(self, split: str) -> str:
    if split not in self._dirs:
      self._dirs.update(clip_stage.embedding_caches(self.config, self.clip_dir, self.workdir, [split]))
    return self._dirs[split]

  def make_dataset(self, split: str, *, seed: int, shard_index: int = 0, shard_count: int = 1):
    from diffusion_jax.data.pipeline import make_pipeline
    d = self.config.data
    src = clip_cache.EmbeddingSource(self.cache(split), keys=("image", "image_emb"))
    return make_pipeline(src, [_to_unit_range], batch_size=int(d.batch_size) // shard_count, seed=seed,
                         shuffle=split == "train", num_workers=int(d.get("num_workers", 0)),
                         prefetch=int(d.get("prefetch", 2)), shard_index=shard_index, shard_count=shard_count)

  def init(self, rng, batch, frozen):
    b = 2
    v = self.module.init(rng, batch["image"][:b], jnp.zeros((b,), jnp.float32), batch["image_emb"][:b],
                         jnp.ones((b,), jnp.float32))
    return v["params"]

  def loss(self, params, frozen, ema, batch, rng, step):
    from diffusion_jax.core.losses import diffusion_loss
    k_drop, k_loss = jax.random.split(rng)
    x0 = batch["image"].astype(jnp.float32)
    b = x0.shape[0]
    keep = 1.0 - jax.random.bernoulli(k_drop, float(self.config.sample.get("cond_drop", 0.1)), (b,)).astype(jnp.float32)
    fn = functools.partial(self._fn, params)
    per_ex, aux = diffusion_loss(fn, x0, k_loss, schedule=self.schedule, prediction_type="epsilon",
                                 cond=(batch["image_emb"].astype(jnp.float32), keep))
    return jnp.mean(per_ex), {}

  def _decoder(self, params) -> Decoder:
    s = self.config.sample
    return Decoder(self.module, params, int(self.config.data.image_size), int(s.get("num_timesteps", 1000)),
                   s.get("beta_schedule", "linear"))

  def sample(self, params, frozen, batch, rng):
    """Decodes the true image embeddings of `batch` (shown next to the images they came from)."""
    s = self.config.sample
    embs = np.asarray(batch["image_emb"], np.float32)
    imgs = self._decoder(params).decode(embs, rng, int(s.get("steps", 25)), float(s.get("guidance", 3.0)),
                                        batch_size=len(embs))
    return {"decoded": imgs.astype(np.float32) / 255.0}

  def export(self, params, frozen, directory: str) -> None:
    save_decoder(directory, params, self.config.model, int(self.config.data.image_size), self.config.sample)

  def evaluate(self, params, frozen, rng, workdir: str) -> Dict[str, float]:
    from diffusion_jax.eval import shapes_parser
    num = int(self.config.eval.get("num_examples", 200))
    arr = clip_cache.load_arrays(self.cache("test"), ["image_emb", "objects"])
    num = min(num, arr["image_emb"].shape[0])
    s = self.config.sample
    imgs = self._decoder(params).decode(np.asarray(arr["image_emb"][:num]), rng, int(s.get("steps", 25)),
                                        float(s.get("guidance", 3.0)))
    scores = shapes_parser.score_all(imgs, np.asarray(arr["objects"][:num]))
    save_grid(os.path.join(workdir, "samples", "decoded_true_embeddings.png"), imgs[:64])
    return {f"true_emb_{k}": float(v) for k, v in scores.items()}
