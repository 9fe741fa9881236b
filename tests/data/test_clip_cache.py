"""data/clip_cache.py on a tiny random CLIP: pairs come from data/folder.py and data/tfds_source.py (mock TFDS),
images go through pipeline.resize_center_crop, each jitted CLIP function is traced once per cache (the short
last batch is padded), and an interrupted build never leaves a complete cache."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffusion_jax.data import clip_cache
from diffusion_jax.data import shapes as S
from diffusion_jax.data.pipeline import resize_center_crop

CLIP_SIZE = 16  # the tiny CLIP's input size; the shapes images (also 16) and folder / TFDS images are resized to it


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A random transformers-layout CLIPModel: 1-layer towers, width 16, 8-d embeddings, 8-token context."""
  from diffusion_jax.models import clip as clip_lib
  from diffusion_jax.pretrained import clip as clip_io
  cfg = clip_lib.CLIPConfig(
      text=clip_lib.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   max_position_embeddings=8, projection_dim=8),
      vision=clip_lib.CLIPVisionConfig(image_size=CLIP_SIZE, patch_size=8, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, projection_dim=8),
      projection_dim=8)
  rng = np.random.default_rng(0)  # random weights on the abstract tree (no init compile): LN scales 1, rest N(0, 0.1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: np.ones(s.shape, s.dtype) if path[-1].key == "scale"
      else (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), clip_io.abstract_params_for("clip", cfg))
  d = str(tmp_path_factory.mktemp("clip") / "hf_clip")
  clip_io.save_clip(d, params, cfg, kind="clip")
  return d


@pytest.fixture(scope="module")
def embedder(clip_dir):
  return clip_cache.ClipEmbedder(clip_dir)


def _shapes(num, split="test", counterfactuals=False):
  return clip_cache.shapes_pairs(num, 0, split, S.ShapesConfig(image_size=16), counterfactuals=counterfactuals)


def test_preprocess_images_resizes_then_centre_crops():
  x = np.random.default_rng(0).integers(0, 255, size=(2, 12, 20, 3), dtype=np.uint8)
  got = clip_cache.preprocess_images(x, 8)
  want = np.stack([resize_center_crop(im, 8) for im in x]).astype(np.float32) / 255.0
  np.testing.assert_allclose(got, (want - clip_cache.CLIP_MEAN) / clip_cache.CLIP_STD, rtol=0, atol=1e-6)
  same = clip_cache.preprocess_images(x[:, :8, :8], 8)  # already the size: no resampling
  np.testing.assert_allclose(same, (x[:, :8, :8] / 255.0 - clip_cache.CLIP_MEAN) / clip_cache.CLIP_STD, atol=1e-6)


def test_each_clip_function_traced_once_with_short_last_batch(clip_dir, tmp_path, monkeypatch):
  traces = {"text": [], "image": []}
  text_fwd, image_fwd = clip_cache._text_forward, clip_cache._image_forward

  def count_text(module, params, ids, mask):
    traces["text"].append(ids.shape)  # runs at trace time only
    return text_fwd(module, params, ids, mask)

  def count_image(module, params, pixels):
    traces["image"].append(pixels.shape)
    return image_fwd(module, params, pixels)

  monkeypatch.setattr(clip_cache, "_text_forward", count_text)
  monkeypatch.setattr(clip_cache, "_image_forward", count_image)
  emb = clip_cache.ClipEmbedder(clip_dir)
  # 7 pairs in batches of 3 (3, 3, 1) + counterfactual images + the empty caption: one shape per function.
  meta = clip_cache.build_cache(emb, _shapes(7, counterfactuals=True), str(tmp_path / "c"), request={"num": 7},
                                batch_size=3, keep_images=True, progress=False)
  assert traces == {"text": [(3, 8)], "image": [(3, CLIP_SIZE, CLIP_SIZE, 3)]}
  assert emb._text._cache_size() == 1 and emb._image._cache_size() == 1
  assert meta["num"] == 7 and clip_cache.is_complete(str(tmp_path / "c"), {"num": 7})
  arr = clip_cache.load_arrays(str(tmp_path / "c"))
  assert arr["text_hidden"].shape == (7, 8, 16) and arr["text_hidden"].dtype == np.float16
  assert arr["image_emb"].shape == (7, 8) and arr["null_text_emb"].shape == (1, 8)
  assert arr["image"].shape == (7, 16, 16, 3) and arr["objects"].shape[0] == 7 and arr["cf_colour_valid"].shape == (7,)
  # The padding rows are dropped, not mixed in: equal to encoding all 7 at once (a new shape, traced now).
  pairs = list(_shapes(7))
  z_img = emb.encode_images(np.stack([p["image"] for p in pairs]))
  z_txt = emb.encode_text([p["caption"] for p in pairs])["text_emb"]
  l2n = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(arr["image_emb"], l2n(z_img), atol=1e-5)
  np.testing.assert_allclose(arr["text_emb"], l2n(z_txt), atol=1e-5)
  np.testing.assert_allclose(arr["null_text_emb"], l2n(emb.encode_text([""])["text_emb"]), atol=1e-5)
  assert clip_cache.load_captions(str(tmp_path / "c")) == [p["caption"] for p in pairs]
  assert len(traces["text"]) == 3 and len(traces["image"]) == 2  # the counter does see new shapes


