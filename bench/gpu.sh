#!/usr/bin/env bash
# One command for a single-GPU machine with PyTorch preinstalled and no network:
# a random-initialised Llama-3.2-1B-shaped model in bf16, batch 64 and 128 (see bench/gpu.py).
#   bench/gpu.sh                       # CUDA
#   bench/gpu.sh --device cpu --tiny   # smoke test on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PYTHON:-python}" -m bench.gpu "$@"
