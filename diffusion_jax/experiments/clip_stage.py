"""What ECLIPSE's prior and the unCLIP decoder share: the CLIP stage and the CLIP embedding caches built from it.

Both experiments declare the CLIP as stage "clip" (`config.stages.clip`: a shapes CLIP trained by
`clip_pretrain`, or a local transformers CLIP given as a path); the experiment receives the CLIP's directory
and, on first use of a split, encodes the (caption, image) pairs of `config.data` once into an embedding cache
(`data/clip_cache.py`): `<config.data.embedding_cache or WORKDIR/cache>/<split>_<num>`. A cache is keyed by
its request (`clip_cache.cache_request`: source, split, size, seed, data paths and keys, normalisation, the
CLIP directory, the content fingerprint of its weights, the context length), so a run with another CLIP — or
the same directory retrained — or other data never reads a stale cache, and several runs can share one
cache root.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Optional

from diffusion_jax.data import clip_cache


def cache_root(config, workdir: Optional[str]) -> str:
  root = config.data.get("embedding_cache", "") or (os.path.join(workdir, "cache") if workdir else "")
  if "{workdir}" in root:  # a stage sharing its parent's cache: "{workdir}/../cache"
    if not workdir:
      raise ValueError(f"config.data.embedding_cache={root!r} names the run directory, but there is none.")
    root = os.path.normpath(root.replace("{workdir}", workdir))
  if not root:
    raise ValueError("No place for the CLIP embedding cache: set config.data.embedding_cache, or run through "
                     "`python -m diffusion_jax.main --workdir DIR` (the cache goes to DIR/cache).")
  return root


def split_size(config, split: str) -> Optional[int]:
  d = config.data
  return int(d.num_train if split == "train" else d.num_test) or None


def embedding_caches(config, clip_dir: str, workdir: Optional[str], splits: Iterable[str]) -> Dict[str, str]:
  """Split -> cache directory, building each missing cache with the CLIP in `clip_dir` (one jitted
  encoder for all splits)."""
  root = cache_root(config, workdir)
  d = config.data
  out, embedder = {}, None
  for split in splits:
    num = split_size(config, split)
    path = os.path.join(root, f"{split}_{num or 'all'}")
    # The full request (data config, CLIP weights' content, normalisation): a cache made from anything else
    # is rebuilt, never reused.
    request = clip_cache.cache_request(d, split, clip_dir, seed=int(d.get("seed", 0)), num=num,
                                       normalize=bool(d.get("normalize", True)),
                                       max_length=int(config.clip.get("max_length", 0) or 0))
    if not clip_cache.is_complete(path, request):
      if embedder is None:
        print(f"[clip cache] encoding (caption, image) pairs with the CLIP in {clip_dir} into {root}", flush=True)
        embedder = clip_cache.ClipEmbedder(clip_dir, int(config.clip.get("max_length", 0) or 0))
      clip_cache.ensure_cache(embedder, d, split, path, seed=int(d.get("seed", 0)), num=num,
                              batch_size=int(d.get("encode_batch_size", 256)), normalize=bool(d.get("normalize", True)))
    out[split] = path
  return out
