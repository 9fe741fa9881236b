"""Pictures for the README and docs/, made from real runs (small PNGs under docs/images/).

    python scripts/make_doc_images.py --only shapes                      # needs no run
    python scripts/make_doc_images.py --demo workdirs/eclipse_prior      # after `make demo`: all three

* `shapes_world.png`: the first shapes-world test scenes with two or more objects with the modalities every method conditions on: image,
  depth, edges, segmentation, low-res, inpainting mask, masked image; the caption under each row.
* `eclipse_retrieval.png`: the `make demo` run's exported ECLIPSE prior on held-out captions of its own test
  cache: caption, true image, and the test images whose cached CLIP image embeddings are nearest (cosine) to
  the predicted embedding (the true image framed green).
* `demo_losses.png`: training loss of the CLIP stage and of the prior, read from the run's `metrics.jsonl` files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAX_BYTES = 300_000
BG = (255, 255, 255)


def _font():
  from PIL import ImageFont
  return ImageFont.load_default()


def _up(img: np.ndarray, scale: int) -> np.ndarray:
  """Nearest-neighbour upscale of an [H, W] or [H, W, 3] image to uint8 RGB."""
  img = np.asarray(img)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, -1)
  return np.repeat(np.repeat(img, scale, 0), scale, 1).astype(np.uint8)


def _to_rgb(key: str, x: np.ndarray) -> np.ndarray:
  """One modality of a shapes example as uint8 RGB [H, W, 3]."""
  x = np.asarray(x)
  if key in ("image", "masked_image", "lowres"):
    return x.astype(np.uint8)
  if key == "depth":  # 1.0 = background (far); nearer objects brighter
    return (np.clip(1.0 - x, 0.0, 1.0) / 0.8 * 255).clip(0, 255).astype(np.uint8)
  if key in ("edges", "mask"):
    return (x > 0).astype(np.uint8) * 255
  if key == "segmentation":  # 0 background, 1 + shape index
    palette = np.array([[0, 0, 0], [230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [204, 121, 167]],
                       np.uint8)
    return palette[np.clip(x, 0, len(palette) - 1)]
  raise KeyError(key)


def _save(img, path: str) -> str:
  from PIL import Image
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  im = img if isinstance(img, Image.Image) else Image.fromarray(img)
  im.save(path, optimize=True)
  size = os.path.getsize(path)
  if size > MAX_BYTES:
    raise SystemExit(f"{path} is {size} bytes, over the {MAX_BYTES} limit for docs/images")
  print(f"wrote {path} ({size / 1000:.1f} kB)")
  return path


def shapes_sheet(out: str, num: int = 5, image_size: int = 32, scale: int = 3, seed: int = 0) -> str:
  """Rows of test-split scenes; columns: every image-like modality of the example."""
  from PIL import Image, ImageDraw
  from diffusion_jax.data import shapes as S
  cols = [("image", "image"), ("depth", "depth"), ("edges", "edges"), ("segmentation", "segmentation"),
          ("lowres", "low-res (1/4)"), ("mask", "inpaint mask"), ("masked_image", "masked image")]
  cfg = S.ShapesConfig(image_size=image_size)
  cell, pad, head, cap = image_size * scale, 6, 16, 14
  w = pad + len(cols) * (cell + pad)
  h = head + num * (cell + cap + pad) + pad
  sheet = Image.new("RGB", (w, h), BG)
  draw, font = ImageDraw.Draw(sheet), _font()
  for j, (_, title) in enumerate(cols):
    draw.text((pad + j * (cell + pad), 3), title, fill=(0, 0, 0), font=font)
  examples = (S.make_example(S.split_seed(seed, "test"), i, cfg) for i in range(10_000))
  examples = [ex for ex in examples if int(ex["num_objects"]) >= 2][:num]  # scenes with a relation
  for i, ex in enumerate(examples):
    y = head + i * (cell + cap + pad)
    for j, (key, _) in enumerate(cols):
      rgb = _to_rgb(key, ex[key])
      rgb = _up(rgb, cell // rgb.shape[0])
      sheet.paste(Image.fromarray(rgb), (pad + j * (cell + pad), y))
    draw.text((pad, y + cell + 1), ex["caption"], fill=(0, 0, 0), font=font)
  return _save(sheet, out)


def _test_cache(workdir: str) -> str:
  """The test-split embedding cache of an ECLIPSE run (the directory whose meta.json says split == test)."""
  found = []
  for meta in sorted(glob.glob(os.path.join(workdir, "cache", "**", "meta.json"), recursive=True)):
    with open(meta) as f:
      m = json.load(f)
    if m.get("split") == "test" or "/test" in os.path.dirname(meta):
      found.append(os.path.dirname(meta))
  if not found:
    raise SystemExit(f"No test embedding cache under {workdir}/cache: run `make demo` first.")
  return found[0]


def eclipse_retrieval(workdir: str, out: str, num: int = 5, k: int = 4, scale: int = 2, seed: int = 0) -> str:
  """Caption, true image and the top-k retrieved test images for the first `num` multi-object test captions."""
  import jax
  from PIL import Image, ImageDraw
  from diffusion_jax.data import clip_cache, shapes as S
  from diffusion_jax.pretrained import prior as prior_io

  export = os.path.join(workdir, "export")
  if not os.path.isdir(export):
    raise SystemExit(f"No exported prior in {export}: run `make demo` first.")
  module, params, _ = prior_io.load_prior(export)
  cache = _test_cache(workdir)
  arrays = clip_cache.load_arrays(cache, mmap=False)
  captions = clip_cache.load_captions(cache)
  z_y = np.asarray(arrays["text_emb"], np.float32)
  hid = np.asarray(arrays["text_hidden"], np.float32)
  mask = np.asarray(arrays["text_mask"], np.float32)
  z_x = np.asarray(arrays["image_emb"], np.float32)
  objects = np.asarray(arrays["objects"])
  size = int(clip_cache.load_meta(cache).get("image_size", 32))
  cfg = S.ShapesConfig(image_size=size)

  noise = jax.random.normal(jax.random.PRNGKey(seed), z_y.shape, np.float32)
  pred = np.asarray(module.apply({"params": params}, noise, z_y, hid, mask))
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-8)
  sims = unit(pred) @ unit(z_x).T  # [N captions, N images]
  r1 = float(np.mean(np.argmax(sims, 1) == np.arange(len(sims))))
  rows = [i for i in range(len(captions)) if (objects[i][:, 0] >= 0).sum() >= 2][:num]

  img = lambda i: _up(clip_cache.scene_image(S.Scene.from_array(objects[i]), cfg), scale)
  cell, pad, cap, head = size * scale, 6, 14, 16
  w = pad + (k + 1) * (cell + pad) + 8
  h = head + len(rows) * (cell + cap + pad) + 14
  sheet = Image.new("RGB", (w, h), BG)
  draw, font = ImageDraw.Draw(sheet), _font()
  draw.text((pad, 3), "true image", fill=(0, 0, 0), font=font)
  draw.text((pad + cell + pad + 8, 3), f"top-{k} retrieved by the predicted embedding", fill=(0, 0, 0), font=font)
  for r, i in enumerate(rows):
    y = head + r * (cell + cap + pad)
    sheet.paste(Image.fromarray(img(i)), (pad, y))
    for j, t in enumerate(np.argsort(-sims[i])[:k]):
      x = pad + (j + 1) * (cell + pad) + 8
      sheet.paste(Image.fromarray(img(int(t))), (x, y))
      if int(t) == i:
        draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=(0, 200, 0), width=2)
    draw.text((pad, y + cell + 1), textwrap.shorten(captions[i], 80), fill=(0, 0, 0), font=font)
  draw.text((pad, h - 13), f"R@1 over all {len(captions)} held-out captions (this noise draw): {r1:.3f}", fill=(0, 0, 0), font=font)
  return _save(sheet, out)


def _losses(path: str):
  steps, loss = [], []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "loss" in row and "step" in row:
        steps.append(row["step"])
        loss.append(row["loss"])
  return np.array(steps), np.array(loss)


def loss_curves(workdir: str, out: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = [("CLIP stage (InfoNCE)", os.path.join(workdir, "clip", "metrics.jsonl")),
          ("ECLIPSE prior (L_proj + 0.2 L_CLS)", os.path.join(workdir, "metrics.jsonl"))]
  runs = [(n, p) for n, p in runs if os.path.exists(p)]
  if not runs:
    raise SystemExit(f"No metrics.jsonl in {workdir}: run `make demo` first.")
  fig, axes = plt.subplots(1, len(runs), figsize=(3.4 * len(runs), 2.4), dpi=100)
  for ax, (name, path) in zip(np.atleast_1d(axes), runs):
    s, l = _losses(path)
    ax.plot(s, l, lw=1.5)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("training loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  fig.savefig(out)
  plt.close(fig)
  size = os.path.getsize(out)
  if size > MAX_BYTES:
    raise SystemExit(f"{out} is {size} bytes, over the {MAX_BYTES} limit for docs/images")
  print(f"wrote {out} ({size / 1000:.1f} kB)")
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--demo", default="workdirs/eclipse_prior", help="the `make demo` run directory")
  ap.add_argument("--out", default="docs/images")
  ap.add_argument("--only", choices=["shapes", "eclipse", "losses"], action="append",
                  help="make only these pictures (repeatable); default: all")
  a = ap.parse_args(argv)
  which = a.only or ["shapes", "eclipse", "losses"]
  if "shapes" in which:
    shapes_sheet(os.path.join(a.out, "shapes_world.png"))
  if "eclipse" in which:
    eclipse_retrieval(a.demo, os.path.join(a.out, "eclipse_retrieval.png"))
  if "losses" in which:
    loss_curves(a.demo, os.path.join(a.out, "demo_losses.png"))


if __name__ == "__main__":
  main()
