#!/usr/bin/env bash
# Runs the same command on every host of a Cloud TPU pod slice. JAX detects the pod, so
# --distributed needs no addresses. The workdir must be shared storage (e.g. gs://).
#
#   TPU=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh \
#     --config=configs/mae_vit.py:variant=B/16,data=tfds:imagenet2012 --workdir=gs://bucket/mae_b16
#
# Assumes the repo is cloned at ~/mim_jax on every host with `pip install -r requirements.txt`
# and jax[tpu] installed.
set -euo pipefail
: "${TPU:?set TPU to the pod slice name}" "${ZONE:?set ZONE}"
# glibc malloc settings that matter for CPU runs only (the Makefile says why). An existing
# GLIBC_TUNABLES here, even empty, is passed on instead.
tunables="${GLIBC_TUNABLES-glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command="cd ~/mim_jax && GLIBC_TUNABLES='$tunables' python -m mim_jax.main --distributed $*"
