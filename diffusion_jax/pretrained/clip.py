"""Import / export of transformers CLIP checkpoints (`config.json` + `model.safetensors`).

Supported architectures: CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel,
CLIPVisionModelWithProjection, CLIPModel (and one tower out of a CLIPModel checkpoint). A directory may be a
model directory or a pipeline with a sub-folder (`subfolder="text_encoder"`).

Name mapping torch -> Flax (a fact of the two layouts): "." -> "/", `layers.N` -> `layers_N`; Linear `weight`
(out, in) -> `kernel` (in, out); LayerNorm `weight` -> `scale`; Embedding `weight` -> `embedding`; Conv2d
`weight` OIHW -> `kernel` HWIO. Non-persistent buffers (`*.position_ids`, written by old transformers) are ignored.
transformers >= 5 saves CLIPTextModel/CLIPVisionModel without the `text_model.`/`vision_model.` prefix; both
spellings load. Exports use the prefixed spelling, which every transformers version loads.

  module, params, cfg = load_clip("path/to/clip-vit-large-patch14", kind="text_with_projection")
  out = module.apply({"params": params}, ids)
  save_clip("out_dir", params, cfg, kind="text_with_projection")   # CLIPTextModelWithProjection.from_pretrained
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import clip as clip_lib
from diffusion_jax.pretrained import io
from diffusion_jax.registry import check_choice

KINDS = ("text", "text_with_projection", "vision", "vision_with_projection", "clip")
ARCHITECTURES = {
    "CLIPTextModel": "text", "CLIPTextModelWithProjection": "text_with_projection",
    "CLIPVisionModel": "vision", "CLIPVisionModelWithProjection": "vision_with_projection", "CLIPModel": "clip",
}
_ARCH_OF_KIND = {v: k for k, v in ARCHITECTURES.items()}
IGNORED_NAMES = ("*position_ids",)

# Flax module names that stand for a torch ModuleList / Sequential index ("layers_3" <-> "layers.3").
_LIST_CONTAINERS = ("layers", "transformer_blocks", "to_out", "net", "resnets", "attentions")
_LIST_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(_LIST_CONTAINERS))


# ----------------------------------------------------------------------------- generic torch <-> flax helpers

def flax_to_torch_name(path: str) -> str:
  """"text_model/encoder/layers_0/mlp/fc1/kernel" -> "text_model.encoder.layers.0.mlp.fc1.weight"."""
  parts = path.split("/")
  out = []
  for p in parts[:-1]:
    m = _LIST_RE.match(p)
    out.extend([m.group(1), m.group(2)] if m else [p])
  leaf = parts[-1]
  out.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
  return ".".join(out)


def _to_flax_value(flax_path: str, value: np.ndarray) -> np.ndarray:
  leaf = flax_path.rsplit("/", 1)[-1]
  if leaf == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:  # OIHW -> HWIO
      return value.transpose(2, 3, 1, 0)
  return value


def _to_torch_value(flax_path: str, value: np.ndarray) -> np.ndarray:
  leaf = flax_path.rsplit("/", 1)[-1]
  if leaf == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:  # HWIO -> OIHW
      return value.transpose(3, 2, 0, 1)
  return value


def torch_state_to_flax(state: Mapping[str, np.ndarray], abstract_params: Any, what: str,
                        ignore: Iterable[str] = IGNORED_NAMES) -> Dict[str, Any]:
  """Maps a torch state dict onto the Flax param tree whose shapes are `abstract_params` (e.g. from
  `jax.eval_shape`). Fails with the missing/unexpected torch names, or the first shape mismatch."""
  flat = io.flatten(abstract_params)
  by_torch = {flax_to_torch_name(k): k for k in flat}
  ignore = tuple(ignore)
  names = [k for k in state if not any(fnmatch.fnmatch(k, pat) for pat in ignore)]
  io.check_names(by_torch, names, what)
  out = {}
  for tname, fpath in by_torch.items():
    v = _to_flax_value(fpath, np.asarray(state[tname]))
    want = tuple(flat[fpath].shape)
    if v.shape != want and v.size == 1 and int(np.prod(want)) == 1:
      v = v.reshape(want)  # a scalar saved as shape (1,) or (): e.g. logit_scale. Nothing else is reshaped.
    io.check_shape(tname, v.shape, want)
    out[fpath] = np.asarray(v, dtype=np.float32) if v.dtype.kind == "f" else v
  return io.unflatten(out)


def flax_to_torch_state(params: Any) -> Dict[str, np.ndarray]:
  """The inverse of `torch_state_to_flax`: Flax params -> torch-named numpy arrays."""
  return {flax_to_torch_name(k): np.asarray(_to_torch_value(k, np.asarray(jax.device_get(v))), np.float32)
          for k, v in io.flatten(params).items()}


def load_weights(directory: str, stem: str, *, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
  """`io.load_weights_dir`, plus transformers' legacy `pytorch_model.bin` name (only with `allow_pickle`)."""
  legacy = os.path.join(directory, "pytorch_model.bin")
  if (stem == "model" and not os.path.exists(os.path.join(directory, "model.safetensors"))
      and not os.path.exists(os.path.join(directory, "model.safetensors.index.json")) and os.path.exists(legacy)):
    return io.load_state_dict(legacy, allow_pickle=allow_pickle)
  return io.load_weights_dir(directory, stem, allow_pickle=allow_pickle)


