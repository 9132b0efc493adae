"""The OpenAI HTTP contract: request schemas, response bodies and the error shape.

Requests are validated strictly for types; `null` means absent everywhere. Sampling
(`temperature`, `top_p`, `seed`, vLLM's `top_k`), several choices (`n`), several prompts,
`echo`, log-probabilities (of the prompt too, with `echo`) and vLLM's `stop_token_ids`, `ignore_eos`, `min_tokens` and
`include_stop_str_in_output` are served. Fields that would change the output in a way this server
cannot honour (penalties, logit_bias, best_of, suffix, tools, a non-text response_format, echo
with logprobs in a stream) are accepted only at their neutral value and otherwise rejected with 400. Unknown
fields are accepted and logged, as vLLM does. `n_token` (the Jacobi block size) is this server's
extension. An absent `temperature` means the server's default (greedy unless configured
otherwise), not OpenAI's 1. Every default resolves in one place, `to_decode_params` (as vLLM's
`to_sampling_params`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_SEQUENCES = 4  # as in OpenAI's API
MAX_STOP_LENGTH = 256  # characters per stop sequence: bounds the work of holding text back
MAX_STOP_TOKEN_IDS = 64
MAX_PROMPTS = 64  # prompts in one completions request
MAX_ROWS = 64  # prompts times n: the rows one request may occupy
MAX_DETOKENIZE_TOKENS = 1_000_000
MAX_CHOICES = 16
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows
INT64 = 2**63
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


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


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "null"})


def _is_field(part: str | int) -> bool:
    """A location part that names a field or an index, not a union member's type (pydantic puts
    `str`, `list[int]`, `function-after[...]` and such into the location of union errors)."""
    text = str(part)
    return not (text in _TYPE_TAGS or "[" in text or text.startswith("function-"))


def from_validation_error(error: ValidationError) -> ApiError:
    """The first pydantic complaint as a 400, naming the offending field as `param`."""
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"] if _is_field(part)) or None
    reason = first["msg"].removeprefix("Value error, ")
    message = reason if param is None else f"{param}: {reason}"
    return ApiError(400, message, param=param, code="invalid_value")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RequestDefaults(BaseModel):
    """The server's values for the fields a request leaves out (builder arguments)."""

    default_max_tokens: int | None = Field(
        default=None, ge=1, description="chat requests without max_tokens; None: the rest of the context (vLLM)"
    )
    default_temperature: float = Field(default=0.0, ge=0, le=2, description="when a request gives none")


@dataclass(frozen=True)
class DecodeParams:
    """One request's sampling, stopping, length and log-probability settings with every default
    resolved; only the context's room is left to the decoder, which tokenizes the prompt."""

    max_tokens: int | None = None  # the client's limit: refused if the prompt leaves less room
    default_max_tokens: int | None = None  # without max_tokens: at most this, within the room; None: all of it
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    echo: bool = False  # the prompt's text opens each choice
    n_token: int | None = None  # None: the decoder's block size
    drafting: tuple[tuple[str, Any], ...] = ()  # (option, value) over the decoder's `DecodingOptions`
    seed: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    n: int = 1
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo with logprobs)


class Drafting(BaseModel):
    """Per-request drafting beyond the paper's rule (extension; `cllm.drafts.DecodingOptions`):
    each field given overrides the server's setting. The text is the same either way."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lookup: bool | None = None
    recycle_candidates: int | None = Field(default=None, ge=0, le=8)
    recycle_length: int | None = Field(default=None, ge=1, le=16)
    blocks_in_flight: int | None = Field(default=None, ge=1, le=4)
    next_block_share: float | None = Field(default=None, gt=0, le=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class _GenerationParameters(BaseModel):
    """Fields shared by completions and chat completions. Unknown fields are kept in
    `model_extra` (the ingress logs them, as vLLM does); `null` means absent for every field."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, description="0 or -1: no limit (vLLM's extension)")
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n_token: int | None = Field(default=None, ge=1, description="Jacobi block size (extension)")
    drafting: Drafting | None = None
    # vLLM's extensions
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    include_stop_str_in_output: bool | None = None

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
        if any(len(sequence) > MAX_STOP_LENGTH for sequence in sequences):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_LENGTH} characters long")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0.0):
            raise ValueError("penalties are not supported: they must be 0 or absent")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported: it must be empty or absent")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationParameters:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @model_validator(mode="after")
    def _min_tokens_within_max_tokens(self) -> _GenerationParameters:
        if self.min_tokens and self.token_limit is not None and self.min_tokens > self.token_limit:
            raise ValueError("min_tokens must be at most max_tokens")
        return self

    def to_decode_params(self, defaults: RequestDefaults) -> DecodeParams:
        """The settings the decoder runs this request with: the request's, or the server's
        `defaults`, or the API's documented ones."""
        return DecodeParams(
            max_tokens=self.token_limit,
            default_max_tokens=defaults.default_max_tokens,
            min_tokens=self.min_tokens or 0,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            ignore_eos=bool(self.ignore_eos),
            echo=self.echoes_prompt,
            n_token=self.n_token,
            drafting=tuple(self.drafting.model_dump(exclude_none=True).items()) if self.drafting else (),
            seed=self.seed,
            temperature=defaults.default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            n=self.choices_per_prompt,
            logprobs=self.logprob_alternatives,
            prompt_logprobs=self.prompt_logprob_alternatives,
        )

    @property
    def token_limit(self) -> int | None:
        """The completion's token limit; None: the server's default."""
        return self.max_tokens

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options is not None and self.stream_options.include_usage)

    @property
    def echoes_prompt(self) -> bool:
        return False

    @property
    def logprob_alternatives(self) -> int | None:
        """Alternatives per generated token the decoder computes (None: no log-probabilities)."""
        return None

    @property
    def prompt_logprob_alternatives(self) -> int | None:
        return None


TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(_GenerationParameters):
    """POST /v1/completions. `prompt`: a string, a list of strings, token ids, or a list of
    token-id lists; each prompt gets `n` choices."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)
    ]
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        def token_ids(item: Any) -> bool:
            return isinstance(item, list) and bool(item) and all(_is_int(token) for token in item)

        if not (
            isinstance(value, str)
            or token_ids(value)
            or isinstance(value, list) and bool(value) and (
                all(isinstance(item, str) for item in value) or all(token_ids(item) for item in value)
            )
        ):
            raise ValueError(
                "prompt must be a string, a non-empty list of strings, a non-empty list of token ids, or a"
                " non-empty list of non-empty lists of token ids"
            )
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of is not supported: it must be 1 or absent")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    @model_validator(mode="after")
    def _bounded_rows(self) -> CompletionRequest:
        if len(self.prompts) * self.choices_per_prompt > MAX_ROWS:
            raise ValueError(f"prompts times n must be at most {MAX_ROWS}")
        return self

    @model_validator(mode="after")
    def _prompt_logprobs_not_streamed(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None and self.stream:
            raise ValueError("echo with logprobs (the prompt's log-probabilities) is served without streaming only")
        return self

    @property
    def token_limit(self) -> int:
        return COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def echoes_prompt(self) -> bool:
        return bool(self.echo)

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprob_alternatives(self) -> int | None:
        return self.logprobs if self.echo else None

    @property
    def prompts(self) -> tuple[str | tuple[int, ...], ...]:
        if isinstance(self.prompt, str):
            return (self.prompt,)
        if all(isinstance(item, int) for item in self.prompt):
            return (tuple(self.prompt),)
        return tuple(item if isinstance(item, str) else tuple(item) for item in self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(not isinstance(part, dict) or part.get("type") != "text" for part in value):
            raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
        return value

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


class ChatCompletionRequest(_GenerationParameters):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("tools (function calling) are not supported by this server")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value not in (None, "none"):
            raise ValueError("tool_choice is not supported: it must be 'none' or absent")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        if value is not None and value.type != "text":
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        return value

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
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's): a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


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
    logprob: float | None
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Choice:
    """One finished choice of a response."""

    index: int
    text: str
    finish_reason: str
    logprobs: Sequence[TokenLogprobs] | None = None  # None: not asked for
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that matched


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
        # A prompt's first token (echo) has no log-probability: null, as OpenAI's.
        "top_logprobs": [
            None if entry.logprob is None else dict(entry.top) | {entry.token: entry.logprob} for entry in entries
        ],
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


def completion_body(
    response_id: str, model: str, choices: Sequence[Choice], usage: Usage, created: int
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "text": choice.text,
                "logprobs": None if choice.logprobs is None else completion_logprobs(choice.logprobs),
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
            for choice in choices
        ],
        "usage": usage.model_dump(),
    }


def chat_body(response_id: str, model: str, choices: Sequence[Choice], usage: Usage, created: int) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": None if choice.logprobs is None else chat_logprobs(choice.logprobs),
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
            for choice in choices
        ],
        "usage": usage.model_dump(),
    }


@dataclass(frozen=True)
class StreamHeader:
    """What every chunk of one stream repeats: one id, one `created` and, when the client asked
    for a usage chunk, `"usage": null` on all the others (as OpenAI defines include_usage)."""

    response_id: str
    model: str
    object_name: str
    created: int
    include_usage: bool = False

    def chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
        body = {
            "id": self.response_id, "object": self.object_name, "created": self.created, "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None if usage is None else usage.model_dump()
        return body


def completion_choice_chunk(
    text: str,
    finish_reason: str | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    stop_reason: str | int | None = None,
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_choice_chunk(
    delta: dict[str, str],
    finish_reason: str | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    stop_reason: str | int | None = None,
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def models_body(model: str, created: int, max_model_len: int | None) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model, created, max_model_len)]}


def model_card(model: str, created: int, max_model_len: int | None) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "cllm", "max_model_len": max_model_len}
