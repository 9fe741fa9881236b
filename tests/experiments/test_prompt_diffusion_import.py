"""Prompt Diffusion: import of a ControlNet in diffusers' PromptDiffusionControlNetModel layout (a tiny random
model written by torch in that layout: diffusers' ControlNetModel with 6 pair channels plus the extra
`controlnet_query_cond_embedding`), and the paper-scale SD-1.5 config."""

import json
import os
import sys

import numpy as np
import pytest

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import prompt_diffusion_sd15  # noqa: E402
from diffusion_jax.models.controlnet import ControlNetModel  # noqa: E402
from diffusion_jax.pretrained import prompt_diffusion as PDI  # noqa: E402
from diffusion_jax.pretrained.io import CheckpointError  # noqa: E402

CN_KW = dict(in_channels=4, conditioning_channels=6, block_out_channels=(32, 64),
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1, norm_num_groups=8,
             cross_attention_dim=16, attention_head_dim=2, conditioning_embedding_out_channels=(8, 16))


def _nchw(torch, x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def test_import_prompt_diffusion_controlnet_layout(tmp_path):
  """A tiny random model saved by torch in the PromptDiffusionControlNetModel layout loads (names and shapes
  checked) and gives the same residuals as the torch model whose conditioning is conv_in(x) + pair_emb(pair) +
  query_emb(query) (what PromptDiffusionControlNetModel.forward computes); a plain ControlNet is refused."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
  torch.manual_seed(0)
  cn = diffusers.ControlNetModel(**CN_KW).eval()
  cn.controlnet_query_cond_embedding = ControlNetConditioningEmbedding(
      conditioning_embedding_channels=32, block_out_channels=(8, 16), conditioning_channels=3)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # random everything, zero convs included, so each weight's mapping matters
    for p in cn.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  d = tmp_path / "pd_controlnet"
  cn.save_pretrained(d, safe_serialization=True)
  cfg_path = d / "config.json"
  raw = json.load(open(cfg_path))
  raw["_class_name"] = PDI.CLASS_NAME
  json.dump(raw, open(cfg_path, "w"))
  from safetensors.numpy import load_file
  names = set(load_file(str(d / "diffusion_pytorch_model.safetensors")))
  assert "controlnet_query_cond_embedding.blocks.1.weight" in names
  assert "controlnet_query_cond_embedding.conv_out.weight" in names

  cfg, params = PDI.load_prompt_diffusion_controlnet(str(d))
  assert cfg.conditioning_channels == 6 and cfg.query_conditioning_channels == 3
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 3, 16)).astype(np.float32)
  pair = rng.uniform(-1, 1, (2, 8, 8, 6)).astype(np.float32)
  query = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  t = np.array([5.0, 800.0], np.float32)
  down, mid = jax.jit(ControlNetModel(cfg).apply)({"params": params}, x, t, ctx, pair, controlnet_query_cond=query)

  pair_emb, q_emb, q_t = cn.controlnet_cond_embedding, cn.controlnet_query_cond_embedding, _nchw(torch, query)

  class Summed(torch.nn.Module):
    def forward(self, c):
      return pair_emb(c) + q_emb(q_t)

  cn.controlnet_cond_embedding = Summed()
  with torch.no_grad():
    down_t, mid_t = cn(_nchw(torch, x), torch.from_numpy(t), torch.from_numpy(ctx), _nchw(torch, pair),
                       return_dict=False)
  assert len(down) == len(down_t)
  for a, b in zip(list(down) + [mid], list(down_t) + [mid_t]):
    np.testing.assert_allclose(np.asarray(a), b.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)

  # the round trip through our writer gives the same names (and no query key in config.json, as diffusers')
  PDI.save_prompt_diffusion_controlnet(str(tmp_path / "out"), cfg, params)
  assert set(load_file(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))) == names
  assert "query_conditioning_channels" not in json.load(open(tmp_path / "out" / "config.json"))

  plain = tmp_path / "plain"
  diffusers.ControlNetModel(**CN_KW).save_pretrained(plain, safe_serialization=True)
  with pytest.raises(CheckpointError, match="controlnet_query_cond_embedding"):
    PDI.load_prompt_diffusion_controlnet(str(plain))
  assert PDI.HINT_RANGE == (-1.0, 1.0)


def test_sd15_config_paper_hyperparameters():
  c = prompt_diffusion_sd15.get_config()
  assert c.experiment == "prompt_diffusion" and c.data.image_size == 256
  assert c.optim.name == "adamw" and c.optim.lr == 1e-4 and c.optim.schedule == "constant"
  assert c.optim.warmup_steps == 0
  assert c.data.batch_size == 1024 and c.optim.grad_accum == 4          # 256 x 4 accumulation
  assert c.train.num_steps == 5000
  assert c.sample.sampler == "ddim" and c.sample.steps == 100 and c.sample.guidance == 9.0 and c.sample.eta == 0
  assert c.prompt.sd_locked is False and set(c.optim.groups) == {"controlnet", "decoder"}
  assert not c.optim.train_unmatched
  assert tuple(c.prompt.dropout) == (0.05, 0.05, 0.05)
  assert c.stages.pipeline.kind == "sd_pipeline" and c.stages.pipeline.path == ""
  with pytest.raises(ValueError, match="variant"):
    prompt_diffusion_sd15.get_config("bogus")


def test_sd15_controlnet_parameter_count():
  """The SD-1.5 Prompt Diffusion ControlNet: SD-1.5's ControlNet (361.3M) + a second hint encoder and 3 more input
  channels on the first (8 + 3 channels of 16 3x3 kernels)."""
  from diffusion_jax.models.codi_adapter import cond_embedding_channels
  from diffusion_jax.models.controlnet import abstract_controlnet_params, controlnet_config_from_unet
  from diffusion_jax.models.unet import count_params, sd15_unet_config
  pd = controlnet_config_from_unet(sd15_unet_config(), conditioning_channels=6, query_conditioning_channels=3,
                                   conditioning_embedding_out_channels=cond_embedding_channels(8))
  plain = controlnet_config_from_unet(sd15_unet_config(), conditioning_embedding_out_channels=(16, 32, 96, 256))
  n_pd, n_plain = count_params(abstract_controlnet_params(pd)), count_params(abstract_controlnet_params(plain))
  emb = count_params(abstract_controlnet_params(pd)["controlnet_query_cond_embedding"])
  assert abs(n_plain / 1e6 - 361.3) < 0.1
  assert n_pd == n_plain + emb + 3 * 16 * 9
  assert pd.num_residuals == 12  # + the mid residual = the 13 outputs of B2
