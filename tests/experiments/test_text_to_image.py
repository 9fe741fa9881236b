"""text_to_image: the tiny shapes config through the stages (CLIP stage -> cache -> UNet -> parser evaluation ->
diffusers-layout export loaded back by diffusers), the SD-1.5 / SD-2.1 configs' tiny variants on a tiny random
pipeline (fine-tuning with cached latents, sampling to PNG + npz), the loss against a hand-written reference,
the paper-scale parameter counts, and the errors on bad input."""

import json
import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
  if p not in sys.path:
    sys.path.insert(0, p)

from configs import sd15, sd21, sd_shapes  # noqa: E402
from diffusion_jax import stages  # noqa: E402
from diffusion_jax.experiments import text_to_image as T  # noqa: E402
from diffusion_jax.experiments.base import get_experiment  # noqa: E402

PARSER_KEYS = ("class_accuracy", "binding", "shape_recall", "colour_recall", "count_accuracy")


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory, sd_shapes_tiny_stage):
  """configs/sd_shapes.py:tiny, trained once per test session by the stage runner (tests/conftest.py: the same
  run is the `pipeline` stage of the CoDi and Prompt Diffusion tests), copied here: (run dir, config, result),
  the result read back from what the run wrote (its stage record, last logged loss and export)."""
  wd = sd_shapes_tiny_stage.copy_to(str(tmp_path_factory.mktemp("sd_shapes")))
  cfg = sd_shapes.get_config("tiny")
  rec = stages.read_record(wd)
  assert rec["complete"] and rec["fingerprint"] == stages.config_fingerprint(cfg)[0]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f if line.strip()]
  out = {"step": rec["step"], "loss": [m for m in logged if "loss" in m][-1]["loss"],
         "export": os.path.join(wd, rec["export"]), **{f"eval/{k}": v for k, v in rec["eval"].items()}}
  return wd, cfg, out


def test_sd_shapes_tiny_end_to_end(shapes_run):
  wd, cfg, out = shapes_run
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["loss"])
  for tag in ("", "nocfg_"):
    for k in PARSER_KEYS:
      v = out[f"eval/{tag}{k}"]
      assert 0.0 <= v <= 1.0, (tag, k, v)  # fails on NaN too
  rec = stages.read_record(os.path.join(wd, "clip"))
  assert rec["complete"] and rec["kind"] == "hf_clip"
  meta = json.load(open(os.path.join(wd, "cache", "t2i_train_32", "meta.json")))
  assert meta["complete"] and {"ids", "image", "objects", "text_hidden"} <= set(meta["keys"])
  assert meta["num"] == cfg.data.num_train
  T.check_sd_pipeline(out["export"])


