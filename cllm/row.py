"""One request's Jacobi decoding state: the block-refinement rule of the project's one decoding loop.

A block of n tokens starts with one verified token (the model's choice after the prefix) and n-1
guesses (drafts). Each iteration feeds only the block tokens whose keys/values are not cached yet;
the model's output at each fed position judges the draft after it. Leading drafts that survive
(greedy: equal the argmax; sampling: pass the speculative test in `cllm.sampling`) are verified,
and so is the token chosen at the first failure: their cache entries are kept, the rest are
overwritten next time, and the drafts after the failure are replaced by the model's new choices.
The block is done when a full iteration changes nothing (the fixed point, which under greedy
decoding is exactly greedy AR), or as soon as the verified tokens reach EOS or the token budget.

`Row` holds that state for one request and applies one iteration's outcome (`advance`); the engine
(`cllm.engine`) runs the forwards and decides the outcome for many rows at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from cllm.metrics import common_prefix_length
from cllm.sampling import SamplingParams, TokenLogprob

InitGuess = Literal["prompt", "repeat"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
RowCallback = Callable[[list[int], "list[TokenLogprob] | None"], "bool | None"]
"""Called as `on_tokens(new_ids, new_logprobs)` whenever a request's verified output grows;
returning False cancels the request (its output ends with the tokens verified so far)."""


@dataclass(frozen=True)
class RequestParams:
    """How one request is decoded. `n_token` 1 is AR decoding; `logprobs` k returns each token's
    log-probability and its k likeliest alternatives (None: none). `eos_token_ids` end the output
    (the caller adds stop token ids, or leaves EOS out to ignore it); `min_tokens` forbids them
    before that many tokens, by masking their logits as vLLM does, so greedy stays exactly AR."""

    max_new_tokens: int = 256
    n_token: int = 16
    eos_token_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    sampling: SamplingParams = SamplingParams()
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (computed in the prefill)
    init: InitGuess = "prompt"
    return_trajectories: bool = False

    def __post_init__(self):
        if self.n_token < 1:
            raise ValueError(f"n_token must be >= 1, got {self.n_token}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.init not in ("prompt", "repeat"):
            raise ValueError(f"init must be 'prompt' or 'repeat', got {self.init!r}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must lie in [0, max_new_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {getattr(self, name)}")


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



def block_statistics(states: list[list[int]], fixed_point: list[int], valid: int) -> tuple[int, int]:
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


class Row:
    """Decoding state of one request."""

    def __init__(
        self,
        request_id: int,
        prompt: list[int],
        params: RequestParams,
        seed: int,
        pad_token_id: int,
        on_tokens: RowCallback | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.seed = seed  # keys the sampling random numbers and the initial guesses
        self.pad = pad_token_id
        self.on_tokens = on_tokens
        self.guesses = random.Random(seed)
        self.length = 0  # keys/values in the cache = position id of the next fed token
        self.slot = -1
        self.draws = 0  # iterations that drew random numbers so far (the sampling counter)
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.block: list[int] = []
        self.cached = 0  # leading block tokens whose keys/values are in the cache
        self.draft_probs: torch.Tensor | None = None  # (n, vocab): what each draft was drawn from
        self.states: list[list[int]] = []
        self.block_forwards = 0
        self.trajectories: list[list[list[int]]] = []
        self.stats = RowStats()
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.emitted = 0  # verified tokens already passed to the callback

    @property
    def n_token(self) -> int:
        return self.params.n_token

    @property
    def sampling(self) -> SamplingParams:
        return self.params.sampling

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def feed(self) -> list[int]:
        """The block tokens the next iteration feeds (those not cached yet)."""
        return self.block[self.cached :]

    @property
    def drafts(self) -> list[int]:
        """The unverified guesses the next iteration judges."""
        return self.block[self.cached + 1 :]

    # -- block bookkeeping ---------------------------------------------------------------------

    def _initial_guess(self, first_token: int) -> list[int]:
        n = self.n_token
        if self.params.init == "repeat" or n == 1:
            return [first_token] * n
        return [first_token] + self.guesses.choices(self.prompt, k=n - 1)

    def _stop(self, tokens: list[int]) -> tuple[int, FinishReason] | None:
        """How many of the verified `tokens` end the row, and why (EOS or the budget), if any."""
        budget = self.params.max_new_tokens - len(self.output)
        for i, token in enumerate(tokens[:budget]):
            if token in self.params.eos_token_ids:
                return i + 1, "stop"
        return (budget, "length") if len(tokens) >= budget else None

    def _emit(self, verified_in_block: list[int]) -> None:
        """Pass newly verified tokens to the callback; a False answer cancels the row."""
        if self.on_tokens is None:
            return
        verified = self.output + verified_in_block
        if len(verified) > self.emitted:
            start, self.emitted = self.emitted, len(verified)
            logprobs = None if self.logprobs is None else self.logprobs[start : len(verified)]
            if self.on_tokens(verified[start:], logprobs) is False and not self.done:
                self.output, self.finish_reason = verified, "cancelled"
                self._trim_logprobs()

    def _trim_logprobs(self) -> None:
        if self.logprobs is not None:
            del self.logprobs[len(self.output) :]

    def start(self, first_token: int, logprob: TokenLogprob | None = None) -> None:
        """Begin the row's first block (after the prefill) or its next one."""
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        stop = self._stop([first_token])
        if stop is not None:  # nothing left to iterate on
            self.output.append(first_token)
            self.finish_reason = stop[1]
            self._emit([])
            return
        self.block = self._initial_guess(first_token)
        self.states = [list(self.block)]
        self.cached = 0
        self.block_forwards = 0
        self._emit([first_token])

    def _end_block(self, valid: int) -> None:
        fixed_point = self.states[-1]
        fast_forwarded, stationary = block_statistics(self.states, fixed_point, valid)
        self.stats.fast_forwarded += fast_forwarded
        self.stats.stationary += stationary
        self.stats.iterations_per_block.append(self.block_forwards)
        self.output.extend(fixed_point[:valid])
        if self.params.return_trajectories:
            self.trajectories.append(self.states)

    def _finish(self, state: list[int], stop: tuple[int, FinishReason]) -> None:
        """End the row inside its current block, after `stop` tokens of `state`."""
        count, reason = stop
        self.states[-1] = state[:count] + [self.pad] * (self.n_token - count)
        self._end_block(count)
        self.finish_reason = reason
        self._trim_logprobs()
        self._emit([])

    def advance(self, accepted: int, proposals: list[int], logprobs: list[TokenLogprob] | None = None) -> int:
        """Apply one iteration: the first `accepted` drafts survived; `proposals[accepted]` is the
        verified token after them (the next block's first at the fixed point) and
        `proposals[accepted + 1 :]` are the new drafts. `logprobs` holds the log-probabilities of
        the fed positions' verified tokens. Returns how many fed tokens' cache entries stay valid."""
        n, before = self.n_token, self.cached
        drafts = n - before - 1
        self.block_forwards += 1
        self.stats.forwards += 1
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.extend(logprobs[: accepted + 1])
        if accepted == drafts:  # nothing changed: the fixed point
            stop = self._stop(self.block)
            if stop is None:  # the last proposal opens the next block
                self._end_block(n)
                self.start(proposals[drafts])
            else:  # EOS or the budget sat unverified in a block that then converged at once
                self._finish(self.block, stop)
            return accepted + 1
        matched = before + 1 + accepted
        updated = self.block[:matched] + proposals[accepted:drafts]
        self.cached = matched
        self.block = updated
        self.states.append(updated)
        verified = updated[: matched + 1]
        stop = self._stop(verified)
        if stop is None:
            self._emit(verified)
        else:
            self._finish(updated, stop)
        return accepted + 1

    def cancel(self) -> None:
        """Stop now (an abort): the output is the tokens verified so far."""
        if not self.done:
            self.output = self.output + self.block[: self.cached + 1] if self.block else self.output
            self.output = self.output[: self.params.max_new_tokens]
            self.finish_reason = "cancelled"
            self._trim_logprobs()

    def fail(self, error: BaseException) -> None:
        self.finish_reason, self.error = "error", error
