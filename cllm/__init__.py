"""CLLM: Jacobi decoding and consistency training for Hugging Face causal LMs (no Ray here)."""

from cllm.hf import load_model, load_tokenizer, tiny_model
from cllm.jacobi import (
    GenerationStats,
    JacobiOutput,
    RowStats,
    ar_generate,
    jacobi_generate,
    pad_prompts,
)

__all__ = [
    "GenerationStats",
    "JacobiOutput",
    "RowStats",
    "ar_generate",
    "jacobi_generate",
    "load_model",
    "load_tokenizer",
    "pad_prompts",
    "tiny_model",
]
