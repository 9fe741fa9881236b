"""(caption, image) pairs -> CLIP embeddings computed once, stored as .npy, read back through grain.

ECLIPSE trains its prior on pre-extracted CLIP embeddings (ECLIPSE §4.1: "<= 50 GPU-hours with
pre-extracted embeddings"). A cache directory holds, for N pairs:

==================  ==================  ==========================================================
file                dtype / shape       meaning
==================  ==================  ==========================================================
text_hidden.npy     float16 [N, L, D]   per-token text states (`last_hidden_state`, after the final LN)
text_mask.npy       uint8 [N, L]        1 on real tokens (up to and including end-of-text), 0 on padding
text_emb.npy        float32 [N, E]      pooled, projected CLIP text embedding z_y (`text_embeds`)
image_emb.npy       float32 [N, E]      projected CLIP image embedding z_x (`image_embeds`)
image.npy           uint8 [N, H, W, 3]  the images (shapes world only; the unCLIP decoder trains on them)
objects.npy         int32 [N, M, 6]     shapes world only: the scene encoding (parser scoring)
cf_<kind>_emb.npy   float32 [N, E]      shapes test split: image embedding of the counterfactual scene
cf_<kind>_valid.npy bool [N]            ... and whether it exists (scenes with >= 2 objects);
                                        kind = "colour" (`swap_colours`) or "position" (`swap_positions`)
null_*.npy          [1, ...]            the encoding of the empty caption "" (unconditional branch)
captions.json       list of str
meta.json           counts, dims, the CLIP it came from, `complete: true` once everything is written
==================  ==================  ==========================================================

`normalize=True` stores L2-normalised `text_emb` / `image_emb` (and counterfactuals); the hidden states are
kept as the CLIP returns them. A cache is written into `<dir>.tmp` and renamed once complete, so an interrupted
build never looks complete (and a failed build removes its `.tmp`); `ensure_cache` reuses a complete cache whose
`meta.json` matches the request.

Pair sources (iterables of dicts with `caption`, `image` uint8 [H, W, 3], optionally `objects`), named by
`config.data.name`: `shapes` (`shapes_pairs`, rendered here), `image_folder` (`data/folder.FolderSource`: a folder
of images + `captions.jsonl` / `captions.tsv` / `config.data.captions_file` / `.txt` side files, using
`<data_dir>/<split>/` when it exists) and `tfds` (`data/tfds_source.TfdsSource`: a TFDS array_record build in a
data_dir, read TF-free). This module reads no files itself: every image is brought to the CLIP's input size by
`data/pipeline.resize_center_crop` (shorter side resized, bicubic, then centre-cropped, as CLIP's own
preprocessing does), in the pair stream and in `preprocess_images`.

`ClipEmbedder` jits one text and one image function, with the CLIP weights as arguments (not constants in the
compiled program); `build_cache` encodes fixed-size batches, padding the last one (and the empty caption) to
`batch_size`, so each function is traced and compiled once per cache.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from diffusion_jax.registry import check_choice

SOURCES = ("shapes", "image_folder", "tfds")
COUNTERFACTUALS = ("colour", "position")
# OpenAI CLIP pixel statistics (CLIPImageProcessor defaults).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


# ------------------------------------------------------------------------------------------- pair sources


def scene_image(scene, cfg) -> np.ndarray:
  """Only the RGB image of a shapes scene (identical to `shapes.render(scene, cfg)["image"]`, ~10x cheaper)."""
  from diffusion_jax.data import shapes as S
  return S.render_image(scene, cfg)


def shapes_config(data_cfg):
  """The `shapes.ShapesConfig` of a data config: `data.image_size` plus the world options in `data.shapes`
  (e.g. the nuisance options `background_jitter`, `texture_noise`, `size_jitter`; empty: the default world)."""
  from diffusion_jax.data import shapes as S
  extra = dict(data_cfg.get("shapes", None) or {})
  return S.ShapesConfig.from_dict(extra, image_size=int(data_cfg.get("image_size", 32)))


class ShapesPairSource:
  """grain source of shapes-world (caption, image, objects): example `i` is the scene of
  `shapes.ShapesSource(num, seed, cfg, split)[i]`, rendering only the image."""

  def __init__(self, num_examples: int, seed: int = 0, cfg=None, split: str = "train", memo: bool = False):
    from diffusion_jax.data import shapes as S
    self.memo = {} if memo else None  # keep examples after the first epoch (in-process pipelines)
    self.num_examples = int(num_examples)
    self.seed = S.split_seed(seed, split)
    self.cfg = cfg if cfg is not None else S.ShapesConfig()

  def __len__(self) -> int:
    return self.num_examples

  def scene(self, index: int):
    from diffusion_jax.data import shapes as S
    if not 0 <= int(index) < self.num_examples:
      raise IndexError(f"ShapesPairSource index {index} out of range [0, {self.num_examples}).")
    rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFFFFFF, int(index)])  # as shapes.make_example
    return S.sample_scene(rng, self.cfg)

  def __getitem__(self, index: int) -> Dict[str, Any]:
    from diffusion_jax.data import shapes as S
    if self.memo is not None and int(index) in self.memo:
      return dict(self.memo[int(index)])
    sc = self.scene(index)
    ex = {"caption": S.caption(sc), "image": scene_image(sc, self.cfg), "objects": sc.to_array(self.cfg.max_objects)}
    if self.memo is not None:
      self.memo[int(index)] = ex
    return dict(ex)


def shapes_pairs(num: int, seed: int, split: str, shapes_cfg=None, counterfactuals: bool = False
                 ) -> Iterator[Dict[str, Any]]:
  """Shapes-world pairs (caption generated with the image); with `counterfactuals`, also the images of the
  same scene with colours swapped / positions swapped (`cf_colour`, `cf_position`, None for 1 object)."""
  from diffusion_jax.data import shapes as S
  src = ShapesPairSource(num, seed, shapes_cfg, split)
  cfg = src.cfg
  for i in range(num):
    sc = src.scene(i)
    out = {"caption": S.caption(sc), "image": scene_image(sc, cfg), "objects": sc.to_array(cfg.max_objects)}
    if counterfactuals:
      two = len(sc.objects) >= 2
      out["cf_colour"] = scene_image(S.swap_colours(sc), cfg) if two else None
      out["cf_position"] = scene_image(S.swap_positions(sc), cfg) if two else None
    yield out


def source_pairs(source, image_size: int, num: Optional[int] = None) -> Iterator[Dict[str, Any]]:
  """(caption, image) pairs of a random-access source whose examples hold "caption" and "image" (a
  `FolderSource`, a `TfdsSource` with a caption_key): the first `num` (all if None), each image resized and
  centre-cropped to `image_size` (`pipeline.ResizeCrop`: grey -> RGB, no-op at the right size)."""
  from diffusion_jax.data.pipeline import ResizeCrop
  resize = ResizeCrop(image_size)
  n = len(source) if not num else min(int(num), len(source))
  for i in range(n):
    ex = source[i]
    yield {"caption": str(ex["caption"]), "image": resize.map({"image": ex["image"]})["image"]}


# ------------------------------------------------------------------------------------------- the encoder


def _text_forward(module, params, ids, mask):
  out = module.apply({"params": params}, ids, mask)
  return out["last_hidden_state"], out["text_embeds"]


def _image_forward(module, params, pixels):
  return module.apply({"params": params}, pixels)["image_embeds"]


def _run_batched(fn: Callable, arrays: Tuple[np.ndarray, ...], batch_size: Optional[int]) -> List[np.ndarray]:
  """`fn(*chunk)` over chunks of `batch_size` rows (all rows at once if None); a short last chunk is padded by
  repeating its last row (so `fn` sees one shape) and the padding is dropped from the outputs."""
  n = len(arrays[0])
  bs = int(batch_size) if batch_size else n
  if n == 0 or bs <= 0:
    raise ValueError(f"Nothing to encode (n={n}, batch_size={batch_size}).")
  outs: List[List[np.ndarray]] = []
  for start in range(0, n, bs):
    chunk = [a[start:start + bs] for a in arrays]
    k = len(chunk[0])
    if k < bs:
      chunk = [np.concatenate([c, np.repeat(c[-1:], bs - k, axis=0)]) for c in chunk]
    res = fn(*chunk)
    res = res if isinstance(res, tuple) else (res,)
    outs.append([np.asarray(r, np.float32)[:k] for r in res])
  return [np.concatenate(col) for col in zip(*outs)]


class ClipEmbedder:
  """A CLIP (text tower + vision tower with projections) plus its tokenizer, as jitted host functions.

  Built from a transformers-layout CLIP directory (`config.json` + `model.safetensors`, a CLIPModel) —
  either a public checkpoint or the small shapes-world CLIP that `clip_pretrain` exports in that layout.
  The weights are arguments of the two jitted functions (`_text(params, ids, mask)`, `_image(params, pixels)`),
  which compile once per input shape; `encode_*(..., batch_size=B)` always calls them on B rows (padding the
  last chunk), so any number of inputs costs one compile.
  """

  def __init__(self, clip_dir: str, max_length: int = 0, image_size: Optional[int] = None):
    import jax
    from diffusion_jax.pretrained import clip as clip_io
    from diffusion_jax.models import clip as clip_lib
    module, params, cfg = clip_io.load_clip(clip_dir, kind="clip")
    self.config = cfg
    self.clip_dir = clip_dir
    self.max_length = int(max_length or cfg.text.max_position_embeddings)
    if self.max_length > cfg.text.max_position_embeddings:
      raise ValueError(f"max_length={self.max_length} exceeds the CLIP's context length "
                       f"{cfg.text.max_position_embeddings}.")
    self.image_size = int(cfg.vision.image_size)
    self.tokenizer = load_tokenizer(clip_dir)
    text = clip_lib.CLIPTextModel(cfg.text, with_projection=True)
    vision = clip_lib.CLIPVisionModel(cfg.vision, with_projection=True)
    self._tparams = {"text_model": params["text_model"], "text_projection": params["text_projection"]}
    self._vparams = {"vision_model": params["vision_model"], "visual_projection": params["visual_projection"]}
    self._text = jax.jit(functools.partial(_text_forward, text))
    self._image = jax.jit(functools.partial(_image_forward, vision))

  @property
  def embed_dim(self) -> int:
    return int(self.config.projection_dim)

  def tokenize(self, captions: Sequence[str]):
    return tokenize(self.tokenizer, captions, self.max_length)

  def encode_text(self, captions: Sequence[str], batch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
    """-> text_hidden float32 [B, L, D], text_emb float32 [B, E], text_mask uint8 [B, L]; run `batch_size`
    captions at a time (all at once if None)."""
    ids, mask = self.tokenize(captions)
    hidden, emb = _run_batched(functools.partial(self._text, self._tparams), (ids, mask), batch_size)
    return {"text_hidden": hidden, "text_emb": emb, "text_mask": mask.astype(np.uint8)}

  def preprocess(self, images: np.ndarray) -> np.ndarray:
    return preprocess_images(images, self.image_size)

  def encode_images(self, images: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, E]; `batch_size` images at a time (all at once if None)."""
    (emb,) = _run_batched(functools.partial(self._image, self._vparams), (self.preprocess(images),), batch_size)
    return emb


