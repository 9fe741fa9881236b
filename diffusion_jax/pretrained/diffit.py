"""Import / export of the released latent DiffiT checkpoints (NVlabs/DiffiT `diffit/diffit.py` layout).

The released ImageNet-256/512 weights (`diffit_256.safetensors`, `diffit_512.safetensors`) are PyTorch state
dicts of the `DiffiT` module. Name mapping (PyTorch -> ours, `DiffiTLatent` params):

  x_embedder.proj.weight [D, C, p, p]          -> x_embedder/kernel [p, p, C, D]
  x_embedder.proj.bias                          -> x_embedder/bias
  t_embedder.mlp.{0,2}.{weight,bias}            -> t_embedder/mlp_{0,2}/{kernel (transposed), bias}
  y_embedder.embedding_table.weight [K+1, D]    -> y_embedder/embedding_table (last row = null class)
  blocks.N.attn.qkv / qkv_temb / proj           -> blocks_N/attn/qkv / qkv_temb / proj (Linear -> Dense)
  blocks.N.attn.relative_position_bias_table    -> blocks_N/attn/relative_position_bias_table
  blocks.N.mlp.fc1 / fc2                        -> blocks_N/mlp/fc1 / fc2
  final_layer.linear                            -> final_layer/linear
  pos_embed [1, N, D], blocks.N.attn.relative_position_index
                                                -> not parameters here (fixed sin-cos table, static index);
                                                   checked against ours when present.

The model hyper-parameters (width, depth, heads, patch, window/input size, classes, learned sigma) are read
off the checkpoint's shapes (`infer_config`). Names are checked both ways (missing / unexpected listed).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import jax
import numpy as np

from diffusion_jax.models.diffit import DiffiTLatent, relative_position_index
from diffusion_jax.models.layers import get_2d_sincos_pos_embed
from diffusion_jax.pretrained import io

BUFFERS = ("pos_embed", "relative_position_index")


def _torch_name(flax_path: str) -> str:
  parts = flax_path.split("/")
  leaf = parts[-1]
  mods = []
  for p in parts[:-1]:
    m = re.fullmatch(r"(blocks|mlp)_(\d+)", p)
    if m:
      mods += [m.group(1), m.group(2)]
    else:
      mods.append(p)
  if mods == ["x_embedder"]:
    mods = ["x_embedder", "proj"]
  if leaf == "relative_position_bias_table":
    return ".".join(mods + [leaf])
  leaf = {"kernel": "weight", "bias": "bias", "embedding_table": "weight"}[leaf]
  if mods[-1:] == ["y_embedder"]:
    mods = mods + ["embedding_table"]
  return ".".join(mods + [leaf])


def _to_torch(flax_path: str, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if flax_path.endswith("kernel"):
    return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
  return x


def _from_torch(flax_path: str, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if flax_path.endswith("kernel"):
    return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T
  return x


def infer_config(state: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """DiffiTLatent keyword arguments from a released-layout state dict's shapes."""
  try:
    w = np.shape(state["x_embedder.proj.weight"])
    table = np.shape(state["blocks.0.attn.relative_position_bias_table"])
    fc1 = np.shape(state["blocks.0.mlp.fc1.weight"])
    emb = np.shape(state["y_embedder.embedding_table.weight"])
    out = np.shape(state["final_layer.linear.weight"])
  except KeyError as e:
    raise io.CheckpointError(f"Not a DiffiT (NVlabs layout) checkpoint: no {e.args[0]!r}.") from None
  hidden, cin, p = w[0], w[1], w[2]
  window = (int(round(np.sqrt(table[0]))) + 1) // 2
  depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
  out_ch = out[0] // (p * p)
  if out_ch not in (cin, 2 * cin):
    raise io.CheckpointError(f"final_layer.linear maps to {out[0]} = p^2 x {out_ch} channels; expected "
                             f"{cin} or {2 * cin} for {cin} input channels.")
  return dict(input_size=window * p, patch_size=p, in_channels=cin, hidden_size=hidden, depth=depth,
              num_heads=table[1], mlp_ratio=fc1[0] / hidden, num_classes=emb[0] - 1, learn_sigma=out_ch == 2 * cin)


