"""CLLM: Jacobi decoding and consistency training for Hugging Face causal LMs (no Ray here)."""

from cllm.drafts import DecodingOptions
from cllm.engine import Engine, FinishedRequest
from cllm.hf import load_model, load_tokenizer, tiny_model
from cllm.jacobi import (
    GenerationStats,
    JacobiOutput,
    ar_generate,
    jacobi_generate,
    pad_prompts,
)
from cllm.row import RequestParams, RowStats
from cllm.sampling import SamplingParams, TokenLogprob

__all__ = [
    "DecodingOptions",
    "Engine",
    "FinishedRequest",
    "GenerationStats",
    "JacobiOutput",
    "RequestParams",
    "RowStats",
    "SamplingParams",
    "TokenLogprob",
    "ar_generate",
    "jacobi_generate",
    "load_model",
    "load_tokenizer",
    "pad_prompts",
    "tiny_model",
]