def preprocess_images(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [B, H, W, 3] -> CLIP pixels: resized and centre-cropped to `size` (`pipeline.resize_center_crop`,
  only if needed), [0, 1], CLIP mean/std."""
  x = np.asarray(images)
  if x.shape[1] != size or x.shape[2] != size:
    from diffusion_jax.data.pipeline import resize_center_crop
    x = np.stack([resize_center_crop(im, size) for im in x])
  x = x.astype(np.float32) / 255.0
  return (x - CLIP_MEAN) / CLIP_STD


class WordCachedTokenizer:
  """CLIP BPE with a per-word memo: exact for lower-case captions made of letter words and single spaces.

  CLIP's pre-tokenizer splits text into letter runs (and digits / punctuation) before BPE, so the ids of such
  a caption are [BOS] + concat(ids(word)) + [EOS]. Anything else goes through the full tokenizer (text
  cleaning included). About 50x faster than tokenizing each shapes caption from scratch.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self._memo: Dict[str, List[int]] = {}

  def _ids(self, text: str) -> Optional[List[int]]:
    words = text.split(" ")
    if not all(w.isalpha() and w.isascii() and w.islower() for w in words):
      return None
    out: List[int] = []
    for w in words:
      ids = self._memo.get(w)
      if ids is None:
        ids = self._memo[w] = list(self.tokenizer.encode(w))
      out.extend(ids)
    return out

  def __call__(self, texts: Sequence[str], max_length: int) -> Dict[str, np.ndarray]:
    tok = self.tokenizer
    ids = np.full((len(texts), max_length), tok.pad_token_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for i, text in enumerate(texts):
      body = self._ids(text)
      if body is None:
        one = tok([text], max_length=max_length)
        ids[i], mask[i] = one["input_ids"][0], one["attention_mask"][0]
        continue
      toks = [tok.bos_token_id] + body[:max_length - 2] + [tok.eos_token_id]
      ids[i, :len(toks)] = toks
      mask[i, :len(toks)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def load_tokenizer(clip_dir: str = ""):
  """The CLIP BPE tokenizer: the one saved with the model (vocab.json + merges.txt) if present, else the
  packaged CLIP vocabulary (`diffusion_jax.data.tokenizer`); wrapped in `WordCachedTokenizer`."""
  from diffusion_jax.data import tokenizer as tok_lib
  for d in (clip_dir, os.path.join(clip_dir, "tokenizer") if clip_dir else ""):
    if d and os.path.exists(os.path.join(d, "vocab.json")) and os.path.exists(os.path.join(d, "merges.txt")):
      return WordCachedTokenizer(tok_lib.CLIPTokenizer(d))
  return WordCachedTokenizer(tok_lib.CLIPTokenizer())


def tokenize(tokenizer, captions: Sequence[str], max_length: int):
  """-> (int32 ids [B, max_length], int32 mask [B, max_length]): [BOS] ids [EOS], padded / truncated."""
  out = tokenizer(list(captions), max_length=int(max_length))
  return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)


# ------------------------------------------------------------------------------------------- the cache


def _l2n(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def is_complete(cache_dir: str, want: Optional[Mapping[str, Any]] = None) -> bool:
  meta_path = os.path.join(cache_dir, "meta.json")
  if not os.path.exists(meta_path):
    return False
  with open(meta_path) as f:
    meta = json.load(f)
  if not meta.get("complete"):
    return False
  if not all(meta.get("request", {}).get(k) == v for k, v in (want or {}).items()):
    return False
  problem = damage(cache_dir, meta)
  if problem:
    from absl import logging
    logging.warning("Embedding cache %s is damaged (%s); it will be rebuilt.", cache_dir, problem)
    return False
  return True


def damage(cache_dir: str, meta: Mapping[str, Any]) -> Optional[str]:
  """What is wrong with a cache whose meta says complete (a missing or truncated .npy, a wrong length), or
  None. Opens every array memory-mapped: no data is read."""
  for k in meta.get("keys", []):
    path = os.path.join(cache_dir, f"{k}.npy")
    try:
      a = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
      return f"{k}.npy: {type(e).__name__}: {e}"
    want = 1 if k.startswith("null_") else int(meta["num"])
    if a.shape[:1] != (want,):
      return f"{k}.npy has {a.shape[0] if a.ndim else 0} rows, expected {want}"
  return None


def build_cache(embedder: ClipEmbedder, pairs: Iterable[Dict[str, Any]], cache_dir: str, *,
                request: Mapping[str, Any], batch_size: int = 256, normalize: bool = True,
                keep_images: bool = False, progress: bool = True) -> Dict[str, Any]:
  """Encodes every pair with `embedder` and writes the cache (see the module docstring) atomically.

  The embedder always sees `batch_size` rows (the last batch and the empty caption are padded), so its text
  and image functions compile once. Everything goes to `<cache_dir>.tmp`, renamed to `cache_dir` only when
  complete; if anything fails (the pair stream included) the `.tmp` is removed and `cache_dir` is untouched."""
  batch_size = int(batch_size)
  if batch_size <= 0:
    raise ValueError(f"build_cache: batch_size must be positive, got {batch_size}.")
  tmp = cache_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    meta = _build_into(embedder, pairs, cache_dir, tmp, request=request, batch_size=batch_size,
                       normalize=normalize, keep_images=keep_images, progress=progress)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  shutil.rmtree(cache_dir, ignore_errors=True)
  os.replace(tmp, cache_dir)
  return meta


def _build_into(embedder: ClipEmbedder, pairs: Iterable[Dict[str, Any]], cache_dir: str, tmp: str, *,
                request: Mapping[str, Any], batch_size: int, normalize: bool, keep_images: bool,
                progress: bool) -> Dict[str, Any]:
  from tqdm import tqdm
  cols: Dict[str, List[np.ndarray]] = {}
  captions: List[str] = []
  bar = tqdm(total=request.get("num"), desc=f"CLIP cache {os.path.basename(cache_dir)}", disable=not progress,
             dynamic_ncols=True, mininterval=1.0)

  def flush(buf: List[Dict[str, Any]]):
    caps = [b["caption"] for b in buf]
    t = embedder.encode_text(caps, batch_size=batch_size)
    imgs = np.stack([b["image"] for b in buf])
    z_img = embedder.encode_images(imgs, batch_size=batch_size)
    out = {"text_hidden": t["text_hidden"].astype(np.float16), "text_mask": t["text_mask"],
           "text_emb": _l2n(t["text_emb"]) if normalize else t["text_emb"],
           "image_emb": _l2n(z_img) if normalize else z_img}
    if keep_images:
      out["image"] = imgs.astype(np.uint8)
    if "objects" in buf[0]:
      out["objects"] = np.stack([b["objects"] for b in buf]).astype(np.int32)
    for kind in COUNTERFACTUALS:
      key = f"cf_{kind}"
      if key in buf[0]:
        valid = np.array([b[key] is not None for b in buf])
        cf_imgs = np.stack([b[key] if b[key] is not None else b["image"] for b in buf])
        z = embedder.encode_images(cf_imgs, batch_size=batch_size)
        out[f"{key}_emb"] = _l2n(z) if normalize else z
        out[f"{key}_valid"] = valid
    for k, v in out.items():
      cols.setdefault(k, []).append(v)
    captions.extend(caps)
    bar.update(len(buf))

  try:
    buf: List[Dict[str, Any]] = []
    for pair in pairs:
      buf.append(pair)
      if len(buf) == batch_size:
        flush(buf)
        buf = []
    if buf:
      flush(buf)
  finally:
    bar.close()
  if not captions:
    raise ValueError(f"No (caption, image) pairs to cache into {cache_dir}; check the data source.")
  null = embedder.encode_text([""], batch_size=batch_size)
  arrays = {k: np.concatenate(v) for k, v in cols.items()}
  arrays["null_text_hidden"] = null["text_hidden"].astype(np.float16)
  arrays["null_text_mask"] = null["text_mask"]
  arrays["null_text_emb"] = _l2n(null["text_emb"]) if normalize else null["text_emb"]
  for k, v in arrays.items():
    np.save(os.path.join(tmp, f"{k}.npy"), v)
  with open(os.path.join(tmp, "captions.json"), "w") as f:
    json.dump(captions, f)
  meta = {"complete": True, "num": len(captions), "text_len": int(arrays["text_hidden"].shape[1]),
          "text_dim": int(arrays["text_hidden"].shape[2]), "embed_dim": int(arrays["image_emb"].shape[1]),
          "normalize": bool(normalize), "clip_dir": os.path.abspath(embedder.clip_dir),
          "keys": sorted(arrays), "request": dict(request)}
  with open(os.path.join(tmp, "meta.json"), "w") as f:  # written last: a .tmp with meta.json is whole
    json.dump(meta, f, indent=1)
  return meta


def load_meta(cache_dir: str) -> Dict[str, Any]:
  with open(os.path.join(cache_dir, "meta.json")) as f:
    return json.load(f)


def load_arrays(cache_dir: str, keys: Optional[Sequence[str]] = None, mmap: bool = True) -> Dict[str, np.ndarray]:
  meta = load_meta(cache_dir)
  keys = keys or meta["keys"]
  missing = [k for k in keys if k not in meta["keys"]]
  if missing:
    raise KeyError(f"Cache {cache_dir} has no {missing}; it holds {meta['keys']}. Delete it to rebuild.")
  return {k: np.load(os.path.join(cache_dir, f"{k}.npy"), mmap_mode="r" if mmap else None) for k in keys}


def load_captions(cache_dir: str) -> List[str]:
  with open(os.path.join(cache_dir, "captions.json")) as f:
    return json.load(f)


class EmbeddingSource:
  """grain `RandomAccessDataSource` over a cache: `[i]` -> dict of the per-example arrays in `keys`
  (float16 hidden states come back as float32). Arrays are memory-mapped lazily (picklable)."""

  DEFAULT_KEYS = ("text_hidden", "text_mask", "text_emb", "image_emb")

  def __init__(self, cache_dir: str, keys: Sequence[str] = DEFAULT_KEYS):
    if not is_complete(cache_dir):
      raise FileNotFoundError(f"No complete embedding cache in {cache_dir}; build it first (ensure_cache).")
    self.cache_dir = cache_dir
    self.keys = tuple(keys)
    self._n = int(load_meta(cache_dir)["num"])
    self._arrays = None

  def __len__(self) -> int:
    return self._n

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_arrays"] = None
    return d

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    if self._arrays is None:
      self._arrays = load_arrays(self.cache_dir, self.keys)
    out = {}
    for k in self.keys:
      v = np.asarray(self._arrays[k][int(index)])
      out[k] = v.astype(np.float32) if v.dtype == np.float16 else v
    return out

  def __repr__(self) -> str:
    return f"EmbeddingSource({self.cache_dir!r}, n={self._n}, keys={self.keys})"


def pairs_from_config(data_cfg, split: str, *, seed: int, num: Optional[int], image_size: int,
                      counterfactuals: bool = False) -> Iterator[Dict[str, Any]]:
  """The (caption, image) stream a data config names (`data.name` in SOURCES), images at `image_size`.

  `image_folder` reads `data/folder.source_from_config` (`data_dir`, `<data_dir>/<split>/`, `captions_file`),
  `tfds` a `data/tfds_source.TfdsSource` (`tfds_name`, `data_dir`, `image_key`, `caption_key`); the split read is
  `config.data.<split>_split` (default `split`). Sources are opened here, so a missing folder, captions file
  or TFDS build fails before any encoding."""
  name = check_choice("caption data source (config.data.name)", data_cfg.name, SOURCES)
  if name == "shapes":
    cfg = shapes_config(data_cfg)
    return shapes_pairs(int(num), seed, split, cfg, counterfactuals=counterfactuals)
  if not data_cfg.get("data_dir"):
    raise ValueError(f"config.data.name={name!r} needs config.data.data_dir (the folder holding the data).")
  split_name = data_cfg.get(f"{split}_split", split) or split
  if name == "image_folder":
    from diffusion_jax.data.folder import source_from_config
    src = source_from_config(data_cfg, split_name, image_size=image_size)
    if src.captions is None:
      raise FileNotFoundError(f"Image folder {src.root!r} has no captions. An image folder needs captions.jsonl "
                              '(lines {"file": "img.png", "caption": "..."}), captions.tsv (file<TAB>caption) or '
                              ".txt files next to the images; or set config.data.captions_file.")
    return source_pairs(src, image_size, num)
  if not data_cfg.get("tfds_name"):
    raise ValueError("config.data.name='tfds' needs config.data.tfds_name (e.g. 'coco_captions').")
  from diffusion_jax.data.tfds_source import TfdsSource
  src = TfdsSource(data_cfg.tfds_name, split_name, data_cfg.data_dir, image_key=data_cfg.get("image_key", "image"),
                   label_key=None, caption_key=data_cfg.get("caption_key", "caption") or "caption")
  return source_pairs(src, image_size, num)


def weights_fingerprint(clip_dir: str) -> str:
  """sha256 of the CLIP directory's config.json and weight files (content, not path or mtime): a CLIP retrained
  into the same directory gets another fingerprint, so caches made with the old one are never reused."""
  import hashlib
  h = hashlib.sha256()
  names = sorted(n for n in os.listdir(clip_dir) if n == "config.json" or n.endswith(".safetensors"))
  if not names:
    raise FileNotFoundError(f"{clip_dir} holds no config.json / .safetensors weights: not a CLIP directory.")
  for name in names:
    h.update(name.encode())
    with open(os.path.join(clip_dir, name), "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
  return h.hexdigest()[:16]


def cache_request(data_cfg, split: str, clip_dir: str, *, seed: int, num: Optional[int], normalize: bool,
                  max_length: int = 0) -> Dict[str, Any]:
  """Everything a cache of `split` is made from: the data (source, split, size, seed, paths, keys), the CLIP
  (its directory, its weights' content fingerprint, the context length) and the normalisation. A cache is
  reused only when its recorded request equals this one."""
  is_shapes = data_cfg.name == "shapes"
  with open(os.path.join(clip_dir, "config.json")) as f:
    cfg = json.load(f)
  ctx = int(cfg.get("text_config", cfg).get("max_position_embeddings", 77))
  world = dict(data_cfg.get("shapes", None) or {}) if is_shapes else {}
  extra = {"shapes": {k: world[k] for k in sorted(world)}} if world else {}  # absent for the default world
  return {**extra, "source": str(data_cfg.name), "split": split, "seed": int(seed) if is_shapes else None,
          "num": int(num) if num else None, "normalize": bool(normalize),
          "clip_dir": os.path.abspath(clip_dir), "clip_weights": weights_fingerprint(clip_dir),
          "max_length": int(max_length or ctx), "image_size": int(data_cfg.get("image_size", 32)),
          "data_dir": str(data_cfg.get("data_dir", "")), "tfds_name": str(data_cfg.get("tfds_name", "")),
          "split_name": str(data_cfg.get(f"{split}_split", split)),
          "captions_file": str(data_cfg.get("captions_file", "")),
          "image_key": str(data_cfg.get("image_key", "image")),
          "caption_key": str(data_cfg.get("caption_key", "caption"))}


def ensure_cache(embedder: ClipEmbedder, data_cfg, split: str, cache_dir: str, *, seed: int,
                 num: Optional[int], batch_size: int = 256, normalize: bool = True,
                 progress: bool = True) -> Dict[str, Any]:
  """Builds the cache of `split` unless a complete one for the same request (`cache_request`) exists;
  returns its meta."""
  is_shapes = data_cfg.name == "shapes"
  request = cache_request(data_cfg, split, embedder.clip_dir, seed=seed, num=num, normalize=normalize,
                          max_length=embedder.max_length)
  if is_complete(cache_dir, request):
    return load_meta(cache_dir)
  pairs = pairs_from_config(data_cfg, split, seed=seed, num=num, image_size=embedder.image_size,
                            counterfactuals=is_shapes and split == "test")
  return build_cache(embedder, pairs, cache_dir, request=request, batch_size=batch_size, normalize=normalize,
                     keep_images=is_shapes, progress=progress)
