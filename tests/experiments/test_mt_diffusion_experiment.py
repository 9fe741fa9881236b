"""MT-Diffusion experiment: the tiny image + label variant end to end (train -> eval -> --mode sample) through the
stages runner, conditional generation with a modality held fixed, the evaluation on a generator whose output is
known, and every config variant (shapes experiments, baselines, backbones, ImageNet-64) constructed and validated
without training."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import mt_diffusion_imagenet64, mt_diffusion_shapes  # noqa: E402
from diffusion_jax import stages  # noqa: E402
from diffusion_jax.experiments.base import get_experiment  # noqa: E402
from diffusion_jax.train.trainer import validate_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("mt_label"))
  cfg = mt_diffusion_shapes.get_config("label,tiny")
  out = stages.run(cfg, wd)
  sampled = stages.run(cfg, wd, mode="sample")
  return cfg, wd, out, sampled


def test_tiny_label_end_to_end(tiny_run):
  cfg, wd, out, sampled = tiny_run
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["loss"])
  assert out["code_mse_image"] > 0 and out["code_mse_label"] > 0  # the per-modality code terms are trained
  assert out["eval/num_samples"] == cfg.eval.num_samples
  for k in ("precision", "recall", "label_image_agreement", "label_to_image_accuracy", "image_to_label_accuracy"):
    assert 0.0 <= out[f"eval/{k}"] <= 1.0, (k, out[f"eval/{k}"])  # fails on NaN too
  assert out["eval/pr_features"].startswith("random_conv (no ShapesNet weights")
  # --mode sample: the sheet and the arrays of the jointly generated image | label and the label-conditioned image.
  assert sampled["step"] == cfg.train.num_steps and os.path.exists(sampled["path"])
  n = cfg.train.num_samples
  assert sampled["outputs"]["image"] == [n, 16, 16, 3] and sampled["outputs"]["image_given_label"] == [n, 16, 16, 3]
  arrays = np.load(os.path.splitext(sampled["path"])[0] + ".npz")
  assert arrays["label"].shape == (n,) and set(arrays["label"].tolist()) <= set(range(35))
  assert 0.0 <= arrays["image"].min() and arrays["image"].max() <= 1.0


@pytest.fixture(scope="module")
def fresh():
  """An untrained tiny image + label experiment (random params) and one test batch."""
  cfg = mt_diffusion_shapes.get_config("label,tiny")
  exp = get_experiment(cfg)
  batch, _ = next(exp.test_batches(8, 8))
  params = jax.jit(exp.init)(jax.random.key(0), {k: jnp.asarray(v) for k, v in batch.items()}, {})
  return exp, params, batch


def test_conditional_generation_holds_the_known_modality(fresh):
  exp, params, batch = fresh
  codes_true = np.asarray(exp._encode_jit(params, exp._inputs({}, batch)))
  # Image given: the image comes back exactly (identity code, held fixed through every step).
  out, codes = exp.generate(params, {}, jax.random.key(1), batch, known=("image",), return_codes=True)
  np.testing.assert_allclose(out["image"], batch["image"], atol=1e-6)
  np.testing.assert_array_equal(codes[0], codes_true[0])
  # Label given: its code is the encoder's code of the batch labels at the end; the image is generated.
  out, codes = exp.generate(params, {}, jax.random.key(1), batch, known=("label",), return_codes=True)
  np.testing.assert_array_equal(codes[1], codes_true[1])
  assert np.abs(out["image"] - batch["image"]).mean() > 0.1
  # Nothing given: neither code is the batch's (the checks above can fail).
  _, codes = exp.generate(params, {}, jax.random.key(1), batch, return_codes=True)
  assert np.abs(codes - codes_true).mean(axis=(1, 2, 3, 4)).min() > 0.05


def test_sampler_compiles_once_per_network(fresh, compiles):
  """A second experiment with an equal network (what --mode sample after training builds) reuses the compiled
  sampler, encoder and decoder."""
  exp, params, batch = fresh
  exp.generate(params, {}, jax.random.key(2), batch, known=("label",))
  other = get_experiment(mt_diffusion_shapes.get_config("label,tiny"))
  with compiles() as c:
    other.generate(params, {}, jax.random.key(3), batch, known=("image",))
    other.generate(params, {}, jax.random.key(4), batch)
  assert c.count == 0


@pytest.mark.parametrize("shift", [0, 1])
def test_evaluate_scores_a_known_generator(shift, monkeypatch, tmp_path):
  """evaluate() on a stand-in sampler returning the test data itself: label / image agreement, the conditional
  accuracies and both segmentation IoUs are 1 exactly; with the labels and masks of the *next* example
  (shift 1), agreement and IoUs drop (different objects)."""
  cfg = mt_diffusion_shapes.get_config("segmentation,tiny")
  cfg.mt.modalities = ("image", "label", "segmentation")
  cfg.mt.weights = (0.4, 0.3, 0.3)
  cfg.mt.rec_weights = (1.0, 1.0, 1.0)
  cfg.eval.num_samples = 12
  cfg.eval.batch_size = 8   # 12 = 8 + 4: the last batch is padded
  exp = get_experiment(cfg)

  def generate(params, frozen, rng, batch=None, known=(), num=None, return_codes=False):
    out = {"image": batch["image"], "label": batch["label"], "segmentation": batch["segmentation"]}
    if shift:
      for k in ("label", "segmentation"):
        if k not in known:
          out[k] = np.roll(batch[k], shift, axis=0)
    return out

  monkeypatch.setattr(exp, "generate", generate)
  out = exp.evaluate(None, {}, jax.random.key(0), str(tmp_path))
  assert out["num_samples"] == 12
  assert out["precision"] == out["recall"] == 1.0  # the same images
  if shift == 0:
    for k in ("label_image_agreement", "label_to_image_accuracy", "image_to_label_accuracy", "seg_image_iou",
              "seg_to_image_iou", "image_to_seg_iou"):
      assert out[k] == 1.0, k
  else:
    assert out["label_to_image_accuracy"] == 1.0 and out["seg_to_image_iou"] == 1.0  # the given ones
    assert out["label_image_agreement"] < 0.5 and out["image_to_label_accuracy"] < 0.5
    assert out["seg_image_iou"] < 0.6 and out["image_to_seg_iou"] < 0.6


def test_evaluate_without_conditional_metrics_samples_jointly_only(monkeypatch, tmp_path):
  """config.eval.conditional=False: only joint sampling (no modality given), the joint metrics as before and no
  `*_to_*` metric."""
  cfg = mt_diffusion_shapes.get_config("segmentation,tiny")
  assert cfg.eval.conditional is True  # the default
  cfg.mt.modalities = ("image", "label", "segmentation")
  cfg.mt.weights = (0.4, 0.3, 0.3)
  cfg.mt.rec_weights = (1.0, 1.0, 1.0)
  cfg.eval.num_samples = 8
  cfg.eval.conditional = False
  exp = get_experiment(cfg)
  calls = []

  def generate(params, frozen, rng, batch=None, known=(), num=None, return_codes=False):
    calls.append(tuple(known))
    return {"image": batch["image"], "label": batch["label"], "segmentation": batch["segmentation"]}

  monkeypatch.setattr(exp, "generate", generate)
  out = exp.evaluate(None, {}, jax.random.key(0), str(tmp_path))
  assert calls == [()]
  assert out["label_image_agreement"] == out["seg_image_iou"] == 1.0
  assert not [k for k in out if "_to_" in k]


def test_evaluate_reports_the_shapes_fd_with_shapesnet_weights(monkeypatch, tmp_path):
  """With config.eval.shapes_fd_path set, precision / recall use the ShapesNet features and evaluate() also
  reports `shapes_fd`: ~0 when the generator returns the test images themselves, and for a constant grey
  generator the Frechet distance computed here from the same net's features (an untrained 16px net: this
  checks the wiring, tests/eval/test_shapes_fd.py the metric)."""
  from diffusion_jax.data import shapes as S
  from diffusion_jax.eval import fid as FID
  from diffusion_jax.eval import shapes_fd as F
  n = len(S.SHAPES) * len(S.COLOUR_NAMES)
  net = str(tmp_path / "net16.safetensors")
  params = F.ShapesNet(n, 8).init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  F.save(params["params"], {"num_classes": n, "width": 8, "image_size": 16}, net)
  cfg = mt_diffusion_shapes.get_config("image,tiny")
  cfg.eval.num_samples = 12
  cfg.eval.shapes_fd_path = net
  exp = get_experiment(cfg)
  real = np.concatenate([b["image"][:m] for b, m in exp.test_batches(12, int(cfg.eval.batch_size))])
  for fill in ("real", "grey"):
    gen = lambda params, frozen, rng, batch=None, known=(), num=None, return_codes=False, fill=fill: {
        "image": batch["image"] if fill == "real" else np.zeros_like(batch["image"])}
    monkeypatch.setattr(exp, "generate", gen)
    out = exp.evaluate(None, {}, jax.random.key(0), str(tmp_path))
    assert out["pr_features"] == "shapes_fd" and out["shapes_fd_net_sha256"] == FID.file_sha256(net)
    if fill == "real":
      assert out["shapes_fd"] == pytest.approx(0.0, abs=1e-6) and out["precision"] == out["recall"] == 1.0
    else:
      m = F.ShapesFD(net)
      f_real, f_fake = m.features(real).astype(np.float64), m.features(np.zeros_like(real)).astype(np.float64)
      want = FID.frechet_distance(f_fake.mean(0), np.cov(f_fake, rowvar=False), f_real.mean(0),
                                  np.cov(f_real, rowvar=False))
      assert want > 1e-4 and out["shapes_fd"] == pytest.approx(want, rel=1e-6)


def test_inpainting_metrics_on_known_fills(monkeypatch, tmp_path):
  """inpaint_mse is the squared error over the masked pixels only: 0 for the true image, and for a fill with
  the masked image itself (grey box) it equals the box's error, computed here by hand."""
  cfg = mt_diffusion_shapes.get_config("inpaint_recon,tiny")
  exp = get_experiment(cfg)
  batches = list(exp.test_batches(8, 8))
  b = batches[0][0]
  for fill, want in (("image", 0.0), ("masked_image", None)):
    monkeypatch.setattr(exp, "inpaint", lambda p, f, r, batch, fill=fill: batch[fill])
    out = exp.evaluate(None, {}, jax.random.key(0), str(tmp_path))
    m = b["mask"][..., None]
    ref = np.mean(np.sum((b[fill] - b["image"]) ** 2 * m, (1, 2, 3)) / (3 * m.sum((1, 2, 3))))
    assert out["inpaint_mse"] == pytest.approx(ref, abs=1e-6)
    assert out["inpaint_mse_outside"] == pytest.approx(0.0, abs=1e-6)
    if want is not None:
      assert ref == want and out["inpaint_class_accuracy"] == 1.0
    else:
      assert ref > 0.05


