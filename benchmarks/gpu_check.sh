#!/usr/bin/env bash
# One prepared GPU check for the device machine (PyTorch + transformers + pytest there, no Ray):
# the decoder's unit tests on CUDA, then equality and speed figures from gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PWD}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python benchmarks/gpu_check.py 2>&1 | tee "${OUT:-/tmp}/gpu_check.txt"
python benchmarks/jacobi_vs_ar.py --dtype bfloat16 --max-new-tokens 128 2>&1 | tee -a "${OUT:-/tmp}/gpu_check.txt"