def test_interrupted_build_leaves_no_complete_cache(embedder, tmp_path):
  cache = str(tmp_path / "cache")
  old = {"num": 3, "tag": "old"}
  clip_cache.build_cache(embedder, _shapes(3), cache, request=old, batch_size=2, progress=False)
  new = {"num": 6, "tag": "new"}

  def broken():
    for i, p in enumerate(_shapes(6)):
      if i == 5:  # after two full batches of 2
        raise RuntimeError("disk on fire")
      yield p

  with pytest.raises(RuntimeError, match="disk on fire"):
    clip_cache.build_cache(embedder, broken(), cache, request=new, batch_size=2, progress=False)
  assert not clip_cache.is_complete(cache, new)
  assert not os.path.exists(cache + ".tmp")
  assert clip_cache.is_complete(cache, old) and clip_cache.load_meta(cache)["num"] == 3  # the old cache survives
  meta = clip_cache.build_cache(embedder, _shapes(6), cache, request=new, batch_size=2, progress=False)
  assert meta["num"] == 6 and clip_cache.is_complete(cache, new) and not clip_cache.is_complete(cache, old)
  assert clip_cache.load_arrays(cache, ["image_emb"])["image_emb"].shape == (6, 8)


def test_image_folder_pairs_through_folder_source(embedder, tmp_path):
  root = tmp_path / "imgs" / "train"
  os.makedirs(root)
  rng = np.random.default_rng(0)
  raw = {}
  for i in range(3):
    raw[f"{i}.png"] = rng.integers(0, 255, size=(12, 20, 3), dtype=np.uint8)  # not square: crop matters
    Image.fromarray(raw[f"{i}.png"]).save(root / f"{i}.png")
  (root / "caps.tsv").write_text("1.png\tone\n0.png\tzero\n0.png\tnought\n2.png\ttwo\n")
  dc = ml_collections.ConfigDict(dict(name="image_folder", data_dir=str(tmp_path / "imgs"), image_size=32,
                                      captions_file=str(root / "caps.tsv"), train_split="train"))
  pairs = list(clip_cache.pairs_from_config(dc, "train", seed=0, num=3, image_size=CLIP_SIZE))
  assert [p["caption"] for p in pairs] == ["zero", "nought", "one"]
  np.testing.assert_array_equal(pairs[2]["image"], resize_center_crop(raw["1.png"], CLIP_SIZE))
  meta = clip_cache.ensure_cache(embedder, dc, "train", str(tmp_path / "c"), seed=0, num=None, batch_size=3,
                                 progress=False)
  assert meta["num"] == 4 and meta["request"]["source"] == "image_folder" and meta["request"]["num"] is None
  mtime = os.path.getmtime(tmp_path / "c" / "meta.json")
  clip_cache.ensure_cache(embedder, dc, "train", str(tmp_path / "c"), seed=0, num=None, batch_size=3, progress=False)
  assert os.path.getmtime(tmp_path / "c" / "meta.json") == mtime  # same request: reused
  dc.captions_file = ""
  with pytest.raises(FileNotFoundError, match="has no captions.*captions_file"):
    clip_cache.pairs_from_config(dc, "train", seed=0, num=None, image_size=CLIP_SIZE)


