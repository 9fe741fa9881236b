"""Generic checkpoint I/O shared by every importer/exporter in `pretrained/`.

* safetensors only; pickle formats (.bin, .pt, .pth, .ckpt) are refused unless `allow_pickle=True`
  (and then need torch, which is not a core dependency);
* loading checks names both ways and fails with the missing / unexpected names listed;
* helpers to flatten / unflatten Flax param trees with "/"-joined keys.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
  """A checkpoint that does not match what the code expects."""


def load_state_dict(path: str, *, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
  """Reads a flat name->array dict from a .safetensors file (or a pickle file with `allow_pickle`)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint file not found: {path}. Check the path in your config.")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return {k: np.asarray(v) for k, v in load_file(path).items()}
  if path.endswith(PICKLE_SUFFIXES):
    if not allow_pickle:
      raise CheckpointError(
          f"Refusing to load pickle checkpoint {path}: pickle files can execute code. Convert it to "
          ".safetensors (e.g. `safetensors.torch.save_file(torch.load(path), out)`), or, if you trust its "
          "source, pass allow_pickle=True to the loader (e.g. `load_vae(directory, allow_pickle=True)`).")
    import torch  # only with the explicit flag
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
      sd = sd["state_dict"]
    return {k: v.float().numpy() if v.dtype.is_floating_point else v.numpy() for k, v in sd.items()}
  raise CheckpointError(f"Unknown checkpoint format for {path}; expected a .safetensors file.")


def save_state_dict(state: Mapping[str, Any], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # np.array(order="C") keeps 0-d arrays 0-d (np.ascontiguousarray would turn them into shape (1,)).
  arrays = {k: np.array(v, dtype=np.float32 if np.asarray(v).dtype.kind == "f" else None, order="C")
            for k, v in state.items()}
  save_file(arrays, path, metadata=metadata or {"format": "pt"})


def find_weights_file(directory: str, stem: str, *, allow_pickle: bool = False) -> str:
  """Finds `stem.safetensors` (or a pickle twin if allowed) in a transformers/diffusers directory."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Pretrained directory not found: {directory}.")
  st = os.path.join(directory, f"{stem}.safetensors")
  if os.path.exists(st):
    return st
  for suf in (".bin", ".pt", ".ckpt"):
    p = os.path.join(directory, f"{stem}{suf}")
    if os.path.exists(p):
      if not allow_pickle:
        raise CheckpointError(
            f"{directory} holds only the pickle file {os.path.basename(p)}; safetensors are required. "
            "Convert it, or pass allow_pickle=True if you trust its source.")
      return p
  raise FileNotFoundError(f"No {stem}.safetensors in {directory} (files: {sorted(os.listdir(directory))}).")


def load_weights_dir(directory: str, stem: str, *, allow_pickle: bool = False) -> Dict[str, np.ndarray]:
  """Reads a transformers/diffusers weights file from `directory`: `stem.safetensors`, or the shards listed in
  `stem.safetensors.index.json`, or (only with `allow_pickle`) a pickle twin such as `stem.bin`."""
  index = os.path.join(directory, f"{stem}.safetensors.index.json")
  if not os.path.exists(os.path.join(directory, f"{stem}.safetensors")) and os.path.exists(index):
    state: Dict[str, np.ndarray] = {}
    root = os.path.realpath(directory)
    for shard in sorted(set(read_json(index)["weight_map"].values())):
      path = os.path.realpath(os.path.join(directory, shard))
      if os.path.dirname(path) != root and not path.startswith(root + os.sep):
        raise CheckpointError(f"{index} names shard {shard!r}, which lies outside {directory}; refusing to read it. "
                              "Shards must be files inside the model directory.")
      state.update(load_state_dict(path, allow_pickle=allow_pickle))
    return state
  return load_state_dict(find_weights_file(directory, stem, allow_pickle=allow_pickle), allow_pickle=allow_pickle)


def read_json(path: str) -> Dict[str, Any]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"Missing config file {path}.")
  with open(path) as f:
    return json.load(f)


def write_json(obj: Mapping[str, Any], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def check_names(expected: Iterable[str], found: Iterable[str], what: str) -> None:
  """Raises CheckpointError listing missing and unexpected names."""
  expected, found = set(expected), set(found)
  missing, unexpected = sorted(expected - found), sorted(found - expected)
  if missing or unexpected:
    def fmt(names):
      head = ", ".join(names[:20])
      return head + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    raise CheckpointError(
        f"{what} does not match the model: missing {len(missing)} name(s) [{fmt(missing)}]; "
        f"unexpected {len(unexpected)} name(s) [{fmt(unexpected)}]. Is this the right checkpoint/config?")


def check_shape(name: str, got, want) -> None:
  if tuple(got) != tuple(want):
    raise CheckpointError(f"Shape mismatch for {name}: checkpoint has {tuple(got)}, model expects {tuple(want)}.")


def flatten(tree: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  out: Dict[str, Any] = {}

  def rec(prefix, node):
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(f"{prefix}{sep}{k}" if prefix else str(k), v)
    else:
      out[prefix] = node

  rec("", tree)
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for key, v in flat.items():
    node = out
    parts = key.split(sep)
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out
