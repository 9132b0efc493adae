"""The HTTP layer of the CLLM server: the FastAPI app and the `OpenAIIngress` deployment.

`OpenAIIngress` is light (HTTP, auth, validation, SSE) and forwards generation to the `Decoder`
deployment (`cllm_serve.decoder`), which holds the model. Keeping them apart lets the model
replicas scale (and sit on GPUs) independently of the HTTP layer, and lets the ingress answer 503
in OpenAI's shape when the decoders' queue is full.

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions. With the environment variable CLLM_API_KEY set (in the ingress
replicas' environment), every /v1 route wants `Authorization: Bearer <key>`.
"""

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cllm_serve.batching import Accepted, Event, Failed, Finished, Rejected, TextDelta
from cllm_serve.decoder import DecodeRequest
from cllm_serve.metrics import ingress_metrics
from cllm_serve.openai_api import (
    ApiError,
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    Usage,
    chat_body,
    chat_chunk,
    chat_logprobs,
    completion_body,
    completion_chunk,
    completion_logprobs,
    from_validation_error,
    model_card,
    models_body,
    new_id,
    now,
    usage_chunk,
)

logger = logging.getLogger("ray.serve")

API_KEY_ENV = "CLLM_API_KEY"
KNOWN_ROUTES = frozenset({"/health", "/v1/models", "/v1/completions", "/v1/chat/completions"})


class IngressSettings(BaseModel):
    served_model_name: str
    max_body_bytes: int = Field(default=1_000_000, ge=1)


# -- per-request observation: metrics and one log line -----------------------------------------


class RequestObserver:
    """Pure ASGI middleware: counts each request by route and status, times it to its last byte
    (streams included) and logs one line without any prompt text. A client that disconnects is
    recorded as 499. (Starlette's `BaseHTTPMiddleware` would get in the way of streaming and
    cancellation, hence plain ASGI.)"""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what the client gets if the app raises before answering

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            self._record(scope, status, time.monotonic() - started)

    @staticmethod
    def _record(scope: Scope, status: int, latency_s: float) -> None:
        outcome: RequestOutcome | None = scope.get("state", {}).get("outcome")
        if outcome is not None and outcome.client_left:
            status = 499  # a stream whose client left had sent its 200 header; count it as gone
        route = route_label(scope)
        ingress_metrics().record(route, status, latency_s)
        details = outcome.log_fields() if outcome else ""
        logger.info(
            "request %s %s status=%d latency_ms=%.1f%s",
            scope.get("method"),
            route,
            status,
            latency_s * 1000,
            details,
        )


def route_label(scope: Scope) -> str:
    """The route as a metric label: known routes by name, anything else lumped together (so
    scanners probing random paths cannot blow up the number of time series)."""
    # Serve mounts an application under its route prefix (the ASGI root_path).
    path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
    if path in KNOWN_ROUTES:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


@dataclass
class RequestOutcome:
    """What a generation route learned about its request, for the log line."""

    stream: bool
    usage: Usage | None = None
    finish_reason: str | None = None
    client_left: bool = False

    def log_fields(self) -> str:
        fields = f" stream={self.stream}"
        if self.usage is not None:
            fields += (
                f" prompt_tokens={self.usage.prompt_tokens} completion_tokens={self.usage.completion_tokens}"
                f" forwards={self.usage.forwards} tokens_per_forward={self.usage.tokens_per_forward:.2f}"
            )
        if self.finish_reason is not None:
            fields += f" finish_reason={self.finish_reason}"
        return fields


# -- the FastAPI app ------------------------------------------------------------------------------

api = FastAPI(title="CLLM (Jacobi decoding) OpenAI-compatible API", docs_url=None, redoc_url=None)
api.add_middleware(RequestObserver)


@api.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods, in OpenAI's shape too.
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return JSONResponse(
        ApiError(error.status_code, str(error.detail), code=code).body(), status_code=error.status_code
    )


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def make_usage(prompt_tokens: int, finished: Sequence[Finished]) -> Usage:
    """Usage of a response: the prompt once, the completions of all its choices."""
    completion_tokens = sum(event.completion_tokens for event in finished)
    forwards = sum(event.forwards for event in finished)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        forwards=forwards,
        tokens_per_forward=completion_tokens / forwards if forwards else 0.0,
    )


