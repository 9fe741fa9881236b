"""Multi-host launch: the device assignment under simulated SLURM environments (diffusion_jax/cluster.py, no
jax.distributed started), the SLURM script's resource request, and launch/tpu_pod.sh's quoting and stop step."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

from diffusion_jax import cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slurm_env(*, nodes=2, tasks_per_node=8, procid=0, cuda_visible=None, **extra):
  """The variables srun sets for task `procid` of a `nodes` x `tasks_per_node` step (block distribution)."""
  env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(nodes * tasks_per_node),
         "SLURM_LOCALID": str(procid % tasks_per_node), "SLURM_NODEID": str(procid // tasks_per_node),
         "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]",
         "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})" if nodes > 1 else str(tasks_per_node)}
  if cuda_visible is not None:
    env["CUDA_VISIBLE_DEVICES"] = cuda_visible
  env.update(extra)
  return env


def gpus_used(nodes, tasks_per_node, visible_of):
  """(node, physical GPU) pairs every task of the step would open, given each task's CUDA_VISIBLE_DEVICES."""
  used = []
  for p in range(nodes * tasks_per_node):
    visible = visible_of(p % tasks_per_node).split(",")
    env = slurm_env(nodes=nodes, tasks_per_node=tasks_per_node, procid=p, cuda_visible=",".join(visible))
    ids = cluster.distributed_init_kwargs(env)["local_device_ids"]
    used += [(p // tasks_per_node, int(visible[i])) for i in ids]
  return used


def test_one_task_per_gpu_each_sees_its_own_gpu():
  """--gpus-per-task=1 (launch/slurm_gpu.sbatch): CUDA_VISIBLE_DEVICES is the task's own GPU, index 0 for JAX
  (JAX's own detection would ask for index SLURM_LOCALID, which does not exist for local ids 1-7)."""
  used = gpus_used(2, 8, lambda local: str(local))
  assert sorted(used) == [(n, g) for n in range(2) for g in range(8)]  # all 16 GPUs, each once
  env = slurm_env(procid=13, cuda_visible="5")
  assert cluster.distributed_init_kwargs(env) == {"local_device_ids": [0]}
  # cgroup-constrained GPUs: every task sees its one GPU as "0"
  assert cluster.distributed_init_kwargs(slurm_env(procid=13, cuda_visible="0")) == {"local_device_ids": [0]}


def test_one_task_per_gpu_all_gpus_visible():
  """--ntasks-per-node=8 --gpus-per-node=8 without per-task binding: every task sees 8 GPUs, takes its own."""
  used = gpus_used(2, 8, lambda local: "0,1,2,3,4,5,6,7")
  assert sorted(used) == [(n, g) for n in range(2) for g in range(8)]
  assert cluster.distributed_init_kwargs(slurm_env(procid=13, cuda_visible="0,1,2,3,4,5,6,7")) == {
      "local_device_ids": [5]}


def test_one_task_per_node_uses_every_gpu():
  """The old script's layout (one task per node): all 8 GPUs, not JAX's default [SLURM_LOCALID] = [0]."""
  env = slurm_env(tasks_per_node=1, procid=1, cuda_visible="0,1,2,3,4,5,6,7")
  assert cluster.distributed_init_kwargs(env) == {"local_device_ids": list(range(8))}
  # without CUDA_VISIBLE_DEVICES, from SLURM's own GPU variables
  env = slurm_env(tasks_per_node=1, procid=1, SLURM_GPUS_ON_NODE="8")
  assert cluster.distributed_init_kwargs(env) == {"local_device_ids": list(range(8))}
  env = slurm_env(tasks_per_node=1, procid=0, SLURM_STEP_GPUS="0,1,2,3")
  assert cluster.distributed_init_kwargs(env) == {"local_device_ids": [0, 1, 2, 3]}


def test_tasks_sharing_gpus_get_disjoint_blocks():
  used = gpus_used(1, 2, lambda local: "0,1,2,3,4,5,6,7")
  assert sorted(used) == [(0, g) for g in range(8)]
  env = slurm_env(nodes=1, tasks_per_node=2, procid=1, cuda_visible="0,1,2,3,4,5,6,7")
  assert cluster.distributed_init_kwargs(env) == {"local_device_ids": [4, 5, 6, 7]}


def test_uneven_sharing_is_an_error_naming_the_fix():
  with pytest.raises(ValueError, match="gpus-per-task=1"):
    cluster.distributed_init_kwargs(slurm_env(nodes=1, tasks_per_node=3, procid=0, cuda_visible="0,1,2,3,4,5,6,7"))


def test_heterogeneous_tasks_per_node():
  assert cluster._expand_tasks_per_node("8(x2),4") == [8, 8, 4]
  env = slurm_env(procid=17, SLURM_STEP_TASKS_PER_NODE="8(x2),2", SLURM_NODEID="2", SLURM_LOCALID="1",
                  cuda_visible="0,1,2,3")
  assert cluster.distributed_init_kwargs(env) == {"local_device_ids": [2, 3]}


def test_outside_slurm_and_overrides():
  assert cluster.distributed_init_kwargs({}) == {}
  local = {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "CUDA_VISIBLE_DEVICES": "0,1"}
  assert cluster.distributed_init_kwargs(local) == {"num_processes": 2, "process_id": 1}
  # JAX_LOCAL_DEVICE_IDS is JAX's own override: left to JAX
  env = slurm_env(procid=3, cuda_visible="0,1,2,3,4,5,6,7", JAX_LOCAL_DEVICE_IDS="3")
  assert "local_device_ids" not in cluster.distributed_init_kwargs(env)
  # a SLURM job on a CPU / TPU node (no GPU variables): nothing to compute
  assert cluster.distributed_init_kwargs(slurm_env(procid=3)) == {}


def test_is_multihost():
  assert cluster.is_multihost(slurm_env(procid=0))
  assert not cluster.is_multihost(slurm_env(nodes=1, tasks_per_node=1, procid=0))
  assert cluster.is_multihost({"JAX_COORDINATOR_ADDRESS": "h:1"})
  assert cluster.is_multihost({"TPU_WORKER_HOSTNAMES": "a,b"}) and not cluster.is_multihost({"TPU_WORKER_HOSTNAMES": "a"})
  assert not cluster.is_multihost({})
  assert cluster.is_multihost({}, flag=True) and not cluster.is_multihost(slurm_env(), flag=False)


def sbatch_options(path):
  with open(path) as f:
    return dict(re.findall(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", f.read(), flags=re.M))


def test_slurm_script_asks_for_one_task_per_gpu():
  opts = sbatch_options(os.path.join(ROOT, "launch", "slurm_gpu.sbatch"))
  assert opts.get("gpus-per-task") == "1" and int(opts["ntasks-per-node"]) == 8
  assert "gpus-per-node" not in opts  # per-task binding, not 8 GPUs shared by one task
  assert opts.get("signal") == "TERM@120"


README_OVERRIDE = "--config.model.num_blocks=(4,4,4)"  # what the shell passes for --config.model.num_blocks='(4,4,4)'
TRICKY = "--config.data.captions_file=my captions; echo INJECTED > $HOME/pwned.txt"


def tpu_pod_dry_run(*args, **env):
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "my-tpu", "us-central2-b", *args],
                       env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True, check=True)
  return out.stdout


def fake_host(tmp_path):
  """A fake TPU host: HOME with ~/diffusion_jax, and python3 / pkill / pgrep / sleep stand-ins that log calls
  (so the remote command can run here without touching any real process)."""
  home, fakebin = tmp_path / "home", tmp_path / "bin"
  (home / "diffusion_jax").mkdir(parents=True)
  fakebin.mkdir()
  scripts = {
      "python3": 'printf "%s\\0" "$@" > "$HOME/argv"; sleep 0.2',
      "pkill": 'printf "%s\\n" "$*" >> "$HOME/pkill.log"; exit 1',
      "pgrep": "exit 1",
  }
  for name, body in scripts.items():
    (fakebin / name).write_text(f"#!/bin/bash\n{body}\n")
    (fakebin / name).chmod(0o755)
  return home, {"HOME": str(home), "PATH": f"{fakebin}:{os.environ['PATH']}"}


def run_remote(command, env):
  subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)


def wait_for(path, timeout=10.0):
  import time
  end = time.time() + timeout
  while not os.path.exists(path) and time.time() < end:
    time.sleep(0.05)
  return os.path.exists(path)


def test_tpu_pod_overrides_arrive_as_typed(tmp_path):
  command = tpu_pod_dry_run("configs/diffit_cifar10.py", "gs://bucket/run 1", README_OVERRIDE, TRICKY)
  home, env = fake_host(tmp_path)
  run_remote(command, env)
  assert wait_for(home / "argv")
  argv = (home / "argv").read_text().split("\0")[:-1]
  assert argv == ["-m", "diffusion_jax.main", "--config=configs/diffit_cifar10.py", "--workdir=gs://bucket/run 1",
                  "--multihost", README_OVERRIDE, TRICKY]
  assert not (home / "pwned.txt").exists()
  assert (home / "diffusion_jax_train.pid").read_text().strip().isdigit()


def test_tpu_pod_unquoted_join_would_break():
  """Why the quoting matters: the former "$*" join hands the remote shell a syntax error."""
  joined = "python3 -m diffusion_jax.main --multihost " + README_OVERRIDE
  assert subprocess.run(["bash", "-n", "-c", joined], capture_output=True).returncode != 0
  assert subprocess.run(["bash", "-n", "-c", "python3 " + shlex.quote(README_OVERRIDE)]).returncode == 0


def test_tpu_pod_stops_the_previous_run_first(tmp_path):
  command = tpu_pod_dry_run("configs/diffit_shapes.py", "gs://b/w", STOP_WAIT="3")
  assert command.index("pkill -TERM") < command.index("nohup")
  home, env = fake_host(tmp_path)
  (home / "diffusion_jax_train.pid").write_text("999999999\n")  # a stale pid: kill fails quietly
  run_remote(command, env)
  calls = (home / "pkill.log").read_text().splitlines()
  assert calls[0].startswith("-TERM -f ") and calls[-1].startswith("-KILL -f ")
  pattern = calls[0].split(" -f ", 1)[1]
  # the pattern finds the trainer's process but not the remote shell that runs the stop step
  assert re.search(pattern, "python3 -m diffusion_jax.main --config=configs/x.py --workdir=gs://b/w --multihost")
  assert not re.search(pattern, command)
  assert "pkill -TERM" in tpu_pod_dry_run("--stop") and "nohup" not in tpu_pod_dry_run("--stop")
