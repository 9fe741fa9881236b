"""UNet2DConditionModel: parity with diffusers (PyTorch, CPU) on tiny random configs, export round trip,
parameter counts of the real SD configurations."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from diffusion_jax.models.unet import (UNet2DConditionModel, UNetConfig, abstract_unet_params, count_params,
                                       sd15_unet_config, sd21_unet_config, unet_config_from_diffusers)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax.pretrained.diffusers_io import load_unet, save_unet  # noqa: E402

# SD-1 style: conv projections, one int head count, CrossAttnUp block without upsampler, UpBlock with one,
# class embedding, 2 resnets per level.
SD1_TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, norm_num_groups=8,
                cross_attention_dim=24, attention_head_dim=4, num_class_embeds=5)
# SD-2 style: linear projections, per-block head counts, upcast attention, 2 transformer layers per block,
# freq_shift 1 / no flip, CrossAttnUp block with upsampler, 3 levels.
SD2_TINY = dict(sample_size=8, in_channels=4, out_channels=3, block_out_channels=(32, 32, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=16, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                upcast_attention=True, transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1)


def randomize_(module, seed=0, scale=0.05):
  """Adds noise to every parameter (so zero-inits, GN/LN affine and biases are all exercised)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return module


def make_torch_unet(kw, seed=0):
  torch.manual_seed(seed)
  return randomize_(diffusers.UNet2DConditionModel(**kw).eval(), seed)


def nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def inputs(kw, hw=(8, 8), batch=2, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, *hw, kw["in_channels"])).astype(np.float32)
  ctx = rng.standard_normal((batch, 5, kw["cross_attention_dim"])).astype(np.float32)
  t = np.array([3.0, 801.0][:batch], np.float32)
  labels = np.array([1, 4][:batch]) if kw.get("num_class_embeds") else None
  return x, ctx, t, labels


def torch_forward(model, x, ctx, t, labels, **extra):
  with torch.no_grad():
    return to_nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                         class_labels=None if labels is None else torch.from_numpy(labels), **extra).sample)


@pytest.mark.parametrize("kw,hw", [(SD1_TINY, (8, 8)), (SD2_TINY, (7, 9))], ids=["sd1", "sd2-odd-size"])
def test_unet_parity_and_export(tmp_path, kw, hw):
  tm = make_torch_unet(kw)
  tm.save_pretrained(tmp_path / "ref", safe_serialization=True)
  cfg, params = load_unet(str(tmp_path / "ref"))
  assert cfg.use_linear_projection == kw.get("use_linear_projection", False)
  x, ctx, t, labels = inputs(kw, hw)
  want = torch_forward(tm, x, ctx, t, labels)
  got = jax.jit(UNet2DConditionModel(cfg).apply)({"params": params}, x, t, ctx, class_labels=labels)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  # Export: our files load in diffusers and give the same outputs.
  save_unet(str(tmp_path / "export"), cfg, params)
  back = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "export")).eval()
  np.testing.assert_allclose(torch_forward(back, x, ctx, t, labels), want, atol=1e-5, rtol=0)
  if kw is SD1_TINY:  # bf16 compute with fp32 params stays close to the fp32 reference
    low = jax.jit(UNet2DConditionModel(cfg, dtype=jnp.bfloat16).apply)({"params": params}, x, t, ctx,
                                                                        class_labels=labels)
    assert low.dtype == jnp.bfloat16
    assert np.abs(np.asarray(low, np.float32) - want).max() < 0.05 * np.abs(want).max() + 0.05


def test_unet_controlnet_residuals_parity(tmp_path):
  """UNet with additional residuals (as a ControlNet produces them) matches diffusers."""
  kw = dict(SD1_TINY, num_class_embeds=None, layers_per_block=1)
  tm = make_torch_unet(kw)
  tm.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = load_unet(str(tmp_path))
  x, ctx, t, _ = inputs(kw)
  rng = np.random.default_rng(3)
  shapes = [(2, 8, 8, 32), (2, 8, 8, 32), (2, 4, 4, 32), (2, 4, 4, 64)]
  down = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  mid = rng.standard_normal((2, 4, 4, 64)).astype(np.float32)
  want = torch_forward(tm, x, ctx, t, None, down_block_additional_residuals=[nchw(d) for d in down],
                       mid_block_additional_residual=nchw(mid))
  apply = jax.jit(UNet2DConditionModel(cfg).apply)
  got = apply({"params": params}, x, t, ctx, down_block_additional_residuals=down,
              mid_block_additional_residual=mid)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  plain = apply({"params": params}, x, t, ctx)
  assert np.abs(np.asarray(plain) - want).max() > 1e-2  # the residuals matter
  with pytest.raises(ValueError, match="both"):
    UNet2DConditionModel(cfg).apply({"params": params}, x, t, ctx, down_block_additional_residuals=down)


def test_config_roundtrip_and_errors():
  cfg = unet_config_from_diffusers(dict(SD2_TINY, _class_name="UNet2DConditionModel"))
  assert cfg.heads == (2, 4, 4) and cfg.transformer_layers == (2, 2, 2)
  assert unet_config_from_diffusers(cfg.to_diffusers()) == cfg
  with pytest.raises(ValueError, match="addition_embed_type"):
    unet_config_from_diffusers(dict(SD1_TINY, addition_embed_type="text_time"))
  with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
    UNetConfig(down_block_types=("SimpleCrossAttnDownBlock2D",) * 4)


def test_param_counts_real_configs():
  """Counts of the real configurations, built abstractly (SD-1.5: 859.5M; SD-2.1: 865.9M)."""
  assert round(count_params(abstract_unet_params(sd15_unet_config())) / 1e6, 1) == 859.5
  assert round(count_params(abstract_unet_params(sd21_unet_config())) / 1e6, 1) == 865.9


def test_registry_preset_and_remat_match_diffusers(tmp_path):
  """build_model({"name": "sd_unet", "config": "tiny"}, remat="full") gives the diffusers output for the same
  weights (remat changes memory, not values)."""
  from diffusion_jax.models import build_model
  from diffusion_jax.models.unet import tiny_unet_config
  kw = {k: v for k, v in tiny_unet_config().to_diffusers().items() if not k.startswith("_")}
  tm = make_torch_unet(kw)
  tm.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = load_unet(str(tmp_path))
  assert cfg == tiny_unet_config()
  model = build_model({"name": "sd_unet", "config": "tiny"}, dtype="float32", remat="full")
  x, ctx, t, _ = inputs(kw)
  got = jax.jit(model.apply)({"params": params}, x, t, ctx)
  np.testing.assert_allclose(np.asarray(got), torch_forward(tm, x, ctx, t, None), atol=1e-4, rtol=0)