def _resolve(path: str, subfolder: Optional[str]) -> str:
  d = os.path.join(path, subfolder) if subfolder else path
  if not os.path.isdir(d):
    raise FileNotFoundError(f"Pretrained directory not found: {d}. Point it at a transformers/diffusers model "
                            "directory (with config.json), optionally with subfolder=.")
  return d


# ----------------------------------------------------------------------------- configs

_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, projection_dim=512, eos_token_id=49407)  # transformers' defaults
_VISION_DEFAULTS = dict(image_size=224, patch_size=32, num_channels=3, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                        projection_dim=512)


def text_config_from_dict(d: Mapping[str, Any]) -> clip_lib.CLIPTextConfig:
  vals = {k: d.get(k, v) for k, v in _TEXT_DEFAULTS.items()}
  if vals["eos_token_id"] is None:
    vals["eos_token_id"] = 49407
  return clip_lib.CLIPTextConfig(**vals)


def vision_config_from_dict(d: Mapping[str, Any]) -> clip_lib.CLIPVisionConfig:
  return clip_lib.CLIPVisionConfig(**{k: d.get(k, v) for k, v in _VISION_DEFAULTS.items()})


def clip_config_from_dict(d: Mapping[str, Any]) -> clip_lib.CLIPConfig:
  proj = d.get("projection_dim", 512)
  text = dataclasses.replace(text_config_from_dict(d.get("text_config") or {}), projection_dim=proj)
  vision = dataclasses.replace(vision_config_from_dict(d.get("vision_config") or {}), projection_dim=proj)
  return clip_lib.CLIPConfig(text=text, vision=vision, projection_dim=proj,
                             logit_scale_init_value=d.get("logit_scale_init_value", 2.6592))


def text_config_to_dict(c: clip_lib.CLIPTextConfig) -> Dict[str, Any]:
  d = dataclasses.asdict(c)
  d.update(model_type="clip_text_model", bos_token_id=clip_lib.BOS_TOKEN_ID, pad_token_id=1,
           attention_dropout=0.0, initializer_factor=1.0, initializer_range=0.02)
  return d


def vision_config_to_dict(c: clip_lib.CLIPVisionConfig) -> Dict[str, Any]:
  d = dataclasses.asdict(c)
  d.update(model_type="clip_vision_model", attention_dropout=0.0, initializer_factor=1.0, initializer_range=0.02)
  return d


# ----------------------------------------------------------------------------- modules

ConfigT = Union[clip_lib.CLIPConfig, clip_lib.CLIPTextConfig, clip_lib.CLIPVisionConfig]


def build_module(kind: str, config: ConfigT, dtype: Any = jnp.float32, remat: bool = False):
  check_choice("CLIP kind", kind, KINDS)
  if kind == "clip":
    return clip_lib.CLIPModel(config, dtype=dtype, remat=remat)
  if kind.startswith("text"):
    return clip_lib.CLIPTextModel(config, with_projection=kind.endswith("projection"), dtype=dtype, remat=remat)
  return clip_lib.CLIPVisionModel(config, with_projection=kind.endswith("projection"), dtype=dtype, remat=remat)


def abstract_params_for(kind: str, config: ConfigT) -> Any:
  module = build_module(kind, config)
  ids = jax.ShapeDtypeStruct((1, config.text.max_position_embeddings if kind == "clip"
                              else getattr(config, "max_position_embeddings", 1)), jnp.int32)
  vc = config.vision if kind == "clip" else config
  px = jax.ShapeDtypeStruct((1, getattr(vc, "image_size", 1), getattr(vc, "image_size", 1),
                             getattr(vc, "num_channels", 1)), jnp.float32)
  if kind == "clip":
    return clip_lib.abstract_params(module, ids, px)
  return clip_lib.abstract_params(module, ids if kind.startswith("text") else px)


def _normalise_names(state: Mapping[str, Any], kind: str) -> Dict[str, Any]:
  """Adds the `text_model.`/`vision_model.` prefix that transformers >= 5 omits for the bare towers."""
  text_roots = ("embeddings.", "encoder.", "final_layer_norm.")
  vision_roots = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
  out = {}
  for k, v in state.items():
    if kind.startswith("text") and k.startswith(text_roots):
      k = "text_model." + k
    elif kind.startswith("vision") and k.startswith(vision_roots):
      k = "vision_model." + k
    out[k] = v
  return out


