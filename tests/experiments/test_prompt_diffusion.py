"""Prompt Diffusion on the shapes world: prompt assembly, CFG dropout rates, the hint encoders' zero-init (step 0
equals the base UNet exactly), and the tiny variant end to end through the stages (the tiny sd_shapes base trained
as stage `pipeline`, a few steps, evaluation, export, `--mode sample` sheet)."""

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

from configs import prompt_diffusion_shapes  # noqa: E402
from diffusion_jax import stages  # noqa: E402
from diffusion_jax.data import shapes as S  # noqa: E402
from diffusion_jax.experiments import prompt_diffusion as PD  # noqa: E402

CFG32 = S.ShapesConfig(image_size=32)


def _scene(i, split="train"):
  ex = S.ShapesSource(64, seed=3, cfg=CFG32, split=split)[i]
  return S.example_scene(ex, 32)


# ------------------------------------------------------------------------------------------- host side


def test_prompt_assembly_every_task():
  """Example pair from the example scene (source first), query + ground truth from the query scene; forward tasks
  carry the fixed map text, inverse ones the query's caption; maps are 3-channel uint8 renders of that scene."""
  qs, es = _scene(0), _scene(1)
  rq, re_ = S.render(qs, CFG32), S.render(es, CFG32)
  for task in PD.TASKS:
    p = PD.assemble_prompt(task, qs, es, CFG32)
    for k in ("example_source", "example_target", "query", "target"):
      assert p[k].shape == (32, 32, 3) and p[k].dtype == np.uint8, (task, k)
    if task in ("depth", "edge", "seg", "silhouette"):
      assert p["text"] == PD.FORWARD_TEXT[task]
      np.testing.assert_array_equal(p["example_source"], re_["image"])
      np.testing.assert_array_equal(p["query"], rq["image"])
    elif task == "colour_perm":
      np.testing.assert_array_equal(p["target"], rq["image"][..., [1, 2, 0]])
      np.testing.assert_array_equal(S.render(PD.permuted_scene(qs), CFG32)["image"], p["target"])
      assert p["text"] == S.caption(PD.permuted_scene(qs)) != S.caption(qs)
    else:
      assert p["text"] == S.caption(qs)
      np.testing.assert_array_equal(p["example_target"], re_["image"])
      np.testing.assert_array_equal(p["target"], rq["image"])
  # the maps themselves
  p = PD.assemble_prompt("inv_depth", qs, es, CFG32)
  np.testing.assert_array_equal(p["query"][..., 0], np.round((1 - rq["depth"]) * 255).astype(np.uint8))
  p = PD.assemble_prompt("edge", qs, es, CFG32)
  np.testing.assert_array_equal(p["target"][..., 1], rq["edges"] * 255)
  p = PD.assemble_prompt("inv_seg", qs, es, CFG32)
  np.testing.assert_array_equal(p["query"], PD.SEG_PALETTE[rq["segmentation"]])
  # a mismatched example: the forward (image, depth) pair under the inverse-depth query
  p = PD.assemble_prompt("inv_depth", qs, es, CFG32, example_task="depth")
  np.testing.assert_array_equal(p["example_source"], re_["image"])
  np.testing.assert_array_equal(p["query"], PD.depth_image(rq["depth"]))


def _fake_cache(tmp, n=12, size=16):
  src = S.ShapesSource(n, seed=0, cfg=S.ShapesConfig(image_size=size))
  exs = [src[i] for i in range(n)]
  os.makedirs(tmp, exist_ok=True)
  np.save(os.path.join(tmp, "objects.npy"), np.stack([e["objects"] for e in exs]))
  np.save(os.path.join(tmp, "ids.npy"), np.arange(n * 4, dtype=np.int32).reshape(n, 4))
  texts = [""] + sorted(set(PD.FORWARD_TEXT.values()))
  np.save(os.path.join(tmp, "task_ids.npy"), -np.arange(len(texts) * 4, dtype=np.int32).reshape(-1, 4) - 1)
  json.dump(texts, open(os.path.join(tmp, "task_texts.json"), "w"))
  json.dump({"num": n, "keys": ["ids", "objects"]}, open(os.path.join(tmp, "meta.json"), "w"))
  return exs, texts


