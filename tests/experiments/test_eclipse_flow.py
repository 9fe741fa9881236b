"""End-to-end tiny runs of every ECLIPSE config through the stages: shapes CLIP stage -> embedding cache ->
prior -> evaluation, the three objectives, the unCLIP decoder as a stage, the paper-scale configs' tiny
variants on a local HF CLIP given as the stage path, and the diffusers-layout export of the prior."""

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
from diffusion_jax import stages  # noqa: E402
from diffusion_jax.data import clip_cache  # noqa: E402

METRICS = ("R@1", "R@5", "cosine", "binding_colour", "binding_position")


@pytest.fixture(scope="module")
def shared(tmp_path_factory, clip_shapes_tiny_stage):
  """One tiny shapes CLIP + embedding cache + ECLIPSE prior run, shared by the tests of this file. The CLIP stage
  is the session's (tests/conftest.py), copied into the run's directory, where the stage runner reuses it."""
  root = str(tmp_path_factory.mktemp("eclipse"))
  clip_shapes_tiny_stage.copy_to(os.path.join(root, "eclipse"))
  cfg = eclipse_prior.get_config("tiny")
  cfg.data.embedding_cache = os.path.join(root, "cache")
  out = stages.run(cfg, os.path.join(root, "eclipse"))
  return root, cfg, out


def test_eclipse_tiny_end_to_end(shared):
  root, cfg, out = shared
  wd = os.path.join(root, "eclipse")
  assert out["step"] == cfg.train.num_steps
  for m in METRICS:
    lo = -1.0 if m == "cosine" else 0.0
    assert lo <= out[f"eval/{m}"] <= 1.0, (m, out[f"eval/{m}"])  # fails on NaN too
  # The CLIP stage (the session's, reused) sits in WORKDIR/clip with its completion and its transformers export.
  record = stages.read_record(os.path.join(wd, "clip"))
  assert record["complete"] and record["kind"] == "hf_clip" and record["experiment"] == "clip_pretrain"
  assert os.path.exists(os.path.join(wd, "clip", record["export"], "model.safetensors"))
  assert clip_cache.is_complete(os.path.join(root, "cache", "train_64"))
  meta = clip_cache.load_meta(os.path.join(root, "cache", "test_32"))
  assert {"cf_colour_emb", "cf_position_emb", "objects", "null_text_emb"} <= set(meta["keys"])
  text = open(os.path.join(wd, "results.md")).read()
  assert "binding acc. (colour swap)" in text and "R@1" in text
  from PIL import Image  # the retrieval picture: caption rows of true image | top-5 (no decoder stage here)
  sheet = np.asarray(Image.open(os.path.join(wd, "samples", "retrieval.png")))
  assert sheet.ndim == 3 and sheet.shape[1] > 6 * 32 and sheet.std() > 0
  res = json.load(open(os.path.join(wd, "eval_results.json")))
  assert res["R@1"] == pytest.approx(out["eval/R@1"])


def test_rerun_reuses_every_stage(shared):
  """Resolving the stages again finds the finished CLIP stage and the caches and rebuilds neither; a changed
  stage config is an error naming the key, unless restaged."""
  from diffusion_jax.experiments import clip_stage
  root, cfg, _ = shared
  wd = os.path.join(root, "eclipse")
  clip_file = os.path.join(wd, "clip", "export", "model.safetensors")
  cache_meta = os.path.join(root, "cache", "train_64", "meta.json")
  before = (os.path.getmtime(clip_file), os.path.getmtime(cache_meta))
  got = stages.resolve(cfg, wd)
  assert got == {"clip": os.path.join(wd, "clip", "export")}
  dirs = clip_stage.embedding_caches(cfg, got["clip"], wd, ["train"])
  assert dirs["train"] == os.path.join(root, "cache", "train_64")
  assert (os.path.getmtime(clip_file), os.path.getmtime(cache_meta)) == before
  # A different request (more examples) is not served by the old cache.
  assert not clip_cache.is_complete(dirs["train"], {"num": 10 ** 6})
  changed = eclipse_prior.get_config("tiny")
  changed.stages.clip.config.optim.lr = 5e-4
  with pytest.raises(ValueError, match=r"Stage 'clip'.*optim\.lr.*--restage=clip"):
    stages.resolve(changed, wd)


