"""The HTTP layer of the CLLM server: the FastAPI app and the `OpenAIIngress` deployment.

`OpenAIIngress` is light (HTTP, auth, validation, SSE) and forwards generation to the `Decoder`
deployment (`cllm_serve.decoder`), which holds the model. Keeping them apart lets the model
replicas scale (and sit on GPUs) independently of the HTTP layer, and lets the ingress answer 503
in OpenAI's shape when the decoders' queue is full.

Routes: GET /health (fails when no decoder replica answers), GET /metrics (Prometheus text),
GET /version, GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
POST /tokenize, POST /detokenize. With the environment variable CLLM_API_KEY set (in the ingress
replicas' environment), every /v1 route and /tokenize, /detokenize want
`Authorization: Bearer <key>`.

A client that disconnects cancels its rows whatever the request's phase: queued behind Serve's
handle, waiting in a decoder, before the first byte, mid-stream, or non-streaming. A decoder
replica that dies takes no request with it: its calls resume on another (`cllm_serve.resume`).
"""

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from typing import Any, Literal

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cllm_serve.batching import Accepted, Event, Failed, Finished, Rejected, TextDelta
from cllm_serve.decoder import DecodeRequest, wait_within
from cllm_serve.metrics import ingress_metrics, serving_metrics
from cllm_serve.openai_api import (
    ApiError,
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    DetokenizeRequest,
    RequestDefaults,
    StreamHeader,
    TokenizeRequest,
    Usage,
    chat_body,
    chat_choice_chunk,
    chat_logprobs,
    completion_body,
    completion_choice_chunk,
    completion_logprobs,
    from_validation_error,
    model_card,
    models_body,
    new_id,
    now,
)
from cllm_serve.resume import ResumableCall, ResumePolicy, ResumptionFailed

logger = logging.getLogger("ray.serve")

API_KEY_ENV = "CLLM_API_KEY"
KNOWN_ROUTES = frozenset({
    "/health", "/metrics", "/version", "/tokenize", "/detokenize", "/v1/models", "/v1/completions",
    "/v1/chat/completions",
})


class IngressSettings(BaseModel):
    served_model_name: str
    defaults: RequestDefaults = Field(default_factory=RequestDefaults)
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    body_timeout_s: float = Field(default=30, gt=0, description="reading a request body; then 408")
    health_timeout_s: float = Field(default=10, gt=0, description="a decoder must answer /health within it")
    resume_attempts: int = Field(default=3, ge=0, description="resumed calls per request after replica deaths")
    resume_timeout_s: float = Field(default=30, gt=0, description="from a replica's death to the resumed call")
    progress_interval_s: float = Field(
        default=0.25, ge=0, description="non-streamed requests: how often a decoder reports progress"
    )


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
    streamed_to_end: bool = False  # the decoder has nothing more for this stream
    call: ResumableCall | None = None

    def log_fields(self) -> str:
        fields = f" stream={self.stream}"
        if self.usage is not None:
            fields += (
                f" prompt_tokens={self.usage.prompt_tokens} completion_tokens={self.usage.completion_tokens}"
                f" forwards={self.usage.forwards} tokens_per_forward={self.usage.tokens_per_forward:.2f}"
            )
        if self.finish_reason is not None:
            fields += f" finish_reason={self.finish_reason}"
        if self.call is not None and self.call.resumptions:
            fields += f" resumptions={self.call.resumptions}"
        return fields


# -- the FastAPI app ------------------------------------------------------------------------------

REQUEST_SCHEMAS = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


@cache
def _component_schemas() -> tuple[dict[tuple[type[BaseModel], str], Any], dict[str, Any]]:
    """JSON schemas of the request bodies, referring to one shared set of components."""
    keys = [(schema, "validation") for schema in REQUEST_SCHEMAS]
    refs, top = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    return refs, top.get("$defs", {})


def request_body(schema: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses its body itself (to answer in OpenAI's error shape
    and to bound its size and time): its documented body, so clients and fuzzers see it."""
    reference = _component_schemas()[0][(schema, "validation")]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": reference}}}}


def package_version() -> str:
    try:
        return installed_version("cllm-ray")
    except PackageNotFoundError:
        return "unknown"

class CllmApi(FastAPI):
    """FastAPI whose OpenAPI schema also holds the request bodies' component schemas."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(_component_schemas()[1])
            self.openapi_schema = schema
        return self.openapi_schema


api = CllmApi(title="CLLM (Jacobi decoding) OpenAI-compatible API", docs_url=None, redoc_url=None)
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
    """Usage of a response: the prompt once, the completions of all its choices (as the client
    received them, across resumptions). Forwards are those of the replicas that finished the
    choices, so tokens per forward leaves out the tokens a failed replica decoded."""
    completion_tokens = sum(event.completion_tokens for event in finished)
    forwards = sum(event.forwards for event in finished)
    counted = completion_tokens - sum(event.carried_tokens for event in finished)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        forwards=forwards,
        tokens_per_forward=counted / forwards if forwards else 0.0,
    )