def test_prompt_source_pairs_and_uniform_tasks(tmp_path):
  """Train items: tasks uniform over the six (chi-square, 6000 draws), the example scene never the query's, the
  text ids the query caption's (inverse) or the task text's (forward). Statistical: fails with p ~ 1e-4."""
  exs, texts = _fake_cache(str(tmp_path))
  n = len(exs)
  src = PD.PromptSource(str(tmp_path), PD.SEEN_TASKS, 16, seed=0, train=True, repeats=500)
  assert len(src) == n * 500
  counts = {t: 0 for t in PD.SEEN_TASKS}
  for k in range(6000):
    task, q, e = src.pick(k)
    counts[task] += 1
    assert q == k % n and e != q
  chi2 = sum((v - 1000) ** 2 / 1000 for v in counts.values())
  assert chi2 < 25.7, counts  # chi-square, 5 dof: P(> 25.7) = 1e-4
  for k in range(12):
    item = src[k]
    task, q, e = src.pick(k)
    if task in PD.FORWARD_TEXT:
      np.testing.assert_array_equal(item["ids"], np.load(os.path.join(tmp_path, "task_ids.npy"))[
          texts.index(PD.FORWARD_TEXT[task])])
    else:
      np.testing.assert_array_equal(item["ids"], np.arange(q * 4, q * 4 + 4))
    ref = PD.assemble_prompt(task, S.example_scene(exs[q], 16), S.example_scene(exs[e], 16),
                             S.ShapesConfig(image_size=16))
    np.testing.assert_array_equal(item["example_target"], ref["example_target"])
    np.testing.assert_array_equal(item["target"], ref["target"])
  test = PD.PromptSource(str(tmp_path), PD.SEEN_TASKS, 16, seed=0, train=False)
  assert [test.pick(k)[0] for k in range(6)] == list(PD.SEEN_TASKS) and test.pick(3)[2] == 4


def test_cfg_dropout_rates():
  """One draw per example: 5 % text only, 5 % text + pair, 5 % pair only, 85 % nothing (the query is never an
  output of the draw). Statistical: each rate within 5 sigma of 400k draws."""
  n = 400_000
  dt, dp = (np.asarray(v) for v in PD.cfg_dropout(jax.random.PRNGKey(0), n))
  rates = {"text_only": np.mean(dt & ~dp), "both": np.mean(dt & dp), "pair_only": np.mean(~dt & dp),
           "none": np.mean(~dt & ~dp)}
  for k, want in (("text_only", 0.05), ("both", 0.05), ("pair_only", 0.05), ("none", 0.85)):
    sigma = np.sqrt(want * (1 - want) / n)
    assert abs(rates[k] - want) < 5 * sigma, (k, rates[k])
  dt, dp = (np.asarray(v) for v in PD.cfg_dropout(jax.random.PRNGKey(1), n, (0.1, 0.0, 0.3)))
  assert abs(np.mean(dt) - 0.1) < 0.003 and abs(np.mean(dp) - 0.3) < 0.004 and not np.any(dt & dp)


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pd_run(tmp_path_factory, sd_shapes_tiny_stage):
  wd = str(tmp_path_factory.mktemp("pd_shapes"))
  sd_shapes_tiny_stage.copy_to(wd)  # the session's tiny base (tests/conftest.py), reused as stage `pipeline`
  cfg = prompt_diffusion_shapes.get_config("tiny")
  return wd, cfg, stages.run(cfg, wd)


def _experiment(wd, cfg):
  exp = PD.PromptDiffusionExperiment(cfg, stages={"pipeline": os.path.join(wd, "pipeline", "export")})
  exp.workdir = wd
  return exp


