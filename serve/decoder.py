"""The model-holding Serve deployment: prompts in, streamed text out, on one engine per replica.

Each replica loads the model once (`cllm.load_model`: a local directory, a hub id or `toy`) and
runs one long-lived `cllm.Engine` loop (`cllm_serve.batching.EngineLoop`): requests join the
running rows between Jacobi iterations (`scheduler=continuous`) or in whole batches
(`scheduler=dynamic`, the baseline). `mode=ar` decodes every request with one-token blocks,
the AR baseline. Tokenisation, the chat template, the context-length check and stop sequences
live here, next to the tokenizer; the ingress deals only with HTTP, and a request's defaults are
resolved before it arrives (`cllm_serve.openai_api.DecodeParams`).

Chat prompts use the tokenizer's chat template, or `cllm.hf.render_chat`'s plain fallback for a
tokenizer without one. A request with `n` choices runs as `n` rows (seeds seed, seed + 1, ...).

A request may resume choices that another replica began (`DecodeRequest.resume`): each continues
from its prompt plus the ids already verified, with the budget that is left, and streams only the
text after them (`cllm_serve.resume` is the ingress's side).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from pydantic import BaseModel, Field
from ray import serve

from cllm import Engine, FinishedRequest, RequestParams, SamplingParams, load_model
from cllm.detokenize import TextAssembler
from cllm.drafts import PAPER, DecodingOptions
from cllm.hf import context_length, encode_chat, eos_ids, pad_id
from cllm_serve.batching import (
    Accepted,
    EngineJob,
    EngineLoop,
    Event,
    Failed,
    Finished,
    LoopStats,
    Rejected,
    Scheduler,
    TextDelta,
    TokenStream,
    coalesce,
)
from cllm_serve.metrics import DecoderMetrics
from cllm_serve.openai_api import DecodeParams

Mode = Literal["jacobi", "ar"]
FALLBACK_MAX_TOKENS = 256  # for a model whose context length is unknown
T = TypeVar("T")


async def wait_within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """`asyncio.wait_for` without its race before Python 3.12: there, a cancellation that arrives
    as the awaitable completes is swallowed, and a request whose client left decodes to its end.
    Raises TimeoutError (the builtin) when `timeout_s` passes first."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(timeout_s, 0))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise TimeoutError
    return task.result()


class DecoderSettings(BaseModel):
    """What a decoder replica needs; filled from the application builder's arguments."""

    model: str = "toy"
    mode: Mode = "jacobi"
    scheduler: Scheduler = "continuous"
    n_token: int = Field(default=16, ge=1, description="default Jacobi block size")
    max_n_token: int = Field(default=64, ge=1, description="largest block size a request may ask for")
    max_batch_size: int = Field(default=8, ge=1, description="rows decoded together")
    batch_wait_ms: float = Field(default=5.0, ge=0, description="scheduler=dynamic: wait for company")
    max_prefill_tokens: int = Field(default=8192, ge=1, description="prompt tokens admitted per step")
    # Drafting beyond the paper's rule (cllm.drafts.DecodingOptions); requests may override each.
    lookup: bool = Field(default=False, description="a new block's guesses continue matches in the text")
    recycle_candidates: int = Field(default=0, ge=0, description="n-grams verified beside each window")
    recycle_length: int = Field(default=4, ge=1, description="tokens per recycled n-gram")
    blocks_in_flight: int = Field(default=1, ge=1, description="blocks refined in one forward")
    next_block_share: float = Field(default=0.1, gt=0, le=1, description="share verified before the next block")

    @property
    def drafting(self) -> DecodingOptions:
        return DecodingOptions(
            lookup=self.lookup, recycle_candidates=self.recycle_candidates, recycle_length=self.recycle_length,
            blocks_in_flight=self.blocks_in_flight, next_block_share=self.next_block_share,
        )


Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class ResumedChoice:
    """A choice that an earlier replica began: the ids it verified, and how many characters of
    the choice's text (an echoed prompt included) the client has."""

    index: int
    token_ids: tuple[int, ...]
    sent_chars: int


