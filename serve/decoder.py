"""The model-holding Serve deployment: prompts in, streamed text out, on one engine per replica.

Each replica loads the model once (`cllm.load_model`: a local directory, a hub id or `toy`) and
runs one long-lived `cllm.Engine` loop (`cllm_serve.batching.EngineLoop`): requests join the
running rows between Jacobi iterations (`scheduler=continuous`) or in whole batches
(`scheduler=dynamic`, the old baseline). `mode=ar` decodes every request with one-token blocks,
the AR baseline. Tokenisation, the chat template, the context-length check, sampling parameters
and stop sequences live here, next to the tokenizer; the ingress deals only with HTTP.

Chat prompts use the tokenizer's chat template, or `cllm.hf.render_chat`'s plain fallback for a
tokenizer without one. A request with `n` choices runs as `n` rows (seeds seed, seed + 1, ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field
from ray import serve

from cllm import Engine, FinishedRequest, RequestParams, SamplingParams, load_model
from cllm.hf import context_length, encode_chat, eos_ids, pad_id
from cllm_serve.batching import (
    Accepted,
    EngineJob,
    EngineLoop,
    Event,
    Failed,
    Finished,
    Rejected,
    Scheduler,
    StopTextAssembler,
    TextDelta,
    TokenStream,
    coalesce,
)
from cllm_serve.metrics import DecoderMetrics

Mode = Literal["jacobi", "ar"]


class DecoderSettings(BaseModel):
    """What a decoder replica needs; filled from the application builder's arguments."""

    model: str = "toy"
    mode: Mode = "jacobi"
    scheduler: Scheduler = "continuous"
    n_token: int = Field(default=16, ge=1, description="default Jacobi block size")
    max_n_token: int = Field(default=64, ge=1, description="largest block size a request may ask for")
    default_max_tokens: int = Field(default=256, ge=1)
    default_temperature: float = Field(default=0.0, ge=0, le=2, description="when a request gives none")
    max_batch_size: int = Field(default=8, ge=1, description="rows decoded together")
    batch_wait_ms: float = Field(default=5.0, ge=0, description="scheduler=dynamic: wait for company")
    max_prefill_tokens: int = Field(default=8192, ge=1, description="prompt tokens admitted per step")


@dataclass(frozen=True)
class DecodeRequest:
    """One generation request as the ingress hands it over (already validated for types)."""

    prompt: str | list[int] | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, text) pairs, for chat
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    n_token: int | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities


@dataclass(frozen=True)
class PreparedRequest:
    prompt_ids: list[int]
    max_tokens: int
    n_token: int


@dataclass(frozen=True)
class Load:
    """A replica's current and cumulative work, for tests and operators."""

    queued: int
    running_rows: int
    generated_tokens: int
    batches: int  # groups of requests that joined the engine together
    batched_rows: int  # rows (choices) that joined so far; batched_rows / batches: mean group size
    peak_rows: int  # the most rows that ever shared a forward
    forwards: int  # model forwards so far; the rows' forwards (usage) / this = rows per forward


@serve.deployment(name="Decoder")
class Decoder:
    def __init__(self, settings: DecoderSettings):
        self._settings = settings
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
        """The same events with each choice's consecutive text deltas merged: for non-streaming
        requests, so the text crosses to the ingress once rather than token by token."""
        events: list[Event] = []
        async with aclosing(self._events(request)) as stream:
            async for event in stream:
                events.append(event)
        # Each choice's deltas, together, before the events that end the choices.
        deltas = [event for event in events if isinstance(event, TextDelta)]
        ordered = sorted(deltas, key=lambda delta: delta.index)
        others = [event for event in events if not isinstance(event, TextDelta)]
        return others[:1] + coalesce(ordered) + others[1:]

    def load(self) -> Load:
        stats = self._loop.stats()
        return Load(
            stats.queued, stats.running_rows, stats.generated_tokens, stats.batches, stats.batched_rows,
            stats.peak_rows, stats.forwards,
        )

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
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        jobs = [self._job(request, prepared, TokenStream(
            loop, queue, StopTextAssembler(self._decode_text, request.stop), prepared.max_tokens, self._eos,
            self._token_text, index,
        )) for index in range(request.n)]
        yield Accepted(prompt_tokens=len(prepared.prompt_ids), choices=request.n)
        for job in jobs:
            self._loop.submit(job)
        open_choices = set(range(request.n))
        try:
            while open_choices:
                ready = [await queue.get()]
                while not queue.empty():  # whatever else is ready goes out with it
                    ready.append(queue.get_nowait())
                for event in coalesce(ready):
                    if isinstance(event, (Finished, Failed)):
                        open_choices.discard(event.index)
                    yield event
        finally:
            # Normal end, or Serve cancelled us because the client left: rows still decoding
            # must stop costing forwards and free their slots; waiting ones must not start.
            for index in open_choices:
                jobs[index].stream.cancel()
                self._loop.abort(jobs[index])

    def _job(self, request: DecodeRequest, prepared: PreparedRequest, stream: TokenStream) -> EngineJob:
        seed = None if request.seed is None else request.seed + stream.index
        temperature = request.temperature if request.temperature is not None else self._settings.default_temperature
        params = RequestParams(
            max_new_tokens=prepared.max_tokens,
            n_token=prepared.n_token,
            eos_token_ids=self._eos,
            sampling=SamplingParams(temperature=temperature, top_p=request.top_p, top_k=request.top_k, seed=seed),
            logprobs=request.logprobs,
        )
        return EngineJob(prepared.prompt_ids, params, stream)

    def _prepare(self, request: DecodeRequest) -> PreparedRequest | Rejected:
        n_token = 1 if self._settings.mode == "ar" else request.n_token or self._settings.n_token
        if n_token > self._settings.max_n_token:
            return Rejected(
                f"n_token must be at most {self._settings.max_n_token}", param="n_token", code="invalid_value"
            )
        prompt_ids = self._prompt_ids(request)
        if isinstance(prompt_ids, Rejected):
            return prompt_ids
        max_tokens = self._max_tokens(len(prompt_ids), request.max_tokens, n_token)
        if isinstance(max_tokens, Rejected):
            return max_tokens
        return PreparedRequest(prompt_ids, max_tokens, n_token)

    def _prompt_ids(self, request: DecodeRequest) -> list[int] | Rejected:
        if request.messages is not None:
            _, ids = encode_chat(self._tokenizer, request.messages)
            param = "messages"
        elif isinstance(request.prompt, str):
            ids = self._tokenizer(request.prompt)["input_ids"]
            param = "prompt"
        else:
            ids, param = list(request.prompt or []), "prompt"
            vocab_size = self._model.config.vocab_size
            if any(not 0 <= token < vocab_size for token in ids):
                return Rejected(f"token ids must lie in [0, {vocab_size})", param=param, code="invalid_value")
        if not ids:
            return Rejected("the prompt must not be empty", param=param, code="invalid_value")
        return ids

    def _max_tokens(self, prompt_tokens: int, requested: int | None, n_token: int) -> int | Rejected:
        if self._context_length is None:
            return requested or self._settings.default_max_tokens
        # The last Jacobi block may reach n_token - 1 positions past the last kept token.
        room = self._context_length - prompt_tokens - (n_token - 1)
        wanted = requested if requested is not None else min(self._settings.default_max_tokens, room)
        if wanted <= room and wanted >= 1:
            return wanted
        lookahead = f" plus {n_token - 1} positions of Jacobi lookahead" if n_token > 1 else ""
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