def test_zero_init_equals_base_unet(pd_run):
  """At init (ControlNet copied from the base, zero convs, zero-initialised hint-encoder outputs; decoder copied
  for sd_locked=False) the Prompt Diffusion output is the base UNet's exactly, for any pair and query; with a
  non-zero residual conv it is not, and the query then changes it (the query path is wired)."""
  wd, cfg, _ = pd_run
  exp = _experiment(wd, cfg)
  frozen = jax.tree.map(jnp.asarray, exp.load_frozen())
  params = exp.init(jax.random.PRNGKey(0), None, frozen)
  assert set(params) == {"controlnet", "decoder"}
  for name in ("controlnet_cond_embedding", "controlnet_query_cond_embedding"):
    assert not np.any(np.asarray(params["controlnet"][name]["conv_out"]["kernel"]))
    assert np.any(np.asarray(params["controlnet"][name]["conv_in"]["kernel"]))
  assert params["controlnet"]["controlnet_cond_embedding"]["conv_in"]["kernel"].shape[2] == 6
  k = jax.random.split(jax.random.PRNGKey(1), 5)
  b, (h, w, ch) = 2, exp.latent_shape
  x = jax.random.normal(k[0], (b, h, w, ch))
  t = jnp.array([10, 700])
  ctx = jax.random.normal(k[1], (b, exp.host.max_length, exp.unet_config.cross_attention_dim))
  s = exp.image_size
  c = {"ctx": ctx, "pair": jax.random.uniform(k[2], (b, s, s, 6), minval=-1, maxval=1),
       "query": jax.random.uniform(k[3], (b, s, s, 3), minval=-1, maxval=1)}
  model = jax.jit(exp.model_fn())  # one compile for the three calls below
  base = np.asarray(jax.jit(exp.unet.apply)({"params": frozen["unet"]}, x, t, ctx))
  np.testing.assert_array_equal(np.asarray(model(params, frozen["unet"], x, t, c)), base)
  bumped = jax.tree.map(lambda a: a, params)
  bumped["controlnet"] = dict(params["controlnet"])
  mid = dict(bumped["controlnet"]["controlnet_mid_block"])
  mid["kernel"] = mid["kernel"] + 0.1
  bumped["controlnet"]["controlnet_mid_block"] = mid
  for name in ("controlnet_cond_embedding", "controlnet_query_cond_embedding"):
    e = dict(bumped["controlnet"][name])
    e["conv_out"] = {"kernel": e["conv_out"]["kernel"] + 0.05, "bias": e["conv_out"]["bias"]}
    bumped["controlnet"][name] = e
  o1 = np.asarray(model(bumped, frozen["unet"], x, t, c))
  assert np.max(np.abs(o1 - base)) > 1e-4
  o2 = np.asarray(model(bumped, frozen["unet"], x, t, dict(c, query=-c["query"])))
  assert np.max(np.abs(o2 - o1)) > 1e-5


def test_prompt_diffusion_tiny_end_to_end(pd_run):
  wd, cfg, out = pd_run
  assert out["step"] == cfg.train.num_steps and np.isfinite(out["loss"])
  info = json.load(open(os.path.join(wd, "run_info.json")))
  assert set(info["param_groups"]) == {"controlnet", "decoder"}  # sd_locked=False: the decoder trains
  for t in PD.SEEN_TASKS + tuple(PD.UNSEEN_TASKS):
    assert 0 < out[f"eval/{t}/rmse"] < 1, t
  for t in ("inv_depth", "inv_edge", "inv_seg"):
    assert 0 <= out[f"eval/{t}/map_agreement"] <= 1
    assert 0 <= out[f"eval/mismatch_{t}/class_accuracy"] <= 1
  assert out["eval/shapes_fd_given"] == 0.0 and not any(k.endswith("shapes_fd") for k in out)
  for tag in ("text", "notext"):
    assert 0 <= out[f"eval/incontext_{tag}/correct"] <= 1
  # different example pairs (with their texts) give different outputs for the same query and noise
  assert out["eval/incontext_text/spread"] > 1e-4
  assert os.path.exists(os.path.join(wd, "samples", "prompt_diffusion_eval.png"))
  PD.check_prompt_diffusion_export(out["export"])
  from diffusion_jax.pretrained.prompt_diffusion import load_prompt_diffusion_controlnet
  ccfg, cparams = load_prompt_diffusion_controlnet(out["export"])
  assert ccfg.conditioning_channels == 6 and ccfg.query_conditioning_channels == 3
  assert json.load(open(os.path.join(out["export"], "controlnet", "config.json")))["_class_name"] == \
      "PromptDiffusionControlNetModel"
  assert os.path.exists(os.path.join(out["export"], "unet", "config.json"))


