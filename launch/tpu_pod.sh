#!/bin/bash
# Training on a Cloud TPU VM pod slice: the same command on every host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/diffit_shapes.py gs://bucket/workdir [--config.key=value ...]
#
# Assumes the repository is cloned at ~/diffusion_jax on every host and installed with
# `pip install -e ".[tpu]"` (run `launch/tpu_pod.sh TPU_NAME ZONE --setup` once to do that from a git URL in
# $REPO_URL). On a TPU VM `jax.distributed.initialize()` needs no arguments; --multihost turns it on.
# The workdir must be shared by all hosts (a gs:// bucket or an NFS path): orbax writes one checkpoint
# from all hosts, and each host saves its own data-iterator state next to it.
set -euo pipefail

TPU_NAME=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]}
ZONE=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]}
shift 2

if [[ "${1:-}" == "--setup" ]]; then
  REPO_URL=${REPO_URL:?set REPO_URL to the git URL of this repository}
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
    set -e; [ -d ~/diffusion_jax ] || git clone $REPO_URL ~/diffusion_jax
    cd ~/diffusion_jax && git pull && python3 -m pip install -q -e '.[tpu]'"
  exit 0
fi

CONFIG=${1:?missing CONFIG}
WORKDIR=${2:?missing WORKDIR}
shift 2
EXTRA="$*"

# Kill a previous run's processes first (the TPU can only be opened by one process per host).
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/diffusion_jax && nohup python3 -m diffusion_jax.main --config=$CONFIG --workdir=$WORKDIR \
    --multihost $EXTRA > ~/train.log 2>&1 &"
echo "Started on all hosts of $TPU_NAME; logs in ~/train.log on each host, metrics in $WORKDIR."
