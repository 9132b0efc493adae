"""The decoding engine: continuous batching of Jacobi (and AR) decoding on one model, Ray-free.

    engine = Engine(model, max_rows=8)
    request_id = engine.add_request(prompt_ids, RequestParams(n_token=16, max_new_tokens=128), on_tokens)
    while engine.has_unfinished():
        for finished in engine.step():
            ...  # FinishedRequest: tokens, finish_reason, stats, logprobs

Each `step` first admits waiting requests (up to `max_rows` running rows and `max_prefill_tokens`
prompt tokens): one prefill forward writes their prompts' keys/values into free slots of the
`SlotCache` and computes logits at each prompt's last position only (at every position for a
request that wants `prompt_logprobs`, prefilled alone). Then one forward advances
every running row by one Jacobi iteration (`cllm.row`), whatever its block size, budget, sampling
parameters or phase. Finished, aborted and failed rows leave at once and free their slot.
`jacobi_generate` and `ar_generate` (`cllm.jacobi`) drive this same engine: there is one decoding
loop. Drafting beyond the paper's rule (`cllm.drafts`) rides in the same forward: a row's window
may hold more than one block, and n-grams to verify follow it in the row, under a tree mask.

Failures stay with their request: a prefill that raises (say, out of memory on one long prompt) is
retried row by row and fails only the rows that still raise; an iteration that raises fails the
longest row, and the others go on at the next step.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cllm.cache import FeedTree, SlotCache, cache_kwargs, logits_to_keep_kwargs
from cllm.metrics import common_prefix_length
from cllm.row import FinishReason, RequestParams, Row, RowCallback, RowStats
from cllm.sampling import TokenLogprob, random_keys, speculative_step, target_probs, token_logprobs

logger = logging.getLogger(__name__)


@dataclass
class FinishedRequest:
    request_id: int
    tokens: list[int]
    """The generated ids up to and including the first EOS, or up to max_new_tokens."""
    finish_reason: FinishReason
    stats: RowStats
    logprobs: list[TokenLogprob] | None = None
    trajectories: list[list[list[int]]] | None = None
    error: BaseException | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    """Prompt tokens 1.. given those before them (`RequestParams.prompt_logprobs`)."""


@dataclass
class _Choices:
    """What one forward decided for its rows, as plain lists (one device sync per kind)."""

    accepted: list[int]
    proposals: list[list[int]]
    logprobs: list[list[TokenLogprob] | None]
    sampled_probs: dict[int, torch.Tensor]  # row index -> (width, vocab) target distributions
    argmax: torch.Tensor  # (rows, width) likeliest tokens: what recycled n-grams are checked against

    def likeliest(self, index: int) -> list[int]:
        """Row `index`'s likeliest token at every position. A greedy row's proposals are exactly
        that, already on the host; only a sampled row's are read off the device."""
        return self.argmax[index].tolist() if index in self.sampled_probs else self.proposals[index]


