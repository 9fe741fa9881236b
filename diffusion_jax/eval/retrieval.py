"""Embedding-space metrics for text-to-image priors (ECLIPSE evaluation, small-scale Table 2).

All functions are NumPy (host side) and take plain arrays:

* `cosine_similarity(a, b)`: row-wise cosine between two `[N, D]` arrays -> `[N]`.
* `recall_at_k(queries, gallery, ks)`: text-to-image retrieval. Query `i` (a predicted image embedding
  for caption `i`) is correct at rank `k` if its true image embedding `gallery[i]` is among the `k`
  gallery items with the highest cosine similarity. Ties are counted against the query (a gallery item
  with the same score as the true one ranks ahead of it), so a constant predictor scores 0, not 1.
* `binding_accuracy(pred, true, counterfactuals)`: for each caption, does the predicted embedding prefer
  (higher cosine) the embedding of the true image over *every* embedding of the same objects re-rendered
  with colours swapped (or positions swapped)? Captions whose scene has no distinct counterfactual are
  excluded with a `valid` mask.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def cosine_similarity(a, b) -> np.ndarray:
  """Row-wise cosine similarity of `[N, D]` arrays `a` and `b` -> `[N]`."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"cosine_similarity expects two [N, D] arrays of the same shape, got {a.shape} and "
                     f"{b.shape}.")
  return np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def similarity_matrix(queries, gallery) -> np.ndarray:
  """`[Nq, Ng]` cosine similarities."""
  return l2_normalize(queries) @ l2_normalize(gallery).T


def retrieval_ranks(queries, gallery) -> np.ndarray:
  """0-based rank of the true gallery item `i` for each query `i` (ties count against the query)."""
  queries, gallery = np.asarray(queries), np.asarray(gallery)
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"retrieval expects [N, D] queries and [M, D] gallery, got {queries.shape} and "
                     f"{gallery.shape}.")
  if gallery.shape[0] < queries.shape[0]:
    raise ValueError("the gallery must hold the true item of every query (gallery[i] for query i): "
                     f"got {queries.shape[0]} queries and {gallery.shape[0]} gallery items.")
  sim = similarity_matrix(queries, gallery)
  n = queries.shape[0]
  true = sim[np.arange(n), np.arange(n)][:, None]
  others = np.ones_like(sim, dtype=bool)
  others[np.arange(n), np.arange(n)] = False
  return np.sum((sim >= true) & others, axis=1)


def recall_at_k(queries, gallery, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
  """Text-to-image retrieval recall: `{"R@k": fraction of queries whose true item ranks < k}`."""
  ranks = retrieval_ranks(queries, gallery)
  return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def binding_accuracy(pred, true, counterfactuals, valid: Optional[np.ndarray] = None) -> float:
  """Fraction of captions whose prediction is closer (cosine) to the true image than to all counterfactuals.

  Args:
    pred: `[N, D]` predicted image embeddings (from the captions).
    true: `[N, D]` CLIP image embeddings of the true images.
    counterfactuals: `[N, D]` or `[N, C, D]` embeddings of the counterfactual images (colours swapped /
      positions swapped).
    valid: optional `[N]` (or `[N, C]`) bool mask; invalid captions (or counterfactual slots) are ignored.
  Returns:
    accuracy in [0, 1] over valid captions (nan if none is valid).
  """
  pred, true, cf = np.asarray(pred), np.asarray(true), np.asarray(counterfactuals)
  if cf.ndim == 2:
    cf = cf[:, None]
    if valid is not None and np.asarray(valid).ndim == 1:
      valid = np.asarray(valid)[:, None]
  if cf.ndim != 3 or cf.shape[0] != pred.shape[0] or cf.shape[-1] != pred.shape[-1]:
    raise ValueError(f"counterfactuals must be [N, D] or [N, C, D] matching pred {pred.shape}, got {cf.shape}.")
  p = l2_normalize(pred)
  s_true = np.sum(p * l2_normalize(true), axis=-1)  # [N]
  s_cf = np.einsum("nd,ncd->nc", p, l2_normalize(cf))  # [N, C]
  if valid is None:
    slot_valid = np.ones(s_cf.shape, bool)
  else:
    slot_valid = np.broadcast_to(np.asarray(valid, bool).reshape(s_cf.shape[0], -1), s_cf.shape)
  wins = np.all((s_true[:, None] > s_cf) | ~slot_valid, axis=1)
  row_valid = np.any(slot_valid, axis=1)
  if not np.any(row_valid):
    return float("nan")
  return float(np.mean(wins[row_valid]))


def embedding_metrics(pred, true, counterfactuals: Optional[Dict[str, np.ndarray]] = None,
                      valid: Optional[Dict[str, np.ndarray]] = None, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
  """All prior metrics at once: R@k, mean cosine(pred, true) and one binding accuracy per counterfactual kind."""
  out = recall_at_k(pred, true, ks)
  out["cosine"] = float(np.mean(cosine_similarity(pred, true)))
  for name, cf in (counterfactuals or {}).items():
    out[f"binding_{name}"] = binding_accuracy(pred, true, cf, None if valid is None else valid.get(name))
  return out
