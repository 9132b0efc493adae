"""A decoder call that outlives its replica: the ingress's side of request resumption.

Replicas die (a reclaimed spot node, a driver fault, an out-of-memory kill). Each `TextDelta`
carries the token ids behind it, so the ingress always knows every choice's output so far. When
the call fails because its replica died, `ResumableCall` sends the request again with
`DecodeRequest.resume`: each unfinished choice continues from its prompt plus those ids, with the
budget that is left, on whichever replica Serve picks. The client sees one uninterrupted stream:
no token repeated or missing, and byte-exact text across the seam (the new replica replays the ids
through the same detokenizer). Greedy text equals the uninterrupted text; sampled text is still
an exact AR sample (lossless decoding from any prefix), though not the same draws.

A request's own failure (an exception raised by the decoder's code, a `Failed` event) is never
retried: only Ray's replica-death and unavailability errors are. Attempts and the time from a
failure to the resumed call's acceptance are bounded; past either, `ResumptionFailed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from cllm_serve.batching import Accepted, Event, Failed, Finished, TextDelta
from cllm_serve.decoder import DecodeRequest, ResumedChoice, wait_within

logger = logging.getLogger("ray.serve")

REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, WorkerCrashedError, NodeDiedError)
# Worth another try while resuming (the first call answers these with a 503 instead).
TRANSIENT_WHILE_RESUMING = (*REPLICA_FAILURES, DeploymentUnavailableError, BackPressureError)
FIRST_BACKOFF_S = 0.25


def is_replica_failure(error: BaseException) -> bool:
    """The replica serving the call died or became unreachable. An exception the decoder's own
    code raised arrives as a `RayTaskError` (whatever else it also is): that one is the request's."""
    return isinstance(error, REPLICA_FAILURES) and not isinstance(error, RayTaskError)


class ResumptionFailed(Exception):
    """The call's replica died and no other replica took the request over in time."""


@dataclass(frozen=True)
class ResumePolicy:
    attempts: int = 3  # resumed calls per request, failed starts included; 0 turns resumption off
    timeout_s: float = 30.0  # from a failure until a resumed call is accepted


class EventStream(Protocol):
    """What `DeploymentHandle.options(stream=True).generate.remote()` returns."""

    def __anext__(self) -> Any: ...

    def cancel(self) -> None: ...


class ResumableCall:
    """The events of one decoder call, `Accepted` first, surviving replica deaths.

    `start(request)` sends a request to the decoder deployment; `on_resume()` is told of every
    resumed call (for `/metrics`)."""

    def __init__(
        self,
        start: Callable[[DecodeRequest], EventStream],
        request: DecodeRequest,
        policy: ResumePolicy,
        on_resume: Callable[[], None] = lambda: None,
    ):
        self._start = start
        self._request = request
        self._policy = policy
        self._on_resume = on_resume
        self._call: EventStream | None = None  # the running call; started by the first __anext__
        self._started = False
        self._accepted: Accepted | None = None
        self._outputs: dict[int, list[int]] = {}  # choice -> ids received so far
        self._sent_chars: dict[int, int] = {}  # choice -> characters of text received so far
        self._ended: set[int] = set()
        self._held: Event | None = None  # a resumed call's first event, when it is the client's first
        self.resumptions = 0

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    def __aiter__(self) -> ResumableCall:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._held is not None:
                event, self._held = self._held, None
            else:
                try:
                    if not self._started:  # here, so that a refusal raises where callers await
                        self._started = True
                        self._call = self._start(self._request)
                    if self._call is None:
                        raise StopAsyncIteration
                    event = await self._call.__anext__()
                except Exception as error:
                    # It ended or failed: nothing to cancel (cancelling would raise its error again).
                    self._call = None
                    if not is_replica_failure(error) or self._policy.attempts == 0:
                        raise
                    if self._accepted is not None and len(self._ended) == len(self._outputs):
                        raise StopAsyncIteration from None  # it died after its last choice ended
                    await self._resume(error)
                    continue
            if isinstance(event, Accepted) and self._accepted is not None:
                continue  # a resumed call's own acceptance: the client had the first one
            self._observe(event)
            return event

    def _observe(self, event: Event) -> None:
        if isinstance(event, Accepted):
            self._accepted = event
            self._outputs = {index: [] for index in range(event.choices)}
            self._sent_chars = dict.fromkeys(range(event.choices), 0)
        elif isinstance(event, TextDelta):
            self._outputs[event.index].extend(event.token_ids)
            self._sent_chars[event.index] += len(event.text)
        elif isinstance(event, (Finished, Failed)):
            self._ended.add(event.index)

    def _resumed_request(self) -> DecodeRequest:
        if self._accepted is None:  # nothing came back: simply send it again
            return self._request
        open_choices = [index for index in self._outputs if index not in self._ended]
        resume = tuple(
            ResumedChoice(index, tuple(self._outputs[index]), self._sent_chars[index]) for index in open_choices
        )
        return replace(self._request, resume=resume)

    async def _resume(self, error: BaseException) -> None:
        """Start a resumed call and wait for its first event, within the policy's bounds."""
        deadline = time.monotonic() + self._policy.timeout_s
        backoff_s = 0.0
        while True:
            remaining = deadline - time.monotonic()
            if self.resumptions >= self._policy.attempts or remaining <= backoff_s:
                raise ResumptionFailed(self._give_up_message()) from error
            await asyncio.sleep(backoff_s)
            self.resumptions += 1
            self._on_resume()
            tokens = sum(len(ids) for ids in self._outputs.values())
            logger.warning("decoder call failed (%s); resuming after %d tokens, attempt %d of %d",
                           type(error).__name__, tokens, self.resumptions, self._policy.attempts)
            try:
                self._call = self._start(self._resumed_request())
                self._held = await wait_within(self._call.__anext__(), deadline - time.monotonic())
                return
            except TimeoutError:  # no replica took it in time
                self.cancel()
                self._call = None
                raise ResumptionFailed(self._give_up_message()) from error
            except TRANSIENT_WHILE_RESUMING as next_error:
                self._call = None
                if isinstance(next_error, RayTaskError):
                    raise
                error = next_error
                backoff_s = max(FIRST_BACKOFF_S, 2 * backoff_s)

    def _give_up_message(self) -> str:
        return (
            f"the decoder replica serving this request failed, and no replica took it over within "
            f"{self.resumptions} resumption attempt(s) and {self._policy.timeout_s:g} s; retry later"
        )
