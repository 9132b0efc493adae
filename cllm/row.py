"""One request's Jacobi decoding state: the block-refinement rule of the project's one decoding loop.

A block of n tokens starts with one verified token (the model's choice after the prefix) and n-1
guesses (drafts). Each iteration feeds only the block tokens whose keys/values are not cached yet;
the model's output at each fed position judges the draft after it. Leading drafts that survive
(greedy: equal the argmax; sampling: pass the speculative test in `cllm.sampling`) are verified,
and so is the token chosen at the first failure: their cache entries are kept, the rest are
overwritten next time, and the drafts after the failure are replaced by the model's new choices.
The block is done when a full iteration changes nothing (the fixed point, which under greedy
decoding is exactly greedy AR), or as soon as the verified tokens reach EOS or the token budget.

Beyond the paper's rule (`cllm.drafts.DecodingOptions`), guesses may come from the text, the
next block may be drafted behind the active one (the row's *window* then holds both, fed as one
run), and n-grams verified beside the window may replace its drafts. None of them changes what is
verified, only how soon.

`Row` holds that state for one request and applies one iteration's outcome (`advance`); the engine
(`cllm.engine`) runs the forwards and decides the outcome for many rows at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from cllm.drafts import MAX_CONTEXT, PAPER, DecodingOptions, DraftPool, NgramIndex
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
    decoding: DecodingOptions = PAPER  # drafting beyond the paper's rule (ignored by AR, n_token 1)

    def __post_init__(self):
        if self.n_token < 1:
            raise ValueError(f"n_token must be >= 1, got {self.n_token}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.init not in ("prompt", "repeat"):
            raise ValueError(f"init must be 'prompt' or 'repeat', got {self.init!r}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must lie in [0, max_new_tokens], got {self.min_tokens}")
        if self.return_trajectories and self.decoding != PAPER:
            raise ValueError("trajectories are the paper's states: collect them with the default decoding options")
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
    recycled: int = 0  # drafts taken from n-grams that the model had confirmed (`Row.recycle`)
    iterations: int = 0  # forwards after the prefill
    fed: int = 0  # tokens those iterations fed (window and n-grams): the width a forward costs
    iterations_per_block: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forwards if self.forwards else 0.0

    @property
    def fed_per_iteration(self) -> float:
        return self.fed / self.iterations if self.iterations else 0.0

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
        vocab_size: int,
        device: torch.device | str = "cpu",
        on_tokens: RowCallback | None = None,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.seed = seed  # keys the sampling random numbers and the initial guesses
        self.pad = pad_token_id
        self.vocab_size = vocab_size  # of the logits: the width of a fixed guess's one-hot distribution
        self.device = device
        self.on_tokens = on_tokens
        self.options = params.decoding if params.n_token > 1 else PAPER
        self.guesses = random.Random(seed)
        recycling = self.options.recycle_candidates > 0
        self.index = NgramIndex(prompt) if self.options.lookup or recycling else None
        self.pool = DraftPool(self.options.recycle_length, self.options.recycle_candidates) if recycling else None
        self.candidates: list[list[int]] = []  # n-grams verified beside the window in the coming forward
        self.length = 0  # keys/values in the cache = position id of the next fed token
        self.slot = -1
        self.draws = 0  # iterations that drew random numbers so far (the sampling counter)
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.block: list[int] = []  # the window: the active block, then drafts of the next ones
        self.cached = 0  # leading window tokens whose keys/values are in the cache
        self.draft_probs: torch.Tensor | None = None  # (window, vocab): what each draft was drawn from
        self.states: list[list[int]] = []  # the active block's states
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
        """The window tokens the next iteration feeds (those not cached yet)."""
        return self.block[self.cached :]

    @property
    def drafts(self) -> list[int]:
        """The unverified guesses the next iteration judges."""
        return self.block[self.cached + 1 :]

    @property
    def _tracks_drafts(self) -> bool:
        """Whether the row keeps each draft's distribution (sampling with drafts to judge)."""
        return not self.sampling.greedy and self.n_token > 1

    # -- the window ----------------------------------------------------------------------------

    def _guesses(self, window: list[int], count: int) -> list[int]:
        """`count` drafts to follow `window`: a lookup's continuation where the options ask for
        one, then the `init` rule (random prompt tokens, or the last token repeated)."""
        guesses: list[int] = []
        if count > 0 and self.options.lookup:
            guesses = self.index.continuation((self.index.tokens[-MAX_CONTEXT:] + window)[-MAX_CONTEXT:], count)
        rest = count - len(guesses)
        if rest > 0 and self.params.init == "repeat":
            guesses += [(window + guesses)[-1]] * rest
        elif rest > 0:
            guesses += self.guesses.choices(self.prompt, k=rest)
        return guesses

    def _window_size(self) -> int:
        """The active block, and once it has verified its share, the next blocks behind it (only
        the active block's tokens are ever verified, so its share is the one signal there is)."""
        n, options = self.n_token, self.options
        if self.cached + 1 < math.ceil(options.next_block_share * n):
            return n
        budget = self.params.max_new_tokens - len(self.output)  # drafts past it would never count
        return max(n, min(n * options.blocks_in_flight, budget))

    def _set_window(self, window: list[int], draft_probs: torch.Tensor | None) -> None:
        """Make `window` (with its drafts' distributions) the row's, cut or extended with guesses
        to the size the options give it now."""
        size = self._window_size()
        guesses = self._guesses(window, size - len(window))
        self.block = window[:size] + guesses
        if self._tracks_drafts:
            fixed = self._one_hot(guesses if draft_probs is not None else self.block)
            self.draft_probs = fixed if draft_probs is None else torch.cat([draft_probs[:size], fixed])

    def _one_hot(self, tokens: list[int]) -> torch.Tensor:
        """Fixed guesses count as drawn from one-hot distributions."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return torch.nn.functional.one_hot(ids, self.vocab_size).float()

    # -- block bookkeeping ---------------------------------------------------------------------

    def _stop(self, tokens: list[int]) -> tuple[int, FinishReason] | None:
        """How many of the verified `tokens` end the row, and why (EOS or the budget), if any."""
        budget = self.params.max_new_tokens - len(self.output)
        for i, token in enumerate(tokens[:budget]):
            if token in self.params.eos_token_ids:
                return i + 1, "stop"
        return (budget, "length") if len(tokens) >= budget else None

    def _emit(self, verified_in_window: list[int]) -> None:
        """Pass newly verified tokens to the callback; a False answer cancels the row."""
        if self.on_tokens is None:
            return
        verified = self.output + verified_in_window
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
        """Begin the first block, after the prefill chose its first token."""
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        stop = self._stop([first_token])
        if stop is not None:  # nothing left to iterate on
            self.output.append(first_token)
            self.finish_reason = stop[1]
            self._emit([])
            return
        self.cached = 0
        self._set_window([first_token], None)
        self.states = [self.block[: self.n_token]]
        self.block_forwards = 0
        self._emit([first_token])

    def _end_block(self, valid: int) -> None:
        """Move the active block's first `valid` tokens (its last state) to the output."""
        fixed_point = self.states[-1]
        fast_forwarded, stationary = block_statistics(self.states, fixed_point, valid)
        self.stats.fast_forwarded += fast_forwarded
        self.stats.stationary += stationary
        self.stats.iterations_per_block.append(self.block_forwards)
        self.output.extend(fixed_point[:valid])
        if self.index is not None:
            self.index.extend(fixed_point[:valid])
        if self.params.return_trajectories:
            self.trajectories.append(self.states)

    def _next_block(self, window: list[int]) -> list[int]:
        """End the (fully verified) active block and make the next one active."""
        self._end_block(self.n_token)
        window = window[self.n_token :]
        self.states = [window[: self.n_token]]
        self.block_forwards = 0
        return window

    def _finish(self, window: list[int], count: int, reason: FinishReason) -> None:
        """End the row after the first `count` tokens of `window`."""
        n = self.n_token
        if window[:n] != self.states[-1]:
            self.states.append(window[:n])
        ended = False
        while count > n:
            window, count, ended = self._next_block(window), count - n, True
        if ended and count == 1:  # a block that has not started: its first token ends the row
            self.output.append(window[0])
        else:
            self.states[-1] = window[:count] + [self.pad] * (n - count)
            self._end_block(count)
        self.finish_reason = reason
        self._trim_logprobs()
        self._emit([])

    def advance(
        self,
        accepted: int,
        proposals: list[int],
        logprobs: list[TokenLogprob] | None = None,
        probs: torch.Tensor | None = None,
    ) -> int:
        """Apply one iteration: the first `accepted` drafts survived; `proposals[accepted]` is the
        verified token after them (the next block's first at the fixed point) and
        `proposals[accepted + 1 :]` are the new drafts. `logprobs` holds the log-probabilities of
        the fed positions' verified tokens, and `probs` (sampling) the distributions the fed
        positions drew from. Returns how many fed tokens' cache entries stay valid."""
        n, before = self.n_token, self.cached
        drafts = len(self.block) - before - 1
        self.block_forwards += 1
        self.stats.forwards += 1
        self.stats.iterations += 1
        self.stats.fed += drafts + 1 + sum(map(len, self.candidates))
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.extend(logprobs[: accepted + 1])
        matched = before + 1 + accepted  # where the verified token lands
        if self.pool is not None:
            self.pool.add(self.block[matched:])  # the drafts this iteration rejected
        window = self.block[:matched] + proposals[accepted : drafts + 1]
        draft_probs = None
        if self._tracks_drafts and probs is not None:
            draft_probs = torch.cat([self.draft_probs[:matched], probs[accepted : drafts + 1]])
        self.cached = matched
        stop = self._stop(window[: matched + 1])
        if stop is not None:
            self._finish(window, *stop)
            return accepted + 1
        ended = False
        while self.cached >= n:  # the active block and the next block's first token are verified
            window, ended = self._next_block(window), True
            draft_probs = None if draft_probs is None else draft_probs[n:]
            self.cached -= n
        self._set_window(window, draft_probs)
        if ended:
            self.states = [self.block[:n]]
        else:
            self.states.append(self.block[:n])
        self._emit(self.block[: self.cached + 1])
        return accepted + 1

    # -- recycled n-grams ----------------------------------------------------------------------

    def next_candidates(self) -> list[list[int]]:
        """The n-grams to verify beside the window in the coming forward: continuations of the
        last verified token, from the text first, then from the pool of rejected drafts; none
        that the window's own drafts already hold."""
        self.candidates = []
        if self.pool is None or self.done:
            return self.candidates
        length, verified = self.options.recycle_length, self.block[: self.cached + 1]
        context = (self.index.tokens[-MAX_CONTEXT:] + verified)[-MAX_CONTEXT:]
        own = tuple(self.drafts[:length])
        for candidate in [tuple(self.index.continuation(context, length)), *self.pool.candidates(verified[-1])]:
            if len(self.candidates) == self.options.recycle_candidates:
                break
            if candidate and candidate != own[: len(candidate)] and list(candidate) not in self.candidates:
                self.candidates.append(list(candidate))
        return self.candidates

    def recycle(self, verified_before: int, argmax: list[int], starts: list[int]) -> None:
        """After `advance`: the longest run of a candidate that the model confirmed (each token the
        argmax after the ones before it), with the model's choice after it, becomes the drafts
        after the verified tokens. `argmax` is the choice at each fed position, `starts` where each
        candidate sat in the feed, `verified_before` the row's verified tokens before the forward.
        Only drafts change: the next forward verifies them as any others."""
        candidates, self.candidates = self.candidates, []
        if self.done or not candidates:
            return
        verified_window = self.block[: self.cached + 1]
        known = len(self.output) + len(verified_window) - verified_before  # verified by this forward
        verified_tail = (self.output[-known:] + verified_window)[-known:]
        best: list[int] = []
        for candidate, start in zip(candidates, starts):
            chain, choice = [], argmax[0]
            for offset, token in enumerate(candidate):
                if token != choice:
                    break
                chain.append(token)
                choice = argmax[start + offset]
            chain.append(choice)
            if len(chain) > max(known, len(best)) and chain[:known] == verified_tail:
                best = chain
        first = self.cached + 1
        drafts = best[known:][: len(self.block) - first]
        if not drafts:
            return
        self.block[first : first + len(drafts)] = drafts
        self.stats.recycled += len(drafts)
        self._fixed_guesses_at(first, drafts)
        self.states[-1] = self.block[: self.n_token]

    def _fixed_guesses_at(self, first: int, drafts: list[int]) -> None:
        """Drafts chosen, not drawn: for the speculative rule they come from one-hot distributions."""
        if self.draft_probs is not None:
            self.draft_probs[first : first + len(drafts)] = self._one_hot(drafts)

    def cancel(self) -> None:
        """Stop now (an abort): the output is the tokens verified so far."""
        if not self.done:
            self.output = self.output + self.block[: self.cached + 1] if self.block else self.output
            self.output = self.output[: self.params.max_new_tokens]
            self.finish_reason = "cancelled"
            self._trim_logprobs()

    def fail(self, error: BaseException) -> None:
        self.finish_reason, self.error = "error", error
