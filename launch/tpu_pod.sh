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
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command="cd ~/mim_jax && python -m mim_jax.main --distributed $*"
