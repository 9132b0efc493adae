"""Model loading and the transformers compatibility shim.

Everything that touches a Hugging Face causal LM goes through the public forward API
(`input_ids`, `attention_mask`, `position_ids`, cache). `cache_kwargs` is the one place that
knows what the installed transformers calls the cache argument.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from functools import lru_cache
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

TOY_NAMES = ("toy", "toy-math", "toy-code")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@lru_cache(maxsize=None)
def _cache_argument_name(model_class: type) -> str:
    # transformers >= 5.2x renamed `past_key_values` to `cache`; older releases only know the former.
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that passes `cache` to `model.forward` on this transformers version."""
    return {_cache_argument_name(type(model)): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a forward returned, under whichever name this version uses."""
    for name in ("cache", "past_key_values"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def drop_last_cache_entries(cache: DynamicCache, count: int) -> None:
    """Remove the last `count` positions from every layer of `cache`. A negative argument to
    `crop` means "remove this many" on every transformers release we support; positive values
    changed meaning across releases."""
    if count > 0:
        cache.crop(-count)


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty dynamic KV cache for `model`."""
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature without `config`
        return DynamicCache()


def local_model_dir(name_or_path: str, weights: bool = True) -> str:
    """`name_or_path` itself for a hub id, local directory or toy name; for a model directory at a
    remote URI (`s3://...`, any fsspec URI) a fresh local copy, without weight files unless
    `weights`. For S3-compatible stores set AWS_ENDPOINT_URL_S3, which s3fs honours."""
    if "://" not in name_or_path:
        return name_or_path
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(name_or_path)
    path = path.rstrip("/")
    if not filesystem.exists(f"{path}/config.json"):
        raise FileNotFoundError(f"no model at {name_or_path} (no config.json)")
    local = tempfile.mkdtemp(prefix="cllm-model-")
    for remote in filesystem.find(path):
        name = remote[len(path) + 1 :]
        if weights or not name.endswith((".safetensors", ".bin", ".pt")):
            target = os.path.join(local, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            filesystem.get_file(remote, target)
    return local


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model (hub id, local or `s3://` directory, or toy name) without its
    weights, with the pad token set to EOS when the model has none. A toy name builds the toy
    teacher on first use, so drivers do that once before starting workers."""
    if name_or_path in TOY_NAMES:
        return load_model(name_or_path, device="cpu")[1]
    tokenizer = AutoTokenizer.from_pretrained(
        local_model_dir(name_or_path, weights=False), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Load (model, tokenizer) from a hub id, a local directory, a model directory at an `s3://`
    URI, or a toy name (`toy`, `toy-math`, `toy-code`). bf16 on CUDA and fp32 on CPU unless `dtype` says otherwise; SDPA attention."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if name_or_path in TOY_NAMES:
        from cllm.toy import load_toy  # local import: building a teacher is heavy

        model, tokenizer = load_toy(_toy_domain(name_or_path))
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    name_or_path = local_model_dir(name_or_path)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    except (ValueError, ImportError):  # architecture without SDPA support
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    return model.to(device).eval(), tokenizer


def _toy_domain(name: str) -> str | None:
    return None if name == "toy" else name.split("-", 1)[1]


TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2")


def tiny_model(
    arch: str = "llama",
    vocab_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of a given architecture, for tests and benchmarks."""
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHITECTURES}")
    if arch == "gpt2":
        settings: dict[str, Any] = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)
    else:
        settings = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    # A wider init than the default 0.02 gives peaked logits, so argmax ties are rare.
    settings.update(
        vocab_size=vocab_size, initializer_range=0.2, bos_token_id=None, eos_token_id=None, **overrides
    )
    config = AutoConfig.for_model(arch, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()