def abstract_params(model: DiffiTLatent):
  s = model.input_size
  x = jax.ShapeDtypeStruct((1, s, s, model.in_channels), np.float32)
  t = jax.ShapeDtypeStruct((1,), np.float32)
  y = jax.ShapeDtypeStruct((1,), np.int32)
  return jax.eval_shape(lambda x, t, y: model.init(jax.random.key(0), x, t, y), x, t, y)["params"]


def _scanned(model) -> bool:
  return bool(getattr(model, "scan_blocks", False))


def to_per_block(params, model):
  """Params of `model` in the per-block layout (`blocks_0 ... blocks_{depth-1}`) that checkpoints and exports
  use: a `scan_blocks=True` model's stacked `blocks/block` subtree is split; other params are returned as is."""
  if _scanned(model) and "blocks" in params:
    from diffusion_jax.models.dit import unscan_block_params  # dit imports models.diffit
    return unscan_block_params(params)
  return params


def for_model(params, model):
  """Per-block params -> the layout `model` expects (stacked for `scan_blocks=True`; else unchanged)."""
  if _scanned(model):
    from diffusion_jax.models.dit import scan_block_params
    return scan_block_params(params, model.depth)
  return params


def torch_state_to_params(state: Mapping[str, np.ndarray], model: DiffiTLatent, what: str = "checkpoint"):
  """Released-layout state dict -> our params for `model` (names and shapes checked; stacked blocks for a
  `scan_blocks=True` model)."""
  if _scanned(model):
    return for_model(torch_state_to_params(state, model.clone(scan_blocks=False), what), model)
  flat_abs = io.flatten(abstract_params(model))
  want = {_torch_name(k): k for k in flat_abs}
  found = {k: v for k, v in state.items() if not k.endswith(BUFFERS)}
  io.check_names(want, found, what)
  out = {}
  for tname, fpath in want.items():
    arr = _from_torch(fpath, state[tname])
    io.check_shape(tname, arr.shape, flat_abs[fpath].shape)
    out[fpath] = arr
  _check_buffers(state, model)
  return io.unflatten(out)


def _check_buffers(state: Mapping[str, np.ndarray], model: DiffiTLatent) -> None:
  g = model.input_size // model.patch_size
  if "pos_embed" in state:
    pe = np.asarray(state["pos_embed"], np.float32).reshape(-1, model.hidden_size)
    if not np.allclose(pe, get_2d_sincos_pos_embed(model.hidden_size, g), atol=1e-4):
      raise io.CheckpointError("pos_embed in the checkpoint is not the fixed 2-D sin-cos table this model uses.")
  idx = relative_position_index(model.window_size or g)
  for k, v in state.items():
    if k.endswith("relative_position_index") and not np.array_equal(np.asarray(v), idx):
      raise io.CheckpointError(f"{k} differs from the Swin relative index for window {model.window_size or g}.")


def params_to_torch_state(params, model: DiffiTLatent, with_buffers: bool = True) -> Dict[str, np.ndarray]:
  """Our params -> released-layout state dict (with `pos_embed` / `relative_position_index` buffers)."""
  params = to_per_block(jax.device_get(params), model)
  out = {_torch_name(k): _to_torch(k, v) for k, v in io.flatten(params).items()}
  if with_buffers:
    g = model.input_size // model.patch_size
    out["pos_embed"] = get_2d_sincos_pos_embed(model.hidden_size, g)[None]
    idx = relative_position_index(model.window_size or g).astype(np.int64)
    for i in range(model.depth):
      out[f"blocks.{i}.attn.relative_position_index"] = idx
  return out


def load_diffit(path: str, *, allow_pickle: bool = False, **model_overrides) -> Tuple[DiffiTLatent, Any]:
  """Loads a released DiffiT checkpoint (.safetensors) -> (DiffiTLatent, params).

  `model_overrides` (e.g. dtype="bfloat16", remat="full") are passed to the module; shape-defining keys must
  agree with the checkpoint.
  """
  state = io.load_state_dict(path, allow_pickle=allow_pickle)
  cfg = infer_config(state)
  for k, v in model_overrides.items():
    if k in cfg and cfg[k] != v:
      raise io.CheckpointError(f"{path} has {k}={cfg[k]}, but {k}={v} was requested.")
  model = DiffiTLatent(**{**cfg, **model_overrides})
  return model, torch_state_to_params(state, model, f"DiffiT checkpoint {path}")


