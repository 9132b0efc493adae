"""Batched, KV-cached, lossless Jacobi decoding for any Hugging Face causal LM.

This is the project's one decoding loop: trajectory collection, evaluation and serving call it,
and greedy autoregressive decoding (`ar_generate`) is the same loop with one-token blocks.

A block of n tokens starts with one verified token (the greedy prediction after the prefix) and
n-1 guesses. Each iteration feeds only the block tokens whose keys/values are not cached yet and
sets every position to the argmax predicted by the position before it. Leading positions whose
input already equalled the prediction are verified: their cache entries are kept, the rest are
dropped. The block is done when a full iteration changes nothing (the fixed point, equal to greedy
AR), or as soon as the verified tokens reach EOS or the token budget.

Rows of a batch advance independently: a row that finishes a block starts its next block in the
next forward, and a finished row leaves the batch. Rows keep per-row position ids and a 2D
attention mask, so cache entries dropped for one row but kept for another are simply masked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from cllm.cache import cache_kwargs, drop_last_cache_entries, new_cache
from cllm.hf import as_id_set
from cllm.metrics import common_prefix_length

InitGuess = Literal["prompt", "repeat"]
TokenCallback = Callable[[int, list[int]], "bool | None"]
"""Called as `on_tokens(row_index, new_ids)` whenever a row's verified output grows; returning
False cancels that row (its output ends with the tokens verified so far)."""


@dataclass
class RowStats:
    """Counters for one row (or, summed, for a whole batch)."""

    forwards: int = 0
    new_tokens: int = 0
    fast_forwarded: int = 0
    stationary: int = 0
    iterations_per_block: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forwards if self.forwards else 0.0

    @property
    def blocks(self) -> int:
        return len(self.iterations_per_block)

    @property
    def mean_iterations_per_block(self) -> float:
        return sum(self.iterations_per_block) / self.blocks if self.blocks else 0.0

    def as_dict(self) -> dict:
        return {
            "forwards": self.forwards,
            "new_tokens": self.new_tokens,
            "tokens_per_forward": self.tokens_per_forward,
            "fast_forwarded": self.fast_forwarded,
            "stationary": self.stationary,
            "blocks": self.blocks,
            "mean_iterations_per_block": self.mean_iterations_per_block,
        }


@dataclass
class GenerationStats:
    rows: list[RowStats]
    batch_forwards: int = 0  # model calls made for the whole batch, prefill included

    @property
    def total(self) -> RowStats:
        total = RowStats()
        for row in self.rows:
            total.forwards += row.forwards
            total.new_tokens += row.new_tokens
            total.fast_forwarded += row.fast_forwarded
            total.stationary += row.stationary
            total.iterations_per_block.extend(row.iterations_per_block)
        return total


@dataclass
class JacobiOutput:
    new_tokens: list[list[int]]
    """Per row, the generated ids up to and including the first EOS, or up to max_new_tokens."""
    stats: GenerationStats
    trajectories: list[list[list[list[int]]]] | None = None
    """Per row, per block, the states (n ids each) from the initial guess to the fixed point.
    Positions past the row's stop (EOS or budget) in the last state hold the pad id. A final block
    that needed no iteration (its first, already verified, token ended the row) has no entry."""


class _Row:
    """Decoding state of one batch row."""

    def __init__(self, index: int, prompt: list[int], position: int):
        self.index = index
        self.prompt = prompt
        self.position = position  # position id of the next token to feed
        self.output: list[int] = []
        self.block: list[int] = []
        self.cached = 0  # leading block tokens whose keys/values are in the cache
        self.states: list[list[int]] = []
        self.block_forwards = 0
        self.trajectories: list[list[list[int]]] = []
        self.stats = RowStats()
        self.done = False
        self.emitted = 0  # verified tokens already passed to the token callback


def _block_statistics(states: list[list[int]], fixed_point: list[int], valid: int) -> tuple[int, int]:
    """(fast-forwarded, stationary) token counts of one block trajectory, on its first `valid`
    positions. Fast-forwarded: tokens beyond the first that become correct in one iteration.
    Stationary: tokens that turn correct while an earlier one is still wrong and then stay."""
    correct = [common_prefix_length(state[:valid], fixed_point[:valid]) for state in states]
    fast_forwarded = sum(max(0, now - before - 1) for before, now in zip(correct, correct[1:]))
    stationary = 0
    for position in range(1, valid):
        settled = len(states)
        while settled > 0 and states[settled - 1][position] == fixed_point[position]:
            settled -= 1
        settled = max(settled, 1)
        if settled < len(states) and correct[settled] < position:
            stationary += 1
    return fast_forwarded, stationary


class _JacobiDecoder:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        n_token: int,
        max_new_tokens: int,
        eos_token_id: int | Iterable[int] | None,
        pad_token_id: int,
        init: InitGuess,
        generator: torch.Generator | None,
        return_trajectories: bool,
        on_tokens: TokenCallback | None = None,
    ):
        if n_token < 1:
            raise ValueError(f"n_token must be >= 1, got {n_token}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if init not in ("prompt", "repeat"):
            raise ValueError(f"init must be 'prompt' or 'repeat', got {init!r}")
        self.model = model
        self.n_token = n_token
        self.max_new_tokens = max_new_tokens
        self.eos = as_id_set(eos_token_id)
        self.pad = pad_token_id
        self.init = init
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.return_trajectories = return_trajectories
        self.on_tokens = on_tokens
        self.batch_forwards = 0

    # -- block bookkeeping -------------------------------------------------------------------

    def _initial_guess(self, row: _Row, first_token: int) -> list[int]:
        if self.init == "repeat" or self.n_token == 1:
            return [first_token] * self.n_token
        picks = torch.randint(len(row.prompt), (self.n_token - 1,), generator=self.generator)
        return [first_token] + [row.prompt[i] for i in picks.tolist()]

    def _stop_length(self, row: _Row, tokens: list[int]) -> int | None:
        """How many of the verified `tokens` end the row (through EOS or the budget), if any."""
        budget = self.max_new_tokens - len(row.output)
        for i, token in enumerate(tokens[:budget]):
            if token in self.eos:
                return i + 1
        return budget if len(tokens) >= budget else None

    def _emit(self, row: _Row, verified_in_block: list[int]) -> None:
        """Pass newly verified tokens to the callback; a False answer cancels the row."""
        if self.on_tokens is None:
            return
        verified = row.output + verified_in_block
        if len(verified) > row.emitted:
            fresh, row.emitted = verified[row.emitted :], len(verified)
            if self.on_tokens(row.index, fresh) is False and not row.done:
                row.output, row.done = verified, True

    def _start_block(self, row: _Row, first_token: int) -> None:
        stop = self._stop_length(row, [first_token])
        if stop is not None:  # nothing left to iterate on
            row.output.append(first_token)
            row.done = True
            self._emit(row, [])
            return
        row.block = self._initial_guess(row, first_token)
        row.states = [list(row.block)]
        row.cached = 0
        row.block_forwards = 0
        self._emit(row, [first_token])

    def _end_block(self, row: _Row, valid: int) -> None:
        fixed_point = row.states[-1]
        fast_forwarded, stationary = _block_statistics(row.states, fixed_point, valid)
        row.stats.fast_forwarded += fast_forwarded
        row.stats.stationary += stationary
        row.stats.iterations_per_block.append(row.block_forwards)
        row.output.extend(fixed_point[:valid])
        if self.return_trajectories:
            row.trajectories.append(row.states)

    def _finish(self, row: _Row, state: list[int], stop: int) -> None:
        """End the row inside its current block, after `stop` tokens of `state`."""
        row.states[-1] = state[:stop] + [self.pad] * (self.n_token - stop)
        self._end_block(row, stop)
        row.done = True
        self._emit(row, [])

    def _advance(self, row: _Row, predictions: list[int]) -> int:
        """Apply one iteration's argmax `predictions` (one per fed token) to the row's block.
        Returns how many of the fed tokens' cache entries stay valid."""
        n, before = self.n_token, row.cached
        row.block_forwards += 1
        updated = row.block[: before + 1] + predictions[: n - before - 1]
        matched = before + 1 + common_prefix_length(row.block[before + 1 :], updated[before + 1 :])
        accepted = matched - before
        row.cached = matched
        row.position += accepted
        if matched == n:  # nothing changed: the fixed point
            stop = self._stop_length(row, row.block)
            if stop is None:  # the last prediction opens the next block
                self._end_block(row, n)
                self._start_block(row, predictions[n - before - 1])
            else:  # EOS or the budget sat unverified in a block that then converged at once
                self._finish(row, row.block, stop)
            return accepted
        row.block = updated
        row.states.append(updated)
        verified = updated[: matched + 1]
        stop = self._stop_length(row, verified)
        if stop is None:
            self._emit(row, verified)
        else:
            self._finish(row, updated, stop)
        return accepted

    # -- the loop ----------------------------------------------------------------------------

    def _forward(self, cache, input_ids, attention_mask, position_ids) -> torch.Tensor:
        self.batch_forwards += 1
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **cache_kwargs(self.model, cache),
        )
        return outputs.logits.argmax(dim=-1)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> JacobiOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        device = self.model.device
        input_ids = input_ids.to(device)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(
            device=device, dtype=torch.long
        )
        if mask.shape != input_ids.shape:
            raise ValueError("attention_mask must have the same shape as input_ids")
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            empty = (lengths == 0).nonzero().flatten().tolist()
            raise ValueError(f"rows {empty} have an empty prompt (attention_mask is all zeros)")

        rows = []
        for index, (ids, row_mask) in enumerate(zip(input_ids.tolist(), mask.tolist())):
            prompt = [token for token, keep in zip(ids, row_mask) if keep]
            rows.append(_Row(index, prompt, position=len(prompt)))

        cache = new_cache(self.model)
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        predictions = self._forward(cache, input_ids, mask, position_ids)
        if not getattr(cache, "is_croppable", True):  # e.g. recurrent or hybrid layers
            raise ValueError(
                f"{type(self.model).__name__}'s cache cannot drop rejected tokens, so it cannot be "
                "Jacobi-decoded; use a model with a full-attention cache"
            )
        last_real = input_ids.shape[1] - 1 - mask.flip(dims=[1]).argmax(dim=1)
        first_tokens = predictions.gather(1, last_real[:, None]).flatten().tolist()
        for row, token in zip(rows, first_tokens):
            row.stats.forwards += 1
            self._start_block(row, token)

        active = rows
        while True:
            keep = [i for i, row in enumerate(active) if not row.done]
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch and stop costing compute
                cache.batch_select_indices(torch.tensor(keep, device=device))
                mask = mask[keep]
                active = [active[i] for i in keep]
            mask = self._iterate(active, cache, mask)

        return self._output(rows)

    def _iterate(self, active: list[_Row], cache, mask: torch.Tensor) -> torch.Tensor:
        device = mask.device
        feeds = [row.block[row.cached :] for row in active]
        width = max(len(feed) for feed in feeds)
        input_ids = torch.tensor(
            [feed + [self.pad] * (width - len(feed)) for feed in feeds], device=device
        )
        fed_mask = torch.tensor(
            [[1] * len(feed) + [0] * (width - len(feed)) for feed in feeds], device=device
        )
        starts = torch.tensor([row.position for row in active], device=device)
        position_ids = starts[:, None] + torch.arange(width, device=device)
        predictions = self._forward(
            cache, input_ids, torch.cat([mask, fed_mask], dim=1), position_ids
        ).tolist()

        accepted = []
        for row, feed, row_predictions in zip(active, feeds, predictions):
            row.stats.forwards += 1
            accepted.append(self._advance(row, row_predictions[: len(feed)]))
        kept = max(accepted)
        # Keep the longest accepted run in the cache; each row masks what it rejected.
        drop_last_cache_entries(cache, width - kept)
        kept_mask = torch.tensor(
            [[1] * count + [0] * (kept - count) for count in accepted], device=device
        )
        return torch.cat([mask, kept_mask], dim=1)

    def _output(self, rows: list[_Row]) -> JacobiOutput:
        for row in rows:
            row.stats.new_tokens = len(row.output)
        return JacobiOutput(
            new_tokens=[row.output for row in rows],
            stats=GenerationStats(rows=[row.stats for row in rows], batch_forwards=self.batch_forwards),
            trajectories=[row.trajectories for row in rows] if self.return_trajectories else None,
        )


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token-id prompts of different lengths, padded on the left."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return input_ids, attention_mask


