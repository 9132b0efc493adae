"""The OpenAI HTTP contract: request schemas, response bodies and the error shape.

Requests are validated strictly. Fields that OpenAI defines but that would change the output in a
way this server cannot honour (sampling, several choices, logprobs, penalties, tools) are accepted
only at their neutral value and otherwise rejected with 400; unknown fields are rejected too, so
nothing is silently ignored. `n_token` (the Jacobi block size) is this server's extension.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # as in OpenAI's API


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
    n: int = 1
    seed: int | None = None
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

    # Decoding is greedy (Jacobi decoding is lossless only against greedy AR): refuse what would
    # need sampling instead of quietly returning greedy text.
    @field_validator("temperature")
    @classmethod
    def _greedy_temperature(cls, value: float | None) -> float | None:
        if value not in (None, 0.0):
            raise ValueError("only greedy decoding is supported: temperature must be 0 or absent")
        return value

    @field_validator("top_p")
    @classmethod
    def _greedy_top_p(cls, value: float | None) -> float | None:
        if value not in (None, 1.0):
            raise ValueError("only greedy decoding is supported: top_p must be 1 or absent")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
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


class CompletionRequest(_GenerationParameters):
    """POST /v1/completions. `prompt` is a string or a list of token ids (one prompt)."""

    prompt: str | list[int]
    echo: bool = False
    logprobs: None = None  # only null: log-probabilities are not computed
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
    logprobs: Literal[False] | None = None

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

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


def completion_body(
    response_id: str, model: str, text: str, finish_reason: str, usage: Usage
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage.model_dump(),
    }


def completion_chunk(
    response_id: str, model: str, text: str, finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_body(response_id: str, model: str, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.model_dump(),
    }


def chat_chunk(
    response_id: str, model: str, delta: dict[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
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
