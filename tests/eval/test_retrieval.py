"""Retrieval / cosine / binding metrics against hand-built cases and explicit loops."""

import numpy as np
import pytest

from diffusion_jax.eval import retrieval


def _loop_recall(q, g, k):
  hits = 0
  for i in range(len(q)):
    sims = [float(np.dot(q[i], g[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(g[j]))) for j in range(len(g))]
    better = sum(1 for j in range(len(g)) if j != i and sims[j] >= sims[i])
    hits += better < k
  return hits / len(q)


def test_recall_matches_loop():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(20, 8))
  q = g + rng.normal(scale=1.0, size=g.shape)
  r = retrieval.recall_at_k(q, g, ks=(1, 5))
  assert r["R@1"] == pytest.approx(_loop_recall(q, g, 1))
  assert r["R@5"] == pytest.approx(_loop_recall(q, g, 5))
  assert 0.0 < r["R@1"] < r["R@5"] <= 1.0


def test_recall_perfect_and_constant():
  g = np.eye(6)
  assert retrieval.recall_at_k(3.0 * g, g)["R@1"] == 1.0
  # A constant predictor ties with every gallery item: no credit.
  assert retrieval.recall_at_k(np.ones((6, 6)), g)["R@5"] == 0.0


def test_cosine():
  a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
  b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
  np.testing.assert_allclose(retrieval.cosine_similarity(a, b), [1.0, -1.0, 0.0], atol=1e-12)
  with pytest.raises(ValueError, match="same shape"):
    retrieval.cosine_similarity(a, b[:2])


def test_binding_accuracy_hand_case():
  pred = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  true = np.array([[1.0, 0.1], [0.0, 1.0], [0.0, 1.0]])
  cf = np.array([[[0.0, 1.0], [1.0, -0.5]],   # both worse than true -> win
                 [[1.0, 0.0], [0.0, 1.0]],    # counterfactual closer -> lose
                 [[0.0, 1.0], [1.0, 0.0]]])   # tie with first counterfactual -> lose
  assert retrieval.binding_accuracy(pred, true, cf) == pytest.approx(1 / 3)
  valid = np.array([True, False, True])
  assert retrieval.binding_accuracy(pred, true, cf, valid) == pytest.approx(1 / 2)
  # Masking the tied slot of row 2 turns it into a win.
  slot_valid = np.array([[True, True], [True, True], [False, True]])
  assert retrieval.binding_accuracy(pred, true, cf, slot_valid) == pytest.approx(2 / 3)
  # Single counterfactual per row ([N, D]).
  assert retrieval.binding_accuracy(pred, true, cf[:, 0]) == pytest.approx(1 / 3)


def test_embedding_metrics_keys():
  rng = np.random.default_rng(1)
  t = rng.normal(size=(10, 4))
  m = retrieval.embedding_metrics(t, t, {"colour": -t})
  assert m["R@1"] == 1.0 and m["cosine"] == pytest.approx(1.0) and m["binding_colour"] == 1.0
