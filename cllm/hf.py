"""Facts about a Hugging Face model and its tokenizer, each rule in one place: where a model
reference points (hub id, local or `s3://` directory, toy name), loading, EOS and pad ids, the
context length, and chat rendering. Collect, train, evaluate and serve all go through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cllm.device import default_device, default_dtype
from cllm.toy import TOY_NAMES, parse_toy_name

Message = tuple[str, str]  # (role, text)

# transformers writes a huge placeholder into model_max_length when a tokenizer does not know it.
_UNSET_MODEL_MAX_LENGTH = 10**9


@dataclass(frozen=True)
class ModelFacts:
    """What the pipelines need to know about a model before (or without) loading its weights."""

    vocab_size: int
    pad_id: int
    eos_ids: frozenset[int]
    context_length: int | None  # positions the model attends to; None when nothing says


def local_model_dir(name_or_path: str, weights: bool = True) -> str:
    """A directory or hub id that `from_pretrained` can read, for any model reference:
    - a toy name (`toy`, `toy-math`, ...): the cached toy teacher, built on first use;
    - a model directory at a remote URI (`s3://...`, any fsspec URI): a fresh local copy, without
      weight files unless `weights` (for S3-compatible stores set AWS_ENDPOINT_URL_S3);
    - anything else (a hub id, a local directory): itself."""
    if name_or_path in TOY_NAMES:
        # Imported here: the teacher's builder (tokenizer training, Llama) loads only when needed.
        from cllm.toy.teacher import ensure_toy

        return str(ensure_toy(parse_toy_name(name_or_path).domain))
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


def _tokenizer_at(directory: str, trust_remote_code: bool):
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of any model reference (see `local_model_dir`), without the weights, with
    the pad token set to EOS when the model has none."""
    return _tokenizer_at(local_model_dir(name_or_path, weights=False), trust_remote_code)


def load_model(
    name_or_path: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) from any model reference (see `local_model_dir`), in eval mode. bf16 on
    CUDA and fp32 on CPU unless `dtype` says otherwise; SDPA attention where the architecture
    has it."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    directory = local_model_dir(name_or_path)
    tokenizer = _tokenizer_at(directory, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    except (ValueError, ImportError):  # architecture without SDPA support
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


# -- facts ---------------------------------------------------------------------------------------


def as_id_set(ids: int | Iterable[int] | None) -> frozenset[int]:
    """An EOS argument (one id, several, or None) as a set."""
    if ids is None:
        return frozenset()
    if isinstance(ids, int):
        return frozenset([ids])
    return frozenset(int(token) for token in ids)


def eos_ids(tokenizer, generation_config: Any = None) -> frozenset[int]:
    """EOS ids from the tokenizer and the generation config (chat models often add one there)."""
    return as_id_set(getattr(tokenizer, "eos_token_id", None)) | as_id_set(
        getattr(generation_config, "eos_token_id", None)
    )


def pad_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS, else 0. Padded
    positions are always masked, so the choice never changes a model's output."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def context_length(config: Any, tokenizer=None) -> int | None:
    """Positions the model can attend to: the smaller of its config's limit and the tokenizer's
    (when either is known)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [getattr(text_config, name, None) for name in ("max_position_embeddings", "n_positions")]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < _UNSET_MODEL_MAX_LENGTH:
        limits.append(tokenizer_limit)
    known = [int(limit) for limit in limits if limit]
    return min(known) if known else None


def model_facts(name_or_path: str, trust_remote_code: bool = False) -> ModelFacts:
    """`ModelFacts` of any model reference, read from its config and tokenizer, not its weights."""
    directory = local_model_dir(name_or_path, weights=False)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    tokenizer = _tokenizer_at(directory, trust_remote_code)
    generation_config = None
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_pretrained(directory)
    return ModelFacts(
        vocab_size=int(config.get_text_config().vocab_size),
        pad_id=pad_id(tokenizer),
        eos_ids=eos_ids(tokenizer, generation_config),
        context_length=context_length(config, tokenizer),
    )


# -- chat ----------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence[Message]) -> str:
    """The prompt text of a conversation, ready for the assistant's reply: the tokenizer's chat
    template, or, for a tokenizer without one, one `role: content` line per message and then
    `assistant:`. A template that refuses the conversation raises (transformers raises
    jinja2's TemplateError)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": role, "content": text} for role, text in messages], tokenize=False, add_generation_prompt=True
        )
    return "".join(f"{role}: {text}\n" for role, text in messages) + "assistant:"


def encode_chat(tokenizer, messages: Sequence[Message]) -> tuple[str, list[int]]:
    """(text, ids) of `render_chat`; the template already holds any special tokens it wants."""
    text = render_chat(tokenizer, messages)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


# -- tiny random models for tests and benchmarks -------------------------------------------------

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
    settings.update(vocab_size=vocab_size, initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    settings.update(overrides)
    config = AutoConfig.for_model(arch, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()

