"""PSNR / SSIM against scikit-image; CLIP score against transformers' CLIPModel (PyTorch) on a tiny random
model; CLIP preprocessing against transformers' CLIPImageProcessor."""

import numpy as np
import pytest

from diffusion_jax.eval import image_metrics as M


def _pair(seed=0, shape=(3, 24, 20, 3)):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 256, shape).astype(np.uint8)
  noise = rng.normal(0, 80, shape)
  b = np.clip(a + noise, 0, 255).astype(np.uint8)
  return a, b


def test_psnr_ssim_match_skimage():
  skm = pytest.importorskip("skimage.metrics")
  a, b = _pair()
  p, s = M.psnr(a, b, 255), M.ssim(a, b, 255)
  for i in range(len(a)):
    assert p[i] == pytest.approx(skm.peak_signal_noise_ratio(a[i], b[i], data_range=255), abs=1e-4)
    want = skm.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     channel_axis=-1, data_range=255)
    assert 0.05 < want < 0.95
    assert s[i] == pytest.approx(want, abs=2e-5)
  # float images in [0, 1], range 1: SSIM is invariant to a common scaling of images and range
  np.testing.assert_allclose(M.ssim(a / 255.0, b / 255.0, 1.0), s, atol=2e-5)
  assert np.all(M.ssim(a, a, 255) > 1 - 1e-6) and np.all(np.isinf(M.psnr(a, a, 255)))
  with pytest.raises(ValueError, match="one shape"):
    M.ssim(a, b[:, :20], 255)
  with pytest.raises(ValueError, match="11x11"):
    M.ssim(a[:, :8, :8], b[:, :8, :8], 255)


def test_clip_score_matches_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from diffusion_jax.pretrained import clip as clip_io
  tc = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=12, projection_dim=16,
                                   eos_token_id=2, bos_token_id=97, pad_token_id=1)
  vc = transformers.CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=37,
                                     num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
  m = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(),
                                                     projection_dim=16)).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  m.save_pretrained(tmp_path / "pt", safe_serialization=True)
  module, params, _ = clip_io.load_clip(str(tmp_path / "pt"))
  rng = np.random.default_rng(0)
  ids = np.array([[97, 10, 20, 98, 1, 1], [97, 5, 50, 70, 90, 98], [97, 3, 98, 1, 1, 1], [97, 8, 9, 98, 1, 1]])
  mask = (np.arange(6)[None] <= np.argmax(ids == 98, axis=1)[:, None]).astype(np.int64)
  px = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
  got = M.clip_score(module, params, px, ids, mask)
  with torch.no_grad():
    out = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            pixel_values=torch.tensor(px.transpose(0, 3, 1, 2)))
    cos = (out.text_embeds * out.image_embeds).sum(-1).numpy()
  want = 100 * np.maximum(cos, 0)
  assert np.any(cos < 0) or np.any(cos > 0)
  np.testing.assert_allclose(got, want, atol=1e-3)


def test_clip_pixels_match_clip_image_processor():
  transformers = pytest.importorskip("transformers")
  proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  # smooth images (a low-frequency random field): PIL resizes uint8 in two passes with uint8 rounding and
  # clipping in between, which on white noise differs from a float resize by up to ~7/255
  coarse = np.random.default_rng(0).uniform(30, 225, (2, 6, 8, 3))
  img = np.clip(np.asarray(M.jax.image.resize(coarse, (2, 48, 64, 3), "linear")), 0, 255).round().astype(np.uint8)
  want = proc(images=list(img), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = np.asarray(M.clip_pixels(img, 32))
  assert got.shape == want.shape == (2, 32, 32, 3)
  # the processor rounds the resized image to uint8 (0.5/255 / std ~ 0.0076) before normalising
  err = np.abs(got - want).max()
  print(f"\nCLIP_PIXELS max_abs_diff={err:.3g}")
  assert err < 0.02
