"""Parity of the Flax CLIP against transformers (PyTorch, CPU) on tiny random models saved with
`save_pretrained(safe_serialization=True)`, plus export round trips and checkpoint errors."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from diffusion_jax.pretrained import clip as clip_io  # noqa: E402
from diffusion_jax.pretrained import io  # noqa: E402

TOL = 1e-4
VOCAB = 99


def _perturb(model, seed=0):
  """Random weights everywhere (LayerNorm scales/biases too) so that every parameter matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


def _text_cfg(act="quick_gelu", eos=2):
  return transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=12, projection_dim=16, hidden_act=act, eos_token_id=eos, bos_token_id=97,
      pad_token_id=1)


def _vision_cfg(act="quick_gelu"):
  return transformers.CLIPVisionConfig(
      image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, projection_dim=16, hidden_act=act)


def _ids_and_mask():
  """Token ids with BOS=97, EOS=98 (the largest id) and padding; one row holds ids 60-90 after its first 50."""
  ids = np.array([
      [97, 10, 20, 30, 98, 1, 1, 1, 1, 1, 1, 1],
      [97, 5, 50, 70, 90, 60, 50, 98, 1, 1, 1, 1],
      [97, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 98],
  ])
  mask = (np.arange(12)[None] <= np.argmax(ids == 98, axis=1)[:, None]).astype(np.int64)
  return ids, mask


def _close(a, b, what):
  a, b = np.asarray(a), np.asarray(b.detach().numpy() if hasattr(b, "detach") else b)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  err = float(np.max(np.abs(a - b)))
  print(f"PARITY {what}: max abs diff {err:.2e}")
  assert err <= TOL, f"{what}: max abs diff {err}"
  return err


@pytest.mark.parametrize("act,eos,with_proj", [("quick_gelu", 2, True), ("gelu", 50, False)])
def test_text_model_parity_and_export(tmp_path, act, eos, with_proj):
  cls = transformers.CLIPTextModelWithProjection if with_proj else transformers.CLIPTextModel
  tm = _perturb(cls(_text_cfg(act, eos)))
  tm.save_pretrained(tmp_path / "pt", safe_serialization=True)
  ids, mask = _ids_and_mask()
  with torch.no_grad():
    ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
  module, params, cfg = clip_io.load_clip(str(tmp_path / "pt"))
  assert cfg.eos_token_id == eos and cfg.hidden_act == act
  out = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  _close(out["last_hidden_state"], ref.last_hidden_state, "last_hidden_state")
  assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
  for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
    _close(a, b, f"hidden_states[{i}]")
  if with_proj:
    _close(out["text_embeds"], ref.text_embeds, "text_embeds")
  else:
    _close(out["pooler_output"], ref.pooler_output, "pooler_output")
  # The two EOS conventions pool different tokens for row 1 (ids 60-90 follow the first 50).
  pos = np.argmax(ids, 1) if eos == 2 else np.argmax(ids == eos, 1)
  _close(out["pooler_output"], out["last_hidden_state"][np.arange(3), pos], "pooled position")

  clip_io.save_clip(str(tmp_path / "ours"), params, cfg, kind="text_with_projection" if with_proj else "text")
  back = cls.from_pretrained(tmp_path / "ours").eval()
  with torch.no_grad():
    ref2 = back(torch.tensor(ids), attention_mask=torch.tensor(mask))
  assert float((ref2.last_hidden_state - ref.last_hidden_state).abs().max()) == 0.0
  if with_proj:
    assert float((ref2.text_embeds - ref.text_embeds).abs().max()) == 0.0


@pytest.mark.parametrize("with_proj", [True, False])
def test_vision_model_parity_and_export(tmp_path, with_proj):
  cls = transformers.CLIPVisionModelWithProjection if with_proj else transformers.CLIPVisionModel
  act = "quick_gelu" if with_proj else "gelu"
  vm = _perturb(cls(_vision_cfg(act)), seed=1)
  vm.save_pretrained(tmp_path / "pt", safe_serialization=True)
  px = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
  with torch.no_grad():
    ref = vm(torch.tensor(px), output_hidden_states=True)
  module, params, cfg = clip_io.load_clip(str(tmp_path / "pt"))
  out = module.apply({"params": params}, jnp.asarray(px.transpose(0, 2, 3, 1)))
  _close(out["last_hidden_state"], ref.last_hidden_state, "last_hidden_state")
  for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
    _close(a, b, f"hidden_states[{i}]")
  assert len(out["hidden_states"]) == len(ref.hidden_states)
  if with_proj:
    _close(out["image_embeds"], ref.image_embeds, "image_embeds")
  else:
    _close(out["pooler_output"], ref.pooler_output, "pooler_output")
  clip_io.save_clip(str(tmp_path / "ours"), params, cfg, kind="vision_with_projection" if with_proj else "vision")
  back = cls.from_pretrained(tmp_path / "ours").eval()
  with torch.no_grad():
    ref2 = back(torch.tensor(px))
  assert float((ref2.last_hidden_state - ref.last_hidden_state).abs().max()) == 0.0