def jacobi_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    n_token: int = 16,
    max_new_tokens: int = 256,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int = 0,
    init: InitGuess = "prompt",
    generator: torch.Generator | None = None,
    return_trajectories: bool = False,
    on_tokens: TokenCallback | None = None,
) -> JacobiOutput:
    """Greedy-equivalent Jacobi decoding of a padded batch (any padding side) with blocks of
    `n_token` tokens. The initial guess of a block is its verified first token followed by
    random tokens of the row's own prompt (`init="prompt"`, seeded by `generator`) or by copies of
    that token (`init="repeat"`). `on_tokens` streams each row's tokens as they are verified.
    `pad_token_id` fills padding and a finished block's unused tail; padding is always masked, so
    it never changes the output (pass `cllm.hf.pad_id(tokenizer)` to keep trajectories readable)."""
    decoder = _JacobiDecoder(
        model,
        n_token=n_token,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        init=init,
        generator=generator,
        return_trajectories=return_trajectories,
        on_tokens=on_tokens,
    )
    return decoder.run(input_ids, attention_mask)


def ar_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int = 0,
    on_tokens: TokenCallback | None = None,
) -> JacobiOutput:
    """Greedy autoregressive decoding on the same cache and attention path: Jacobi decoding with
    one-token blocks, where every iteration verifies exactly one token."""
    return jacobi_generate(
        model,
        input_ids,
        attention_mask,
        n_token=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        init="repeat",
        on_tokens=on_tokens,
    )
