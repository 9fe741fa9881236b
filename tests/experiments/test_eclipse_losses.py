"""ECLIPSE losses (Eq. 3-5) and the CLIP pretraining loss against direct NumPy computations."""

import numpy as np
import pytest

import jax.numpy as jnp

from diffusion_jax.experiments import clip_pretrain, eclipse


def _np_y2x(pred, text, tau):
  """-(1/N) sum_i log softmax_j(cos(pred_i, text_j) / tau)[i], written as explicit loops."""
  n = pred.shape[0]
  total = 0.0
  for i in range(n):
    sims = []
    for j in range(n):
      sims.append(np.dot(pred[i], text[j]) / (np.linalg.norm(pred[i]) * np.linalg.norm(text[j])) / tau)
    sims = np.array(sims)
    total += -(sims[i] - np.log(np.sum(np.exp(sims))))
  return total / n


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  return rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), rng.normal(size=(6, 5))


def test_projection_loss(batch):
  pred, target, _ = batch
  want_sum = np.mean([np.sum((target[i] - pred[i]) ** 2) for i in range(len(pred))])
  want_mean = np.mean((target - pred) ** 2)
  np.testing.assert_allclose(eclipse.projection_loss(jnp.asarray(pred), jnp.asarray(target), "sum"), want_sum,
                             rtol=1e-5)
  np.testing.assert_allclose(eclipse.projection_loss(jnp.asarray(pred), jnp.asarray(target), "mean"), want_mean,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="sum"):
    eclipse.projection_loss(jnp.asarray(pred), jnp.asarray(target), "max")


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_contrastive_y2x(batch, tau):
  pred, _, text = batch
  got = eclipse.contrastive_loss_y2x(jnp.asarray(pred), jnp.asarray(text), tau)
  np.testing.assert_allclose(got, _np_y2x(pred, text, tau), rtol=1e-5)
  # One direction only: swapping the roles changes the value (the text->image loss is not symmetric).
  other = eclipse.contrastive_loss_y2x(jnp.asarray(text), jnp.asarray(pred), tau)
  assert abs(float(other) - float(got)) > 1e-4
  # Scale invariance of the cosine.
  np.testing.assert_allclose(eclipse.contrastive_loss_y2x(jnp.asarray(3 * pred), jnp.asarray(text), tau), got,
                             rtol=1e-5)


def test_eclipse_total(batch):
  pred, image, text = batch
  total, parts = eclipse.eclipse_loss(jnp.asarray(pred), jnp.asarray(image), jnp.asarray(text), lam=0.2, tau=0.07)
  want_proj = np.mean(np.sum((image - pred) ** 2, -1))
  want = want_proj + 0.2 * _np_y2x(pred, text, 0.07)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  np.testing.assert_allclose(parts["loss_proj"], want_proj, rtol=1e-5)
  proj_only, _ = eclipse.eclipse_loss(jnp.asarray(pred), jnp.asarray(image), jnp.asarray(text), lam=0.0, tau=0.07)
  np.testing.assert_allclose(proj_only, want_proj, rtol=1e-5)


def test_clip_symmetric_loss(batch):
  img, _, txt = batch
  scale = 10.0
  a = img / np.linalg.norm(img, axis=-1, keepdims=True)
  b = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  logits = scale * a @ b.T
  i2t = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(len(a))])
  t2i = -np.mean([logits[i, i] - np.log(np.exp(logits[:, i]).sum()) for i in range(len(a))])
  got = clip_pretrain.clip_symmetric_loss(jnp.asarray(img), jnp.asarray(txt), scale)
  np.testing.assert_allclose(got, 0.5 * (i2t + t2i), rtol=1e-5)
