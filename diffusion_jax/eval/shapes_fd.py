"""A shapes-world image distance ("shapes FD"): the Frechet distance on features of a small conv net trained on
the shapes world, for the built-in runs where no Inception weights exist offline.

The net (`ShapesNet`) is trained once (`train`, or `scripts/shapes_fd.py train`) to predict, from the image,
the class label (shape x colour of the main object), the number of objects and the relation of objects 0 and 1
(multi-task, so the features encode what the parser scores: identity, binding, layout). Features: the global
averages of the last three conv stages plus the 128-d embedding (concatenated, 14 x width = 448-d at the
default width 32),
so that low-level degradations (noise, blur, colour shifts) and high-level errors (wrong shape / colour /
relation) both move the statistics. Distances are only comparable between runs that use the *same* weights
file (its sha256 is recorded with every result), like FID with one Inception network.

Validation (docs/eval.md, `scripts/shapes_fd.py validate`): near zero between two independent real sample
sets, monotone in noise, blur and colour shift of real images, and in the same order as the parser's accuracies
on those degradations.
"""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.eval.fid import FeatureStats, frechet_distance

NUM_RELATIONS = 5  # 4 relations + "single object"


class ShapesNet(nn.Module):
  num_classes: int
  width: int = 32
  max_objects: int = 3

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, 3] in [-1, 1] -> (features [B, 14 * width], logits dict)."""
    w = self.width
    h = nn.relu(nn.Conv(w, (3, 3), name="conv1")(x))
    pooled = []
    for i, (c, s) in enumerate(((2 * w, 2), (4 * w, 2), (4 * w, 2))):
      h = nn.relu(nn.Conv(c, (3, 3), strides=s, name=f"conv{i + 2}")(h))
      pooled.append(h.mean((1, 2)))
    emb = nn.relu(nn.Dense(4 * w, name="embed")(pooled[-1]))
    feats = jnp.concatenate(pooled[:2] + [pooled[2], emb], -1)
    logits = {"label": nn.Dense(self.num_classes, name="head_label")(emb),
              "num_objects": nn.Dense(self.max_objects, name="head_num")(emb),
              "relation": nn.Dense(NUM_RELATIONS, name="head_relation")(emb)}
    return feats, logits


def _data(cfg, n: int, seed: int, split: str):
  from diffusion_jax.data import shapes as S
  src = S.ShapesSource(n, seed=seed, cfg=cfg, split=split)
  exs = [src[i] for i in range(n)]
  img = np.stack([e["image"] for e in exs]).astype(np.float32) / 127.5 - 1.0
  return {"image": img, "label": np.array([e["label"] for e in exs], np.int32),
          "num_objects": np.array([e["num_objects"] - 1 for e in exs], np.int32),
          "relation": np.array([e["relation"] + 1 for e in exs], np.int32)}


def train(cfg=None, *, steps: int = 800, batch_size: int = 64, num_examples: int = 8192, width: int = 32,
          seed: int = 0, lr: float = 2e-3, log=print) -> Tuple[Dict, Dict]:
  """Trains `ShapesNet` on `num_examples` train-split examples of the shapes world `cfg` (a ShapesConfig);
  returns (params, info) with held-out accuracies on 1024 test-split examples."""
  import optax
  from diffusion_jax.data import shapes as S
  cfg = cfg or S.ShapesConfig()
  num_classes = len(S.SHAPES) * len(S.COLOUR_NAMES)
  net = ShapesNet(num_classes, width, cfg.max_objects)
  data = _data(cfg, num_examples, seed, "train")
  params = net.init(jax.random.key(seed), data["image"][:1])["params"]
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
  state = opt.init(params)

  def loss_fn(p, b):
    _, lg = net.apply({"params": p}, b["image"])
    return sum(optax.softmax_cross_entropy_with_integer_labels(lg[k], b[k]).mean() for k in lg)

  @jax.jit
  def step(p, s, b):
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, num_examples, batch_size)
    params, state, loss = step(params, state, {k: v[idx] for k, v in data.items()})
    if log and (i % 200 == 0 or i == steps - 1):
      log(f"shapes net step {i}: loss {float(loss):.4f}")
  test = _data(cfg, 1024, seed, "test")
  _, lg = jax.jit(net.apply)({"params": params}, test["image"])
  info = {f"test_accuracy_{k}": float(np.mean(np.argmax(np.asarray(lg[k]), -1) == test[k])) for k in lg}
  info.update(width=width, image_size=cfg.image_size, num_classes=num_classes, steps=steps, seed=seed)
  return params, info


def save(params, info: Dict, path: str) -> None:
  import json
  from diffusion_jax.pretrained import io
  io.save_state_dict(io.flatten(params), path, metadata={"format": "flax", "info": json.dumps(info)})


def load(path: str):
  """(ShapesNet, params, info) from a file written by `save`."""
  import json
  import os
  from safetensors import safe_open
  from diffusion_jax.pretrained import io
  if not os.path.exists(path):
    raise FileNotFoundError(f"Shapes-FD network not found: {path}. Train it once with "
                            "`python scripts/shapes_fd.py train --out PATH` (docs/eval.md).")
  with safe_open(path, "np") as f:
    info = json.loads(f.metadata()["info"])
  params = io.unflatten(io.load_state_dict(path))
  return ShapesNet(int(info["num_classes"]), int(info["width"])), params, info


class ShapesFD:
  """Features / statistics / distance with one trained ShapesNet (images NHWC in [-1, 1])."""

  def __init__(self, path: str, batch_size: int = 256):
    from diffusion_jax.eval.fid import file_sha256
    self.net, self.params, self.info = load(path)
    self.sha256 = file_sha256(path)
    self.batch_size = batch_size
    self._fn = jax.jit(lambda p, x: self.net.apply({"params": p}, x)[0])

  def features(self, images) -> np.ndarray:
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3 or x.min() < -1.001 or x.max() > 1.001:
      raise ValueError(f"Shapes FD expects NHWC images in [-1, 1], got shape {x.shape}, range "
                       f"[{x.min():.3g}, {x.max():.3g}].")
    if x.shape[1] != self.info["image_size"]:
      raise ValueError(f"This shapes-FD network was trained at {self.info['image_size']}px; images are "
                       f"{x.shape[1]}px.")
    bs = self.batch_size
    out = []
    for i in range(0, len(x), bs):
      c = x[i:i + bs]
      k = len(c)
      if k < bs:
        c = np.concatenate([c, np.zeros((bs - k,) + c.shape[1:], np.float32)])
      out.append(np.asarray(self._fn(self.params, c))[:k])
    return np.concatenate(out)

  def statistics(self, images) -> FeatureStats:
    f = self.features(images)
    return FeatureStats(f.shape[1]).update(f)

  def distance(self, a, b) -> float:
    sa, sb = self.statistics(a), self.statistics(b)
    return frechet_distance(sa.mean(), sa.cov(), sb.mean(), sb.cov())


# ------------------------------------------------------------------------------------------ degradations


def gaussian_noise(x, sigma: float, seed: int = 0):
  return np.clip(x + sigma * np.random.default_rng(seed).normal(size=x.shape), -1, 1).astype(np.float32)


def gaussian_blur(x, sigma: float):
  if sigma <= 0:
    return x
  from scipy.ndimage import gaussian_filter
  return gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest").astype(np.float32)


def colour_shift(x, amount: float):
  """Rotates RGB towards GBR by `amount` in [0, 1] (0: unchanged; 1: channels permuted)."""
  return ((1 - amount) * x + amount * x[..., [1, 2, 0]]).astype(np.float32)


DEGRADATIONS = {"noise": gaussian_noise, "blur": gaussian_blur, "colour": colour_shift}
