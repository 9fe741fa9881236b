"""Import/export of diffusers UNet2DConditionModel, AutoencoderKL and ControlNetModel directories.

A diffusers model directory holds `config.json` + `diffusion_pytorch_model.safetensors` (optionally sharded with
`diffusion_pytorch_model.safetensors.index.json`, or a `.fp16` variant); a pipeline directory holds one such
directory per component (`unet/`, `vae/`, `controlnet/`, ...). Pickle files (`.bin`) are refused unless
`allow_pickle=True`.

Name mapping (mechanical, because our module names mirror diffusers'): Flax path components `<name>_<i>` are
torch `<name>.<i>` (except `linear_1`/`linear_2` of the time embedding); leaves `kernel`/`scale`/`embedding` are
torch `weight`. Conv kernels are HWIO here and OIHW in torch; Linear kernels are (in, out) here and (out, in) in
torch. Old VAE checkpoints name the mid-block attention `query/key/value/proj_attn` (sometimes as 1x1 convs):
they are renamed to `to_q/to_k/to_v/to_out.0` on load. Every load checks names both ways (missing and unexpected
names are listed) and shapes.

    cfg, params = load_unet("stable-diffusion-v1-5")          # pipeline dir: uses its unet/ sub-folder
    vae_cfg, vae_params = load_vae("stable-diffusion-v1-5")
    save_unet("out/unet", cfg, params)                        # loads with diffusers' UNet2DConditionModel
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.controlnet import ControlNetConfig, abstract_controlnet_params
from diffusion_jax.models.unet import UNetConfig, abstract_unet_params
from diffusion_jax.models.vae import VAEConfig, abstract_vae_params
from diffusion_jax.pretrained.io import (CheckpointError, check_names, check_shape, flatten, load_weights_dir,
                                         read_json, save_state_dict, unflatten, write_json)
from diffusion_jax.registry import check_choice

WEIGHTS_STEM = "diffusion_pytorch_model"
_NO_SPLIT = {"linear_1", "linear_2"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# kind -> (config class, abstract-params builder, default sub-folder, accepted diffusers class names)
KINDS: Dict[str, Tuple[Any, Callable, str, Tuple[str, ...]]] = {
    "unet": (UNetConfig, abstract_unet_params, "unet", ("UNet2DConditionModel",)),
    "vae": (VAEConfig, abstract_vae_params, "vae", ("AutoencoderKL",)),
    "controlnet": (ControlNetConfig, abstract_controlnet_params, "controlnet",
                   ("ControlNetModel", "PromptDiffusionControlNetModel")),
}


def flax_to_torch_name(key: str) -> str:
  """'down_blocks_0/resnets_1/conv1/kernel' -> 'down_blocks.0.resnets.1.conv1.weight'."""
  parts = key.split("/")
  out = []
  for p in parts[:-1]:
    m = re.fullmatch(r"(.+)_(\d+)", p)
    out.append(f"{m.group(1)}.{m.group(2)}" if (m and p not in _NO_SPLIT) else p)
  leaf = parts[-1]
  out.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
  return ".".join(out)


def _to_torch_array(flax_leaf: str, x) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  if flax_leaf == "kernel":
    if x.ndim == 4:
      return np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    if x.ndim == 2:
      return np.ascontiguousarray(x.T)
  return x


def _from_torch_array(flax_leaf: str, x: np.ndarray, want_shape) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype.kind == "f" and x.dtype != np.float32:
    x = x.astype(np.float32)
  if flax_leaf == "kernel":
    if len(want_shape) == 4 and x.ndim == 4:
      x = x.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif len(want_shape) == 2:
      if x.ndim == 4 and x.shape[2:] == (1, 1):  # 1x1 conv stored for a Linear (old VAE attention)
        x = x[:, :, 0, 0]
      if x.ndim == 2:
        x = x.T
  return x


def normalize_legacy_names(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Renames old VAE attention weights (query/key/value/proj_attn) to the current diffusers names."""
  out = {}
  for k, v in state.items():
    parts = k.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_ATTN and "attentions" in parts:
      k = ".".join(parts[:-2] + [_LEGACY_ATTN[parts[-2]], parts[-1]])
    out[k] = v
  return out


