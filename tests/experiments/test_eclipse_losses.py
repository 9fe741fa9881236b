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


def test_modality_geometry_on_constructed_embeddings():
  from diffusion_jax.experiments.clip_pretrain import modality_geometry
  rng = np.random.default_rng(0)
  n, d = 200, 32
  x = rng.normal(size=(n, d))
  same = modality_geometry(x, x)
  assert same["paired_cos"] == pytest.approx(1.0) and same["gap"] == pytest.approx(0.0, abs=1e-9)
  # Two modalities in orthogonal halves of the space: paired = unpaired = 0, the centroids far apart.
  a = np.zeros((n, d)); a[:, 0] = 1.0; a[:, 1:16] = 0.1 * rng.normal(size=(n, 15))
  b = np.zeros((n, d)); b[:, 16] = 1.0; b[:, 17:] = 0.1 * rng.normal(size=(n, 15))
  g = modality_geometry(a, b)
  assert abs(g["paired_cos"]) < 1e-9 and abs(g["unpaired_cos"]) < 1e-9 and g["centroid_cos"] == pytest.approx(0.0)
  assert 1.2 < g["gap"] < np.sqrt(2) and g["image_image_cos"] > 0.8 and g["text_text_cos"] > 0.8
  # A shared content part plus a modality offset: paired cosine above unpaired.
  c = rng.normal(size=(n, d))
  off = np.zeros(d); off[0] = 3.0
  h = modality_geometry(c + off, c - off)
  assert h["paired_cos"] > h["unpaired_cos"] and h["gap"] > 0.5
  with pytest.raises(ValueError):
    modality_geometry(x[:1], x[:1])


def test_first_n_subset():
  from diffusion_jax.experiments.eclipse import FirstN
  src = list(range(10))
  sub = FirstN(src, 4)
  assert len(sub) == 4 and [sub[i] for i in range(4)] == [0, 1, 2, 3]
  with pytest.raises(IndexError):
    sub[4]
  with pytest.raises(ValueError, match="train_subset"):
    FirstN(src, 11)


def test_clip_loss_hard_negatives():
  """Hard negatives enter caption i's text->image softmax only; masked slots change nothing."""
  rng = np.random.default_rng(1)
  x, y, h = rng.normal(size=(4, 8)), rng.normal(size=(4, 8)), rng.normal(size=(4, 2, 8))
  plain = float(clip_pretrain.clip_symmetric_loss(x, y, 10.0))
  assert float(clip_pretrain.clip_symmetric_loss(x, y, 10.0, h, np.zeros((4, 2)))) == pytest.approx(plain, rel=1e-6)
  un = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  lg = 10.0 * un(x) @ un(y).T
  extra = 10.0 * np.einsum("bd,bkd->bk", un(y), un(h))
  t2i = np.concatenate([lg.T, extra], 1)
  lse = lambda a: np.log(np.exp(a).sum(1))  # noqa: E731
  want = 0.5 * (np.mean(lse(lg) - np.diag(lg)) + np.mean(lse(t2i) - np.diag(lg)))
  got = float(clip_pretrain.clip_symmetric_loss(x, y, 10.0, h, np.ones((4, 2))))
  assert got == pytest.approx(want, rel=1e-5) and got > plain


def test_clip_transform_hard_negative_images():
  from diffusion_jax.data import clip_cache, shapes as S
  cfg = S.ShapesConfig(min_objects=2, background_jitter=96, texture_noise=24.0)
  src = clip_cache.ShapesPairSource(4, 0, cfg)
  tr = clip_pretrain.TokenizeAndNormalize(24, cfg, ("colour", "position"))
  ex = src[0]
  out = tr(ex)
  assert out["hard_pixels"].shape == (2,) + out["pixels"].shape and np.all(out["hard_valid"] == 1)
  sc = src.scene(0)
  want = clip_cache.preprocess_images(clip_cache.scene_image(S.swap_positions(sc), cfg)[None], 32)[0]
  np.testing.assert_allclose(out["hard_pixels"][1], want)
  assert "hard_pixels" not in clip_pretrain.TokenizeAndNormalize(24, cfg)(ex)


def test_retrieval_sheet_shows_the_nearest_images_and_frames_the_true_one(tmp_path):
  """retrieval_sheet: each row's top-k cells are the gallery images in cosine order of the predicted embedding;
  the true image is framed green where it is retrieved; the decoded column appears only with decoded images."""
  from PIL import Image
  rng = np.random.default_rng(0)
  n, size, scale, pad, head, cap = 8, 4, 3, 4, 14, 13
  images = np.stack([np.full((size, size, 3), 20 * i + 10, np.uint8) for i in range(n)])  # one grey per image
  true = rng.normal(size=(n, 6)).astype(np.float32)
  pred = true.copy()
  pred[1] = true[5] + 1e-3 * true[1]  # row 1 retrieves image 5 first, not its own
  path = str(tmp_path / "samples" / "retrieval.png")
  sheet = eclipse.retrieval_sheet(path, [f"caption {i}" for i in range(n)], images, pred, true, rows=3, k=5,
                                  scale=scale)
  assert np.array_equal(np.asarray(Image.open(path)), sheet)
  cell = size * scale

  def pixel(row, col):  # the centre of a cell (away from the frame)
    return sheet[head + row * (cell + cap + pad) + cell // 2, pad + col * (cell + pad) + cell // 2]

  sims = (true / np.linalg.norm(true, axis=1, keepdims=True)) @ (true / np.linalg.norm(true, axis=1,
                                                                                         keepdims=True)).T
  for r in (0, 2):
    assert tuple(pixel(r, 0)) == (20 * r + 10,) * 3  # the true image
    assert tuple(pixel(r, 1)) == (20 * r + 10,) * 3  # retrieved first
    assert tuple(pixel(r, 2)) == (20 * int(np.argsort(-sims[r])[1]) + 10,) * 3  # then the next nearest
    corner = sheet[head + r * (cell + cap + pad), pad + cell + pad]
    assert tuple(corner) == (0, 200, 0)  # framed
  assert tuple(pixel(1, 1)) == (20 * 5 + 10,) * 3
  assert tuple(sheet[head + (cell + cap + pad), pad + cell + pad]) != (0, 200, 0)  # image 5 is not the true one
  assert sheet.shape[1] == pad + 6 * (cell + pad)
  decoded = np.full((3, size, size, 3), 0.5, np.float32)
  with_dec = eclipse.retrieval_sheet(path, ["c"] * n, images, pred, true, rows=3, k=5, scale=scale,
                                     decoded=decoded)
  assert with_dec.shape[1] == pad + 7 * (cell + pad)
  assert tuple(with_dec[head + cell // 2, pad + 6 * (cell + pad) + cell // 2]) == (128, 128, 128)
