"""CLLM: Jacobi decoding and consistency training for Hugging Face causal LMs (no Ray here)."""

from cllm.jacobi import (
    GenerationStats,
    JacobiOutput,
    RowStats,
    ar_generate,
    jacobi_generate,
    pad_prompts,
)
from cllm.models import load_model, tiny_model

__all__ = [
    "GenerationStats",
    "JacobiOutput",
    "RowStats",
    "ar_generate",
    "jacobi_generate",
    "load_model",
    "pad_prompts",
    "tiny_model",
]
