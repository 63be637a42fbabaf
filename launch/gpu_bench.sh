#!/usr/bin/env bash
# MAE ViT-B/16 at 224 px in bf16 on one GPU: images/s and MFU against the GPU's own bf16 matmul
# peak, which mim_jax.bench measures on the device it runs on (flops.matmul_peak).
#
#   launch/gpu_bench.sh [more mim_jax.bench flags, e.g. --config.batch_size=512 --steps=50]
#
# Prints mim_jax.bench's JSON line (images_per_sec, step_ms, mfu, compile_s, ...). The step is
# the trainer's own on a fixed synthetic batch already on the GPU: batch 256, the paper's
# 8x512 decoder and 75% masking, bf16 compute with f32 parameters, attention through cuDNN's
# fused kernel (bf16, head dims 64 and 32: multiples of 8 under cuDNN's limit, no bias, so any
# sequence length is allowed). Flags given here come after these and override them.
#
# The first run makes a venv ($VENV, default .venv-gpu) with requirements.txt's runtime pins
# (the part above its '# tests' line: the test-only pins such as torch would add gigabytes of
# CUDA wheels the bench never imports) and jax[cuda12] at requirements.txt's jax version, which
# brings jax-cuda12-plugin and jax-cuda12-pjrt with NVIDIA's CUDA, cuDNN and NCCL wheels: no
# system CUDA is needed, only an NVIDIA driver recent enough for CUDA 12. Later runs reuse it.
# JAX_PLATFORMS defaults to cuda, so a GPU JAX cannot use fails the run instead of falling back
# to the CPU.
# Expected on one NVIDIA H200: under 5 minutes in all, the install included (not yet measured).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv-gpu}
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
if [[ ! -f "$venv/.gpu_bench_installed" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  sed '/^# tests/,$d' requirements.txt > "$venv/runtime-requirements.txt"
  "$venv/bin/python" -m pip install --quiet -r "$venv/runtime-requirements.txt" \
    "jax[cuda12]==${jax_version}"
  touch "$venv/.gpu_bench_installed"
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
exec "$venv/bin/python" -m mim_jax.bench \
  --config=configs/mae_vit.py:variant=B/16,image_size=224,batch_size=256,data=synthetic \
  --config.model.dtype=bfloat16 --config.model.attention_impl=cudnn "$@"