def torch_state_to_params(state: Mapping[str, np.ndarray], abstract_params, what: str = "checkpoint"):
  """Converts a diffusers state dict to a Flax param tree shaped like `abstract_params` (checks names/shapes)."""
  state = normalize_legacy_names(state)
  flat = flatten(abstract_params)
  names = {flax_to_torch_name(k): k for k in flat}
  check_names(names.keys(), state.keys(), what)
  out = {}
  for tname, fkey in names.items():
    want = tuple(flat[fkey].shape)
    arr = _from_torch_array(fkey.split("/")[-1], state[tname], want)
    check_shape(tname, arr.shape, want)
    out[fkey] = jnp.asarray(arr, jnp.float32)
  return unflatten(out)


def params_to_torch_state(params) -> Dict[str, np.ndarray]:
  """Flax params -> diffusers state dict (float32 numpy)."""
  return {flax_to_torch_name(k): _to_torch_array(k.split("/")[-1], v) for k, v in flatten(params).items()}


def _resolve_dir(directory: str, subfolder: Optional[str], default_sub: str) -> str:
  if subfolder:
    directory = os.path.join(directory, subfolder)
  elif (not os.path.exists(os.path.join(directory, "config.json"))
        and os.path.exists(os.path.join(directory, default_sub, "config.json"))):
    directory = os.path.join(directory, default_sub)  # a pipeline directory
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Pretrained directory not found: {directory}.")
  return directory


def _load_weights(directory: str, variant: Optional[str], allow_pickle: bool) -> Dict[str, np.ndarray]:
  stem = WEIGHTS_STEM + (f".{variant}" if variant else "")
  return load_weights_dir(directory, stem, allow_pickle=allow_pickle)


def load_diffusers_model(directory: str, kind: str, *, subfolder: Optional[str] = None,
                         variant: Optional[str] = None, allow_pickle: bool = False):
  """Loads a diffusers model directory (or a pipeline's sub-folder) -> (config, params).

  kind: "unet" | "vae" | "controlnet". A pipeline directory is accepted: its `<kind>/` sub-folder is used."""
  check_choice("diffusers model kind", kind, KINDS)
  cfg_cls, abstract_fn, default_sub, class_names = KINDS[kind]
  directory = _resolve_dir(directory, subfolder, default_sub)
  raw = read_json(os.path.join(directory, "config.json"))
  cname = raw.get("_class_name")
  if cname is not None and cname not in class_names:
    raise CheckpointError(f"{directory}/config.json describes a {cname}, not a {' / '.join(class_names)}; "
                          f"point the {kind} loader at the right (sub-)folder.")
  config = cfg_cls.from_diffusers(raw)
  state = _load_weights(directory, variant, allow_pickle)
  params = torch_state_to_params(state, abstract_fn(config), f"{kind} checkpoint {directory}")
  return config, params


def save_diffusers_model(directory: str, config, params, *, class_name: Optional[str] = None) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors, loadable by the diffusers class."""
  cfg = config.to_diffusers()
  if class_name:
    cfg["_class_name"] = class_name
  os.makedirs(directory, exist_ok=True)
  write_json(cfg, os.path.join(directory, "config.json"))
  save_state_dict(params_to_torch_state(jax.device_get(params)),
                  os.path.join(directory, f"{WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})


def load_unet(directory: str, **kw) -> Tuple[UNetConfig, Any]:
  """diffusers UNet2DConditionModel dir (or pipeline dir) -> (UNetConfig, params)."""
  return load_diffusers_model(directory, "unet", **kw)


def load_vae(directory: str, **kw) -> Tuple[VAEConfig, Any]:
  """diffusers AutoencoderKL dir (or pipeline dir) -> (VAEConfig, params)."""
  return load_diffusers_model(directory, "vae", **kw)


def load_controlnet(directory: str, **kw) -> Tuple[ControlNetConfig, Any]:
  """diffusers ControlNetModel dir -> (ControlNetConfig, params)."""
  return load_diffusers_model(directory, "controlnet", **kw)


def save_unet(directory: str, config: UNetConfig, params) -> None:
  save_diffusers_model(directory, config, params)


def save_vae(directory: str, config: VAEConfig, params) -> None:
  save_diffusers_model(directory, config, params)


def save_controlnet(directory: str, config: ControlNetConfig, params) -> None:
  save_diffusers_model(directory, config, params)


def load_sd_components(pipeline_dir: str, components=("unet", "vae"), **kw) -> Dict[str, Tuple[Any, Any]]:
  """Loads several sub-folders of a Stable Diffusion pipeline: {"unet": (cfg, params), "vae": (cfg, params)}."""
  return {c: load_diffusers_model(pipeline_dir, c, subfolder=KINDS[c][2], **kw) for c in components}
