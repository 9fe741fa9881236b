"""MT-Diffusion networks (`models/mt_diffusion.py`): encoder / decoder shapes, the codes' scale, the identity image
code, the restoration losses against hand-written formulas, and the shared net's heads on a stand-in backbone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import mt_diffusion as M

B, H, C = 3, 8, 4
SHAPE = (H, H, C)
SPECS = {"image": M.ModalitySpec("image"), "image_conv": M.ModalitySpec("image", encoder="conv", hidden=8),
         "label": M.ModalitySpec("label", num_classes=5, hidden=8),
         "segmentation": M.ModalitySpec("segmentation", num_classes=3, hidden=8),
         "masked_image": M.ModalitySpec("masked_image", hidden=8),
         "embedding": M.ModalitySpec("embedding", embed_dim=6, hidden=8)}
DECODED = {"image": (B, H, H, 3), "image_conv": (B, H, H, 3), "label": (B, 5), "segmentation": (B, H, H, 3),
           "masked_image": (B, H, H, 4), "embedding": (B, 6)}


def _inputs():
  r = np.random.default_rng(0)
  return {"image": r.uniform(-1, 1, (B, H, H, 3)).astype(np.float32), "label": np.array([0, 3, 4], np.int32),
          "segmentation": r.integers(0, 3, (B, H, H)).astype(np.int32),
          "masked_image": r.uniform(-1, 1, (B, H, H, 3)).astype(np.float32),
          "mask": (r.uniform(size=(B, H, H)) > 0.5).astype(np.float32),
          "embedding": r.normal(size=(B, 6)).astype(np.float32)}


def _x(name, inp):
  return inp["image" if name.startswith("image") else name]


@pytest.mark.parametrize("name", list(SPECS))
def test_encoder_decoder_shapes_and_code_scale(name):
  spec, inp = SPECS[name], _inputs()
  enc = M.ModalityEncoder(spec, SHAPE, code_scale=0.7)
  mask = inp["mask"] if spec.kind == "masked_image" else None
  v = enc.init(jax.random.key(0), _x(name, inp), mask)
  code = enc.apply(v, _x(name, inp), mask)
  assert code.shape == (B,) + SHAPE
  if name == "image":  # identity code: pixels on channels 0-2, zeros on the rest, no parameters
    assert not jax.tree.leaves(v)
    np.testing.assert_array_equal(np.asarray(code[..., :3]), inp["image"])
    assert np.all(np.asarray(code[..., 3:]) == 0)
  else:  # learned codes are RMS-normalised per example to code_scale
    rms = np.sqrt(np.mean(np.square(np.asarray(code)), axis=(1, 2, 3)))
    np.testing.assert_allclose(rms, 0.7, rtol=1e-4)
  dec = M.ModalityDecoder(spec, SHAPE)
  dv = dec.init(jax.random.key(1), code)
  out = dec.apply(dv, code)
  assert out.shape == DECODED[name]
  if name == "image":
    np.testing.assert_array_equal(np.asarray(out), inp["image"])  # D(E(x)) = x exactly
    assert dec.exact


def _loss(spec, decoded, target, mask=None):
  dec = M.ModalityDecoder(spec, SHAPE)
  return np.asarray(dec.apply({}, decoded, target, mask, method="loss"))


def test_restoration_losses_match_formulas():
  r = np.random.default_rng(1)
  logits = r.normal(size=(B, 5)).astype(np.float32)
  y = np.array([1, 0, 4])
  ref = -(logits[np.arange(B), y] - np.log(np.exp(logits).sum(-1)))
  np.testing.assert_allclose(_loss(SPECS["label"], logits, y), ref, rtol=1e-5)
  seg_logits = r.normal(size=(B, H, H, 3)).astype(np.float32)
  seg = r.integers(0, 3, (B, H, H))
  oh = np.eye(3)[seg]
  np.testing.assert_allclose(_loss(SPECS["segmentation"], seg_logits, seg),
                             np.mean((seg_logits - oh) ** 2, axis=(1, 2, 3)), rtol=1e-5)
  ce_spec = M.ModalitySpec("segmentation", num_classes=3, loss="ce")
  lsm = seg_logits - np.log(np.exp(seg_logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(_loss(ce_spec, seg_logits, seg), -np.mean(np.sum(oh * lsm, -1), axis=(1, 2)), rtol=1e-5)
  a, b = r.normal(size=(B, 6)).astype(np.float32), r.normal(size=(B, 6)).astype(np.float32)
  cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(_loss(SPECS["embedding"], a, b), 1 - cos, rtol=1e-5)
  np.testing.assert_allclose(_loss(M.ModalitySpec("embedding", embed_dim=6, loss="mse"), a, b),
                             np.mean((a - b) ** 2, -1), rtol=1e-5)
  inp = _inputs()
  dec4 = r.normal(size=(B, H, H, 4)).astype(np.float32)
  tgt = np.concatenate([inp["masked_image"], 2 * inp["mask"][..., None] - 1], -1)
  np.testing.assert_allclose(_loss(SPECS["masked_image"], dec4, inp["masked_image"], inp["mask"]),
                             np.mean((dec4 - tgt) ** 2, axis=(1, 2, 3)), rtol=1e-5)
  # The loss is 0 at the target (labels: large logit on the right class) and grows away from it.
  assert _loss(SPECS["label"], 50.0 * np.eye(5, dtype=np.float32)[y], y).max() < 1e-6
  assert _loss(SPECS["embedding"], a, a).max() < 1e-6


def test_spec_validation():
  with pytest.raises(ValueError, match="modality kind"):
    M.ModalitySpec("audio")
  with pytest.raises(ValueError, match="num_classes"):
    M.ModalitySpec("label")
  with pytest.raises(ValueError, match="embed_dim"):
    M.ModalitySpec("embedding")
  with pytest.raises(ValueError, match="restoration loss"):
    M.ModalitySpec("label", num_classes=3, loss="mse")
  with pytest.raises(ValueError, match="image encoder"):
    M.ModalitySpec("image", encoder="vae")


class _StandIn(nn.Module):
  """A stand-in backbone: [B, H, W, C] + t -> [B, H, W, 8] features."""

  @nn.compact
  def __call__(self, x, t):
    return nn.Conv(8, (3, 3))(x) + t[:, None, None, None] * nn.Dense(8)(jnp.ones((1, 1)))[None, None]


def test_shared_net_heads_and_restoration():
  specs = (SPECS["image"], SPECS["label"], SPECS["segmentation"])
  net = M.MTDiffusionNet(specs, _StandIn(), SHAPE)
  inp = _inputs()
  z = jnp.asarray(np.random.default_rng(2).normal(size=(B,) + SHAPE), jnp.float32)
  t = jnp.arange(B, dtype=jnp.float32)
  params = net.init(jax.random.key(0), inp, z, t)["params"]
  assert {"backbone", "enc_label", "enc_segmentation", "head_image", "head_label", "head_segmentation",
          "dec_label", "dec_segmentation"} <= set(params)
  codes = net.apply({"params": params}, inp, method="encode")
  pred = net.apply({"params": params}, z, t, method="predict")
  assert codes.shape == pred.shape == (3, B) + SHAPE
  # Each head is its own 1x1 conv: changing the label head changes only the label's predicted code.
  p2 = jax.tree_util.tree_map(lambda a: a, params)
  p2["head_label"] = jax.tree.map(lambda a: a + 1.0, params["head_label"])
  pred2 = net.apply({"params": p2}, z, t, method="predict")
  np.testing.assert_array_equal(np.asarray(pred2[0]), np.asarray(pred[0]))
  assert np.abs(np.asarray(pred2[1] - pred[1])).mean() > 0.5 and np.all(np.asarray(pred2[2] == pred[2]))
  rec = net.apply({"params": params}, codes, inp, method="restoration")
  assert rec["image"] is None and rec["label"].shape == rec["segmentation"].shape == (B,)
  with pytest.raises(ValueError, match="distinct"):
    M.MTDiffusionNet((SPECS["image"], SPECS["image"]), _StandIn(), SHAPE).init(jax.random.key(0), inp, z, t)
