#!/usr/bin/env bash
# One prepared GPU check for the device machine (PyTorch + transformers + pytest there, no Ray):
# equality, engine and speed figures from gpu_check.py (the engine's on a 7B-shaped Llama), then
# the Jacobi-vs-AR benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PWD}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python benchmarks/gpu_check.py 2>&1 | tee "${OUT:-/tmp}/gpu_check.txt"
python benchmarks/jacobi_vs_ar.py --dtype bfloat16 --max-new-tokens 128 2>&1 | tee -a "${OUT:-/tmp}/gpu_check.txt"
