"""End-to-end tiny runs of every ECLIPSE config: shapes CLIP -> embedding cache -> prior -> evaluation,
the three objectives, the unCLIP decoder, the paper-scale configs' tiny variants on a local HF CLIP, and the
diffusers-layout export of the prior."""

import json
import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import eclipse_kandinsky, eclipse_karlo, eclipse_prior, unclip_decoder_shapes  # noqa: E402
from diffusion_jax.data import clip_cache  # noqa: E402
from diffusion_jax.experiments import eclipse  # noqa: E402
from diffusion_jax.train.trainer import train  # noqa: E402

METRICS = ("R@1", "R@5", "cosine", "binding_colour", "binding_position")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """One tiny shapes CLIP + embedding cache + ECLIPSE prior run, shared by the tests of this file."""
  root = str(tmp_path_factory.mktemp("eclipse"))
  cfg = eclipse_prior.get_config("tiny")
  cfg.clip.workdir = os.path.join(root, "clip")
  cfg.data.embedding_cache = os.path.join(root, "cache")
  out = train(cfg, os.path.join(root, "eclipse"))
  return root, cfg, out


def test_eclipse_tiny_end_to_end(shared):
  root, cfg, out = shared
  wd = os.path.join(root, "eclipse")
  assert out["step"] == cfg.train.num_steps
  for m in METRICS:
    assert 0.0 <= out[f"eval/{m}"] <= 1.0 or m == "cosine"
  assert os.path.exists(os.path.join(root, "clip", "hf_clip", "model.safetensors"))
  assert clip_cache.is_complete(os.path.join(root, "cache", "train_64"))
  meta = clip_cache.load_meta(os.path.join(root, "cache", "test_32"))
  assert {"cf_colour_emb", "cf_position_emb", "objects", "null_text_emb"} <= set(meta["keys"])
  text = open(os.path.join(wd, "results.md")).read()
  assert "binding acc. (colour swap)" in text and "R@1" in text
  res = json.load(open(os.path.join(wd, "eval_results.json")))
  assert res["R@1"] == pytest.approx(out["eval/R@1"])


def test_rerun_reuses_every_stage(shared):
  """A second run finds the CLIP export and the caches and rebuilds neither."""
  root, cfg, _ = shared
  clip_file = os.path.join(root, "clip", "hf_clip", "model.safetensors")
  cache_meta = os.path.join(root, "cache", "train_64", "meta.json")
  before = (os.path.getmtime(clip_file), os.path.getmtime(cache_meta))
  clip_dir = eclipse.ensure_clip(cfg, None)
  dirs = eclipse.ensure_caches(cfg, clip_dir, None)
  assert clip_dir == os.path.join(root, "clip", "hf_clip") and dirs["train"] == os.path.join(root, "cache", "train_64")
  assert (os.path.getmtime(clip_file), os.path.getmtime(cache_meta)) == before
  # A different request (more examples) is not served by the old cache.
  assert not clip_cache.is_complete(dirs["train"], {"num": 10 ** 6})


def test_prior_export_matches_flax(shared):
  from diffusion_jax.pretrained import prior as prior_io
  from diffusion_jax.train.checkpoint import Checkpointer  # noqa: F401  (the trainer's own format)
  root, cfg, _ = shared
  module, params, pcfg = prior_io.load_prior(os.path.join(root, "eclipse", eclipse.PRIOR_EXPORT))
  assert not pcfg.use_timestep and pcfg.additional_embeddings == 3
  arr = clip_cache.load_arrays(os.path.join(root, "cache", "test_32"))
  noise = jax.random.normal(jax.random.PRNGKey(0), (4, pcfg.embedding_dim))
  out = module.apply({"params": params}, noise, jnp.asarray(arr["text_emb"][:4]),
                     jnp.asarray(arr["text_hidden"][:4], jnp.float32), jnp.asarray(arr["text_mask"][:4]))
  assert out.shape == (4, pcfg.embedding_dim) and np.all(np.isfinite(out))
  assert pcfg.num_embeddings == cfg.clip.train.model.text.max_position_embeddings


def test_decoder_and_diffusion_baseline_end_to_end(shared, tmp_path):
  """unCLIP decoder (tiny) on the shared cache, then the diffusion-prior baseline scored end to end."""
  root, base, _ = shared
  dcfg = unclip_decoder_shapes.get_config("tiny")
  dcfg.clip.workdir, dcfg.data.embedding_cache = base.clip.workdir, base.data.embedding_cache
  dwd = str(tmp_path / "decoder")
  out = train(dcfg, dwd)
  assert 0.0 <= out["eval/true_emb_binding"] <= 1.0
  assert os.path.exists(os.path.join(dwd, "decoder_export", "params.safetensors"))
  cfg = eclipse_prior.get_config("tiny")
  cfg.clip.workdir, cfg.data.embedding_cache = base.clip.workdir, base.data.embedding_cache
  cfg.prior.objective = "diffusion"
  cfg.prior.sample_steps = 3
  cfg.eval.decoder_workdir = dwd
  cfg.eval.num_decoded = 8
  cfg.eval.decoder_steps = 2
  pwd = tmp_path / "diffusion_prior"
  out = train(cfg, str(pwd))
  assert all(np.isfinite(out[f"eval/{m}"]) for m in METRICS)
  for k in ("e2e_binding", "e2e_relation_accuracy", "e2e_shape_recall"):
    assert 0.0 <= out[f"eval/{k}"] <= 1.0 or np.isnan(out[f"eval/{k}"])
  assert "(diffusion)" in open(pwd / "results.md").read()
  assert os.path.exists(pwd / "samples" / "end_to_end.png")


@pytest.fixture(scope="module")
def local_hf_clip(tmp_path_factory):
  """A tiny random CLIPModel saved in the transformers layout (77-token context, like every public CLIP)."""
  from diffusion_jax.models import clip as clip_lib
  from diffusion_jax.pretrained import clip as clip_io
  ccfg = clip_lib.CLIPConfig(
      text=clip_lib.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   max_position_embeddings=77, projection_dim=16),
      vision=clip_lib.CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, projection_dim=16),
      projection_dim=16)
  model = clip_lib.CLIPModel(ccfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32), jnp.zeros((1, 32, 32, 3)))["params"]
  root = tmp_path_factory.mktemp("hf")
  clip_io.save_clip(str(root / "hf_clip"), params, ccfg, kind="clip")
  return str(root / "hf_clip"), str(root / "cache")


@pytest.mark.parametrize("mod", [eclipse_karlo, eclipse_kandinsky])
def test_paper_configs_tiny_with_local_hf_clip(local_hf_clip, tmp_path, mod):
  """The paper configs' code path (pretrained CLIP dir, 77-token context) on a tiny random CLIP."""
  clip_dir, cache = local_hf_clip
  cfg = mod.get_config("tiny")
  cfg.clip.pretrained_dir = clip_dir
  cfg.data.embedding_cache = cache
  out = train(cfg, str(tmp_path / "run"))
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["eval/R@1"])
  assert clip_cache.load_meta(os.path.join(cache, "train_64"))["text_len"] == 77
  assert os.path.exists(tmp_path / "run" / eclipse.PRIOR_EXPORT / "config.json")
  cfg.clip.pretrained_dir = ""
  with pytest.raises(ValueError, match="pretrained_dir"):
    eclipse.ensure_clip(cfg, str(tmp_path / "run2"))