@dataclass
class ChunkFormat:
    """How one streamed response renders its chunks: completions or chat, with or without
    log-probabilities (the completions API numbers each choice's characters as it goes)."""

    kind: Literal["completion", "chat"]
    response_id: str
    model: str
    with_logprobs: bool = False
    text_offsets: dict[int, int] = field(default_factory=dict)

    def opening(self, choices: int) -> list[dict[str, Any]]:
        # Chat streams announce the role first, for every choice, as OpenAI's do.
        if self.kind != "chat":
            return []
        return [
            chat_chunk(self.response_id, self.model, {"role": "assistant", "content": ""}, index=index)
            for index in range(choices)
        ]

    def delta(self, event: TextDelta) -> dict[str, Any]:
        if self.kind == "chat":
            logprobs = chat_logprobs(event.logprobs) if self.with_logprobs else None
            return chat_chunk(self.response_id, self.model, {"content": event.text}, index=event.index,
                              logprobs=logprobs)
        logprobs = None
        if self.with_logprobs:
            offset = self.text_offsets.get(event.index, 0)
            logprobs = completion_logprobs(event.logprobs, offset)
            self.text_offsets[event.index] = offset + sum(len(entry.token) for entry in event.logprobs)
        return completion_chunk(self.response_id, self.model, event.text, index=event.index, logprobs=logprobs)

    def closing(self, finished: Finished) -> dict[str, Any]:
        if self.kind == "chat":
            return chat_chunk(self.response_id, self.model, {}, finished.finish_reason, index=finished.index)
        return completion_chunk(self.response_id, self.model, "", finished.finish_reason, index=finished.index)

    def usage(self, usage: Usage) -> dict[str, Any]:
        object_name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return usage_chunk(self.response_id, self.model, object_name, usage)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_request(schema: type[BaseModel], body: bytes) -> Any:
    try:
        return schema.model_validate_json(body)
    except ValidationError as error:
        if error.errors()[0]["type"] == "json_invalid":
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        raise from_validation_error(error) from None


async def _over_capacity_as_503(call: Any) -> Any:
    """Await a decoder call, turning Serve's back-pressure and replica failures into API errors."""
    try:
        return await call
    except (BackPressureError, DeploymentUnavailableError):
        raise ApiError(
            503, "The server is over capacity; retry later.", type="server_error", code="overloaded"
        ) from None
    except (RayTaskError, RayActorError):
        logger.exception("decoder call failed")
        raise ApiError(500, "internal error while decoding", type="server_error") from None


def _accepted_or_raise(event: Event) -> Accepted:
    if isinstance(event, Rejected):
        raise ApiError(400, event.message, param=event.param, code=event.code)
    if not isinstance(event, Accepted):
        raise ApiError(500, "unexpected reply from the decoder", type="server_error")
    return event