def save_diffit(path: str, params, model: DiffiTLatent) -> None:
  """Writes our params in the released layout (so the NVlabs code can load them)."""
  io.save_state_dict(params_to_torch_state(params, model), path)


# ------------------------------------------------------------------------------ trained-run export
# What a finished `generation` run (DiffiT image / latent, DiT, any registered denoiser) exports to
# DIR/export: `config.json` (the network's config.model plus what sampling needs: objective, sigma_data,
# time_scale, latent space, image size, classes, sampler settings) and `model.safetensors` (the params,
# "/"-joined Flax paths). A latent DiffiT additionally gets `diffit.safetensors` in the released NVlabs layout
# (readable by `load_diffit` and by the NVlabs code).

EXPORT_CLASS = "DiffusionJaxGenerationModel"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_RELEASED = "diffit.safetensors"


def _plain(x):
  """ConfigDicts / tuples -> JSON-ready dicts and lists."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  return x


def save_trained(directory: str, params, model_config: Mapping[str, Any], extra: Mapping[str, Any] = None,
                 model=None) -> None:
  """Writes a trained denoiser to `directory`: config.json ({"_class_name", "model": model_config, **extra})
  and model.safetensors; with a `DiffiTLatent` `model`, also diffit.safetensors in the released layout. The
  params are written per block (`blocks_<i>`) also from a `scan_blocks=True` model, so one export loads into
  either form."""
  import os
  params = to_per_block(jax.device_get(params), model)
  os.makedirs(directory, exist_ok=True)
  io.save_state_dict(io.flatten(params), os.path.join(directory, EXPORT_WEIGHTS))
  io.write_json({"_class_name": EXPORT_CLASS, "model": _plain(model_config), **_plain(dict(extra or {}))},
                os.path.join(directory, "config.json"))
  if isinstance(model, DiffiTLatent):
    save_diffit(os.path.join(directory, EXPORT_RELEASED), params, model)


def load_trained(directory: str, **model_overrides) -> Tuple[Any, Any, Dict[str, Any]]:
  """Reads what `save_trained` wrote (a `generation` run's DIR/export, or the run directory itself):
  (module, params, config dict). Names and shapes are checked against the module built from config.json;
  `model_overrides` (dtype, remat, attention) go to the module."""
  import os
  from diffusion_jax.models import build_model
  if not os.path.exists(os.path.join(directory, "config.json")) and os.path.isdir(os.path.join(directory, "export")):
    directory = os.path.join(directory, "export")
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{directory} holds no config.json: not an exported generation run (train one with "
                            "python -m diffusion_jax.main --config configs/diffit_shapes.py --workdir DIR; the "
                            "export is DIR/export).")
  cfg = io.read_json(cfg_path)
  if cfg.get("_class_name") != EXPORT_CLASS:
    raise io.CheckpointError(f"{cfg_path} is a {cfg.get('_class_name')!r}, not an exported generation run "
                             f"({EXPORT_CLASS}).")
  model = build_model(cfg["model"], **model_overrides)
  flat = io.load_state_dict(os.path.join(directory, EXPORT_WEIGHTS))
  size = int(cfg.get("latent_shape", [0])[0] or cfg.get("image_size", 32))
  channels = int(cfg.get("latent_shape", [0, 0, 3])[-1])
  x = jax.ShapeDtypeStruct((1, size, size, channels), np.float32)
  t = jax.ShapeDtypeStruct((1,), np.float32)
  y = jax.ShapeDtypeStruct((1,), np.int32) if int(cfg.get("num_classes", 0)) else None
  per_block = model.clone(scan_blocks=False) if _scanned(model) else model  # the layout save_trained writes
  want = io.flatten(jax.eval_shape(lambda x, t, y: per_block.init(jax.random.key(0), x, t, y), x, t, y)["params"])
  io.check_names(want, flat, f"exported model {directory}")
  for k, v in want.items():
    io.check_shape(k, np.shape(flat[k]), v.shape)
  params = io.unflatten({k: np.asarray(flat[k], v.dtype) for k, v in want.items()})
  return model, for_model(params, model), cfg
