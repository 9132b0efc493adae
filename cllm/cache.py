"""The KV cache through transformers' public API, whatever the installed release calls it.

transformers >= 5.2x renamed the forward's `past_key_values` argument to `cache` (the old name
still works, with a deprecation warning, until 5.40); 5.17 knows only `past_key_values`.
`model_kwargs` is the one place that knows which name to use, and whether the model takes
`logits_to_keep`.

`SlotCache` is the decoding engine's cache: a `transformers.Cache` whose every row (slot) holds
one request with its own length. The engine tells it, before each forward, which slots the batch
covers and how long each row is; the forward's new keys/values are written in place at each
row's own end, so nothing is re-concatenated, and a row's rejected Jacobi entries are simply
overwritten by its next iteration. Storage grows by doubling when a longer row or more rows
arrive. Attention goes through a 4D mask that the model uses as given (SDPA or eager attention).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

_LENGTH_QUANTUM = 64  # cache lengths grow in multiples of this many positions


@cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that passes `cache` to `model.forward` on this transformers version."""
    name = "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"
    return {name: cache}


def logits_to_keep_kwargs(model: torch.nn.Module, positions: list[int], width: int) -> dict[str, Any]:
    """The `logits_to_keep` argument that computes logits at `positions` only (one per row of a
    batch `width` tokens wide), where the model and the installed release allow it: the last
    position as an int everywhere, different positions per row as a (rows, 1) tensor where
    transformers slices by tensor (5.2x's `slice_logits_to_keep`). Otherwise nothing: the caller
    picks the positions out of the full logits."""
    if "logits_to_keep" not in _forward_parameters(type(model)):
        return {}
    if all(position == width - 1 for position in positions):
        return {"logits_to_keep": 1}
    if _slices_by_tensor():
        return {"logits_to_keep": torch.tensor(positions, device=model.device)[:, None]}
    return {}


@cache
def _slices_by_tensor() -> bool:
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty dynamic KV cache for `model`."""
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature without `config`
        return DynamicCache()


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the float mask every attention backend (sdpa and eager) takes
    as a prepared 4D mask: 0 where attention is allowed, the dtype's minimum where it is not."""
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return blocked.masked_fill_(~allowed, torch.finfo(dtype).min)


def attention_window(model: torch.nn.Module) -> int | None:
    """The sliding window every attention layer of `model` shares (None: full attention). Raises
    for what `SlotCache` cannot hold: recurrent or hybrid layers, or full and sliding layers mixed."""
    layers = new_cache(model).layers
    kinds = {type(layer) for layer in layers}
    if kinds == {DynamicLayer} or not layers:
        return None
    windows = {getattr(layer, "sliding_window", None) for layer in layers}
    if kinds == {DynamicSlidingWindowLayer} and len(windows) == 1:
        return int(windows.pop())
    names = sorted(kind.__name__ for kind in kinds)
    raise ValueError(
        f"{type(model).__name__} has cache layers {names}; the decoding engine supports models whose "
        "layers all use full attention or one shared sliding window"
    )


@dataclass
class FeedTree:
    """How a forward's fed tokens relate when they are not one chain (n-grams verified beside a
    Jacobi window): token j of row b sits at position length + offsets[b, j] and sees the fed
    tokens i with visible[b, j, i] (and the whole cache). A chain is offsets j, visible i <= j."""

    offsets: torch.Tensor  # (rows, width) long
    visible: torch.Tensor  # (rows, width, width) bool


