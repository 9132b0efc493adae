"""Per-replica engine loop of the decoder deployment, and the events it streams to the ingress.

Each decoder replica owns one `cllm.Engine` and one `EngineLoop`: a thread that calls
`engine.step()` for as long as there is work, and between steps adds newly submitted requests
and aborts cancelled ones. Two admission policies share that loop:

- `continuous` (the default): a request joins the running rows at the next iteration, and a row
  that finishes or is aborted frees its slot at once, so a short request that arrives during a
  long one finishes first;
- `dynamic` (the baseline `benchmarks/serve_load.py` compares with): an idle replica waits
  `batch_wait_ms` for company (or until `max_batch_size` requests wait), admits that batch, and
  admits nothing more until the whole batch is done.

The engine reports each row's verified tokens through its `on_tokens` callback, on the loop
thread. `TokenStream` turns them into text deltas (holding back incomplete characters and text
that may still become a stop sequence) and hands them to the replica's event loop. A stream whose client went away, that
hit a stop sequence, or that reached its own `max_tokens` answers False, which ends that row only.
Text comes from `cllm.detokenize.TextAssembler` (incremental detokenization, then stop strings).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cllm import Engine, FinishedRequest, RequestParams, TokenLogprob
from cllm.detokenize import TextAssembler

logger = logging.getLogger("ray.serve")

Scheduler = Literal["continuous", "dynamic"]


# -- events from the decoder deployment to the ingress ----------------------------------------


@dataclass(frozen=True)
class Accepted:
    """The request passed the decoder's checks and is queued for decoding."""

    prompt_tokens: int
    choices: int = 1


