"""ControlNet: parity with diffusers ControlNetModel (residuals, and the UNet fed with them), export round trip,
initialisation from a UNet, parameter count of the SD-1.5 ControlNet."""

import numpy as np
import pytest

import jax

from diffusion_jax.models.controlnet import (ControlNetModel, abstract_controlnet_params, controlnet_config_from_unet,
                                             init_controlnet_from_unet, sd15_controlnet_config)
from diffusion_jax.models.unet import UNet2DConditionModel, count_params
from diffusion_jax.pretrained.io import flatten

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax.pretrained.diffusers_io import load_controlnet, load_unet, save_controlnet  # noqa: E402

UNET_KW = dict(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
               cross_attention_dim=16, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
COND_CH = (8, 16)  # conditioning embedding widths: one stride-2 conv, so the condition is 2x the latent size


def randomize_(module, seed=0, scale=0.05):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return module


def nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  torch.manual_seed(0)
  unet = randomize_(diffusers.UNet2DConditionModel(**UNET_KW).eval(), 0)
  cn_init = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CH).eval()
  d = tmp_path_factory.mktemp("cn")
  unet.save_pretrained(d / "unet", safe_serialization=True)
  cn_init.save_pretrained(d / "cn_init", safe_serialization=True)
  cn = randomize_(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CH).eval(), 1)
  cn.save_pretrained(d / "cn", safe_serialization=True)
  return unet, cn, d


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 3, 16)).astype(np.float32)
  cond = rng.uniform(0, 1, (2, 12, 12, 3)).astype(np.float32)
  t = np.array([7.0, 640.0], np.float32)
  return x, ctx, cond, t


def test_controlnet_and_unet_parity(ref):
  """Residuals (conditioning_scale 0.7; guess mode) and the UNet fed with them match diffusers."""
  unet, cn, d = ref
  ucfg, uparams = load_unet(str(d / "unet"))
  ccfg, cparams = load_controlnet(str(d / "cn"))
  x, ctx, cond, t = _inputs()
  cn_apply = jax.jit(ControlNetModel(ccfg).apply, static_argnames="guess_mode")
  for scale, guess in ((0.7, False), (1.3, True)):
    with torch.no_grad():
      down_t, mid_t = cn(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond),
                         conditioning_scale=scale, guess_mode=guess, return_dict=False)
    down, mid = cn_apply({"params": cparams}, x, t, ctx, cond, scale, guess_mode=guess)
    assert len(down) == len(down_t) == ccfg.num_residuals
    for a, b in zip(down, down_t):
      np.testing.assert_allclose(np.asarray(a), to_nhwc(b), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(mid), to_nhwc(mid_t), atol=1e-4, rtol=0)
  with torch.no_grad():  # the UNet with the last (guess-mode) residuals
    want = to_nhwc(unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), down_block_additional_residuals=down_t,
                        mid_block_additional_residual=mid_t).sample)
  got = jax.jit(UNet2DConditionModel(ucfg).apply)({"params": uparams}, x, t, ctx, down_block_additional_residuals=down,
                                                   mid_block_additional_residual=mid)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_controlnet_export_roundtrip(ref, tmp_path):
  _, cn, d = ref
  ccfg, cparams = load_controlnet(str(d / "cn"))
  save_controlnet(str(tmp_path), ccfg, cparams)
  back = diffusers.ControlNetModel.from_pretrained(str(tmp_path)).eval()
  x, ctx, cond, t = _inputs()
  with torch.no_grad():
    a = cn(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond), return_dict=False)
    b = back(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond), return_dict=False)
  for u, v in zip(list(a[0]) + [a[1]], list(b[0]) + [b[1]]):
    np.testing.assert_allclose(u.numpy(), v.numpy(), atol=1e-6, rtol=0)


def test_init_from_unet_matches_diffusers_from_unet(ref):
  """init_controlnet_from_unet copies the same tensors as diffusers' ControlNetModel.from_unet and zeroes the
  zero convs, so the UNet output is unchanged at initialisation."""
  _, _, d = ref
  ucfg, uparams = load_unet(str(d / "unet"))
  ref_cfg, ref_params = load_controlnet(str(d / "cn_init"))
  ccfg = controlnet_config_from_unet(ucfg, conditioning_embedding_out_channels=COND_CH)
  assert ccfg == ref_cfg
  ours = flatten(init_controlnet_from_unet(uparams, ccfg, jax.random.PRNGKey(3)))
  theirs = flatten(ref_params)
  assert set(ours) == set(theirs)
  copied = [k for k in ours if not k.startswith("controlnet_")]
  assert any(k.startswith("down_blocks_1/") for k in copied) and any(k.startswith("mid_block/") for k in copied)
  for k in copied:
    np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]), err_msg=k)
  zero = [k for k in ours if k.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                           "controlnet_cond_embedding/conv_out"))]
  assert len(zero) == 2 * (ccfg.num_residuals + 2)
  for k in zero:
    assert not np.any(np.asarray(ours[k])), k


def test_param_count_sd15_controlnet():
  """SD-1.5 ControlNet: 361.3M parameters, built abstractly."""
  assert round(count_params(abstract_controlnet_params(sd15_controlnet_config())) / 1e6, 1) == 361.3


def test_prompt_diffusion_query_embedding_is_summed():
  """Prompt Diffusion (B2): the query embedding is added like the pair embedding. With the query embedding a copy
  of the pair embedding and query == pair image, the residuals equal a plain ControlNet whose embedding output
  conv is doubled (conv_out is linear)."""
  from diffusion_jax.models.controlnet import ControlNetConfig
  kw = dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            layers_per_block=1, norm_num_groups=8, cross_attention_dim=8, attention_head_dim=2,
            conditioning_embedding_out_channels=(8, 16))
  pd_cfg = ControlNetConfig(query_conditioning_channels=3, **kw)
  plain_cfg = ControlNetConfig(**kw)
  assert pd_cfg.to_diffusers()["_class_name"] == "PromptDiffusionControlNetModel"
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda a: 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                                  abstract_controlnet_params(plain_cfg))
  emb = params["controlnet_cond_embedding"]
  pd_params = dict(params, controlnet_cond_embedding=emb, controlnet_query_cond_embedding=emb)
  doubled = dict(emb, conv_out={k: 2 * v for k, v in emb["conv_out"].items()})
  plain_params = dict(params, controlnet_cond_embedding=doubled)
  x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
  ctx = rng.standard_normal((1, 3, 8)).astype(np.float32)
  img = rng.uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
  t = np.array([10.0], np.float32)
  a_down, a_mid = jax.jit(ControlNetModel(pd_cfg).apply)({"params": pd_params}, x, t, ctx, img,
                                                          controlnet_query_cond=img)
  b_down, b_mid = jax.jit(ControlNetModel(plain_cfg).apply)({"params": plain_params}, x, t, ctx, img)
  for u, v in zip(list(a_down) + [a_mid], list(b_down) + [b_mid]):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="controlnet_query_cond"):
    jax.eval_shape(ControlNetModel(pd_cfg).apply, {"params": pd_params}, x, t, ctx, img)