@dataclass
class SlotView:
    """The slots the next forward covers, and where each of its rows writes."""

    start: int
    stop: int
    write_positions: torch.Tensor  # (rows, width): cache index of each fed token
    kv_length: int  # keys/values the forward attends over: max(row length) + width


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values: (slots, heads, length, head_dim), grown on demand."""

    is_sliding = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_zeros((0, key_states.shape[1], 0, key_states.shape[-1]))
        self.values = value_states.new_zeros((0, value_states.shape[1], 0, value_states.shape[-1]))
        self.is_initialized = True

    def _reserve(self, slots: int, length: int) -> None:
        """Grow the storage (zeros, never uninitialized memory: masked keys still enter the
        attention product, and a NaN there would poison it) to hold `slots` x `length`."""
        have_slots, have_length = self.keys.shape[0], self.keys.shape[2]
        if slots <= have_slots and length <= have_length:
            return
        new_slots = max(slots, min(2 * have_slots, self._owner.max_slots)) if slots > have_slots else have_slots
        new_length = have_length
        if length > have_length:
            new_length = max(2 * have_length, -(-length // _LENGTH_QUANTUM) * _LENGTH_QUANTUM)
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = old.new_zeros((new_slots, old.shape[1], new_length, old.shape[3]))
            grown[: old.shape[0], :, : old.shape[2]] = old
            setattr(self, name, grown)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        view = self._owner.view
        self._reserve(view.stop, view.kv_length)
        keys, values = self.keys[view.start : view.stop], self.values[view.start : view.stop]
        index = view.write_positions[:, None, :, None]
        keys.scatter_(2, index.expand(-1, keys.shape[1], -1, keys.shape[3]), key_states)
        values.scatter_(2, index.expand(-1, values.shape[1], -1, values.shape[3]), value_states)
        return keys[:, :, : view.kv_length], values[:, :, : view.kv_length]

    def move(self, source: int, target: int, length: int) -> None:
        if self.is_initialized and length > 0:
            self.keys[target, :, :length] = self.keys[source, :, :length]
            self.values[target, :, :length] = self.values[source, :, :length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.view.kv_length, 0

    def get_seq_length(self) -> int:
        view = self._owner.view
        return 0 if view is None else view.kv_length - view.write_positions.shape[1]

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """Per-slot KV storage with per-row lengths, for a batch whose rows come and go.

    Call `prepare(start, lengths, width)` before each forward: the batch is slots
    [start, start + len(lengths)), row i holds `lengths[i]` valid positions, and each row is fed
    `width` tokens (right-padded), which land at positions lengths[i] ... lengths[i] + width - 1.
    It returns the 4D attention mask and the position ids for that forward. Which of the new
    entries stay valid is the caller's business: it simply counts them into the row's length."""

    def __init__(self, model: torch.nn.Module, max_slots: int):
        config = model.config.get_text_config(decoder=True)
        self.window = attention_window(model)
        self.max_slots = max_slots
        implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        if implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"the decoding engine needs SDPA or eager attention (it passes a 4D mask), not {implementation!r}"
            )
        self.boolean_mask = implementation == "sdpa"
        self.view: SlotView | None = None
        super().__init__(layers=[SlotLayer(self) for _ in range(config.num_hidden_layers)])

    def prepare(
        self,
        start: int,
        lengths: list[int],
        width: int,
        device: torch.device,
        dtype: torch.dtype,
        tree: FeedTree | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask, position_ids) for a forward over slots [start, start + len(lengths)):
        the fed tokens form a chain, or the `tree` given."""
        row_lengths = torch.tensor(lengths, device=device)
        writes = row_lengths[:, None] + torch.arange(width, device=device)
        kv_length = max(lengths) + width
        self.view = SlotView(start, start + len(lengths), writes, kv_length)
        keys = torch.arange(kv_length, device=device)
        if tree is None:
            # Row b's query i sits at position lengths[b] + i and sees every key up to itself.
            # Padding queries see padding keys too: finite garbage no real query ever attends to.
            positions, key_positions = writes, keys[None, :]
            allowed = keys[None, None, :] <= positions[:, :, None]
        else:
            positions = row_lengths[:, None] + tree.offsets.to(device)
            fed = keys[None, :] - row_lengths[:, None]  # (rows, keys): which fed token a key is, if >= 0
            is_fed = (fed >= 0) & (fed < width)
            index = fed.clamp(0, width - 1)
            sees_fed = tree.visible.to(device).gather(2, index[:, None, :].expand(-1, width, -1))
            allowed = (fed < 0)[:, None, :] | (sees_fed & is_fed[:, None, :])
            key_positions = torch.where(is_fed, positions.gather(1, index), keys[None, :])
        if self.window is not None:
            allowed &= key_positions[:, None, :] > positions[:, :, None] - self.window
        allowed = allowed[:, None]
        if self.boolean_mask:
            return allowed, positions
        return additive_mask(allowed, dtype), positions

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target`."""
        for layer in self.layers:
            layer.move(source, target, length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.view is None else self.layers[0].get_seq_length()
