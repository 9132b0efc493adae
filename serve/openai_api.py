"""The OpenAI HTTP contract: request schemas, response bodies and the error shape.

Requests are validated strictly. Sampling (`temperature`, `top_p`, `seed`, and vLLM's `top_k`),
several choices (`n`) and log-probabilities are served; fields that would change the output in a
way this server cannot honour (penalties, echo, best_of, tools) are accepted only at their neutral
value and otherwise rejected with 400; unknown fields are rejected too, so nothing is silently
ignored. `n_token` (the Jacobi block size) is this server's extension. An absent `temperature`
means the server's default (greedy unless configured otherwise), not OpenAI's 1.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # as in OpenAI's API
MAX_CHOICES = 16
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows
INT64 = 2**63


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_validation_error(error: ValidationError) -> ApiError:
    """The first pydantic complaint as a 400, naming the offending field as `param`."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    reason = first["msg"].removeprefix("Value error, ")
    message = reason if param is None else f"{param}: {reason}"
    return ApiError(400, message, param=param, code="invalid_value")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _GenerationParameters(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, description="0 or -1: no limit (vLLM's extension)")
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n_token: int | None = Field(default=None, ge=1, description="Jacobi block size (extension)")

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _integers_are_numbers(cls, value: Any) -> Any:
        # Strict mode would refuse `"temperature": 0`, which every JSON client sends for 0.0.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        sequences = [value] if isinstance(value, str) else value or []
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported")
        if any(sequence == "" for sequence in sequences):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0.0):
            raise ValueError("penalties are not supported: they must be 0 or absent")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationParameters:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def top_k_limit(self) -> int:
        return max(self.top_k or 0, 0)


class CompletionRequest(_GenerationParameters):
    """POST /v1/completions. `prompt` is a string or a list of token ids (one prompt)."""

    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationParameters):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def logprob_alternatives(self) -> int | None:
        """Alternatives per token the decoder computes (None: no log-probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- response bodies -----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forwards: int = Field(description="model forward passes spent on this request (extension)")
    tokens_per_forward: float = Field(description="completion_tokens / forwards (extension)")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class TokenLogprobs(Protocol):
    """A generated token's log-probability as the decoder reports it (text of the token, value,
    and the likeliest alternatives as (text, value) pairs)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Choice:
    """One finished choice of a response."""

    index: int
    text: str
    finish_reason: str
    logprobs: Sequence[TokenLogprobs] | None = None  # None: not asked for


def completion_logprobs(entries: Sequence[TokenLogprobs], text_offset: int = 0) -> dict[str, Any]:
    """The completions API's (legacy) logprobs object. `top_logprobs` holds the alternatives and
    the chosen token, as OpenAI's does; `text_offset` counts characters from `text_offset` on."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [dict(entry.top) | {entry.token: entry.logprob} for entry in entries],
        "text_offset": offsets,
    }


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: Sequence[TokenLogprobs]) -> dict[str, Any]:
    """The chat API's logprobs object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    return {
        "content": [
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": _token_bytes(entry.token),
                "top_logprobs": [
                    {"token": token, "logprob": value, "bytes": _token_bytes(token)} for token, value in entry.top
                ],
            }
            for entry in entries
        ]
    }


def completion_body(response_id: str, model: str, choices: Sequence[Choice], usage: Usage) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "text": choice.text,
                "logprobs": None if choice.logprobs is None else completion_logprobs(choice.logprobs),
                "finish_reason": choice.finish_reason,
            }
            for choice in choices
        ],
        "usage": usage.model_dump(),
    }


def completion_chunk(
    response_id: str,
    model: str,
    text: str,
    finish_reason: str | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def chat_body(response_id: str, model: str, choices: Sequence[Choice], usage: Usage) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": None if choice.logprobs is None else chat_logprobs(choice.logprobs),
                "finish_reason": choice.finish_reason,
            }
            for choice in choices
        ],
        "usage": usage.model_dump(),
    }


def chat_chunk(
    response_id: str,
    model: str,
    delta: dict[str, str],
    finish_reason: str | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(response_id: str, model: str, object_name: str, usage: Usage) -> dict[str, Any]:
    """The extra last chunk of `stream_options.include_usage`: no choices, only usage."""
    return {
        "id": response_id,
        "object": object_name,
        "created": now(),
        "model": model,
        "choices": [],
        "usage": usage.model_dump(),
    }


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "cllm"}
