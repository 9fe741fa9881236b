"""Paper-scale ECLIPSE configs: prior parameter counts (jax.eval_shape, nothing allocated) and hyper-parameters."""

import os
import sys

import pytest

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import clip_shapes, eclipse_kandinsky, eclipse_karlo, eclipse_prior, unclip_decoder_shapes  # noqa: E402
from diffusion_jax.experiments import eclipse  # noqa: E402
from diffusion_jax.models import prior as prior_lib  # noqa: E402


def _count_prior(cfg, objective="eclipse"):
  pc = eclipse.prior_config_for(cfg.model, objective, cfg.model.num_embeddings, cfg.model.embedding_dim)
  module = prior_lib.PriorTransformer(pc)
  e, l = pc.embedding_dim, pc.num_embeddings
  kw = {"timestep": jnp.zeros((1,))} if objective == "diffusion" else {}
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, e)), jnp.zeros((1, e)),
                                              jnp.zeros((1, l, e)), jnp.ones((1, l)), **kw))
  return sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))


def _by_hand(width: int, emb: int, layers: int, tokens: int) -> int:
  """diffusers PriorTransformer without time embedding: per block LN1, q/k/v/out (+bias), LN3, FF x4 (+bias)."""
  block = 2 * 2 * width + 4 * (width * width + width) + (width * 4 * width + 4 * width) + (4 * width * width + width)
  proj_in = 3 * (emb * width + width)          # encoder_hidden_states_proj, embedding_proj, proj_in
  extra = width + tokens * width + 2 * width   # prd token, positional embedding, norm_out
  out = width * emb + emb + 2 * emb            # proj_to_clip_embeddings, clip_mean, clip_std
  return layers * block + proj_in + extra + out


@pytest.mark.parametrize("mod,emb,paper_m", [(eclipse_karlo, 768, 33.1), (eclipse_kandinsky, 1280, 34.2)])
def test_paper_prior_param_count(mod, emb, paper_m):
  cfg = mod.get_config()
  assert cfg.model.embedding_dim == emb and cfg.model.num_embeddings == 77
  n = _count_prior(cfg)
  assert n == _by_hand(512, emb, 10, 77 + 3)
  # ECLIPSE App. A: "33M" (Karlo) / "34M" (Kandinsky); the diffusers count of the release gives 33.1M / 34.2M.
  assert round(n / 1e6, 1) == paper_m


def test_paper_hyper_parameters():
  for mod in (eclipse_karlo, eclipse_kandinsky):
    c = mod.get_config()
    assert (c.model.num_layers, c.model.num_attention_heads, c.model.attention_head_dim) == (10, 16, 32)
    assert c.optim.lr == 5e-5 and c.data.batch_size == 1024 and c.train.num_steps == 60000
    assert c.optim.schedule == "cosine_restarts" and c.prior.lam == 0.2 and c.prior.objective == "eclipse"
    # The CLIP can only come from outside: a stage with no run to train, checked as a transformers CLIP.
    assert not c.stages.clip.config and c.stages.clip.path == "" and c.stages.clip.kind == "hf_clip"


def test_diffusion_baseline_adds_time_embedding():
  cfg = eclipse_karlo.get_config()
  pc = eclipse.prior_config_for(cfg.model, "diffusion", 77, 768)
  assert pc.use_timestep and pc.additional_embeddings == 4
  assert _count_prior(cfg, "diffusion") > _count_prior(cfg, "eclipse")


def test_variants_and_bad_names():
  for mod in (eclipse_prior, clip_shapes, unclip_decoder_shapes, eclipse_karlo, eclipse_kandinsky):
    assert mod.get_config("tiny").experiment
    with pytest.raises(ValueError, match="tiny"):
      mod.get_config("huge")
  cfg = eclipse_prior.get_config("tiny")
  cfg.prior.objective = "flow"
  with pytest.raises(ValueError, match="eclipse, projection, diffusion"):
    eclipse.EclipsePrior(cfg)


def test_main_job_variants():
  """The main job (default) keeps the quick CLIP (no nuisance) and adds the projection baseline; `gap` is the
  CLIP with a modality gap on nuisance images, its baseline on the same shapes options; `clean` has no
  baseline stage."""
  default, gap, clean = (eclipse_prior.get_config(v) for v in ("", "gap", "clean"))
  assert not default.data.shapes.to_dict() and default.stages.projection.config is not None
  assert default.stages.clip.config.to_dict() == clean.stages.clip.config.to_dict()
  assert gap.data.shapes.to_dict() and gap.stages.clip.config.to_dict() != default.stages.clip.config.to_dict()
  for c in (default, gap):
    assert c.stages.projection.config.prior.objective == "projection"
    assert c.stages.projection.config.data.shapes.to_dict() == c.data.shapes.to_dict()
  assert not clean.stages.projection.config.to_dict() and clean.stages.projection.optional


def test_train_subset_out_of_range_fails_before_any_stage(tmp_path):
  """config.data.train_subset beyond the cached pairs is refused by the stage runner before the CLIP stage
  trains (nothing is written), with the key and the fix named."""
  from diffusion_jax import stages
  cfg = eclipse_prior.get_config("tiny")
  cfg.data.train_subset = int(cfg.data.num_train) + 1
  with pytest.raises(ValueError, match=r"config\.data\.train_subset=65 .*num_train=64"):
    stages.run(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
  cfg.data.train_subset = -1
  with pytest.raises(ValueError, match="train_subset=-1"):
    stages.run(cfg, str(tmp_path / "run"))