def test_mode_sample_sheet(pd_run):
  """`--mode sample` from the checkpoint: example source | example target | query | output | ground truth."""
  from diffusion_jax.train import trainer
  wd, cfg, _ = pd_run
  res = trainer.sample(cfg, wd, num=6, stages={"pipeline": os.path.join(wd, "pipeline", "export")})
  assert res["outputs"]["output"] == [6, 16, 16, 3] and res["outputs"]["ground_truth"] == [6, 16, 16, 3]
  arr = np.load(os.path.splitext(res["path"])[0] + ".npz")
  exp = _experiment(wd, cfg)
  src = exp.source("test")
  for k in range(6):  # the test batch cycles through the six seen tasks; its ground truth is the assembled target
    assert src.pick(k)[0] == PD.SEEN_TASKS[k]
    np.testing.assert_array_equal(arr["ground_truth"][k], src[k]["target"])
  assert np.isfinite(arr["output"]).all()


def test_cnft_baseline_variant(pd_run):
  """CN-FT (the paper's per-task ControlNet baseline): a plain ControlNet on the query (3 channels, no pair, no
  second hint encoder), trained and evaluated on its one task; the variant names exactly one task."""
  wd, _, _ = pd_run
  cfg = prompt_diffusion_shapes.get_config("tiny,cnft,inv_depth")
  exp = _experiment(wd, cfg)
  assert exp.control_config.conditioning_channels == 3 and exp.control_config.query_conditioning_channels is None
  assert list(exp.eval_sets(4)) == ["inv_depth"]
  src = exp.source("train")
  assert {src.pick(k)[0] for k in range(50)} == {"inv_depth"}
  assert cfg.train.num_steps == prompt_diffusion_shapes.get_config("tiny").train.num_steps  # same budget
  for bad in ("cnft", "cnft,depth,edge", "depth"):
    with pytest.raises(ValueError):
      prompt_diffusion_shapes.get_config(bad)


def test_benchmark_script_on_the_tiny_base(pd_run, tmp_path, capsys):
  """scripts/prompt_diffusion_benchmark.py on the session's tiny base: every row timed and the table printed (no
  assertion on the timings themselves: those belong to the benchmark, not to a test)."""
  from scripts import prompt_diffusion_benchmark as B
  wd, _, _ = pd_run
  res = B.main(["--base", os.path.join(wd, "pipeline"), "--variant", "tiny", "--batch", "2", "--sample_batch", "2",
                "--repeats", "3", "--cache_dir", str(tmp_path / "cache")])
  for k in ("forward_pd", "forward_base", "train_step_pd", "train_step_base", "sample"):
    assert res[f"{k}_ms"] > 0 and res[f"{k}_cpu_s"] >= 0, k
  assert res["controlnet_overhead"] == res["forward_pd_ms"] / res["forward_base_ms"]
  assert res["sample_images_per_s"] > 0
  assert res["trainable_params"] > 0 and "ddim 2 steps" in res["sampler"]
  out = capsys.readouterr().out
  assert "| train step, Prompt Diffusion |" in out and "ControlNet overhead" in out
  with pytest.raises(SystemExit, match="no such directory"):
    B.main(["--base", str(tmp_path / "nope")])