@dataclass
class ChunkFormat:
    """How one streamed response renders its chunks: completions or chat, with or without
    log-probabilities (the completions API numbers each choice's characters as it goes)."""

    kind: Literal["completion", "chat"]
    header: StreamHeader
    with_logprobs: bool = False
    text_offsets: dict[int, int] = field(default_factory=dict)

    @classmethod
    def new(cls, kind: Literal["completion", "chat"], model: str, include_usage: bool, with_logprobs: bool):
        prefix, object_name = ("chatcmpl", "chat.completion.chunk") if kind == "chat" else ("cmpl", "text_completion")
        return cls(kind, StreamHeader(new_id(prefix), model, object_name, now(), include_usage), with_logprobs)

    def opening(self, choices: int) -> list[dict[str, Any]]:
        # Chat streams announce the role first, for every choice, as OpenAI's do.
        if self.kind != "chat":
            return []
        return [
            self.header.chunk([chat_choice_chunk({"role": "assistant", "content": ""}, index=index)])
            for index in range(choices)
        ]

    def delta(self, event: TextDelta) -> dict[str, Any]:
        if self.kind == "chat":
            logprobs = chat_logprobs(event.logprobs) if self.with_logprobs else None
            return self.header.chunk([chat_choice_chunk({"content": event.text}, index=event.index, logprobs=logprobs)])
        logprobs = None
        if self.with_logprobs:
            offset = self.text_offsets.get(event.index, 0)
            logprobs = completion_logprobs(event.logprobs, offset)
            self.text_offsets[event.index] = offset + sum(len(entry.token) for entry in event.logprobs)
        return self.header.chunk([completion_choice_chunk(event.text, index=event.index, logprobs=logprobs)])

    def closing(self, finished: Finished) -> dict[str, Any]:
        if self.kind == "chat":
            choice = chat_choice_chunk({}, finished.finish_reason, finished.index, stop_reason=finished.stop_reason)
        else:
            choice = completion_choice_chunk("", finished.finish_reason, finished.index,
                                              stop_reason=finished.stop_reason)
        return self.header.chunk([choice])

    def usage(self, usage: Usage) -> dict[str, Any]:
        return self.header.chunk([], usage)


class RequestPhase:
    """A request's phase for the waiting/running gauges and its latency figures (TTFT, time per
    output token), recorded once whatever way the request ends."""

    def __init__(self):
        self._metrics = serving_metrics()
        self.started = time.monotonic()
        self.first_text: float | None = None
        self._phase: Literal["new", "waiting", "running", "done"] = "new"

    def submitted(self) -> None:
        self._move("waiting")

    def text(self) -> None:
        if self.first_text is None:
            self.first_text = time.monotonic()
            self._metrics.time_to_first_token.observe(self.first_text - self.started)
        self._move("running")

    def finished(self, prompt_tokens: int, rows: Sequence[Finished]) -> None:
        for row in rows:
            self._metrics.record_row(row.completion_tokens, row.carried_tokens, row.forwards, row.queue_s)
        self._metrics.prompt_tokens.inc(prompt_tokens)
        if self.first_text is None and rows:  # not streamed: the decoder timed the first token
            self.first_text = self.started + min(row.first_token_s for row in rows)
            self._metrics.time_to_first_token.observe(self.first_text - self.started)
        tokens = max((row.completion_tokens for row in rows), default=0)
        if self.first_text is not None and tokens > 1:
            self._metrics.time_per_output_token.observe((time.monotonic() - self.first_text) / (tokens - 1))

    def close(self) -> None:
        self._move("done")

    def _move(self, phase: Literal["waiting", "running", "done"]) -> None:
        if self._phase == phase or self._phase == "done":
            return
        gauges = {"waiting": self._metrics.waiting, "running": self._metrics.running}
        if self._phase in gauges:
            gauges[self._phase].dec()
        if phase in gauges:
            gauges[phase].inc()
        self._phase = phase


