"""Parity of the Flax PriorTransformer against diffusers (PyTorch, CPU) for the Karlo/Kandinsky layout, a
Shap-E-like layout (no text projection, no prd token, padded positions) and the ECLIPSE variant without a time
embedding.

diffusers has no class for the ECLIPSE variant, so its reference is `_eclipse_reference` below: the forward pass of
the ECLIPSE release (`src/priors/prior_transformer.py`), i.e. diffusers' forward with the time token removed,
written over the sub-modules of a diffusers `PriorTransformer(additional_embeddings=3)` whose time-embedding
weights are dropped from the saved checkpoint."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from diffusion_jax.pretrained import io  # noqa: E402
from diffusion_jax.pretrained import prior as prior_io  # noqa: E402

TOL = 1e-4
B, N, D = 3, 5, 12


def _perturb(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=g))
  return model.eval()


def _inputs(seed=0, d=D, proj_d=None):
  r = np.random.RandomState(seed)
  x = r.randn(B, d).astype(np.float32)
  proj = r.randn(B, proj_d or d).astype(np.float32)
  enc = r.randn(B, N, d).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  return x, proj, enc, mask


def _close(a, b, what):
  a, b = np.asarray(a), b.detach().numpy()
  assert a.shape == b.shape, (what, a.shape, b.shape)
  err = float(np.max(np.abs(a - b)))
  print(f"PARITY {what}: max abs diff {err:.2e}")
  assert err <= TOL, f"{what}: max abs diff {err}"


KARLO_LIKE = [
    dict(),  # plain Karlo / Kandinsky layout
    dict(norm_in_type="layer", embedding_proj_norm_type="layer", time_embed_dim=10, embedding_proj_dim=6,
         clip_embed_dim=7, time_embed_act_fn="gelu"),
]


@pytest.mark.parametrize("extra", KARLO_LIKE)
def test_karlo_layout_parity_and_export(tmp_path, extra):
  m = _perturb(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=2,
                                          embedding_dim=D, num_embeddings=N, additional_embeddings=4, **extra))
  m.save_pretrained(tmp_path / "pt", safe_serialization=True)
  x, proj, enc, mask = _inputs(proj_d=extra.get("embedding_proj_dim"))
  t = np.array([3, 250, 999])
  module, params, cfg = prior_io.load_prior(str(tmp_path / "pt"))
  assert cfg.use_timestep
  for use_mask in (True, False):
    with torch.no_grad():
      ref = m(torch.tensor(x), torch.tensor(t), torch.tensor(proj), torch.tensor(enc),
              attention_mask=torch.tensor(mask) if use_mask else None).predicted_image_embedding
    out = module.apply({"params": params}, x, proj, enc, mask if use_mask else None, timestep=t)
    _close(out, ref, f"prior output (mask={use_mask})")

  prior_io.save_prior(str(tmp_path / "ours"), params, cfg)
  back = diffusers.PriorTransformer.from_pretrained(tmp_path / "ours").eval()
  with torch.no_grad():
    ref2 = back(torch.tensor(x), torch.tensor(t), torch.tensor(proj), torch.tensor(enc),
                attention_mask=torch.tensor(mask)).predicted_image_embedding
    ref1 = m(torch.tensor(x), torch.tensor(t), torch.tensor(proj), torch.tensor(enc),
             attention_mask=torch.tensor(mask)).predicted_image_embedding
  assert float((ref2 - ref1).abs().max()) == 0.0


def test_shap_e_like_layout_parity(tmp_path):
  """No encoder projection, no prd token, 3-D hidden states, positional embedding padded with zeros."""
  m = _perturb(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=2,
                                          embedding_dim=D, num_embeddings=N, additional_embeddings=0,
                                          encoder_hid_proj_type=None, added_emb_type=None, norm_in_type="layer",
                                          clip_embed_dim=9), seed=3)
  m.save_pretrained(tmp_path, safe_serialization=True)
  r = np.random.RandomState(1)
  x = r.randn(B, N, D).astype(np.float32)
  proj = r.randn(B, D).astype(np.float32)
  t = np.array([1, 2, 3])
  with torch.no_grad():
    ref = m(torch.tensor(x), torch.tensor(t), torch.tensor(proj)).predicted_image_embedding
  module, params, cfg = prior_io.load_prior(str(tmp_path))
  out = module.apply({"params": params}, x, proj, None, None, timestep=t)
  _close(out, ref, "shap-e-like prior output")


def _eclipse_reference(m, x, proj, enc, mask):
  """ECLIPSE forward (no time token): [text, proj, noise, prd] + positions, causal + text mask, blocks, last."""
  heads = m.config.num_attention_heads
  proj = m.embedding_proj(proj)[:, None]
  enc = m.encoder_hidden_states_proj(enc)
  h = m.proj_in(x)[:, None]
  prd = m.prd_embedding.expand(x.shape[0], -1, -1)
  hs = torch.cat([enc, proj, h, prd], dim=1) + m.positional_embedding
  bias = (1 - mask.to(hs.dtype)) * -10000.0
  bias = torch.nn.functional.pad(bias, (0, m.additional_embeddings), value=0.0)
  bias = (bias[:, None, :] + m.causal_attention_mask).repeat_interleave(heads, dim=0)
  for block in m.transformer_blocks:
    hs = block(hs, attention_mask=bias)
  return m.proj_to_clip_embeddings(m.norm_out(hs)[:, -1])


def test_eclipse_variant_parity_and_export(tmp_path):
  from safetensors.torch import load_file, save_file
  m = _perturb(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=2,
                                          embedding_dim=D, num_embeddings=N, additional_embeddings=3), seed=5)
  d = tmp_path / "eclipse"
  m.save_pretrained(d, safe_serialization=True)
  wpath = os.path.join(d, "diffusion_pytorch_model.safetensors")
  sd = {k: v for k, v in load_file(wpath).items() if not k.startswith("time_embedding.")}
  save_file(sd, wpath, metadata={"format": "pt"})
  cfg_json = json.load(open(os.path.join(d, "config.json")))
  for k in ("time_embed_act_fn", "time_embed_dim"):
    cfg_json.pop(k, None)
  json.dump(cfg_json, open(os.path.join(d, "config.json"), "w"))

  x, proj, enc, mask = _inputs(seed=2)
  with torch.no_grad():
    ref = _eclipse_reference(m, torch.tensor(x), torch.tensor(proj), torch.tensor(enc), torch.tensor(mask))
  module, params, cfg = prior_io.load_prior(str(d))
  assert not cfg.use_timestep and cfg.additional_embeddings == 3
  out = module.apply({"params": params}, x, proj, enc, mask)
  _close(out, ref, "eclipse prior output")
  with pytest.raises(ValueError, match="no time embedding"):
    module.apply({"params": params}, x, proj, enc, mask, timestep=np.zeros(B))

  prior_io.save_prior(str(tmp_path / "ours"), params, cfg)
  saved = json.load(open(tmp_path / "ours" / "config.json"))
  assert saved["additional_embeddings"] == 3 and "time_embed_dim" not in saved
  fresh = diffusers.PriorTransformer(**{k: v for k, v in saved.items() if not k.startswith("_")}).eval()
  result = fresh.load_state_dict(load_file(tmp_path / "ours" / "diffusion_pytorch_model.safetensors"),
                                 strict=False)
  assert not result.unexpected_keys
  assert sorted(result.missing_keys) == sorted(k for k in fresh.state_dict() if k.startswith("time_embedding."))
  with torch.no_grad():
    ref2 = _eclipse_reference(fresh, torch.tensor(x), torch.tensor(proj), torch.tensor(enc), torch.tensor(mask))
  assert float((ref2 - ref).abs().max()) == 0.0


def test_partial_checkpoint_and_pickle(tmp_path):
  from safetensors.torch import load_file, save_file
  m = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=D,
                                 num_embeddings=N)
  m.save_pretrained(tmp_path / "p", safe_serialization=True)
  wpath = os.path.join(tmp_path / "p", "diffusion_pytorch_model.safetensors")
  sd = load_file(wpath)
  del sd["norm_out.weight"]
  sd["transformer_blocks.5.norm1.weight"] = torch.zeros(8)
  save_file(sd, wpath, metadata={"format": "pt"})
  with pytest.raises(io.CheckpointError) as e:
    prior_io.load_prior(str(tmp_path / "p"))
  assert "norm_out.weight" in str(e.value) and "transformer_blocks.5.norm1.weight" in str(e.value)

  m.save_pretrained(tmp_path / "b", safe_serialization=False)
  assert os.path.exists(tmp_path / "b" / "diffusion_pytorch_model.bin")
  with pytest.raises(io.CheckpointError, match="allow_pickle"):
    prior_io.load_prior(str(tmp_path / "b"))
  _, params, _ = prior_io.load_prior(str(tmp_path / "b"), allow_pickle=True)
  np.testing.assert_array_equal(np.asarray(params["norm_out"]["scale"]), m.norm_out.weight.detach().numpy())


def test_pipeline_subfolder(tmp_path):
  m = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=D,
                                 num_embeddings=N)
  m.save_pretrained(tmp_path / "prior", safe_serialization=True)
  _, _, cfg = prior_io.load_prior(str(tmp_path), subfolder="prior")
  assert cfg.num_layers == 1 and cfg.embedding_dim == D
  _, _, cfg2 = prior_io.load_prior(str(tmp_path))  # a pipeline directory: its prior/ folder is used
  assert cfg2 == cfg
  with pytest.raises(FileNotFoundError, match="subfolder"):
    prior_io.load_prior(str(tmp_path), subfolder="decoder")
