#!/bin/bash
# Training on a Cloud TPU VM pod slice: the same command on every host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/diffit_shapes.py gs://bucket/workdir [--config.key=value ...]
#   launch/tpu_pod.sh TPU_NAME ZONE --stop        # stop the run on every host (SIGTERM: a checkpoint is saved)
#   launch/tpu_pod.sh TPU_NAME ZONE --setup       # clone $REPO_URL and install with the tpu and gcp extras
#
# Assumes the repository is cloned at ~/diffusion_jax on every host and installed with
# `pip install -e ".[tpu,gcp]"` (what --setup does). On a TPU VM `jax.distributed.initialize()` needs no
# arguments; --multihost turns it on. The workdir must be shared by all hosts (a gs:// bucket, which needs the
# gcp extra, or an NFS path): orbax writes one checkpoint from all hosts, and each host saves its own
# data-iterator state next to it.
#
# Overrides reach the remote shell quoted (printf %q), so `--config.model.num_blocks='(4,4,4)'` or values with
# spaces arrive as typed. A TPU can be opened by one process per host only, so starting a run first stops a
# previous one on every host: SIGTERM (the trainer checkpoints and exits), up to STOP_WAIT seconds (default
# 180), then SIGKILL. DRY_RUN=1 prints the remote command instead of running it.
set -euo pipefail

TPU_NAME=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]}
ZONE=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]}
shift 2
STOP_WAIT=${STOP_WAIT:-180}

on_all_hosts() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%s\n' "$1"
  else
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
  fi
}

# The remote stop step. The pattern's [.] keeps it from matching this remote shell's own command line, which
# spells the module name differently ("diffusion_jax.main" in quotes below).
PATTERN='python3 -m diffusion_jax[.]main'
STOP="if [ -f ~/diffusion_jax_train.pid ]; then kill -TERM \"\$(cat ~/diffusion_jax_train.pid)\" 2>/dev/null || true; fi
pkill -TERM -f '$PATTERN' || true
for _ in \$(seq 1 $(printf %q "$STOP_WAIT")); do pgrep -f '$PATTERN' > /dev/null || break; sleep 1; done
pkill -KILL -f '$PATTERN' || true
rm -f ~/diffusion_jax_train.pid"

if [[ "${1:-}" == "--setup" ]]; then
  REPO_URL=${REPO_URL:?set REPO_URL to the git URL of this repository}
  on_all_hosts "set -e; [ -d ~/diffusion_jax ] || git clone $(printf %q "$REPO_URL") ~/diffusion_jax
    cd ~/diffusion_jax && git pull && python3 -m pip install -q -e '.[tpu,gcp]'"
  exit 0
fi

if [[ "${1:-}" == "--stop" ]]; then
  on_all_hosts "$STOP"
  exit 0
fi

CONFIG=${1:?missing CONFIG}
WORKDIR=${2:?missing WORKDIR}
shift 2
ARGS=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" --multihost "$@")

on_all_hosts "$STOP
cd ~/diffusion_jax && nohup python3 -m \"diffusion_jax.main\"$ARGS > ~/train.log 2>&1 < /dev/null &
echo \$! > ~/diffusion_jax_train.pid"
if [[ -z "${DRY_RUN:-}" ]]; then
  echo "Started on all hosts of $TPU_NAME; logs in ~/train.log on each host, metrics in $WORKDIR."
fi