def test_reconstruction_baseline_loss_is_the_mse_of_its_inpainting():
  """The reconstruction-only baseline: its loss is the image MSE of what inpaint() returns (one pass, no
  sampler), and its masked-region metric is that error over the masked pixels."""
  cfg = mt_diffusion_shapes.get_config("inpaint_recon,tiny")
  exp = get_experiment(cfg)
  batch, _ = next(exp.test_batches(8, 8))
  params = jax.jit(exp.init)(jax.random.key(0), {k: jnp.asarray(v) for k, v in batch.items()}, {})
  params = jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params)
  loss, metrics = exp.loss(params, {}, {}, batch, jax.random.key(1), 0)
  raw = np.asarray(exp._recon_jit(params, exp._inputs({}, batch)))
  x = exp.inpaint(params, {}, jax.random.key(2), batch)
  assert x.shape == batch["image"].shape and np.array_equal(x, np.clip(raw, -1, 1))
  err = raw - batch["image"]
  assert float(loss) == pytest.approx(float(np.mean(err ** 2)), rel=1e-4)
  m = batch["mask"][..., None]
  want = np.mean(np.sum(err ** 2 * m, (1, 2, 3)) / (3 * m.sum((1, 2, 3))))
  assert float(metrics["mse_masked"]) == pytest.approx(float(want), rel=1e-4)
  with pytest.raises(ValueError, match="no sampler"):
    exp.generate(params, {}, jax.random.key(0), batch)