def test_tfds_pairs_through_tfds_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyCaptionsClipCacheTest(tfds.core.GeneratorBasedBuilder):
    """Mock-only builder: non-square images and COCO-style nested captions."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(12, 20, 3)),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      yield 0, {}

  name = "tiny_captions_clip_cache_test"
  dc = ml_collections.ConfigDict(dict(name="tfds", tfds_name=name, data_dir=str(tmp_path), test_split="validation",
                                      image_key="image", caption_key="captions/text"))
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    pairs = list(clip_cache.pairs_from_config(dc, "test", seed=0, num=3, image_size=8))
    raw = tfds.data_source(name, split="validation", data_dir=str(tmp_path))
    raw = [raw[i] for i in range(3)]
  assert len(pairs) == 3
  for p, r in zip(pairs, raw):
    want = r["captions"]["text"][0]
    assert p["caption"] == (want.decode() if isinstance(want, bytes) else str(want))
    np.testing.assert_array_equal(p["image"], resize_center_crop(np.asarray(r["image"]), 8))


def test_a_cache_is_never_reused_for_other_weights_or_data(clip_dir, tmp_path):
  """The cache request holds the CLIP weights' content fingerprint and the data config: the same CLIP
  directory retrained (other weights), another data seed or another normalisation rebuild the cache; an
  identical request reuses it."""
  import shutil
  from diffusion_jax.experiments import clip_stage
  from diffusion_jax.pretrained import clip as clip_io
  own = str(tmp_path / "clip")
  shutil.copytree(clip_dir, own)
  cfg = ml_collections.ConfigDict({"data": {"name": "shapes", "image_size": 16, "num_train": 6, "num_test": 5,
                                            "seed": 0, "normalize": True, "encode_batch_size": 4,
                                            "embedding_cache": str(tmp_path / "cache")},
                                   "clip": {"max_length": 0}})
  path = clip_stage.embedding_caches(cfg, own, None, ["test"])["test"]
  meta_file = os.path.join(path, "meta.json")
  built = os.path.getmtime(meta_file)
  first = np.asarray(clip_cache.load_arrays(path, ["text_emb"])["text_emb"]).copy()
  assert clip_stage.embedding_caches(cfg, own, None, ["test"])["test"] == path
  assert os.path.getmtime(meta_file) == built  # same request: reused
  # "Retrain" the CLIP into the same directory: other weights, same path.
  _, params, ccfg = clip_io.load_clip(own, kind="clip")
  clip_io.save_clip(own, jax.tree.map(lambda a: np.asarray(a) * 1.5, params), ccfg, kind="clip")
  clip_stage.embedding_caches(cfg, own, None, ["test"])
  second = np.asarray(clip_cache.load_arrays(path, ["text_emb"])["text_emb"])
  assert np.abs(second - first).max() > 1e-3, "the cache of the old weights was reused"
  for key, value in (("seed", 1), ("normalize", False)):
    before = clip_cache.load_meta(path)["request"]
    cfg.data[key] = value
    clip_stage.embedding_caches(cfg, own, None, ["test"])
    after = clip_cache.load_meta(path)["request"]
    assert after != before and after[key] == value


def test_a_truncated_cache_array_is_rebuilt(clip_dir, tmp_path):
  from diffusion_jax.experiments import clip_stage
  cfg = ml_collections.ConfigDict({"data": {"name": "shapes", "image_size": 16, "num_train": 6, "num_test": 5,
                                            "seed": 0, "normalize": True, "encode_batch_size": 4,
                                            "embedding_cache": str(tmp_path / "cache")},
                                   "clip": {"max_length": 0}})
  path = clip_stage.embedding_caches(cfg, clip_dir, None, ["test"])["test"]
  good = np.asarray(clip_cache.load_arrays(path, ["image_emb"])["image_emb"]).copy()
  npy = os.path.join(path, "image_emb.npy")
  with open(npy, "r+b") as f:
    f.truncate(os.path.getsize(npy) - 8)
  assert clip_cache.damage(path, clip_cache.load_meta(path)) is not None
  assert not clip_cache.is_complete(path)
  clip_stage.embedding_caches(cfg, clip_dir, None, ["test"])
  np.testing.assert_array_equal(np.asarray(clip_cache.load_arrays(path, ["image_emb"])["image_emb"]), good)