@dataclass(frozen=True)
class Rejected:
    """The request cannot be served (answered as a 400 by the ingress)."""

    message: str
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class LogprobEntry:
    """One token's log-probability, with the token as text, and its alternatives (a prompt's
    first token has none: None)."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    index: int = 0  # the choice (n > 1)
    logprobs: tuple[LogprobEntry, ...] = ()  # for the tokens behind this delta, when asked for
    # The ids verified since the last delta, whether or not their text is out yet: the ingress
    # keeps them to resume the choice on another replica if this one dies.
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    completion_tokens: int
    forwards: int
    index: int = 0
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's)
    prompt_logprobs: tuple[LogprobEntry, ...] | None = None  # echo with logprobs: the prompt's tokens
    carried_tokens: int = 0  # of completion_tokens, those decoded by an earlier (failed) replica
    queue_s: float = field(default=0.0, compare=False)  # waiting for a slot in the engine
    first_token_s: float = field(default=0.0, compare=False)  # from submission to the first token


@dataclass(frozen=True)
class Failed:
    """Decoding this request raised; the message is safe to show to the client."""

    message: str
    index: int = 0


Event = Accepted | Rejected | TextDelta | Finished | Failed


def coalesce(events: list[Event]) -> list[Event]:
    """Merge each run of adjacent text deltas of one choice into one delta: under load the engine
    verifies tokens faster than they can cross to the ingress one by one."""
    merged: list[Event] = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, TextDelta) and isinstance(last, TextDelta) and last.index == event.index:
            merged[-1] = TextDelta(
                last.text + event.text, event.index, last.logprobs + event.logprobs, last.token_ids + event.token_ids
            )
        else:
            merged.append(event)
    return merged


class TokenStream:
    """One choice's output while it decodes: fed on the engine thread, read on the event loop
    through `events` (a queue that all choices of one request share)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        events: asyncio.Queue[Event],
        text: TextAssembler,
        max_tokens: int,
        stop_token_ids: frozenset[int],
        token_text: Callable[[int], str] = str,
        index: int = 0,
        reported_stop_ids: frozenset[int] = frozenset(),
        include_stop: bool = False,
    ):
        self._loop = loop
        self._events = events
        self._text = text
        self._max_tokens = max_tokens
        self._stop_ids = stop_token_ids  # EOS (unless ignored) and the request's stop_token_ids
        self._reported_stop_ids = reported_stop_ids  # the request's own: named in stop_reason
        self._include_stop = include_stop
        self._token_text = token_text
        self.index = index
        self._lock = threading.Lock()  # `cancel` (loop thread) races `on_tokens` (engine thread)
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cancelled = False
        self.submitted_at = time.monotonic()
        self.queue_s = 0.0  # set by the engine loop on admission
        self.first_token_s: float | None = None
        self.carried = 0  # ids decoded before a resumption (`resume`)
        self._unsent_from = 0  # characters of output that a resumed client already has

    def resume(self, carried_ids: list[int], sent_chars: int) -> bool:
        """Start after the ids an earlier replica verified, of whose text the client has the first
        `sent_chars` characters. The ids go through the same detokenizer and stop checks. Where
        the text is released can depend on how the ids were grouped, but all of it, once out, is
        the same (the decoded ids, cut at a stop string), so skipping what was sent continues it
        byte for byte. False: those ids had already ended the choice."""
        with self._lock:
            self._unsent_from = sent_chars
            _, delta = self._add(list(carried_ids))
            self.carried = len(self.ids)
            if delta:
                self._push(TextDelta(delta, self.index))
            return self.finish_reason is None

    def _unsent(self, text: str) -> str:
        """`text`, the next of this choice's output, less what a resumed client already has."""
        skip = min(self._unsent_from, len(text))
        self._unsent_from -= skip
        return text[skip:]

    def on_tokens(self, new_ids: list[int], logprobs: list[TokenLogprob] | None = None) -> bool:
        """The engine's per-row callback. False ends the row: cancelled, stopped or full."""
        with self._lock:
            if self.cancelled or self.finish_reason is not None:
                return False
            if self.first_token_s is None:
                self.first_token_s = time.monotonic() - self.submitted_at
            new_ids, delta = self._add(new_ids)
            entries = tuple(self._entry(entry) for entry in (logprobs or [])[: len(new_ids)])
            if new_ids or delta:
                self._push(TextDelta(delta, self.index, entries, tuple(new_ids)))
            return self.finish_reason is None

    def _add(self, new_ids: list[int]) -> tuple[list[int], str]:
        """Take the ids this choice still wants and return them with the text they release,
        setting `finish_reason` when they end the choice (under the lock)."""
        new_ids = new_ids[: self._max_tokens - len(self.ids)]
        stop_at = next((i for i, token in enumerate(new_ids) if token in self._stop_ids), None)
        if stop_at is not None:
            new_ids = new_ids[: stop_at + 1]
        self.ids.extend(new_ids)
        # A stop token's own text is left out unless asked for (as vLLM does).
        shown = new_ids if stop_at is None or self._include_stop else new_ids[:stop_at]
        delta = self._text.add(shown)
        if self._text.stopped:
            self.finish_reason, self.stop_reason = "stop", self._text.stop_reason
        elif stop_at is not None:
            self.finish_reason = "stop"
            token = new_ids[stop_at]
            self.stop_reason = token if token in self._reported_stop_ids else None
        elif len(self.ids) >= self._max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            delta += self._text.flush()
        return new_ids, self._unsent(delta)

    def _entry(self, logprob: TokenLogprob) -> LogprobEntry:
        top = tuple((self._token_text(token), value) for token, value in logprob.top)
        return LogprobEntry(self._token_text(logprob.token), logprob.logprob, top)

    def finish(
        self, forwards: int, prompt_ids: list[int] | None = None, prompt_logprobs: list[TokenLogprob] | None = None
    ) -> None:
        """Called once the engine is done with the row (the forward count is final), with the
        prompt's log-probabilities when the row asked for them."""
        prompt_entries = None
        if prompt_ids and prompt_logprobs is not None:
            # A resumed row's prompt ends with its carried ids, which the client has as output.
            prompt_ids = prompt_ids[: len(prompt_ids) - self.carried]
            prompt_logprobs = prompt_logprobs[: len(prompt_ids) - 1]
            first = LogprobEntry(self._token_text(prompt_ids[0]), None)  # nothing comes before it
            prompt_entries = (first, *(self._entry(entry) for entry in prompt_logprobs))
        with self._lock:
            if self.finish_reason is None:  # cancelled rows end here too; nobody reads them
                self.finish_reason = "length"
                delta = self._unsent(self._text.flush())
                if delta:
                    self._push(TextDelta(delta, self.index))
            first_token_s = self.first_token_s if self.first_token_s is not None else self.queue_s
            self._push(Finished(
                self.finish_reason, len(self.ids), forwards, self.index, self.stop_reason, prompt_entries,
                self.carried, self.queue_s, first_token_s,
            ))

    def fail(self, message: str) -> None:
        self._push(Failed(message, self.index))

    def cancel(self) -> None:
        """The client is gone: the row stops at its next verified tokens (or is aborted)."""
        with self._lock:
            self.cancelled = True

    def _push(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the reader's event loop is gone: nobody is left to tell
            self.cancelled = True


# -- the engine loop ------------------------------------------------------------------------------


@dataclass(eq=False)
class EngineJob:
    """One choice of one request, as the engine loop sees it."""

    prompt_ids: list[int]
    params: RequestParams
    stream: TokenStream
    enqueued_at: float = field(default_factory=time.monotonic)
    request_id: int | None = None  # the engine's id, once added


@dataclass(frozen=True)
class LoopStats:
    """A replica's current and cumulative work (`Decoder.load`)."""

    queued: int  # submitted, not decoding yet
    running_rows: int
    generated_tokens: int
    batches: int  # groups of requests that joined together (one prefill each)
    batched_rows: int  # requests that joined so far
    peak_rows: int  # the most rows that shared a forward
    forwards: int  # model forwards (prefills and iterations) so far


class EngineLoop:
    """Drives `engine` on a thread of its own; `submit` and `abort` may be called from any thread."""

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        scheduler: Scheduler = "continuous",
        max_batch_size: int = 8,
        batch_wait_s: float = 0.005,
        on_finished: Callable[[FinishedRequest], None] | None = None,
    ):
        if scheduler not in ("continuous", "dynamic"):
            raise ValueError(f"scheduler must be 'continuous' or 'dynamic', got {scheduler!r}")
        self._engine_factory = engine_factory
        self._engine = engine_factory()
        self._scheduler = scheduler
        self._max_batch_size = max_batch_size
        self._batch_wait_s = batch_wait_s
        self._on_finished = on_finished
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: list[EngineJob] = []  # submitted, not handed to the engine yet
        self._aborts: list[EngineJob] = []
        self._jobs: dict[int, EngineJob] = {}  # engine id -> job
        self._stopping = False
        self._generated_tokens = self._batches = self._batched_rows = self._peak_rows = self._forwards = 0
        self._thread = threading.Thread(target=self._run, name="cllm-engine-loop", daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------------

    def submit(self, job: EngineJob) -> None:
        with self._lock:
            self._pending.append(job)
        self._wake.set()

    def abort(self, job: EngineJob) -> None:
        """Withdraw a waiting job, or stop a running one: its slot frees before the next step."""
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
            else:
                self._aborts.append(job)
        self._wake.set()

    def stats(self) -> LoopStats:
        with self._lock:
            queued = len(self._pending) + self._engine.waiting
            return LoopStats(
                queued, self._engine.running, self._generated_tokens, self._batches, self._batched_rows,
                self._peak_rows, self._forwards,
            )

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout_s: float = 10) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    # -- the loop thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            with self._lock:
                aborts, self._aborts = self._aborts, []
                for job in aborts:
                    if job.request_id is not None:
                        self._engine.abort(job.request_id)
                admitted = self._admit()
            if admitted:
                self._batches += 1
                self._batched_rows += admitted
            if self._engine.has_unfinished():
                self._step()
            else:
                self._wake.wait(self._idle_wait())

    def _admit(self) -> int:
        """Hand pending jobs to the engine, as the scheduler allows (under the lock)."""
        if not self._pending:
            return 0
        if self._scheduler == "dynamic":
            if self._engine.has_unfinished():
                return 0  # the running batch finishes first
            waited = time.monotonic() - self._pending[0].enqueued_at
            if len(self._pending) < self._max_batch_size and waited < self._batch_wait_s:
                return 0  # give concurrent requests a moment to join
        batch, self._pending = self._pending[: self._max_batch_size], self._pending[self._max_batch_size :]
        if self._scheduler == "continuous":
            room = self._max_batch_size - self._engine.running - self._engine.waiting
            batch, self._pending = batch[: max(room, 0)], batch[max(room, 0) :] + self._pending
        for job in batch:
            job.stream.queue_s = time.monotonic() - job.enqueued_at
            try:
                job.request_id = self._engine.add_request(job.prompt_ids, job.params, job.stream.on_tokens)
            except ValueError as error:  # the decoder's checks should have caught it
                job.stream.fail(str(error))
                continue
            self._jobs[job.request_id] = job
        return len(batch)

    def _idle_wait(self) -> float | None:
        with self._lock:
            if self._scheduler == "dynamic" and self._pending:
                return max(0.0, self._pending[0].enqueued_at + self._batch_wait_s - time.monotonic())
            return 0.0 if self._pending else None

    def _step(self) -> None:
        forwards = self._engine.forwards
        try:
            finished = self._engine.step()
            self._forwards += self._engine.forwards - forwards
            self._peak_rows = max(self._peak_rows, self._engine.running + len(finished))
        except Exception:  # a bug or a broken device: fail what runs, start over, keep serving
            logger.exception("the decoding engine failed; failing its %d requests", len(self._jobs))
            for job in self._jobs.values():
                job.stream.fail("internal error while decoding")
            self._jobs.clear()
            self._engine = self._engine_factory()
            return
        for request in finished:
            job = self._jobs.pop(request.request_id)
            self._generated_tokens += len(job.stream.ids)
            if request.finish_reason == "error":
                job.stream.fail(_failure_message(request.error))
            else:
                job.stream.finish(request.stats.forwards, job.prompt_ids, request.prompt_logprobs)
            if self._on_finished is not None:
                try:
                    self._on_finished(request)
                except Exception:  # metrics must never stop the loop
                    logger.exception("recording a finished request failed")


def _failure_message(error: BaseException | None) -> str:
    if error is not None and "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError":
        return "the server ran out of memory decoding this request; try a shorter prompt or max_tokens"
    return "internal error while decoding"
