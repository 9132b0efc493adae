"""Per-replica dynamic batching for the decoder deployment, and the events it streams.

Requests that arrive on a replica while it is idle wait a few milliseconds (or until the batch is
full) and are then decoded together by one `cllm.jacobi_generate` (or `cllm.ar_generate`) call in
a worker thread. Requests that arrive while a batch runs form the next batch. Rows of one call
share the block size, so pending requests are grouped by `n_token`.

The decoding call reports each row's verified tokens through its `on_tokens` callback, on the
worker thread. `TokenStream` turns them into text deltas (holding back text that may still become
a stop sequence), and hands them to the replica's event loop. A stream whose client went away, that
hit a stop sequence, or that reached its own `max_tokens` answers False, which ends that row only.

Batching never changes the text: `jacobi_generate` equals greedy AR row by row, whatever else is
in the batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger("ray.serve")


# -- events from the decoder deployment to the ingress ----------------------------------------


@dataclass(frozen=True)
class Accepted:
    """The request passed the decoder's checks and is queued for decoding."""

    prompt_tokens: int


@dataclass(frozen=True)
class Rejected:
    """The request cannot be served (answered as a 400 by the ingress)."""

    message: str
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    completion_tokens: int
    forwards: int


@dataclass(frozen=True)
class Failed:
    """Decoding raised; the message is safe to show to the client."""

    message: str


Event = Accepted | Rejected | TextDelta | Finished | Failed


# -- text assembly --------------------------------------------------------------------------------


class StopTextAssembler:
    """Builds the completion text from token ids and cuts it at the first stop sequence.

    Text that could still grow into a stop sequence, and a trailing replacement character (an
    incomplete multi-byte character), is held back, so streamed deltas never need retracting."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self._decode = decode
        self._stop = tuple(stop)
        self._sent = 0  # characters of the text already handed out
        self.text = ""
        self.stopped = False

    def update(self, ids: list[int]) -> str:
        """The new text that is safe to send now that the output is `ids`."""
        self.text = self._decode(ids)
        hits = [index for index in (self.text.find(stop) for stop in self._stop) if index >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Everything not sent yet: the output is complete, nothing can still change."""
        return self._release(len(self.text))

    def _held_back(self) -> int:
        held = 1 if self.text.endswith("\ufffd") else 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:length]):
                    held = length
                    break
        return held

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        delta, self._sent = self.text[self._sent : end], end
        return delta


class TokenStream:
    """One request's output while its batch runs: fed on the decoding thread, read on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        text: StopTextAssembler,
        max_tokens: int,
        eos_token_ids: frozenset[int],
    ):
        self._loop = loop
        self._text = text
        self._max_tokens = max_tokens
        self._eos = eos_token_ids
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._lock = threading.Lock()  # `cancel` (loop thread) races `on_tokens` (worker thread)
        self.ids: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False

    def on_tokens(self, new_ids: list[int]) -> bool:
        """The decoder's per-row callback. False ends the row: cancelled, stopped or full."""
        with self._lock:
            if self.cancelled or self.finish_reason is not None:
                return False
            # The batch runs to the largest max_tokens of its rows; this row may want fewer.
            new_ids = new_ids[: self._max_tokens - len(self.ids)]
            eos_at = next((i for i, token in enumerate(new_ids) if token in self._eos), None)
            if eos_at is not None:
                new_ids = new_ids[: eos_at + 1]
            self.ids.extend(new_ids)
            delta = self._text.update(self.ids)
            if self._text.stopped or eos_at is not None:
                self.finish_reason = "stop"
            elif len(self.ids) >= self._max_tokens:
                self.finish_reason = "length"
            if self.finish_reason is not None:
                delta += self._text.flush()
            if delta:
                self._push(TextDelta(delta))
            return self.finish_reason is None

    def finish(self, forwards: int) -> None:
        """Called once the batch's decoding call returned (the row's forward count is final)."""
        with self._lock:
            if self.finish_reason is None:  # cancelled rows end here too; nobody reads them
                self.finish_reason = "length"
                delta = self._text.flush()
                if delta:
                    self._push(TextDelta(delta))
            self._push(Finished(self.finish_reason, len(self.ids), forwards))

    def fail(self, message: str) -> None:
        self._push(Failed(message))

    def cancel(self) -> None:
        """The client is gone: the row stops at its next verified tokens."""
        with self._lock:
            self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    def _push(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)


# -- the batcher ----------------------------------------------------------------------------------


@dataclass
class PendingRequest:
    prompt_ids: list[int]
    max_tokens: int
    n_token: int
    seed: int | None
    stream: TokenStream
    enqueued_at: float = field(default_factory=time.monotonic)


DecodeBatch = Callable[[list[PendingRequest]], list[int]]
"""Decodes one batch on a worker thread, feeding each request's stream through `on_tokens`, and
returns the forward passes each row took."""


class DynamicBatcher:
    """Collects pending requests and runs them through `decode_batch`, one batch at a time.

    One batch at a time is deliberate: a replica holds one model, and two concurrent decoding
    calls would only contend for the same device while each got smaller batches."""

    def __init__(self, decode_batch: DecodeBatch, max_batch_size: int, max_wait_s: float):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._decode_batch = decode_batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._pending: list[PendingRequest] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.running_rows = 0

    def submit(self, request: PendingRequest) -> None:
        self._pending.append(request)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())

    def withdraw(self, request: PendingRequest) -> None:
        """Drop a request that has not started decoding (its client left while it waited)."""
        if request in self._pending:
            self._pending.remove(request)

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            await self._wait_for_company()
            batch = self._take_batch()
            if not batch:
                continue
            self.running_rows = len(batch)
            try:
                forwards = await asyncio.to_thread(self._decode_batch, batch)
            except Exception:  # fail this batch's requests, keep serving the next ones
                logger.exception("decoding a batch of %d failed", len(batch))
                for request in batch:
                    request.stream.fail("internal error while decoding")
            else:
                for request, row_forwards in zip(batch, forwards):
                    request.stream.finish(row_forwards)
            finally:
                self.running_rows = 0

    async def _wait_for_company(self) -> None:
        """Give concurrent requests a moment to join, unless the oldest already waited."""
        deadline = self._pending[0].enqueued_at + self._max_wait_s if self._pending else 0
        while len(self._pending) < self._max_batch_size and time.monotonic() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break

    def _take_batch(self) -> list[PendingRequest]:
        """The oldest request and the next ones with the same block size, up to the batch size."""
        if not self._pending:
            return []
        n_token = self._pending[0].n_token
        batch = [request for request in self._pending if request.n_token == n_token]
        batch = batch[: self._max_batch_size]
        for request in batch:
            self._pending.remove(request)
        return batch