def load_clip(path: str, *, kind: Optional[str] = None, subfolder: Optional[str] = None,
              allow_pickle: bool = False, dtype: Any = jnp.float32,
              remat: bool = False) -> Tuple[Any, Dict[str, Any], ConfigT]:
  """Loads a transformers CLIP directory. Returns (flax module, params, our config).

  kind: one of KINDS; default = the checkpoint's architecture. A tower kind on a CLIPModel checkpoint loads that
  tower (+ its projection) only.
  """
  d = _resolve(path, subfolder)
  cfg_json = io.read_json(os.path.join(d, "config.json"))
  arch = (cfg_json.get("architectures") or [None])[0]
  is_full = "text_config" in cfg_json or "vision_config" in cfg_json or cfg_json.get("model_type") == "clip"
  if kind is None:
    if arch in ARCHITECTURES:
      kind = ARCHITECTURES[arch]
    elif is_full:
      kind = "clip"
    else:
      mt = cfg_json.get("model_type", "")
      kind = "vision" if "vision" in mt else "text"
  check_choice("CLIP kind", kind, KINDS)
  if is_full:
    full = clip_config_from_dict(cfg_json)
    config = {"clip": full}.get(kind) or (full.text if kind.startswith("text") else full.vision)
  elif kind == "clip":
    raise io.CheckpointError(f"{d} holds a single CLIP tower ({arch}); load it with kind='text...' or "
                             "'vision...', not 'clip'.")
  elif kind.startswith("text"):
    config = text_config_from_dict(cfg_json)
  else:
    if "patch_size" not in cfg_json and cfg_json.get("model_type") == "clip_text_model":
      raise io.CheckpointError(f"{d} is a CLIP text model; use kind='text' or 'text_with_projection'.")
    config = vision_config_from_dict(cfg_json)

  state = load_weights(d, "model", allow_pickle=allow_pickle)
  state = _normalise_names(state, kind)
  own_kind = ARCHITECTURES.get(arch, "clip" if is_full else kind)
  if own_kind != kind:  # one tower (and its projection, if asked for) out of a bigger checkpoint
    keep = ("text_model.", "text_projection.") if kind.startswith("text") else ("vision_model.", "visual_projection.")
    if not kind.endswith("projection"):
      keep = keep[:1]
    state = {k: v for k, v in state.items() if k.startswith(keep)}
  abstract = abstract_params_for(kind, config)
  params = torch_state_to_flax(state, abstract, f"CLIP checkpoint {d} (kind={kind})")
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return build_module(kind, config, dtype, remat), params, config


def save_clip(directory: str, params: Mapping[str, Any], config: ConfigT, kind: str) -> None:
  """Writes config.json + model.safetensors loadable by the transformers class of `kind` (+ the image
  processor's preprocessor_config.json for a model with a vision tower)."""
  check_choice("CLIP kind", kind, KINDS)
  if kind == "clip":
    cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.projection_dim,
           "logit_scale_init_value": config.logit_scale_init_value,
           "text_config": text_config_to_dict(config.text), "vision_config": vision_config_to_dict(config.vision)}
  elif kind.startswith("text"):
    cfg = text_config_to_dict(config)
  else:
    cfg = vision_config_to_dict(config)
  cfg["architectures"] = [_ARCH_OF_KIND[kind]]
  cfg["torch_dtype"] = "float32"
  # Check the tree against the architecture before writing anything.
  flat_expected = {flax_to_torch_name(k) for k in io.flatten(abstract_params_for(kind, config))}
  state = flax_to_torch_state(params)
  io.check_names(flat_expected, state, f"Params for {_ARCH_OF_KIND[kind]}")
  os.makedirs(directory, exist_ok=True)
  io.save_state_dict(state, os.path.join(directory, "model.safetensors"))
  io.write_json(cfg, os.path.join(directory, "config.json"))
  if kind in ("clip", "vision", "vision_with_projection"):
    vision = config.vision if kind == "clip" else config
    write_preprocessor_config(directory, int(vision.image_size))


# The image preprocessing of `data.clip_cache.preprocess_images` (shorter side resized with PIL bicubic, centre
# crop, [0, 1], CLIP mean / std), as transformers' CLIPImageProcessor reads it.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def write_preprocessor_config(directory: str, image_size: int) -> str:
  """Writes `preprocessor_config.json` (a CLIPImageProcessor for `image_size` px inputs), so that
  `transformers.CLIPProcessor.from_pretrained(directory)` (with the tokenizer files) works."""
  path = os.path.join(directory, "preprocessor_config.json")
  io.write_json({"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
                 "do_resize": True, "size": {"shortest_edge": int(image_size)}, "resample": 3,
                 "do_center_crop": True, "crop_size": {"height": int(image_size), "width": int(image_size)},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(CLIP_IMAGE_MEAN), "image_std": list(CLIP_IMAGE_STD), "do_convert_rgb": True},
                path)
  return path
