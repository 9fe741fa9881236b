"""Device mesh and sharding rules.

The mesh has three named axes, `("data", "fsdp", "tensor")`, sized from `config.mesh` (one may be -1 =
fill with the remaining devices). Axes are built with `AxisType.Auto` (jax >= 0.7 makes `jax.make_mesh`
axes Explicit by default, under which the backward pass of an unannotated model fails to shard).

* Batches: leading axis sharded over `("data", "fsdp")` (every device of those two axes sees a different
  slice of the global batch; `tensor` devices see the same slice).
* Params (and everything shaped like them: optimizer moments, EMA copies, frozen arrays), by
  `config.param_sharding`:
  - `"replicated"`: a full copy on every device (plain data parallelism);
  - `"fsdp"`: each array with at least `mesh.fsdp_min_size` elements is split over the `fsdp` axis along its
    largest dimension divisible by the `fsdp` size (ZeRO-3 style); smaller arrays are replicated.
    XLA inserts the all-gathers / reduce-scatters.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.registry import check_choice

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
PARAM_SHARDINGS = ("replicated", "fsdp")
DEFAULT_FSDP_MIN_SIZE = 2 ** 10


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple:
  """Resolves config.mesh (data, fsdp, tensor; one may be -1) against `num_devices`."""
  shape = [int(mesh_config.get(a, 1)) if mesh_config is not None else (-1 if a == "data" else 1) for a in AXES]
  fills = [a for a, s in zip(AXES, shape) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"Only one of mesh.{{data,fsdp,tensor}} may be -1 (fill); got {dict(zip(AXES, shape))}.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"Mesh axis sizes must be positive or -1; got {dict(zip(AXES, shape))}.")
  known = math.prod(s for s in shape if s != -1)
  if fills:
    if num_devices % known:
      raise ValueError(
          f"Cannot fill mesh axis {fills[0]!r}: {num_devices} devices are not divisible by the product "
          f"{known} of the other axes {dict(zip(AXES, shape))}. Fix config.mesh.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
        f"config.mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices but {num_devices} are "
        "available. Set one axis to -1 (e.g. --config.mesh.data=-1) or change the sizes.")
  return tuple(shape)


def make_mesh(mesh_config: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh with Auto axis types.

  `mesh.num_devices` > 0 restricts the mesh to the first that many devices (debugging, tests).
  """
  devices = list(devices if devices is not None else jax.devices())
  n = int(mesh_config.get("num_devices", 0) or 0) if mesh_config is not None else 0
  if n > len(devices):
    raise ValueError(f"config.mesh.num_devices={n} but only {len(devices)} devices are available.")
  if n > 0:
    devices = devices[:n]
  shape = mesh_shape(mesh_config, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  try:
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  except Exception:  # e.g. device topology not factorisable: fall back to the plain order.
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leaf_spec(shape: Sequence[int], rule: str, fsdp_size: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """PartitionSpec of one array under `rule` (see module docstring)."""
  check_choice("param_sharding rule", rule, PARAM_SHARDINGS)
  if rule == "replicated" or fsdp_size <= 1 or not shape or math.prod(shape) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
  for i in order:
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rule: str, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs) under `rule`."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), rule, fsdp_size, min_size)), tree)