def test_prior_export_matches_flax(shared):
  """The exported diffusers-layout prior, loaded in diffusers' PyTorch PriorTransformer, gives the outputs of
  the trained Flax prior (the one evaluation used) on the same inputs."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from diffusion_jax.pretrained import prior as prior_io
  from diffusion_jax.train import trainer
  root, cfg, _ = shared
  wd = os.path.join(root, "eclipse")
  export = os.path.join(wd, "export")
  # The trained Flax params, from the run's own checkpoint (not from the export).
  run, state, _ = trainer._restore_latest(cfg, wd, stages.resolve(cfg, wd, train_missing=False))
  exp = run.experiment
  run.close()
  pcfg = prior_io.load_prior(export)[2]
  assert not pcfg.use_timestep and pcfg.additional_embeddings == 3
  assert pcfg.num_embeddings == cfg.stages.clip.config.model.text.max_position_embeddings
  arr = clip_cache.load_arrays(os.path.join(root, "cache", "test_32"))
  noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, pcfg.embedding_dim)))
  emb, hid = np.asarray(arr["text_emb"][:4]), np.asarray(arr["text_hidden"][:4], np.float32)
  mask = np.asarray(arr["text_mask"][:4])
  flax_out = np.asarray(exp.apply(state.params, noise, emb, hid, mask))
  import importlib.util
  from diffusers import PriorTransformer
  from safetensors.torch import load_file
  spec = importlib.util.spec_from_file_location(
      "prior_parity", os.path.join(ROOT, "tests", "pretrained", "test_prior_pretrained.py"))
  parity = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(parity)
  saved = json.load(open(os.path.join(export, "config.json")))
  ref = PriorTransformer(**{k: v for k, v in saved.items() if not k.startswith("_")}).eval()
  missing = ref.load_state_dict(load_file(os.path.join(export, "diffusion_pytorch_model.safetensors")),
                                strict=False).missing_keys
  assert all(k.startswith("time_embedding.") for k in missing)  # ECLIPSE's prior has no time embedding
  with torch.no_grad():
    t_out = parity._eclipse_reference(ref, torch.from_numpy(noise), torch.from_numpy(emb.copy()), torch.from_numpy(hid),
                                      torch.from_numpy(mask.astype(np.int64))).numpy()
  assert np.abs(flax_out).max() > 1e-3
  np.testing.assert_allclose(t_out, flax_out, atol=1e-4, rtol=1e-4)


def test_decoder_and_diffusion_baseline_end_to_end(shared, tmp_path):
  """unCLIP decoder (tiny) on the shared cache, then the diffusion-prior baseline scored end to end."""
  root, base, _ = shared
  clip_run = os.path.join(root, "eclipse", "clip")
  dcfg = unclip_decoder_shapes.get_config("tiny")
  dcfg.stages.clip.path, dcfg.data.embedding_cache = clip_run, base.data.embedding_cache
  dwd = str(tmp_path / "decoder")
  out = stages.run(dcfg, dwd)
  assert 0.0 <= out["eval/true_emb_binding"] <= 1.0
  assert os.path.exists(os.path.join(dwd, "export", "params.safetensors"))
  assert not os.path.exists(os.path.join(dwd, "clip"))  # the CLIP came from the path: nothing trained
  cfg = eclipse_prior.get_config("tiny")
  cfg.stages.clip.path, cfg.data.embedding_cache = clip_run, base.data.embedding_cache
  cfg.prior.objective = "diffusion"
  cfg.prior.sample_steps = 3
  cfg.stages.decoder.path = dwd
  cfg.eval.num_decoded = 8
  cfg.eval.decoder_steps = 2
  cfg.train.sample_every = cfg.train.num_steps
  cfg.train.num_samples = 4
  pwd = tmp_path / "diffusion_prior"
  out = stages.run(cfg, str(pwd))
  assert all(np.isfinite(out[f"eval/{m}"]) for m in METRICS)
  for k in ("e2e_binding", "e2e_relation_accuracy", "e2e_shape_recall"):
    assert 0.0 <= out[f"eval/{k}"] <= 1.0 or np.isnan(out[f"eval/{k}"])
  assert "(diffusion)" in open(pwd / "results.md").read()
  assert os.path.exists(pwd / "samples" / "end_to_end.png")
  # The sample sheet: the true test images next to the decoded prior samples, >= 64 px cells.
  from PIL import Image
  wide = np.asarray(Image.open(pwd / "samples" / "retrieval.png"))
  narrow = np.asarray(Image.open(os.path.join(root, "eclipse", "samples", "retrieval.png")))
  assert wide.shape[1] > narrow.shape[1]  # with a decoder stage: the decoded-image column
  sheet = np.asarray(Image.open(pwd / "samples" / f"step_{cfg.train.num_steps:07d}.png"))
  assert sheet.shape[0] >= 4 * 64 and sheet.shape[1] >= 2 * 64


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
  cfg.stages.clip.path = clip_dir
  cfg.data.embedding_cache = cache
  out = stages.run(cfg, str(tmp_path / "run"))
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["eval/R@1"])
  assert clip_cache.load_meta(os.path.join(cache, "train_64"))["text_len"] == 77
  assert os.path.exists(tmp_path / "run" / "export" / "config.json")
  cfg.stages.clip.path = ""
  with pytest.raises(ValueError, match=r"Stage 'clip' needs a path.*--config\.stages\.clip\.path"):
    stages.run(cfg, str(tmp_path / "run2"))
  cfg.stages.clip.path = str(tmp_path)  # exists, but holds no CLIP
  with pytest.raises(FileNotFoundError, match=r"Stage 'clip'.*model\.safetensors.*hf_clip"):
    stages.run(cfg, str(tmp_path / "run3"))
  assert not os.path.exists(tmp_path / "run3" / "checkpoints")


def test_eclipse_evaluate_and_sample_compile_nothing_the_second_time(shared, compiles, tmp_path):
  from diffusion_jax.train import trainer
  root, cfg, _ = shared
  wd = os.path.join(root, "eclipse")
  run, state, _ = trainer._restore_latest(cfg, wd, stages.resolve(cfg, wd, train_missing=False))
  try:
    exp = run.experiment
    first = exp.evaluate(state.params, run.frozen, jax.random.PRNGKey(0), str(tmp_path))
    with compiles() as c:
      again = exp.evaluate(state.params, run.frozen, jax.random.PRNGKey(0), str(tmp_path))
    assert c.count == 0 and again["R@1"] == first["R@1"]
    batch = run.sample_batch(4)
    exp.sample(state.params, run.frozen, batch, jax.random.PRNGKey(1))
    with compiles() as c:
      out = exp.sample(state.params, run.frozen, batch, jax.random.PRNGKey(1))
    assert c.count == 0 and out["image_emb"].shape == (4, exp.embed_dim)
  finally:
    run.close()


def test_curve_script_and_projection_baseline_stage(shared, tmp_path):
  """scripts/eclipse_curve.py on the shared tiny CLIP and cache (one training-set size, both objectives); and
  the projection baseline as stage "projection" (the demo's middle column), here on the tiny config."""
  from scripts import eclipse_curve
  root, cfg, _ = shared
  wd = str(tmp_path / "curve")
  text = eclipse_curve.main(["--workdir", wd, "--variant", "tiny", "--clip-workdir", os.path.join(root, "eclipse", "clip"),
                             "--cache", os.path.join(root, "cache"), "--sizes", "32", "--seeds", "0",
                             "--set", "train.num_steps=2"])
  res = json.load(open(os.path.join(wd, "curve.json")))
  assert set(res["runs"]) == {"32"} and set(res["runs"]["32"]) == {"projection", "eclipse"}
  assert res["runs"]["32"]["eclipse"]["0"]["step"] == 2
  assert "ECLIPSE − Projection" in text and "*CLIP text embedding as the query*" in text
  assert os.path.getsize(os.path.join(wd, "curve.png")) > 1000
  # The baseline stage: trained in WORKDIR/projection on the parent's cache, reported in results.md.
  bcfg = eclipse_prior.with_baseline(eclipse_prior.get_config("tiny"), tiny=True)
  bcfg.stages.clip.path = bcfg.stages.projection.config.stages.clip.path = os.path.join(root, "eclipse", "clip")
  assert bcfg.stages.projection.config.data.embedding_cache == "{workdir}/../cache"
  bcfg.train.num_steps = bcfg.stages.projection.config.train.num_steps = 2
  out = stages.run(bcfg, str(tmp_path / "with_base"))
  assert stages.read_record(str(tmp_path / "with_base" / "projection"))["complete"]
  # one cache, the parent's, built by the stage and reused by the parent
  assert not os.path.exists(tmp_path / "with_base" / "projection" / "cache")
  assert clip_cache.is_complete(str(tmp_path / "with_base" / "cache" / "train_64"))
  assert 0.0 <= out["eval/projection_R@1"] <= 1.0 and -1.0 <= out["eval/clip_paired_cos"] <= 1.0
  assert "projection-only prior" in open(tmp_path / "with_base" / "results.md").read()
