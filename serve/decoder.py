"""The model-holding Serve deployment: prompts in, streamed text out, decoded in dynamic batches.

Each replica loads the model once (`cllm.load_model`: a local directory, a hub id or `toy`) and
decodes with `cllm.jacobi_generate`, or `cllm.ar_generate` in `ar` mode, the greedy baseline.
Tokenisation, the chat template, the context-length check and stop sequences live here, next to
the tokenizer; the ingress deals only with HTTP.

Chat prompts use the tokenizer's chat template, or `cllm.hf.render_chat`'s plain fallback for a
tokenizer without one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field
from ray import serve

from cllm import ar_generate, jacobi_generate, load_model, pad_prompts
from cllm.hf import context_length, encode_chat, eos_ids, pad_id
from cllm_serve.batching import (
    Accepted,
    DynamicBatcher,
    Event,
    PendingRequest,
    Rejected,
    StopTextAssembler,
    TextDelta,
    TokenStream,
)
from cllm_serve.metrics import DecoderMetrics

Mode = Literal["jacobi", "ar"]


class DecoderSettings(BaseModel):
    """What a decoder replica needs; filled from the application builder's arguments."""

    model: str = "toy"
    mode: Mode = "jacobi"
    n_token: int = Field(default=16, ge=1, description="default Jacobi block size")
    max_n_token: int = Field(default=64, ge=1, description="largest block size a request may ask for")
    default_max_tokens: int = Field(default=256, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0)


@dataclass(frozen=True)
class DecodeRequest:
    """One generation request as the ingress hands it over (already validated for types)."""

    prompt: str | list[int] | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, text) pairs, for chat
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    n_token: int | None = None
    seed: int | None = None


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
    batches: int  # decoding calls made so far
    batched_rows: int  # requests decoded so far; batched_rows / batches is the mean batch size


@serve.deployment(name="Decoder")
class Decoder:
    def __init__(self, settings: DecoderSettings):
        self._settings = settings
        self._model, self._tokenizer = load_model(settings.model)
        self._context_length = context_length(self._model.config, self._tokenizer)
        self._eos = eos_ids(self._tokenizer, self._model.generation_config)
        self._pad_id = pad_id(self._tokenizer)
        self._batcher = DynamicBatcher(
            self._decode_batch, settings.max_batch_size, settings.batch_wait_ms / 1000
        )
        self._metrics = DecoderMetrics(settings.mode)
        self._generated_tokens = 0
        self._batches = 0
        self._batched_rows = 0

    async def generate(self, request: DecodeRequest) -> AsyncIterator[Event]:
        """Streams `Accepted` (or `Rejected`), then `TextDelta`s, then `Finished` or `Failed`.
        Call it through a handle with `.options(stream=True)`."""
        # aclosing: if Serve cancels this generator, the inner one's cleanup runs right away.
        async with aclosing(self._events(request)) as events:
            async for event in events:
                yield event

    async def complete(self, request: DecodeRequest) -> list[Event]:
        """The same events with consecutive text deltas merged: for non-streaming requests, so
        the text crosses to the ingress once rather than token by token."""
        events: list[Event] = []
        async with aclosing(self._events(request)) as stream:
            async for event in stream:
                if isinstance(event, TextDelta) and events and isinstance(events[-1], TextDelta):
                    events[-1] = TextDelta(events[-1].text + event.text)
                else:
                    events.append(event)
        return events

    def load(self) -> Load:
        return Load(
            self._batcher.queued,
            self._batcher.running_rows,
            self._generated_tokens,
            self._batches,
            self._batched_rows,
        )

    async def _events(self, request: DecodeRequest) -> AsyncIterator[Event]:
        prepared = self._prepare(request)
        if isinstance(prepared, Rejected):
            yield prepared
            return
        stream = TokenStream(
            asyncio.get_running_loop(),
            StopTextAssembler(self._decode_text, request.stop),
            prepared.max_tokens,
            self._eos,
        )
        pending = PendingRequest(
            prompt_ids=prepared.prompt_ids,
            max_tokens=prepared.max_tokens,
            n_token=prepared.n_token,
            seed=request.seed,
            stream=stream,
        )
        yield Accepted(prompt_tokens=len(prepared.prompt_ids))
        self._batcher.submit(pending)
        try:
            async for event in stream.events():
                yield event
        finally:
            # Normal end, or Serve cancelled us because the client left: either way the row
            # must stop costing forwards, and a request still waiting must not start.
            stream.cancel()
            self._batcher.withdraw(pending)

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

    def _decode_batch(self, batch: list[PendingRequest]) -> list[int]:
        """Runs on the batcher's worker thread: one decoding call for the whole batch."""
        input_ids, attention_mask = pad_prompts([request.prompt_ids for request in batch], self._pad_id)

        def on_tokens(row: int, new_ids: list[int]) -> bool:
            return batch[row].stream.on_tokens(new_ids)

        common = dict(
            max_new_tokens=max(request.max_tokens for request in batch),
            eos_token_id=sorted(self._eos) or None,
            pad_token_id=self._pad_id,
            on_tokens=on_tokens,
        )
        if self._settings.mode == "ar":
            output = ar_generate(self._model, input_ids, attention_mask, **common)
        else:
            # The seed only shapes the initial guesses (hence the speed), never the text.
            generator = torch.Generator().manual_seed(batch[0].seed or 0)
            output = jacobi_generate(
                self._model,
                input_ids,
                attention_mask,
                n_token=batch[0].n_token,
                generator=generator,
                **common,
            )
        rows = output.stats.rows
        self._generated_tokens += sum(row.new_tokens for row in rows)
        self._batches += 1
        self._batched_rows += len(rows)
        self._metrics.record_batch(rows)
        return [row.forwards for row in rows]