def test_evaluate_uses_the_configured_strided_sampler(monkeypatch, tmp_path):
  """config.sample.sampler="ddim": every sample evaluate() draws (joint, image given label, label given image)
  comes from the strided sampler with config.sample.num_steps / eta, never from the T-step ancestral one;
  generate(num_steps=...) overrides the step count for one call. (A stand-in records the calls and returns the
  known codes, zeros elsewhere: no sampler is compiled here; tests/core/test_mt_diffusion.py tests the sampler.)"""
  from diffusion_jax.core import mt_diffusion as core_mt
  cfg = mt_diffusion_shapes.get_config("label,tiny")
  cfg.sample.update(sampler="ddim", num_steps=3, eta=0.5)
  exp = get_experiment(cfg)
  batch, _ = next(exp.test_batches(8, 8))
  params = jax.jit(exp.init)(jax.random.key(0), {k: jnp.asarray(v) for k, v in batch.items()}, {})
  calls = []

  def strided(predict_fn, z_T, **kw):
    calls.append((kw["num_steps"], kw["eta"], kw["timestep_spacing"], tuple(np.asarray(kw["known_mask"]))))
    mask = jnp.asarray(kw["known_mask"]).reshape((-1,) + (1,) * z_T.ndim)
    return z_T, jnp.where(mask, kw["known_codes"], 0.0)

  def ancestral(*a, **kw):
    raise AssertionError("the ancestral sampler ran although config.sample.sampler='ddim'")

  monkeypatch.setattr(core_mt, "mt_ddim_sample", strided)
  monkeypatch.setattr(core_mt, "mt_sample", ancestral)
  out = exp.evaluate(params, {}, jax.random.key(1), str(tmp_path))
  assert 0.0 <= out["label_to_image_accuracy"] <= 1.0 and 0.0 <= out["image_to_label_accuracy"] <= 1.0
  assert {c[:3] for c in calls} == {(3, 0.5, "linspace")}
  assert sorted(c[3] for c in calls) == [(False, False), (False, True), (True, False)]
  res = exp.generate(params, {}, jax.random.key(2), batch, num_steps=2, known=("image",))
  assert calls[-1][:2] == (2, 0.5) and res["image"].shape == batch["image"].shape
  np.testing.assert_allclose(res["image"], batch["image"], atol=1e-6)  # the known image, decoded