class Engine:
    """Runs requests on `model` in continuous batches. Not thread-safe: one thread calls it."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_rows: int = 8,
        max_prefill_tokens: int | None = 8192,
        pad_token_id: int = 0,
        seed: int | None = 0,
        isolate_failures: bool = True,
    ):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model
        self.max_rows = max_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.pad = pad_token_id
        self.isolate_failures = isolate_failures
        self.cache = SlotCache(model, max_slots=max_rows)
        self.vocab_size = int(model.config.get_text_config(decoder=True).vocab_size)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._logits_width = int(head.weight.shape[0]) if head is not None else self.vocab_size
        self._dtype = getattr(model, "dtype", torch.float32)  # of the attention mask (eager attention)
        self._seeds = random.Random(seed) if seed is not None else random.SystemRandom()
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []  # running[i].slot == i
        self._rows: dict[int, Row] = {}
        self._finished: list[FinishedRequest] = []
        self._next_id = 0
        self._in_step = False
        self.forwards = 0  # model calls, prefills included

    # -- the public interface ------------------------------------------------------------------

    def add_request(
        self, prompt_ids: Sequence[int], params: RequestParams | None = None, on_tokens: RowCallback | None = None
    ) -> int:
        """Queue a request; it joins the running batch at the next step. Returns its id."""
        params = params if params is not None else RequestParams()
        prompt = [int(token) for token in prompt_ids]
        if not prompt:
            raise ValueError("the prompt must not be empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        seed = params.sampling.seed if params.sampling.seed is not None else self._seeds.getrandbits(63)
        request_id, self._next_id = self._next_id, self._next_id + 1
        row = Row(request_id, prompt, params, seed, self.pad, self._logits_width, self.model.device, on_tokens)
        self._rows[request_id] = row
        self._waiting.append(row)
        return request_id

    @torch.inference_mode()
    def abort(self, request_id: int) -> None:
        """Stop a request now; its slot is free for the next step. Unknown ids are ignored."""
        row = self._rows.get(request_id)
        if row is None or row.done:
            return
        row.cancel()
        if row in self._waiting:
            self._waiting.remove(row)
            self._retire(row)
        elif not self._in_step:
            self._release()

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._finished)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @torch.inference_mode()
    def step(self) -> list[FinishedRequest]:
        """Admit waiting requests, run one iteration for every running row, and return the
        requests that finished (including aborted and failed ones) since the last step."""
        self._in_step = True
        try:
            self._admit()
            self._release()
            if self._running:
                self._iterate()
            self._release()
        finally:
            self._in_step = False
        finished, self._finished = self._finished, []
        return finished

    # -- admission and release -----------------------------------------------------------------

    def _admit(self) -> None:
        joiners: list[Row] = []
        tokens = 0
        while self._waiting and len(self._running) + len(joiners) < self.max_rows:
            size = len(self._waiting[0].prompt)
            if joiners and self.max_prefill_tokens is not None and tokens + size > self.max_prefill_tokens:
                break
            joiners.append(self._waiting.popleft())
            tokens += size
        if not joiners:
            return
        joiners.sort(key=lambda row: row.params.prompt_logprobs is not None)  # see _prefill
        for row in joiners:
            row.slot = len(self._running)
            self._running.append(row)
        try:
            self._prefill(joiners)
        except Exception as error:
            if not self.isolate_failures:
                raise
            logger.warning("prefill of %d requests failed (%s); retrying them one by one", len(joiners), error)
            for row in joiners:
                if row.length:  # its group's prefill went through before the failure
                    continue
                if len(joiners) == 1:
                    row.fail(error)
                    continue
                try:
                    self._prefill([row])
                except Exception as own_error:
                    logger.exception("request %d failed in its prefill", row.request_id)
                    row.fail(own_error)

    def _release(self) -> None:
        """Retire finished rows and move the last running rows into their slots."""
        survivors = [row for row in self._running if not row.done]
        if len(survivors) == len(self._running):
            return
        keep = len(survivors)
        holes = [row.slot for row in self._running[:keep] if row.done]
        movers = [row for row in self._running[keep:] if not row.done]
        for row in self._running:
            if row.done:
                self._retire(row)
        for row, hole in zip(movers, holes, strict=True):
            self.cache.move_slot(row.slot, hole, row.length)
            row.slot = hole
        self._running = sorted(survivors, key=lambda row: row.slot)

    def _retire(self, row: Row) -> None:
        del self._rows[row.request_id]
        row.stats.new_tokens = len(row.output)
        row.draft_probs = None
        self._finished.append(
            FinishedRequest(
                row.request_id,
                row.output,
                row.finish_reason,
                row.stats,
                row.logprobs,
                row.trajectories if row.params.return_trajectories else None,
                row.error,
                row.prompt_logprobs,
            )
        )

    # -- forwards --------------------------------------------------------------------------------

    def _forward(
        self, rows: list[Row], feeds: list[list[int]], keep: list[int] | None = None, tree: FeedTree | None = None
    ) -> torch.Tensor:
        """Logits (rows, positions, vocab) of one forward over the rows' slots, each row fed its
        tokens at its own end (as a chain, or as `tree` lays them out); with `keep` (a position
        per row), only those positions' logits."""
        device = self.model.device
        width = max(len(feed) for feed in feeds)
        input_ids = torch.tensor([feed + [self.pad] * (width - len(feed)) for feed in feeds], device=device)
        mask, positions = self.cache.prepare(
            rows[0].slot, [row.length for row in rows], width, device, self._dtype, tree
        )
        kwargs = cache_kwargs(self.model, self.cache)
        if keep is not None:
            kwargs.update(logits_to_keep_kwargs(self.model, keep, width))
        self.forwards += 1
        logits = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
        ).logits
        if keep is not None and logits.shape[1] != 1:  # the model computed every position
            index = torch.tensor(keep, device=logits.device)[:, None, None].expand(-1, 1, logits.shape[-1])
            logits = logits.gather(1, index)
        return logits

    def _prefill(self, rows: list[Row]) -> None:
        # A row that wants prompt log-probabilities needs every position's logits: it gets a
        # forward of its own (bounded by its prompt), after the others' (its slot comes last).
        plain = [row for row in rows if row.params.prompt_logprobs is None]
        for group in ([plain] if plain else []) + [[row] for row in rows if row not in plain]:
            self._prefill_group(group)

    def _prefill_group(self, rows: list[Row]) -> None:
        for row in rows:
            row.length = 0
        last = [len(row.prompt) - 1 for row in rows]
        if rows[0].params.prompt_logprobs is not None:
            every = self._forward(rows, [rows[0].prompt])
            self._prompt_logprobs(rows[0], every[0])
            logits = every[:, last[0] :]
        else:
            logits = self._forward(rows, [row.prompt for row in rows], last)
        self._forbid_early_stops(rows, logits, [0] * len(rows))
        choices = self._choose(rows, logits, [[] for _ in rows])
        for index, row in enumerate(rows):
            row.length = len(row.prompt)
            row.stats.forwards += 1
            logprobs = choices.logprobs[index]
            row.start(choices.proposals[index][0], logprobs[0] if logprobs else None)

    @staticmethod
    def _prompt_logprobs(row: Row, logits: torch.Tensor) -> None:
        """Each prompt token's log-probability given the tokens before it (the first has none),
        with `prompt_logprobs` alternatives; `logits` (positions, vocab) are the prompt's."""
        k, count = row.params.prompt_logprobs, len(row.prompt) - 1
        targets = torch.tensor([row.prompt[1:]], device=logits.device)
        values, top_values, top_ids = token_logprobs(logits[None, :count], targets, k)
        if k:
            tops = [tuple(zip(ids, vals)) for ids, vals in zip(top_ids[0].tolist(), top_values[0].tolist())]
        else:
            tops = [()] * count
        row.prompt_logprobs = [
            TokenLogprob(token, value, top) for token, value, top in zip(row.prompt[1:], values[0].tolist(), tops)
        ]

    def _iterate(self) -> None:
        rows = self._running
        try:
            feeds, tree, starts = self._feeds(rows)
            logits = self._forward(rows, feeds, tree=tree)
            self._forbid_early_stops(rows, logits, [len(row.output) + row.cached + 1 for row in rows])
            choices = self._choose(rows, logits, [row.drafts for row in rows])
        except Exception as error:
            if not self.isolate_failures:
                raise
            longest = max(rows, key=lambda row: row.length + len(row.feed))
            logger.exception("an iteration failed; failing request %d (the longest)", longest.request_id)
            longest.fail(error)
            return
        for index, row in enumerate(rows):
            verified_before = len(row.output) + row.cached + 1
            row.length += row.advance(
                choices.accepted[index], choices.proposals[index], choices.logprobs[index],
                choices.sampled_probs.get(index),
            )
            if starts[index]:  # only where n-grams rode along
                row.recycle(verified_before, choices.likeliest(index), starts[index])

    @staticmethod
    def _feeds(rows: list[Row]) -> tuple[list[list[int]], FeedTree | None, list[list[int]]]:
        """Each row's window tokens, then the n-grams it verifies beside them (and where each
        starts in the feed): every n-gram branches off the first fed token (the last verified
        one), so each of its tokens sees that token and the n-gram's own earlier tokens, at the
        positions it would hold in the text."""
        candidates = [row.next_candidates() for row in rows]
        feeds = [list(row.feed) for row in rows]
        starts: list[list[int]] = [[] for _ in rows]
        for feed, row_starts, row_candidates in zip(feeds, starts, candidates):
            for candidate in row_candidates:
                row_starts.append(len(feed))
                feed.extend(candidate)
        if not any(candidates):
            return feeds, None, starts
        width = max(map(len, feeds))
        offsets = torch.arange(width).repeat(len(rows), 1)
        visible = torch.ones(width, width, dtype=torch.bool).tril().repeat(len(rows), 1, 1)
        for index, (row_starts, row_candidates) in enumerate(zip(starts, candidates)):
            for start, candidate in zip(row_starts, row_candidates):
                span = slice(start, start + len(candidate))
                offsets[index, span] = torch.arange(1, len(candidate) + 1)
                visible[index, span, 1:start] = False  # neither the window's drafts nor earlier n-grams
        return feeds, FeedTree(offsets, visible), starts

    @staticmethod
    def _forbid_early_stops(rows: list[Row], logits: torch.Tensor, first_outputs: list[int]) -> None:
        """`min_tokens`: the stop ids' logits become -inf at every position that predicts an output
        token before the minimum (position j predicts output token first_outputs[i] + j)."""
        for i, row in enumerate(rows):
            early = min(row.params.min_tokens - first_outputs[i], logits.shape[1])
            if early > 0 and row.params.eos_token_ids:
                logits[i, :early, sorted(row.params.eos_token_ids)] = -float("inf")

    # -- choosing tokens ---------------------------------------------------------------------------

    def _choose(self, rows: list[Row], logits: torch.Tensor, drafts: list[list[int]]) -> _Choices:
        """Per row: how many of its `drafts` survive, the verified token after them and the new
        drafts (greedy: argmax; sampling: the speculative rule), and their log-probabilities."""
        device, width = logits.device, logits.shape[1]
        sampled = [i for i, row in enumerate(rows) if not row.sampling.greedy]
        argmax = logits.argmax(-1)
        chosen = argmax.clone()  # greedy rows' proposals; for every row, the logprob targets
        sampled_probs: dict[int, torch.Tensor] = {}
        kept: list[int] = []
        if sampled:
            draft_ids = torch.tensor([drafts[i] + [0] * (width - len(drafts[i])) for i in sampled], device=device)
            counts = torch.tensor([len(drafts[i]) for i in sampled], device=device)
            p = target_probs(logits[sampled], [rows[i].sampling for i in sampled])
            q = torch.zeros_like(p)
            for position, i in enumerate(sampled):
                if drafts[i]:
                    q[position, : len(drafts[i])] = rows[i].draft_probs[rows[i].cached + 1 :]
            keys = random_keys([rows[i].seed for i in sampled], [rows[i].draws for i in sampled], device)
            accepted, tokens = speculative_step(p, q, draft_ids, counts, keys)
            offsets = torch.arange(width, device=device)
            chosen[sampled] = torch.where(offsets < accepted[:, None], draft_ids, tokens)
            kept = accepted.tolist()
            for position, i in enumerate(sampled):
                rows[i].draws += 1
                sampled_probs[i] = p[position]
        proposals = chosen.tolist()
        accepted_by_row = [common_prefix_length(drafts[i], proposals[i][: len(drafts[i])]) for i in range(len(rows))]
        for position, i in enumerate(sampled):
            accepted_by_row[i] = kept[position]
        logprobs = self._logprobs(rows, logits, chosen, proposals)
        return _Choices(accepted_by_row, proposals, logprobs, sampled_probs, argmax)

    def _logprobs(
        self, rows: list[Row], logits: torch.Tensor, chosen: torch.Tensor, proposals: list[list[int]]
    ) -> list[list[TokenLogprob] | None]:
        """Each fed position's log-probabilities of the token chosen there, for rows that asked."""
        wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        result: list[list[TokenLogprob] | None] = [None] * len(rows)
        if not wanted:
            return result
        top = max(rows[i].params.logprobs for i in wanted)
        values, top_values, top_ids = token_logprobs(logits[wanted], chosen[wanted], top)
        values = values.tolist()
        top_values = top_values.tolist() if top_values is not None else None
        top_ids = top_ids.tolist() if top_ids is not None else None
        for position, i in enumerate(wanted):
            k = rows[i].params.logprobs
            result[i] = [
                TokenLogprob(
                    token,
                    values[position][offset],
                    tuple(zip(top_ids[position][offset][:k], top_values[position][offset][:k])) if k else (),
                )
                for offset, token in enumerate(proposals[i])
            ]
        return result