def test_clip_model_parity_towers_and_export(tmp_path):
  cfg = transformers.CLIPConfig(text_config=_text_cfg().to_dict(), vision_config=_vision_cfg().to_dict(),
                                projection_dim=16)
  m = _perturb(transformers.CLIPModel(cfg), seed=2)
  m.save_pretrained(tmp_path / "pt", safe_serialization=True)
  ids, mask = _ids_and_mask()
  px = np.random.RandomState(1).randn(3, 3, 16, 16).astype(np.float32)
  with torch.no_grad():
    ref = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px),
            output_hidden_states=True)
    ref_text = m.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output
  module, params, ours_cfg = clip_io.load_clip(str(tmp_path / "pt"))
  px_nhwc = jnp.asarray(px.transpose(0, 2, 3, 1))
  out = module.apply({"params": params}, jnp.asarray(ids), px_nhwc, jnp.asarray(mask))
  for k in ("logits_per_text", "logits_per_image", "text_embeds", "image_embeds"):
    _close(out[k], getattr(ref, k), k)
  for i, (a, b) in enumerate(zip(out["text_model_output"]["hidden_states"], ref.text_model_output.hidden_states)):
    _close(a, b, f"text hidden_states[{i}]")
  for i, (a, b) in enumerate(zip(out["vision_model_output"]["hidden_states"],
                                 ref.vision_model_output.hidden_states)):
    _close(a, b, f"vision hidden_states[{i}]")
  feats = module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                       method=type(module).get_text_features)
  _close(feats, ref_text, "get_text_features")

  # One tower out of the full checkpoint.
  tmod, tparams, _ = clip_io.load_clip(str(tmp_path / "pt"), kind="text_with_projection")
  _close(tmod.apply({"params": tparams}, jnp.asarray(ids), jnp.asarray(mask))["text_embeds"], ref_text,
         "text tower from CLIPModel")

  clip_io.save_clip(str(tmp_path / "ours"), params, ours_cfg, kind="clip")
  back = transformers.CLIPModel.from_pretrained(tmp_path / "ours").eval()
  with torch.no_grad():
    ref2 = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px))
  assert float((ref2.logits_per_text - ref.logits_per_text).abs().max()) == 0.0


def test_wrong_or_partial_checkpoint_lists_names(tmp_path):
  from safetensors.torch import load_file, save_file
  tm = transformers.CLIPTextModelWithProjection(_text_cfg())
  tm.save_pretrained(tmp_path, safe_serialization=True)
  path = os.path.join(tmp_path, "model.safetensors")
  sd = load_file(path)
  del sd["text_model.final_layer_norm.weight"]
  sd["text_model.extra_head.weight"] = torch.zeros(2)
  save_file(sd, path, metadata={"format": "pt"})
  with pytest.raises(io.CheckpointError) as e:
    clip_io.load_clip(str(tmp_path))
  msg = str(e.value)
  assert "text_model.final_layer_norm.weight" in msg and "text_model.extra_head.weight" in msg
  # A vision checkpoint loaded as a text model fails the same way.
  vm = transformers.CLIPVisionModel(_vision_cfg())
  vm.save_pretrained(tmp_path / "v", safe_serialization=True)
  with pytest.raises(io.CheckpointError, match="missing"):
    clip_io.load_clip(str(tmp_path / "v"), kind="text")


def test_pickle_refused_without_flag(tmp_path):
  tm = _perturb(transformers.CLIPTextModel(_text_cfg()))
  tm.config.save_pretrained(tmp_path)
  torch.save(tm.state_dict(), os.path.join(tmp_path, "pytorch_model.bin"))
  with pytest.raises(io.CheckpointError, match="allow_pickle"):
    clip_io.load_clip(str(tmp_path))
  module, params, _ = clip_io.load_clip(str(tmp_path), allow_pickle=True)
  ids, mask = _ids_and_mask()
  with torch.no_grad():
    ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask))
  _close(module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))["pooler_output"],
         ref.pooler_output, "pooler_output (pickle)")


def test_pipeline_text_encoder_subfolder(tmp_path):
  tm = _perturb(transformers.CLIPTextModelWithProjection(_text_cfg()), seed=4)
  tm.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
  module, params, cfg = clip_io.load_clip(str(tmp_path), subfolder="text_encoder")
  assert cfg.projection_dim == 16 and module.with_projection
  with pytest.raises(ValueError, match="Valid CLIP kind"):
    clip_io.load_clip(str(tmp_path), subfolder="text_encoder", kind="txt")