VARIANTS = [f"{e}{m}" for e in mt_diffusion_shapes.EXPERIMENTS for m in ("", ",tiny", ",unet")]


def test_config_variants_construct_and_validate():
  for v in VARIANTS + ["", "label,tiny,seed3"]:
    cfg = mt_diffusion_shapes.get_config(v)
    validate_config(cfg)
    exp = get_experiment(cfg)  # builds the experiment (networks, schedule, weights), no training
    kind = mt_diffusion_shapes.parse_variant(v)[0]
    assert exp.kinds == mt_diffusion_shapes.EXPERIMENTS[kind], v
    assert exp.mode == ("reconstruction" if kind == "inpaint_recon" else "joint")
    np.testing.assert_allclose(exp.weights.table.sum(1), 1.0)
    assert ("clip" in cfg.stages) == (kind == "clip")
  assert mt_diffusion_shapes.get_config("label,seed3").seed == 3
  assert get_experiment(mt_diffusion_shapes.get_config("label,unet")).net.backbone.__class__.__name__ == \
      "UNet2DConditionModel"
  with pytest.raises(ValueError, match="variant part"):
    mt_diffusion_shapes.get_config("audio")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.mt.update(modalities=("image", "depth")), "modality"),
    (lambda c: c.mt.update(weights=(0.5, 0.6)), "sum to"),
    (lambda c: c.mt.update(weights=(1.0,)), "one weight per modality"),
    (lambda c: c.mt.update(mode="reconstruction"), "needs the modalities"),
    (lambda c: c.diffusion.update(weighting="p2"), "weighting"),
    (lambda c: c.mt.encoders.update(label={"width": 3}), "config.mt.encoders.label"),
    (lambda c: c.sample.update(sampler="ddim", num_steps=11), "1..T"),
    (lambda c: c.sample.update(num_steps=5), "always runs all T"),
    (lambda c: c.sample.update(sampler="dpm"), "sampler"),
    (lambda c: c.sample.update(steps=3), "unknown keys"),
])
def test_bad_configs_fail_at_start_up(edit, match):
  cfg = mt_diffusion_shapes.get_config("label,tiny")
  edit(cfg)
  with pytest.raises(ValueError, match=match):
    get_experiment(cfg)


def test_imagenet64_config_constructs_with_paper_scale():
  cfg = mt_diffusion_imagenet64.get_config()
  validate_config(cfg)
  exp = get_experiment(cfg)
  assert exp.kinds == ("image", "label") and exp.code_shape == (64, 64, 4)
  assert exp.schedule.num_train_timesteps == 1000 and cfg.data.name == "tfds"
  b = 1
  inputs = {"image": jnp.zeros((b, 64, 64, 3)), "label": jnp.zeros((b,), jnp.int32)}
  shapes = jax.eval_shape(exp.net.init, jax.random.key(0), inputs, jnp.zeros((b, 64, 64, 4)), jnp.zeros((b,)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n == PARAMS_IN64, n
  with pytest.raises(ValueError, match="variant"):
    mt_diffusion_imagenet64.get_config("tiny")


PARAMS_IN64 = 28_729_524  # the DiffiT-64 backbone + label encoder / decoder + code heads