def _decoding_fields(parsed: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """The sampling and Jacobi fields every generation request hands to the decoder."""
    return {
        "stop": parsed.stop_sequences,
        "n_token": parsed.n_token,
        "seed": parsed.seed,
        "temperature": parsed.temperature,
        "top_p": parsed.top_p if parsed.top_p is not None else 1.0,
        "top_k": parsed.top_k_limit,
        "n": parsed.n,
    }


def _choices_or_raise(events: Sequence[Event], choices: int) -> tuple[list[Choice], list[Finished]]:
    """The finished choices of a non-streamed response, in index order; any failed choice fails
    the response (500)."""
    failed = [event for event in events if isinstance(event, Failed)]
    if failed:
        raise ApiError(500, failed[0].message, type="server_error")
    finished = sorted((event for event in events if isinstance(event, Finished)), key=lambda event: event.index)
    if [event.index for event in finished] != list(range(choices)):
        raise ApiError(500, "unexpected reply from the decoder", type="server_error")
    texts: dict[int, list[str]] = {index: [] for index in range(choices)}
    logprobs: dict[int, list] = {index: [] for index in range(choices)}
    for event in events:
        if isinstance(event, TextDelta):
            texts[event.index].append(event.text)
            logprobs[event.index].extend(event.logprobs)
    return [
        Choice(event.index, "".join(texts[event.index]), event.finish_reason, logprobs[event.index])
        for event in finished
    ], finished


# Serve serialises the deployment class when it is decorated: everything its methods use must
# be defined above this line.
@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, decoder: DeploymentHandle, settings: IngressSettings):
        self._decoder = decoder
        self._streaming_decoder = decoder.options(stream=True)
        self._settings = settings
        self._api_key = os.environ.get(API_KEY_ENV) or None
        self._created = now()

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return models_body(self._settings.served_model_name, self._created)

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self._check_model(model_id)
        return model_card(model_id, self._created)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        parsed: CompletionRequest = parse_request(
            CompletionRequest, await read_body(request, self._settings.max_body_bytes)
        )
        self._check_model(parsed.model)
        decode_request = DecodeRequest(
            prompt=parsed.prompt,
            max_tokens=parsed.max_tokens,
            logprobs=parsed.logprobs,
            **_decoding_fields(parsed),
        )
        chunks = ChunkFormat("completion", new_id("cmpl"), parsed.model, with_logprobs=parsed.logprobs is not None)
        return await self._respond(request, parsed, decode_request, chunks)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        parsed: ChatCompletionRequest = parse_request(
            ChatCompletionRequest, await read_body(request, self._settings.max_body_bytes)
        )
        self._check_model(parsed.model)
        decode_request = DecodeRequest(
            messages=tuple((message.role, message.text) for message in parsed.messages),
            max_tokens=parsed.token_limit,
            logprobs=parsed.logprob_alternatives,
            **_decoding_fields(parsed),
        )
        chunks = ChunkFormat("chat", new_id("chatcmpl"), parsed.model, with_logprobs=bool(parsed.logprobs))
        return await self._respond(request, parsed, decode_request, chunks)

    # -- helpers --------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        # Constant-time comparison, so response timing does not leak the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            supplied.strip().encode(), self._api_key.encode()
        ):
            raise ApiError(
                401, "invalid or missing API key", type="authentication_error", code="invalid_api_key"
            )

    def _check_model(self, model: str) -> None:
        if model != self._settings.served_model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    async def _respond(
        self,
        request: Request,
        parsed: CompletionRequest | ChatCompletionRequest,
        decode_request: DecodeRequest,
        chunks: ChunkFormat,
    ) -> Response:
        outcome = RequestOutcome(stream=parsed.stream)
        request.state.outcome = outcome
        if parsed.stream:
            events = self._streaming_decoder.generate.remote(decode_request)
            accepted = _accepted_or_raise(await _over_capacity_as_503(events.__anext__()))
            stream = self._sse(events, accepted, chunks, outcome, parsed.include_usage_chunk)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        events = await _over_capacity_as_503(self._decoder.complete.remote(decode_request))
        accepted = _accepted_or_raise(events[0])
        choices, finished = _choices_or_raise(events[1:], accepted.choices)
        if not chunks.with_logprobs:
            choices = [replace(choice, logprobs=None) for choice in choices]
        outcome.usage = make_usage(accepted.prompt_tokens, finished)
        outcome.finish_reason = ",".join(choice.finish_reason for choice in choices)
        render = chat_body if chunks.kind == "chat" else completion_body
        return JSONResponse(render(chunks.response_id, chunks.model, choices, outcome.usage))

    async def _sse(
        self,
        events: DeploymentResponseGenerator,
        accepted: Accepted,
        chunks: ChunkFormat,
        outcome: RequestOutcome,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        finished_normally = False
        finished: list[Finished] = []
        try:
            for chunk in chunks.opening(accepted.choices):
                yield sse(chunk)
            try:
                async for event in events:
                    if isinstance(event, TextDelta):
                        yield sse(chunks.delta(event))
                    elif isinstance(event, Finished):
                        finished.append(event)
                        yield sse(chunks.closing(event))
                        if len(finished) == accepted.choices:
                            outcome.usage = make_usage(accepted.prompt_tokens, finished)
                            outcome.finish_reason = ",".join(done.finish_reason for done in finished)
                            if include_usage:
                                yield sse(chunks.usage(outcome.usage))
                    elif isinstance(event, Failed):
                        # The 200 header is gone already: report the error in-band, as OpenAI does.
                        yield sse(ApiError(500, event.message, type="server_error").body())
            except (RayTaskError, RayActorError):
                logger.exception("decoder stream failed")
                yield sse(ApiError(500, "internal error while decoding", type="server_error").body())
            yield sse("[DONE]")
            finished_normally = True
        finally:
            if not finished_normally:  # the client left: stop the decoder's row now
                outcome.client_left = True
                events.cancel()
