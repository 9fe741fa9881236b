"""Import / export of diffusers `PriorTransformer` checkpoints (`config.json` +
`diffusion_pytorch_model.safetensors`, or the `prior/` sub-folder of a Karlo / Kandinsky pipeline) and of the
ECLIPSE prior (same layout without `time_embedding.*`; `additional_embeddings` 3).

Whether the checkpoint has a time embedding is read from its weights (`time_embedding.linear_1.weight`), so the
ECLIPSE release (whose config has no marker for it) loads without flags. Names map as in
`diffusion_jax.pretrained.clip` ("." -> "/", `transformer_blocks.N` -> `transformer_blocks_N`, Linear weights
transposed, LayerNorm weight -> scale).

  module, params, cfg = load_prior("path/to/karlo-v1-alpha", subfolder="prior")
  emb = module.apply({"params": params}, x_t, text_emb, text_hidden, text_mask, timestep=t)
  save_prior("out_dir", params, cfg)   # diffusers PriorTransformer.from_pretrained("out_dir")

An exported ECLIPSE prior (use_timestep=False) has the ECLIPSE layout: diffusers' own `PriorTransformer` class
always builds a time embedding and so cannot run it as-is; the ECLIPSE inference code's class loads it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from diffusion_jax.models import prior as prior_lib
from diffusion_jax.models.clip import count_params  # noqa: F401  (re-exported for scripts)
from diffusion_jax.pretrained import io
from diffusion_jax.pretrained.clip import (_resolve, flax_to_torch_name, flax_to_torch_state, load_weights,
                                           torch_state_to_flax)

WEIGHTS_STEM = "diffusion_pytorch_model"
_FIELDS = [f.name for f in dataclasses.fields(prior_lib.PriorConfig) if f.name != "use_timestep"]


def prior_config_from_dict(d: Mapping[str, Any], use_timestep: bool) -> prior_lib.PriorConfig:
  defaults = prior_lib.PriorConfig()
  vals = {k: d.get(k, getattr(defaults, k)) for k in _FIELDS}
  if not use_timestep and "additional_embeddings" not in d:
    vals["additional_embeddings"] = 3  # ECLIPSE default
  return prior_lib.PriorConfig(**vals, use_timestep=use_timestep).validate()


def prior_config_to_dict(c: prior_lib.PriorConfig) -> Dict[str, Any]:
  d = {k: getattr(c, k) for k in _FIELDS}
  if not c.use_timestep:  # the ECLIPSE class has no time arguments
    d.pop("time_embed_act_fn")
    d.pop("time_embed_dim")
  d["_class_name"] = "PriorTransformer"
  return d


def abstract_prior_params(config: prior_lib.PriorConfig) -> Any:
  c = config
  d = c.embedding_dim
  module = prior_lib.PriorTransformer(c)
  x = jax.ShapeDtypeStruct((1, d), jnp.float32)
  proj = jax.ShapeDtypeStruct((1, c.embedding_proj_dim or d), jnp.float32)
  enc = jax.ShapeDtypeStruct((1, c.num_embeddings, d), jnp.float32) if c.encoder_hid_proj_type else None
  if enc is None:  # e.g. Shap-E style priors: the input itself carries num_embeddings tokens
    x = jax.ShapeDtypeStruct((1, c.num_embeddings, d), jnp.float32)
  t = jnp.zeros((1,), jnp.int32) if c.use_timestep else None

  def init(x, proj, enc):
    return module.init(jax.random.PRNGKey(0), x, proj, enc, None, t)

  return jax.eval_shape(init, x, proj, enc)["params"]


def load_prior(path: str, *, subfolder: Optional[str] = None, allow_pickle: bool = False,
               dtype: Any = jnp.float32, remat: bool = False) -> Tuple[Any, Dict[str, Any], prior_lib.PriorConfig]:
  """Loads a diffusers/ECLIPSE prior directory. Returns (flax PriorTransformer, params, PriorConfig)."""
  d = _resolve(path, subfolder)
  if subfolder is None and not os.path.exists(os.path.join(d, "config.json")) and \
      os.path.isdir(os.path.join(d, "prior")):
    d = os.path.join(d, "prior")  # a Karlo / Kandinsky pipeline directory
  cfg_json = io.read_json(os.path.join(d, "config.json"))
  cls = cfg_json.get("_class_name", "PriorTransformer")
  if cls != "PriorTransformer":
    raise io.CheckpointError(f"{d} holds a {cls}, not a PriorTransformer; point at the prior's folder "
                             "(e.g. subfolder='prior').")
  state = load_weights(d, WEIGHTS_STEM, allow_pickle=allow_pickle)
  use_timestep = "time_embedding.linear_1.weight" in state
  config = prior_config_from_dict(cfg_json, use_timestep)
  params = torch_state_to_flax(state, abstract_prior_params(config), f"Prior checkpoint {d}")
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return prior_lib.PriorTransformer(config, dtype=dtype, remat=remat), params, config


def save_prior(directory: str, params: Mapping[str, Any], config: prior_lib.PriorConfig) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors in the diffusers layout."""
  expected = {flax_to_torch_name(k) for k in io.flatten(abstract_prior_params(config))}
  state = flax_to_torch_state(params)
  io.check_names(expected, state, "Prior params")
  os.makedirs(directory, exist_ok=True)
  io.save_state_dict(state, os.path.join(directory, f"{WEIGHTS_STEM}.safetensors"))
  io.write_json(prior_config_to_dict(config), os.path.join(directory, "config.json"))
