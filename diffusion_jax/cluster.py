"""Multi-host detection and the arguments of `jax.distributed.initialize()`, as pure functions of the environment.

Under SLURM, JAX's own cluster detection gives each process only the local device `[SLURM_LOCALID]`. With one
task per node on an 8-GPU node that trains on 1 GPU of 8 without an error; with one task per GPU whose
`CUDA_VISIBLE_DEVICES` holds only its own GPU, index `SLURM_LOCALID` does not exist. `distributed_init_kwargs`
therefore computes `local_device_ids` from what the task can see:

* the task sees 1 GPU (`--gpus-per-task=1`, cgroup-constrained or not): `[0]`;
* the task sees every GPU of the node and there is one task per GPU: `[SLURM_LOCALID]`;
* one task per node: all its GPUs, `[0, ..., G - 1]`;
* k tasks sharing G visible GPUs (G divisible by k): the task's contiguous block of G / k.

`JAX_LOCAL_DEVICE_IDS` (read by JAX itself) overrides all of this. Coordinator address, process count and
process id are left to JAX's detection (SLURM, TPU VMs, ...) unless `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` are
set (any other cluster, see launch/local_multiprocess.sh).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional

MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def in_slurm_job(env: Mapping[str, str]) -> bool:
  return "SLURM_JOB_ID" in env and "SLURM_PROCID" in env


def is_multihost(env: Mapping[str, str], flag: Optional[bool] = None) -> bool:
  """`--multihost` if given, else: a coordinator address is set, a SLURM step with several tasks, or a
  multi-host TPU VM slice."""
  if flag is not None:
    return bool(flag)
  if any(env.get(k) for k in MULTIHOST_ENV):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def _expand_tasks_per_node(value: str) -> List[int]:
  """SLURM's `SLURM_TASKS_PER_NODE` / `SLURM_STEP_TASKS_PER_NODE`, e.g. "8(x2),4" -> [8, 8, 4]."""
  out: List[int] = []
  for part in value.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if not m:
      raise ValueError(f"Cannot read SLURM tasks per node {value!r}.")
    out += [int(m.group(1))] * int(m.group(2) or 1)
  return out


def slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
  """How many tasks of the step run on this node."""
  for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
    if env.get(key):
      counts = _expand_tasks_per_node(env[key])
      node = int(env.get("SLURM_NODEID", "0") or 0)
      return counts[node] if node < len(counts) else counts[-1]
  if env.get("SLURM_NTASKS_PER_NODE"):
    return int(env["SLURM_NTASKS_PER_NODE"])
  return 1


def _device_list(value: str) -> Optional[List[str]]:
  value = value.strip()
  if not value or value.lower() in ("none", "nodevfiles"):
    return None
  return [v for v in value.split(",") if v.strip()]


def visible_gpu_count(env: Mapping[str, str]) -> Optional[int]:
  """GPUs this task can open: `CUDA_VISIBLE_DEVICES` if set, else SLURM's GPU variables; None if unknown."""
  if "CUDA_VISIBLE_DEVICES" in env:
    devices = _device_list(env["CUDA_VISIBLE_DEVICES"])
    return len(devices) if devices else 0
  for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
    if env.get(key):
      devices = _device_list(env[key])
      if devices:
        return len(devices)
  if env.get("SLURM_GPUS_ON_NODE"):
    return int(env["SLURM_GPUS_ON_NODE"])
  return None


def slurm_local_device_ids(env: Mapping[str, str]) -> Optional[List[int]]:
  """The GPU indices (among the visible ones) this SLURM task should use; None outside SLURM or without GPUs."""
  if not in_slurm_job(env):
    return None
  gpus = visible_gpu_count(env)
  if not gpus:
    return None
  local_id = int(env.get("SLURM_LOCALID", "0") or 0)
  tasks = slurm_tasks_on_this_node(env)
  if gpus == 1:
    return [0]
  if tasks == 1:
    return list(range(gpus))
  if gpus % tasks:
    raise ValueError(
        f"SLURM runs {tasks} tasks on this node and each sees {gpus} GPUs, which they cannot share evenly. "
        "Use one task per GPU (sbatch --ntasks-per-node=G --gpus-per-task=1, launch/slurm_gpu.sbatch) or set "
        "JAX_LOCAL_DEVICE_IDS for each task.")
  per_task = gpus // tasks
  return list(range(local_id * per_task, (local_id + 1) * per_task))


def distributed_init_kwargs(env: Mapping[str, str]) -> Dict[str, Any]:
  """Keyword arguments for `jax.distributed.initialize()` (everything not given here JAX detects itself)."""
  kwargs: Dict[str, Any] = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  if not env.get("JAX_LOCAL_DEVICE_IDS"):
    ids = slurm_local_device_ids(env)
    if ids is not None:
      kwargs["local_device_ids"] = ids
  return kwargs

