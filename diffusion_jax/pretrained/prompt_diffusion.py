"""Import of Prompt Diffusion ControlNets in diffusers' `PromptDiffusionControlNetModel` layout
(diffusers `examples/research_projects/promptdiffusion`, the converted release `zhendongw/prompt-diffusion`).

That class is diffusers' `ControlNetModel` with `conditioning_channels=6` (the example pair, source then target)
plus `controlnet_query_cond_embedding`, a second `ControlNetConditioningEmbedding` with 3 input channels (the
query) that its config.json does not describe (the class hard-codes 3 channels). Names otherwise follow
`ControlNetModel`, so the mechanical mapping of `diffusers_io` applies:
`controlnet_query_cond_embedding.blocks.0.weight` <-> `controlnet_query_cond_embedding/blocks_0/kernel` (OIHW ->
HWIO), etc.; both embeddings are summed with conv_in(sample) (`models/controlnet.py`).

Hint range: the original code trains and samples with hints in [-1, 1] (B2 of the facts); the diffusers port's
pipeline preprocesses the control images with `do_normalize=False`, i.e. feeds [0, 1]. The weights are the
released training's, so they expect [-1, 1]: this project feeds [-1, 1] (`experiments/prompt_diffusion.hint`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Tuple

from diffusion_jax.models.controlnet import ControlNetConfig, abstract_controlnet_params
from diffusion_jax.pretrained import diffusers_io
from diffusion_jax.pretrained.io import CheckpointError, read_json

CLASS_NAME = "PromptDiffusionControlNetModel"
QUERY_CHANNELS = 3
HINT_RANGE = (-1.0, 1.0)


def prompt_diffusion_config(raw: dict) -> ControlNetConfig:
  """A PromptDiffusionControlNetModel config.json dict -> ControlNetConfig with the query embedding."""
  cname = raw.get("_class_name")
  if cname not in (None, CLASS_NAME, "ControlNetModel"):
    raise CheckpointError(f"config.json describes a {cname}, not a {CLASS_NAME}.")
  cfg = ControlNetConfig.from_diffusers(raw)
  q = raw.get("query_conditioning_channels", QUERY_CHANNELS)
  return dataclasses.replace(cfg, query_conditioning_channels=int(q))


def load_prompt_diffusion_controlnet(directory: str, *, subfolder: Optional[str] = None,
                                     variant: Optional[str] = None, allow_pickle: bool = False
                                     ) -> Tuple[ControlNetConfig, Any]:
  """A PromptDiffusionControlNetModel directory (config.json + diffusion_pytorch_model.safetensors, or a pipeline
  directory with controlnet/) -> (ControlNetConfig, Flax params). Names and shapes are checked both ways."""
  d = os.path.join(directory, subfolder) if subfolder else directory
  if not os.path.exists(os.path.join(d, "config.json")) and os.path.exists(os.path.join(d, "controlnet",
                                                                                          "config.json")):
    d = os.path.join(d, "controlnet")
  if not os.path.isdir(d):
    raise FileNotFoundError(f"Prompt Diffusion ControlNet directory not found: {d}.")
  cfg = prompt_diffusion_config(read_json(os.path.join(d, "config.json")))
  state = diffusers_io._load_weights(d, variant, allow_pickle)
  if not any(k.startswith("controlnet_query_cond_embedding.") for k in state):
    raise CheckpointError(f"{d} has no controlnet_query_cond_embedding.* weights: it is a plain ControlNet, not a "
                          f"{CLASS_NAME}.")
  params = diffusers_io.torch_state_to_params(state, abstract_controlnet_params(cfg),
                                              f"Prompt Diffusion ControlNet {d}")
  return cfg, params


def save_prompt_diffusion_controlnet(directory: str, config: ControlNetConfig, params) -> None:
  """Writes the PromptDiffusionControlNetModel layout (config.json without the query key, as diffusers' class)."""
  if config.query_conditioning_channels != QUERY_CHANNELS:
    raise ValueError(f"{CLASS_NAME} has a {QUERY_CHANNELS}-channel query embedding; this config has "
                     f"query_conditioning_channels={config.query_conditioning_channels}.")
  from diffusion_jax.pretrained.io import save_state_dict, write_json
  import jax
  cfg = config.to_diffusers()
  cfg.pop("query_conditioning_channels", None)
  cfg["_class_name"] = CLASS_NAME
  os.makedirs(directory, exist_ok=True)
  write_json(cfg, os.path.join(directory, "config.json"))
  save_state_dict(diffusers_io.params_to_torch_state(jax.device_get(params)),
                  os.path.join(directory, f"{diffusers_io.WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})
