#!/usr/bin/env bash
# Runs N processes of one training job on this machine, the way a multi-host job runs: one
# global mesh, each process feeding its own data shard. Useful to check multi-host behaviour on
# a laptop (CPU processes talk through gloo).
#
#   launch/local.sh 2 --config=configs/mae_vit.py:runlocal --workdir=/tmp/mae_2proc
#
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 2).
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES [mim_jax.main flags...]}
shift
port=${PORT:-12355}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"
# glibc malloc settings for XLA on CPU (the Makefile says why); an existing value, even empty, wins.
export GLIBC_TUNABLES="${GLIBC_TUNABLES-glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776}"
pids=()
for ((i = 0; i < n; i++)); do
  python -m mim_jax.main --coordinator_address="127.0.0.1:${port}" --num_processes="$n" \
    --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
