"""Batched, KV-cached, lossless Jacobi decoding of a padded batch, for any Hugging Face causal LM.

`jacobi_generate` and `ar_generate` run a batch of prompts through the decoding engine
(`cllm.engine`), the project's one decoding loop: greedy autoregressive decoding is the same loop
with one-token blocks. The block-refinement rule lives in `cllm.row`.

Rows of a batch advance independently: a row that finishes a block starts its next block in the
next forward, and a finished row leaves the batch at once. With `sampling` (temperature > 0) the
rows sample losslessly: every token is distributed exactly as AR sampling would draw it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from cllm.drafts import PAPER, DecodingOptions
from cllm.engine import Engine, FinishedRequest
from cllm.hf import as_id_set
from cllm.row import InitGuess, RequestParams, RowStats
from cllm.sampling import SamplingParams, TokenLogprob

TokenCallback = Callable[[int, list[int]], "bool | None"]
"""Called as `on_tokens(row_index, new_ids)` whenever a row's verified output grows; returning
False cancels that row (its output ends with the tokens verified so far)."""

GREEDY = SamplingParams()


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
            total.recycled += row.recycled
            total.iterations += row.iterations
            total.fed += row.fed
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
    logprobs: list[list[TokenLogprob]] | None = None
    """Per row and generated token, its log-probability (and top alternatives), with `logprobs=k`."""


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token-id prompts of different lengths, padded on the left."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return input_ids, attention_mask


def _prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if mask.shape != input_ids.shape:
        raise ValueError("attention_mask must have the same shape as input_ids")
    prompts = [[t for t, keep in zip(ids, keeps) if keep] for ids, keeps in zip(input_ids.tolist(), mask.tolist())]
    empty = [row for row, prompt in enumerate(prompts) if not prompt]
    if empty:
        raise ValueError(f"rows {empty} have an empty prompt (attention_mask is all zeros)")
    return prompts


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
    sampling: SamplingParams = GREEDY,
    logprobs: int | None = None,
    decoding: DecodingOptions = PAPER,
) -> JacobiOutput:
    """Jacobi decoding of a padded batch (any padding side) with blocks of `n_token` tokens:
    greedy (equal to greedy AR) by default, lossless sampling with `sampling`. The initial guess
    of a block is its verified first token followed by random tokens of the row's own prompt
    (`init="prompt"`) or by copies of that token (`init="repeat"`). `generator` seeds each row
    (its guesses and, unless `sampling.seed` is set, its samples; row i of a seeded `sampling`
    uses seed + i). `on_tokens` streams each row's tokens as they are verified; `logprobs=k`
    returns each token's log-probability and its k likeliest alternatives. `decoding` turns on
    drafting beyond the paper's rule (`cllm.drafts.DecodingOptions`). `pad_token_id` fills
    padding and a finished block's unused tail; padding never changes the output (pass
    `cllm.hf.pad_id(tokenizer)` to keep trajectories readable)."""
    prompts = _prompts(input_ids, attention_mask)
    base = RequestParams(
        max_new_tokens=max_new_tokens,
        n_token=n_token,
        eos_token_ids=as_id_set(eos_token_id),
        sampling=sampling,
        logprobs=logprobs,
        init=init,
        return_trajectories=return_trajectories,
        decoding=decoding,
    )
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator).tolist()
    if sampling.seed is not None:
        seeds = [sampling.seed + row for row in range(len(prompts))]
    engine = Engine(model, max_rows=len(prompts), max_prefill_tokens=None, pad_token_id=pad_token_id,
                    isolate_failures=False)
    ids = []
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        callback = None if on_tokens is None else _row_callback(on_tokens, row)
        params = replace(base, sampling=replace(sampling, seed=seed))
        ids.append(engine.add_request(prompt, params, callback))
    finished: dict[int, FinishedRequest] = {}
    while engine.has_unfinished():
        finished.update((request.request_id, request) for request in engine.step())
    results = [finished[request_id] for request_id in ids]
    return JacobiOutput(
        new_tokens=[result.tokens for result in results],
        stats=GenerationStats(rows=[result.stats for result in results], batch_forwards=engine.forwards),
        trajectories=[result.trajectories for result in results] if return_trajectories else None,
        logprobs=[result.logprobs for result in results] if logprobs is not None else None,
    )


def _row_callback(on_tokens: TokenCallback, row: int) -> Callable[[list[int], object], bool | None]:
    return lambda new_ids, _logprobs: on_tokens(row, new_ids)


def ar_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int = 0,
    on_tokens: TokenCallback | None = None,
    sampling: SamplingParams = GREEDY,
    generator: torch.Generator | None = None,
    logprobs: int | None = None,
) -> JacobiOutput:
    """Autoregressive decoding (greedy by default) on the same engine, cache and attention path:
    Jacobi decoding with one-token blocks, where every iteration verifies exactly one token."""
    return jacobi_generate(
        model,
        input_ids,
        attention_mask,
        n_token=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        init="repeat",
        generator=generator,
        on_tokens=on_tokens,
        sampling=sampling,
        logprobs=logprobs,
    )