def test_export_loads_in_diffusers_and_matches(shapes_run):
  """The exported unet/ is a diffusers UNet2DConditionModel giving our UNet's output; the exported
  text_encoder/ is a transformers CLIPTextModel giving the cached text states."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  from diffusion_jax.models.unet import UNet2DConditionModel
  from diffusion_jax.pretrained import diffusers_io
  wd, cfg, out = shapes_run
  ucfg, params = diffusers_io.load_unet(out["export"])
  ref = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(out["export"], "unet")).eval()
  rng = np.random.default_rng(0)
  # the tiny config's UNet sees 2x2 pixel patches: 16x16x3 images -> 8x8x12
  assert (ucfg.sample_size, ucfg.in_channels) == (8, 12)
  x = rng.standard_normal((2, 8, 8, 12)).astype(np.float32)
  ctx = rng.standard_normal((2, 24, ucfg.cross_attention_dim)).astype(np.float32)
  t = np.array([10.0, 700.0], np.float32)
  ours = np.asarray(UNet2DConditionModel(ucfg).apply({"params": params}, x, t, ctx))
  with torch.no_grad():
    theirs = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx)).sample
  np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 3, 1), atol=2e-5)
  assert np.abs(ours).max() > 1e-3
  te = transformers.CLIPTextModel.from_pretrained(os.path.join(out["export"], "text_encoder")).eval()
  cache = os.path.join(wd, "cache", "t2i_test_8")
  ids = np.load(os.path.join(cache, "ids.npy"))[:2]
  with torch.no_grad():
    hs = te(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  np.testing.assert_allclose(hs, np.load(os.path.join(cache, "text_hidden.npy"))[:2].astype(np.float32), atol=2e-2)


def test_sample_compiles_once(shapes_run, compiles):
  wd, cfg, _ = shapes_run
  exp = get_experiment(cfg, stages={"clip": os.path.join(wd, "clip", "export")})
  exp.workdir = wd
  frozen = exp.load_frozen()
  params = exp.init(jax.random.PRNGKey(0), None, frozen)
  batch = {"ids": exp.host.tokenize(["a red circle", "a blue square", "a green triangle", "a red square"])}
  exp.sample(params, frozen, batch, jax.random.PRNGKey(0))  # compiles here (params placed unlike the trainer's)
  batch = {"ids": exp.host.tokenize(["a small blue circle", "a red square", "a circle", "a green square"])}
  with compiles() as c:
    a = exp.sample(params, frozen, batch, jax.random.PRNGKey(1))["image"]
    b = exp.sample(params, frozen, batch, jax.random.PRNGKey(1))["image"]
  assert c.count == 0
  np.testing.assert_array_equal(a, b)
  assert a.shape == (4, 16, 16, 3) and 0.0 <= a.min() and a.max() <= 1.0


def _space_to_depth(x, p):
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C], channels ordered (row in patch, column in patch, colour)."""
  b, h, w, c = x.shape
  out = np.zeros((b, h // p, w // p, p * p * c), x.dtype)
  for i in range(p):
    for j in range(p):
      out[..., (i * p + j) * c:(i * p + j + 1) * c] = x[:, i::p, j::p, :]
  return out


def test_loss_matches_reference(shapes_run):
  """The loss is the min-SNR-weighted per-example MSE of the UNet's prediction against eps (SD-1) or v (SD-2)
  on 2x2 pixel patches, with the dropped captions' states replaced by the empty caption's."""
  wd, cfg, _ = shapes_run
  for pt in ("epsilon", "v_prediction"):
    c = sd_shapes.get_config("tiny")
    c.diffusion.prediction_type = pt
    c.data.caption_drop = 0.5
    gamma = c.diffusion.snr_gamma = 5.0
    assert c.model.pixel_patch == 2
    exp = get_experiment(c, stages={"clip": os.path.join(wd, "clip", "export")})
    frozen = exp.load_frozen()
    params = exp.init(jax.random.PRNGKey(0), None, frozen)
    r = np.random.default_rng(1)
    batch = {"ids": exp.host.tokenize(["a red circle", "a blue square", "a green triangle", "a small red square"]),
             "image": r.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)}
    for seed in range(100):  # a key that drops some captions but not all
      rng = jax.random.PRNGKey(seed)
      k_drop, _, k_loss = jax.random.split(rng, 3)
      drop = np.asarray(jax.random.bernoulli(k_drop, 0.5, (4,)))
      if 0 < drop.sum() < 4:
        break
    loss, aux = exp.loss(params, frozen, {}, batch, rng, 0)
    # the reference, written out with the same random draws
    ids = np.where(drop[:, None], frozen["null_ids"], batch["ids"])
    ctx = exp.host.encode(ids)
    kt, kn = jax.random.split(k_loss)
    t = np.asarray(jax.random.randint(kt, (4,), 0, 1000))
    noise = np.asarray(jax.random.normal(kn, (4, 8, 8, 12)))
    x0 = _space_to_depth(batch["image"].astype(np.float32) / 127.5 - 1.0, 2)
    ac = np.asarray(exp.schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
    xt = np.sqrt(ac) * x0 + np.sqrt(1 - ac) * noise
    target = noise if pt == "epsilon" else np.sqrt(ac) * noise - np.sqrt(1 - ac) * x0
    pred = np.asarray(exp.unet.apply({"params": params}, jnp.asarray(xt, jnp.float32), jnp.asarray(t, jnp.float32),
                                     jnp.asarray(ctx)))
    snr = ac[:, 0, 0, 0] / (1 - ac[:, 0, 0, 0])
    w = np.minimum(snr, gamma) / (snr if pt == "epsilon" else snr + 1)  # min-SNR-gamma (Hang et al. 2023)
    want = np.mean(w * np.mean((pred - target) ** 2, axis=(1, 2, 3)))
    assert 0 < drop.sum() < 4 and np.ptp(w) > 0.01
    np.testing.assert_allclose(float(loss), want, rtol=2e-4)


def test_pixel_patch_round_trip_and_export(shapes_run, tmp_path):
  """Space-to-depth is the permutation written out above and is undone exactly; the export records the patch,
  a config using the export as its pipeline reads it, and a contradicting config is refused."""
  wd, cfg, out = shapes_run
  x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
  z = np.asarray(T.to_model_space(jnp.asarray(x), 2))
  np.testing.assert_array_equal(z, _space_to_depth(x, 2))
  np.testing.assert_array_equal(np.asarray(T.from_model_space(jnp.asarray(z), 2)), x)
  index = json.load(open(os.path.join(out["export"], "model_index.json")))
  assert index[T.PIXEL_PATCH_KEY] == 2
  c = sd_shapes.get_config("tiny")
  del c.model["pixel_patch"]
  exp = get_experiment(c, stages={"pipeline": out["export"]})
  assert exp.pixel_patch == 2 and exp.latent_shape == (8, 8, 12)
  c.model.pixel_patch = 1
  with pytest.raises(ValueError, match="pixel patch 2"):
    get_experiment(c, stages={"pipeline": out["export"]}).pixel_patch


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  import sd_testlib
  d = str(tmp_path_factory.mktemp("pipe_v"))
  return sd_testlib.make_tiny_pipeline(d, prediction_type="v_prediction", sd2=True)


def _image_folder(root):
  from PIL import Image
  os.makedirs(root, exist_ok=True)
  r = np.random.default_rng(0)
  with open(os.path.join(root, "captions.jsonl"), "w") as f:
    for i in range(6):
      Image.fromarray(r.integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(os.path.join(root, f"{i}.png"))
      f.write(json.dumps({"file": f"{i}.png", "caption": f"picture number {i}"}) + "\n")
  return root


def test_sd21_tiny_finetune_and_sample(tiny_pipe, tmp_path):
  """sd21:tiny_finetune on a captioned folder: latents and text states cached once, VAE / text encoder frozen,
  the pipeline's UNet as the initial params, v-prediction; then its export sampled by scripts/sd_sample.py."""
  from diffusion_jax.pretrained import diffusers_io, io
  cfg = sd21.get_config("tiny_finetune")
  cfg.stages.pipeline.path = tiny_pipe
  cfg.data.data_dir = _image_folder(str(tmp_path / "images"))
  out = stages.run(cfg, str(tmp_path / "ft"))
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["loss"])
  meta = json.load(open(os.path.join(tmp_path, "ft", "cache", "t2i_train_all", "meta.json")))
  assert {"latent_moments", "text_hidden", "ids"} <= set(meta["keys"]) and "image" not in meta["keys"]
  assert meta["num"] == 6
  exp = get_experiment(cfg, stages={"pipeline": tiny_pipe})
  assert exp.prediction_type == "v_prediction" and exp.latent
  before = io.flatten(diffusers_io.load_unet(tiny_pipe)[1])
  after = io.flatten(diffusers_io.load_unet(out["export"])[1])
  assert set(before) == set(after)
  assert max(float(np.abs(np.asarray(before[k]) - np.asarray(after[k])).max()) for k in before) > 0
  # the export is a pipeline: sample it with the script (PNG + npz, no checkpoint)
  from scripts import sd_sample
  sd_sample.main(["--config", os.path.join(ROOT, "configs", "sd21.py:tiny"), "--pipeline", out["export"],
                  "--out", str(tmp_path / "samples"), "--prompt", "a cat", "--prompt", "a dog", "--sampler", "euler",
                  "--steps", "3", "--image_size", "16"])
  s = np.load(tmp_path / "samples" / "samples.npz")
  assert s["image"].shape == (2, 16, 16, 3) and os.path.exists(tmp_path / "samples" / "0001.png")
  assert np.isfinite(s["image"]).all() and s["image"].std() > 0


def test_sample_and_eval_a_pipeline_without_training(tiny_pipe, tmp_path):
  """`--mode sample` of the SD-2.1 config on a pipeline: no checkpoint, the pipeline's UNet at step 0, the
  sample sheet + npz written, the images those of the experiment's own sampler; training 0 steps is refused."""
  from diffusion_jax.train import trainer
  cfg = sd21.get_config("tiny")
  cfg.stages.pipeline.path = tiny_pipe
  cfg.data.prompts = ["a red circle", "a blue square"]
  cfg.train.num_samples = 2
  wd = str(tmp_path / "wd")
  out = stages.run(cfg, wd, mode="sample")
  assert out["step"] == 0 and os.path.exists(out["path"])
  arrays = np.load(out["path"].replace(".png", ".npz"))
  assert arrays["image"].shape == (2, 16, 16, 3) and arrays["image"].std() > 1e-3
  exp = get_experiment(cfg, stages={"pipeline": tiny_pipe})
  frozen = jax.tree.map(jnp.asarray, exp.load_frozen())
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x5A4E)  # the key `trainer.sample` uses
  want = exp.sample_images(exp.load_params(None), frozen, exp.host.tokenize(cfg.data.prompts), rng)
  np.testing.assert_allclose(arrays["image"], np.asarray(want), atol=1e-5)
  with pytest.raises(ValueError, match="--mode sample"):
    stages.run(cfg, str(tmp_path / "wd2"))
  cfg.model.unet = "tiny"  # a UNet trained from scratch: no released weights, so a checkpoint is required
  with pytest.raises(FileNotFoundError, match="Train first"):
    trainer.sample(cfg, str(tmp_path / "wd3"), stages={"pipeline": tiny_pipe})


def test_paper_scale_parameter_counts():
  """SD-1.5 / SD-2.1 UNets and text encoders, counted on `jax.eval_shape` trees (no weights allocated)."""
  from diffusion_jax.models import clip as clip_lib
  from diffusion_jax.models.unet import abstract_unet_params, count_params
  want = {sd15: (859_520_964, 123_060_480), sd21: (865_910_724, 340_387_840)}
  for mod, (n_unet, n_text) in want.items():
    ucfg, tcfg = mod.reference_components()
    assert count_params(abstract_unet_params(ucfg)) == n_unet, mod.__name__
    text = clip_lib.CLIPTextModel(tcfg)
    shapes = clip_lib.abstract_params(text, jax.ShapeDtypeStruct((1, 77), jnp.int32))
    assert count_params(shapes) == n_text, mod.__name__
  assert sd15.get_config().diffusion.prediction_type == "epsilon" and sd15.get_config().data.image_size == 512
  assert sd21.get_config().diffusion.prediction_type == "v_prediction" and sd21.get_config().data.image_size == 768


def test_bad_input_names_the_fix(tiny_pipe, tmp_path):
  with pytest.raises(ValueError, match="stages.pipeline.path"):
    stages.run(sd15.get_config("tiny"), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="Valid variants"):
    sd15.get_config("huge")
  cfg = sd15.get_config("tiny")
  cfg.sample.sampler = "plms"
  with pytest.raises(ValueError, match="ddim"):
    get_experiment(cfg, stages={"pipeline": tiny_pipe})
  cfg = sd15.get_config("tiny")
  cfg.train.num_steps = 1
  exp = get_experiment(cfg, stages={"pipeline": tiny_pipe})
  with pytest.raises(ValueError, match="no images to train on"):
    exp.workdir = str(tmp_path / "b")
    exp.make_dataset("train", seed=0)
  cfg = sd15.get_config("tiny")  # an epsilon config on a v-prediction pipeline
  with pytest.raises(ValueError, match="v_prediction"):
    get_experiment(cfg, stages={"pipeline": tiny_pipe}).prediction_type
  cfg.diffusion.prediction_type = ""
  assert get_experiment(cfg, stages={"pipeline": tiny_pipe}).prediction_type == "v_prediction"
  with pytest.raises(ValueError, match="solver_order"):
    T.scheduler_settings({"solver_order": 3}, "dpmpp_2m")
  with pytest.raises(FileNotFoundError, match="model_index.json"):
    T.check_sd_pipeline(str(tmp_path))


def test_latents_in_the_step_equal_cached_ones(tiny_pipe):
  """Latents encoded inside the step (data.cache_latents=False) equal those drawn from cached VAE moments
  with the same key, scaled by the VAE's scaling_factor; text states from ids equal cached ones."""
  from diffusion_jax.models.vae import AutoencoderKL
  cfg = sd21.get_config("tiny_finetune")
  exp = get_experiment(cfg, stages={"pipeline": tiny_pipe})
  frozen = exp.load_frozen()
  img = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  moments = AutoencoderKL(exp.host.vae_config).apply({"params": frozen["vae"]}, jnp.asarray(img, jnp.float32) / 127.5 - 1,
                                                   method="encode")
  key = jax.random.PRNGKey(5)
  in_step = np.asarray(exp._x0(frozen, {"image": img}, key))
  cached = np.asarray(exp._x0(frozen, {"latent_moments": moments}, key))
  assert in_step.shape == (2, 8, 8, 4)
  np.testing.assert_allclose(in_step, cached, atol=1e-5)
  mean = np.asarray(moments)[..., :4] * exp.host.vae_config.scaling_factor
  assert np.abs(in_step - mean).max() > 1e-4  # a sample of the posterior, not its mode
  ids = exp.host.tokenize(["a cat", "a dog"])
  np.testing.assert_allclose(np.asarray(exp._context(frozen, {"ids": ids})),
                             np.asarray(exp._context(frozen, {"text_hidden": exp.host.encode(ids)})), atol=1e-6)