class CancellingStreamingResponse(StreamingResponse):
    """A StreamingResponse that cancels its decoder stream however it ends short: a disconnect
    before Starlette starts the body generator, or while it waits for the next event (Starlette
    then cancels the sending task and leaves the generator unfinished)."""

    def __init__(self, content: AsyncIterator[str], on_exit: Any, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._on_exit = on_exit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_exit()


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body within `timeout_s` (else 408), refused with 413 as soon as it is known to
    exceed `limit` bytes."""
    try:
        return await wait_within(_read_body(request, limit), timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="timeout") from None


async def _read_body(request: Request, limit: int) -> bytes:
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
        parsed = schema.model_validate_json(body)
    except ValidationError as error:
        if error.errors()[0]["type"] == "json_invalid":
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        raise from_validation_error(error) from None
    unknown = sorted(parsed.model_extra or {})
    if unknown:  # as vLLM: accepted, and said so in the log
        logger.warning("ignoring unknown request fields: %s", ", ".join(repr(name[:64]) for name in unknown[:20]))
    return parsed


async def _over_capacity_as_503(call: Any) -> Any:
    """Await a decoder call, turning Serve's back-pressure and replica failures into API errors."""
    try:
        return await call
    except (BackPressureError, DeploymentUnavailableError):
        raise ApiError(
            503, "The server is over capacity; retry later.", type="server_error", code="overloaded"
        ) from None
    except ResumptionFailed as error:
        raise _resumption_error(error) from None
    except (RayTaskError, RayActorError):
        logger.exception("decoder call failed")
        raise ApiError(500, "internal error while decoding", type="server_error") from None


def _resumption_error(error: ResumptionFailed) -> ApiError:
    serving_metrics().resumption_failures.inc()
    return ApiError(503, str(error), type="server_error", code="replica_failed")


def _accepted_or_raise(event: Event) -> Accepted:
    if isinstance(event, Rejected):
        raise ApiError(400, event.message, param=event.param, code=event.code)
    if not isinstance(event, Accepted):
        raise ApiError(500, "unexpected reply from the decoder", type="server_error")
    return event


async def _collect(events: ResumableCall) -> list[Event]:
    return [event async for event in events]


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
        Choice(
            event.index, "".join(texts[event.index]), event.finish_reason,
            list(event.prompt_logprobs or ()) + logprobs[event.index], event.stop_reason,
        )
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
        self._resume_policy = ResumePolicy(settings.resume_attempts, settings.resume_timeout_s)
        self._api_key = os.environ.get(API_KEY_ENV) or None
        if self._api_key is None:
            logger.warning("%s is not set: the API accepts requests without a key", API_KEY_ENV)
        self._created = now()
        self._max_model_len: int | None = None

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """200 once a decoder replica answers within health_timeout_s, else 503."""
        try:
            await asyncio.wait_for(self._decoder.max_model_len.remote(), self._settings.health_timeout_s)
        except Exception:  # noqa: BLE001 - whatever the reason, no decoder answered
            raise ApiError(503, "no decoder replica is answering", type="server_error", code="unhealthy") from None
        return {"status": "ok"}

    @api.get("/metrics")
    async def metrics(self) -> Response:
        """This ingress replica's serving metrics in Prometheus text (Ray's own endpoint has more)."""
        return Response(serving_metrics().text(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @api.get("/version")
    async def version(self) -> dict[str, str]:
        return {"version": package_version()}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return models_body(self._settings.served_model_name, self._created, await self._model_len())

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self._check_model(model_id)
        return model_card(model_id, self._created, await self._model_len())

    @api.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        parsed: TokenizeRequest = parse_request(TokenizeRequest, await self._body(request))
        self._check_model(parsed.model)
        messages = None if parsed.messages is None else tuple((m.role, m.text) for m in parsed.messages)
        add_special = parsed.add_special_tokens if parsed.add_special_tokens is not None else True
        tokens = await _over_capacity_as_503(self._decoder.tokenize.remote(parsed.prompt, messages, add_special))
        if isinstance(tokens, Rejected):
            raise ApiError(400, tokens.message, param=tokens.param, code=tokens.code)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": await self._model_len()}

    @api.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
    async def detokenize(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        parsed: DetokenizeRequest = parse_request(DetokenizeRequest, await self._body(request))
        self._check_model(parsed.model)
        text = await _over_capacity_as_503(self._decoder.detokenize.remote(parsed.tokens))
        if isinstance(text, Rejected):
            raise ApiError(400, text.message, param=text.param, code=text.code)
        return {"prompt": text}

    @api.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        parsed: CompletionRequest = parse_request(CompletionRequest, await self._body(request))
        self._check_model(parsed.model)
        decode_request = DecodeRequest(prompts=parsed.prompts, params=parsed.to_decode_params(self._settings.defaults))
        chunks = ChunkFormat.new("completion", parsed.model, parsed.include_usage_chunk, parsed.logprobs is not None)
        return await self._respond(request, parsed, decode_request, chunks)

    @api.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        parsed: ChatCompletionRequest = parse_request(ChatCompletionRequest, await self._body(request))
        self._check_model(parsed.model)
        messages = tuple((message.role, message.text) for message in parsed.messages)
        decode_request = DecodeRequest(messages=messages, params=parsed.to_decode_params(self._settings.defaults))
        chunks = ChunkFormat.new("chat", parsed.model, parsed.include_usage_chunk, bool(parsed.logprobs))
        return await self._respond(request, parsed, decode_request, chunks)

    # -- helpers --------------------------------------------------------------------------------

    async def _body(self, request: Request) -> bytes:
        return await read_body(request, self._settings.max_body_bytes, self._settings.body_timeout_s)

    async def _model_len(self) -> int | None:
        if self._max_model_len is None:
            self._max_model_len = await _over_capacity_as_503(self._decoder.max_model_len.remote())
        return self._max_model_len

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

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self._settings.served_model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def _call(self, decode_request: DecodeRequest) -> ResumableCall:
        """The decoder's event stream for `decode_request`, resumed on another replica if its own
        dies. Non-streamed requests use it too, with events held for `progress_interval_s`."""
        resumptions = serving_metrics().resumptions
        return ResumableCall(self._streaming_decoder.generate.remote, decode_request, self._resume_policy,
                             on_resume=resumptions.inc)

    async def _respond(
        self,
        request: Request,
        parsed: CompletionRequest | ChatCompletionRequest,
        decode_request: DecodeRequest,
        chunks: ChunkFormat,
    ) -> Response:
        outcome = RequestOutcome(stream=bool(parsed.stream))
        request.state.outcome = outcome
        phase = RequestPhase()
        phase.submitted()
        if not parsed.stream:
            decode_request = replace(decode_request, event_interval_s=self._settings.progress_interval_s)
        events = outcome.call = self._call(decode_request)
        try:
            accepted = _accepted_or_raise(await _over_capacity_as_503(events.__anext__()))
        except BaseException:  # refused, or the client left while the request was queued
            events.cancel()
            phase.close()
            raise
        if parsed.stream:

            def on_exit() -> None:
                if not outcome.streamed_to_end:  # the client left: stop the decoder's rows now
                    outcome.client_left = True
                    events.cancel()
                phase.close()

            stream = self._sse(events, accepted, chunks, outcome, phase)
            return CancellingStreamingResponse(
                stream, on_exit, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        try:
            rest = await _over_capacity_as_503(_collect(events))
        except asyncio.CancelledError:  # the client left: the decoder must not go on
            outcome.client_left = True
            events.cancel()
            raise
        finally:
            phase.close()
        choices, finished = _choices_or_raise(rest, accepted.choices)
        if not chunks.with_logprobs:
            choices = [replace(choice, logprobs=None) for choice in choices]
        outcome.usage = make_usage(accepted.prompt_tokens, finished)
        outcome.finish_reason = ",".join(choice.finish_reason for choice in choices)
        phase.finished(accepted.prompt_tokens, finished)
        render = chat_body if chunks.kind == "chat" else completion_body
        header = chunks.header
        return JSONResponse(render(header.response_id, header.model, choices, outcome.usage, header.created))

    async def _sse(
        self,
        events: ResumableCall,
        accepted: Accepted,
        chunks: ChunkFormat,
        outcome: RequestOutcome,
        phase: RequestPhase,
    ) -> AsyncIterator[str]:
        finished: list[Finished] = []
        for chunk in chunks.opening(accepted.choices):
            yield sse(chunk)
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    if not event.text and not (chunks.with_logprobs and event.logprobs):
                        continue  # ids whose text is held back (a partial character, a maybe-stop)
                    phase.text()
                    yield sse(chunks.delta(event))
                elif isinstance(event, Finished):
                    finished.append(event)
                    yield sse(chunks.closing(event))
                    if len(finished) == accepted.choices:
                        outcome.usage = make_usage(accepted.prompt_tokens, finished)
                        outcome.finish_reason = ",".join(done.finish_reason for done in finished)
                        phase.finished(accepted.prompt_tokens, finished)
                        if chunks.header.include_usage:
                            yield sse(chunks.usage(outcome.usage))
                elif isinstance(event, Failed):
                    # The 200 header is gone already: report the error in-band, as OpenAI does.
                    yield sse(ApiError(500, event.message, type="server_error").body())
        except (RayTaskError, RayActorError):
            logger.exception("decoder stream failed")
            yield sse(ApiError(500, "internal error while decoding", type="server_error").body())
        except ResumptionFailed as error:  # never a silent cut: the client learns why it ends here
            logger.warning("stream ends unfinished: %s", error)
            yield sse(_resumption_error(error).body())
        outcome.streamed_to_end = True
        yield sse("[DONE]")
