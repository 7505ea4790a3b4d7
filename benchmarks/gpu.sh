#!/usr/bin/env bash
# The accelerator benchmark set (issue 7): a Qwen2.5-7B-shaped random-weight model in bf16 on
# one GPU, persona_jax vs transformers in one run; prints a markdown table. Needs jax with
# CUDA, torch with CUDA, transformers, flax, optax, orbax (the lent machines have them).
# Under 8 minutes on one H100/H200. Run from the repository root: bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}  # leave room for torch
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 python3 benchmarks/gpu_bench.py "$@"