@dataclass(frozen=True)
class DecodeRequest:
    """One generation request as the ingress hands it over (validated, its defaults resolved).
    Several prompts (completions) give `n` choices each: choice index = prompt index * n + i."""

    prompts: tuple[Prompt, ...] = ()
    messages: tuple[tuple[str, str], ...] | None = None  # (role, text) pairs, for chat
    params: DecodeParams = DecodeParams()
    # None: a new request. Otherwise only these choices run, each after its ids so far (no echo).
    resume: tuple[ResumedChoice, ...] | None = None
    # Hold events up to this long and send them together: a non-streamed request's progress
    # reaches the ingress at this pace, so a replica's death loses at most that much work.
    event_interval_s: float = 0.0


@dataclass(frozen=True)
class PreparedRequest:
    prompt_ids: list[list[int]]  # one list per prompt (chat: one)
    max_tokens: list[int]  # per prompt
    n_token: int
    drafting: DecodingOptions = PAPER


@serve.deployment(name="Decoder")
class Decoder:
    def __init__(self, settings: DecoderSettings):
        self._settings = settings
        self._drafting = settings.drafting  # checked before the model loads
        self._model, self._tokenizer = load_model(settings.model)
        self._context_length = context_length(self._model.config, self._tokenizer)
        self._eos = eos_ids(self._tokenizer, self._model.generation_config)
        self._pad_id = pad_id(self._tokenizer)
        self._metrics = DecoderMetrics(settings.mode)
        self._loop = EngineLoop(
            self._new_engine,
            scheduler=settings.scheduler,
            max_batch_size=settings.max_batch_size,
            batch_wait_s=settings.batch_wait_ms / 1000,
            on_finished=self._record,
        )

    def _new_engine(self) -> Engine:
        return Engine(
            self._model,
            max_rows=self._settings.max_batch_size,
            max_prefill_tokens=self._settings.max_prefill_tokens,
            pad_token_id=self._pad_id,
            seed=None,
        )

    async def generate(self, request: DecodeRequest) -> AsyncIterator[Event]:
        """Streams `Accepted` (or `Rejected`), then `TextDelta`s, then `Finished` or `Failed` for
        every choice. Call it through a handle with `.options(stream=True)`."""
        # aclosing: if Serve cancels this generator, the inner one's cleanup runs right away.
        async with aclosing(self._events(request)) as events:
            async for event in events:
                yield event

    async def complete(self, request: DecodeRequest) -> list[Event]:
        """The same events with each choice's text deltas merged: the whole reply at once, for
        callers in the replica's process (the ingress streams, to track progress)."""
        events: list[Event] = []
        async with aclosing(self._events(request)) as stream:
            async for event in stream:
                events.append(event)
        # Each choice's deltas, together, before the events that end the choices.
        deltas = [event for event in events if isinstance(event, TextDelta)]
        ordered = sorted(deltas, key=lambda delta: delta.index)
        others = [event for event in events if not isinstance(event, TextDelta)]
        return others[:1] + coalesce(ordered) + others[1:]

    def max_model_len(self) -> int | None:
        """The model's context length (None: unknown), for /v1/models."""
        return self._context_length

    def tokenize(
        self, prompt: str | None, messages: tuple[tuple[str, str], ...] | None, add_special_tokens: bool = True
    ) -> list[int] | Rejected:
        """vLLM's /tokenize: the ids of a prompt, or of chat messages through the chat template."""
        if messages is not None:
            return self._prompt_ids(messages, "messages")
        return self._tokenizer(prompt or "", add_special_tokens=add_special_tokens)["input_ids"]

    def detokenize(self, tokens: list[int]) -> str | Rejected:
        return self._out_of_vocabulary(tokens, "tokens") or self._tokenizer.decode(tokens)

    def load(self) -> LoopStats:
        """The replica's current and cumulative work, for tests and operators."""
        return self._loop.stats()

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (it is replaced)."""
        if not self._loop.alive:
            raise RuntimeError("the decoding engine's loop has stopped")

    def __del__(self):
        # Serve calls this once the graceful shutdown has drained (or timed out on) the streams.
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.shutdown()

    async def _events(self, request: DecodeRequest) -> AsyncIterator[Event]:
        prepared = self._prepare(request)
        if isinstance(prepared, Rejected):
            yield prepared
            return
        loop, queue, n = asyncio.get_running_loop(), asyncio.Queue(), request.params.n
        resumed = {choice.index: choice for choice in request.resume or ()}
        jobs = [
            self._job(request.params, prepared, index // n, self._stream(request.params, prepared, loop, queue, index))
            for index in range(len(prepared.prompt_ids) * n)
            if request.resume is None or index in resumed
        ]
        yield Accepted(prompt_tokens=sum(len(ids) for ids in prepared.prompt_ids), choices=len(jobs))
        echo = request.params.echo
        if echo and request.resume is None:
            for job in jobs:
                yield TextDelta(self._decode_text(job.prompt_ids), job.stream.index)
        for job in jobs:
            choice = resumed.get(job.stream.index)
            if choice is None:
                self._loop.submit(job)
                continue
            echoed = len(self._decode_text(job.prompt_ids)) if echo else 0
            if job.stream.resume(list(choice.token_ids), choice.sent_chars - echoed):
                self._loop.submit(self._continued(job, list(choice.token_ids)))
            else:  # the carried ids had ended the choice; only its Finished was lost
                job.stream.finish(forwards=0)
        open_choices = {job.stream.index for job in jobs}

        def abort_open(_: object = None) -> None:
            # Rows still decoding must stop costing forwards and free their slots; waiting ones
            # must not start.
            for job in jobs:
                if job.stream.index in open_choices:
                    job.stream.cancel()
                    self._loop.abort(job)
            open_choices.clear()

        # A client that leaves cancels the task reading this generator. If that happens while the
        # generator waits at a `yield`, its `finally` runs only once it is garbage-collected, and
        # the rows would decode on meanwhile: the task's end aborts them at once.
        reader = asyncio.current_task()
        reader.add_done_callback(abort_open)
        try:
            while open_choices:
                ready = await self._ready(queue, request.event_interval_s, len(open_choices))
                for event in coalesce(ready):
                    if isinstance(event, (Finished, Failed)):
                        open_choices.discard(event.index)
                    yield event
        finally:
            reader.remove_done_callback(abort_open)
            abort_open()

    @staticmethod
    async def _ready(queue: asyncio.Queue, interval_s: float, open_choices: int) -> list[Event]:
        """The next events: whatever is ready once one is, or, with `interval_s`, all that arrive
        within it, each choice's in order (sooner if every open choice ends meanwhile)."""
        ready = [await queue.get()]
        deadline = asyncio.get_running_loop().time() + interval_s
        while True:
            while not queue.empty():
                ready.append(queue.get_nowait())
            ended = sum(isinstance(event, (Finished, Failed)) for event in ready)
            remaining = deadline - asyncio.get_running_loop().time()
            if ended >= open_choices or remaining <= 0:
                # Sorted by choice (stable), so each choice's deltas merge into one.
                return sorted(ready, key=lambda event: event.index) if interval_s > 0 else ready
            try:
                ready.append(await wait_within(queue.get(), remaining))
            except TimeoutError:
                continue

    @staticmethod
    def _continued(job: EngineJob, carried: list[int]) -> EngineJob:
        """`job` continued after `carried`: its prompt grows by them and its budgets shrink."""
        params = replace(
            job.params,
            max_new_tokens=job.params.max_new_tokens - len(carried),
            min_tokens=max(0, job.params.min_tokens - len(carried)),
        )
        return EngineJob(job.prompt_ids + carried, params, job.stream)

    def _stop_ids(self, params: DecodeParams) -> frozenset[int]:
        """The ids that end a row: EOS unless ignored, and the request's stop_token_ids."""
        return (frozenset() if params.ignore_eos else self._eos) | frozenset(params.stop_token_ids)

    def _stream(
        self, params: DecodeParams, prepared: PreparedRequest, loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue, index: int,
    ) -> TokenStream:
        return TokenStream(
            loop, queue, TextAssembler(self._decode_text, params.stop, params.include_stop_str_in_output),
            prepared.max_tokens[index // params.n], self._stop_ids(params), self._token_text, index,
            reported_stop_ids=frozenset(params.stop_token_ids), include_stop=params.include_stop_str_in_output,
        )

    def _job(self, params: DecodeParams, prepared: PreparedRequest, prompt: int, stream: TokenStream) -> EngineJob:
        # Seeds wrap into int64, so seed + index never overflows whatever the client sent.
        seed = None if params.seed is None else (params.seed + stream.index) % 2**63
        max_tokens = prepared.max_tokens[prompt]
        sampling = SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=seed)
        row_params = RequestParams(
            max_new_tokens=max_tokens,
            n_token=prepared.n_token,
            eos_token_ids=self._stop_ids(params),
            # A limit left to the context's room may fall under min_tokens; a client's was checked.
            min_tokens=min(params.min_tokens, max_tokens),
            sampling=sampling,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            decoding=prepared.drafting,
        )
        return EngineJob(prepared.prompt_ids[prompt], row_params, stream)

    def _prepare(self, request: DecodeRequest) -> PreparedRequest | Rejected:
        params = request.params
        n_token = 1 if self._settings.mode == "ar" else params.n_token or self._settings.n_token
        if n_token > self._settings.max_n_token:
            return Rejected(
                f"n_token must be at most {self._settings.max_n_token}", param="n_token", code="invalid_value"
            )
        if refused := self._out_of_vocabulary(params.stop_token_ids, "stop_token_ids"):
            return refused
        try:
            drafting = replace(self._drafting, **dict(params.drafting))
        except ValueError as error:
            return Rejected(f"drafting: {error}", param="drafting", code="invalid_value")
        prompts: list[list[int]] = []
        limits: list[int] = []
        for prompt in self._prompts(request):
            prompt_ids = self._prompt_ids(prompt, "messages" if request.messages is not None else "prompt")
            if isinstance(prompt_ids, Rejected):
                return prompt_ids
            window = n_token * drafting.blocks_in_flight if n_token > 1 else 1
            max_tokens = self._max_tokens(len(prompt_ids), params, window)
            if isinstance(max_tokens, Rejected):
                return max_tokens
            prompts.append(prompt_ids)
            limits.append(max_tokens)
        if not prompts:
            return Rejected("the prompt must not be empty", param="prompt", code="invalid_value")
        return PreparedRequest(prompts, limits, n_token, drafting)

    def _out_of_vocabulary(self, tokens: Sequence[int], param: str) -> Rejected | None:
        vocab_size = self._model.config.vocab_size
        if any(not 0 <= token < vocab_size for token in tokens):
            return Rejected(f"{param}: token ids must lie in [0, {vocab_size})", param=param, code="invalid_value")
        return None

    def _prompts(self, request: DecodeRequest) -> list[Prompt | tuple[tuple[str, str], ...]]:
        return [request.messages] if request.messages is not None else list(request.prompts)

    def _prompt_ids(self, prompt: Prompt | tuple[tuple[str, str], ...], param: str) -> list[int] | Rejected:
        if param == "messages":
            try:
                _, ids = encode_chat(self._tokenizer, prompt)
            except Exception as error:  # noqa: BLE001 - a template refusing the conversation is the client's error
                return Rejected(f"the chat template refused these messages: {error}", param="messages",
                                code="invalid_value")
        elif isinstance(prompt, str):
            ids = self._tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            if refused := self._out_of_vocabulary(ids, param):
                return refused
        if not ids:
            return Rejected("the prompt must not be empty", param=param, code="invalid_value")
        return ids

    def _max_tokens(self, prompt_tokens: int, params: DecodeParams, window: int) -> int | Rejected:
        requested, fallback = params.max_tokens, params.default_max_tokens
        if self._context_length is None:
            return requested or fallback or FALLBACK_MAX_TOKENS
        # The last Jacobi window may reach window - 1 positions past the last kept token.
        room = self._context_length - prompt_tokens - (window - 1)
        wanted = requested if requested is not None else min(fallback or room, room)
        if wanted <= room and wanted >= 1:
            return wanted
        lookahead = f" plus {window - 1} positions of Jacobi lookahead" if window > 1 else ""
        return Rejected(
            f"This model's maximum context length is {self._context_length} tokens. However, you "
            f"requested {prompt_tokens + max(wanted, 1)} tokens ({prompt_tokens} in the prompt, "
            f"{max(wanted, 1)} for the completion){lookahead}. Please reduce the prompt or max_tokens.",
            param="max_tokens" if requested is not None else "prompt",
            code="context_length_exceeded",
        )

    def _decode_text(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _token_text(self, token: int) -> str:
        return self._tokenizer.decode([token])

    def _record(self, request: FinishedRequest) -> None:
        """Runs on the engine loop's thread for every finished row."""
        self._metrics.record_request(request.stats, self._loop.stats().running_rows)
