#!/bin/bash
# Simulates a 2-host run on one machine (CPU, 2 processes x 2 devices) to check multi-host code paths:
#
#   launch/local_multiprocess.sh configs/diffit_shapes.py:tiny workdirs/mh [--config.key=value ...]
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
# jax.distributed.initialize() reads; main.py turns it on because JAX_COORDINATOR_ADDRESS is set.
set -euo pipefail
CONFIG=${1:?usage: launch/local_multiprocess.sh CONFIG WORKDIR [overrides]}
WORKDIR=${2:?usage: launch/local_multiprocess.sh CONFIG WORKDIR [overrides]}
shift 2
PYTHON=${PYTHON:-python}
PORT=${PORT:-12355}
mkdir -p "$(dirname "$WORKDIR")"
pids=()
for i in 0 1; do
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \
  JAX_COORDINATOR_ADDRESS=localhost:$PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
    "$PYTHON" -m diffusion_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" > "$WORKDIR.proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
echo "exit status $status; logs: $WORKDIR.proc0.log $WORKDIR.proc1.log"
exit $status
