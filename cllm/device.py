"""Where models run by default: CUDA when present, else the CPU; bf16 on CUDA, fp32 elsewhere."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
