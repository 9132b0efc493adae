"""The KV cache through transformers' public API, whatever the installed release calls it.

transformers >= 5.2x renamed the forward's `past_key_values` argument to `cache` (the old name
still works, with a deprecation warning, until 5.40); 5.17 knows only `past_key_values`.
`cache_kwargs` is the one place that knows which name to use.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
from transformers import DynamicCache


@cache
def _cache_argument_name(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that passes `cache` to `model.forward` on this transformers version."""
    return {_cache_argument_name(type(model)): cache}


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty dynamic KV cache for `model`."""
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature without `config`
        return DynamicCache()


def drop_last_cache_entries(cache: DynamicCache, count: int) -> None:
    """Remove the last `count` positions from every layer of `cache`. A negative argument to
    `crop` means "remove this many" on every transformers release we support; positive values
    changed meaning across releases."""
    if count > 0:
        cache.crop(-count)
