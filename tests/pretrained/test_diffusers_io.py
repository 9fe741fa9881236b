"""diffusers directory I/O: name mapping, wrong/partial checkpoints, pickle refusal, pipeline sub-folders,
legacy VAE attention names."""

import json
import os

import numpy as np
import pytest

from diffusion_jax.pretrained.diffusers_io import (flax_to_torch_name, load_controlnet, load_sd_components, load_unet,
                                                   load_vae, params_to_torch_state)
from diffusion_jax.pretrained.io import CheckpointError, flatten

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import load_file, save_file  # noqa: E402

UNET_KW = dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
               cross_attention_dim=16, attention_head_dim=2)
VAE_KW = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  """A pipeline-style directory with unet/ and vae/ sub-folders written by diffusers."""
  torch.manual_seed(0)
  d = tmp_path_factory.mktemp("pipe")
  diffusers.UNet2DConditionModel(**UNET_KW).save_pretrained(d / "unet", safe_serialization=True)
  diffusers.AutoencoderKL(**VAE_KW).save_pretrained(d / "vae", safe_serialization=True)
  return d


def test_name_mapping():
  assert flax_to_torch_name("down_blocks_0/attentions_1/transformer_blocks_0/ff/net_0/proj/kernel") == \
      "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"
  assert flax_to_torch_name("time_embedding/linear_1/bias") == "time_embedding.linear_1.bias"
  assert flax_to_torch_name("mid_block/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel") == \
      "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
  assert flax_to_torch_name("conv_norm_out/scale") == "conv_norm_out.weight"
  assert flax_to_torch_name("controlnet_cond_embedding/blocks_3/bias") == "controlnet_cond_embedding.blocks.3.bias"


def test_pipeline_subfolders_and_exact_weights(pipe):
  comps = load_sd_components(str(pipe))
  ucfg, uparams = comps["unet"]
  assert ucfg.cross_attention_dim == 16 and comps["vae"][0].block_out_channels == (16, 32)
  ref = load_file(str(pipe / "unet" / WEIGHTS))
  back = params_to_torch_state(uparams)
  assert set(back) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(back[k], ref[k], err_msg=k)
  # conv kernels are HWIO, Linear kernels (in, out)
  p = flatten(uparams)
  assert p["conv_in/kernel"].shape == (3, 3, 4, 32)
  assert p["time_embedding/linear_1/kernel"].shape == (32, 128)
  # a pipeline dir given to load_unet picks its unet/ sub-folder
  assert load_unet(str(pipe))[0] == ucfg


def test_partial_and_wrong_checkpoints_list_names(pipe, tmp_path):
  d = tmp_path / "broken"
  d.mkdir()
  (d / "config.json").write_text((pipe / "unet" / "config.json").read_text())
  sd = load_file(str(pipe / "unet" / WEIGHTS))
  sd.pop("conv_in.weight")
  sd["extra.layer.weight"] = np.zeros(3, np.float32)
  save_file(sd, str(d / WEIGHTS))
  with pytest.raises(CheckpointError) as e:
    load_unet(str(d))
  msg = str(e.value)
  assert "missing 1" in msg and "conv_in.weight" in msg
  assert "unexpected 1" in msg and "extra.layer.weight" in msg
  # a VAE checkpoint is refused by the UNet loader by its config class name
  with pytest.raises(CheckpointError, match="AutoencoderKL"):
    load_unet(str(pipe / "vae"))
  # right names, wrong shape
  sd = load_file(str(pipe / "unet" / WEIGHTS))
  sd["conv_in.bias"] = np.zeros(7, np.float32)
  save_file(sd, str(d / WEIGHTS))
  with pytest.raises(CheckpointError, match="conv_in.bias"):
    load_unet(str(d))
  # a config asking for unsupported features
  cfg = json.loads((pipe / "unet" / "config.json").read_text())
  cfg["class_embed_type"] = "projection"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="class_embed_type"):
    load_unet(str(d))


def test_pickle_refused_unless_allowed(tmp_path):
  torch.manual_seed(0)
  diffusers.AutoencoderKL(**VAE_KW).save_pretrained(tmp_path, safe_serialization=False)
  assert os.path.exists(tmp_path / "diffusion_pytorch_model.bin")
  with pytest.raises(CheckpointError, match="allow_pickle"):
    load_vae(str(tmp_path))
  cfg, params = load_vae(str(tmp_path), allow_pickle=True)
  assert flatten(params)["encoder/conv_in/kernel"].shape == (3, 3, 3, 16)


def test_legacy_vae_attention_names(pipe, tmp_path):
  """Old VAE checkpoints (query/key/value/proj_attn, 1x1-conv shaped) load to the same params."""
  _, want = load_vae(str(pipe / "vae"))
  sd = load_file(str(pipe / "vae" / WEIGHTS))
  legacy = {}
  for k, v in sd.items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        if v.ndim == 2:
          v = v[:, :, None, None]
    legacy[k] = v
  assert any(".query." in k for k in legacy)
  d = tmp_path / "legacy"
  d.mkdir()
  (d / "config.json").write_text((pipe / "vae" / "config.json").read_text())
  save_file(legacy, str(d / WEIGHTS))
  _, got = load_vae(str(d))
  for k, v in flatten(want).items():
    np.testing.assert_array_equal(np.asarray(flatten(got)[k]), np.asarray(v), err_msg=k)


def test_missing_directory_and_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_controlnet(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    load_controlnet(str(tmp_path))


def test_sharded_and_fp16_variant(pipe, tmp_path):
  _, want = load_unet(str(pipe / "unet"))
  sd = load_file(str(pipe / "unet" / WEIGHTS))
  keys = sorted(sd)
  d = tmp_path / "sharded"
  d.mkdir()
  (d / "config.json").write_text((pipe / "unet" / "config.json").read_text())
  shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  for name, ks in shards.items():
    save_file({k: sd[k] for k in ks}, str(d / name))
  (d / f"{WEIGHTS}.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
  _, got = load_unet(str(d))
  for k, v in flatten(want).items():
    np.testing.assert_array_equal(np.asarray(flatten(got)[k]), np.asarray(v), err_msg=k)
  # fp16 variant file: loaded and cast to float32
  v = tmp_path / "variant"
  v.mkdir()
  (v / "config.json").write_text((pipe / "unet" / "config.json").read_text())
  save_file({k: a.astype(np.float16) for k, a in sd.items()}, str(v / "diffusion_pytorch_model.fp16.safetensors"))
  _, got16 = load_unet(str(v), variant="fp16")
  leaf = flatten(got16)["conv_in/kernel"]
  assert leaf.dtype == np.float32
  np.testing.assert_allclose(np.asarray(leaf), np.asarray(flatten(want)["conv_in/kernel"]), atol=1e-3)
