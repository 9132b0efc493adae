"""The protocol models' one place for defaults and cross-field checks: `to_decode_params`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cllm_serve.openai_api import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    DecodeParams,
    RequestDefaults,
    from_validation_error,
)

WARM = RequestDefaults(default_max_tokens=50, default_temperature=0.7)
USER = [{"role": "user", "content": "t5"}]


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "t5", **fields})


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def test_absent_fields_take_the_servers_defaults_and_the_apis():
    params = completion().to_decode_params(WARM)
    assert params.max_tokens == COMPLETIONS_DEFAULT_MAX_TOKENS  # OpenAI's, not the server's chat default
    assert (params.temperature, params.top_p, params.top_k, params.n, params.min_tokens) == (0.7, 1.0, 0, 1, 0)
    assert (params.logprobs, params.prompt_logprobs, params.echo) == (None, None, False)
    assert chat().to_decode_params(WARM) == DecodeParams(default_max_tokens=50, temperature=0.7)
    assert chat().to_decode_params(RequestDefaults()).temperature == 0.0  # greedy unless configured


def test_given_fields_win_over_the_defaults():
    params = completion(max_tokens=9, temperature=0, top_p=0.5, top_k=-1, n=2, stop="x", stop_token_ids=[3],
                        seed=4, min_tokens=2, ignore_eos=True).to_decode_params(WARM)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.n) == (9, 0.0, 0.5, 0, 2)
    assert (params.stop, params.stop_token_ids, params.seed, params.min_tokens, params.ignore_eos) == (
        ("x",), (3,), 4, 2, True)
    assert chat(max_completion_tokens=7).to_decode_params(WARM).max_tokens == 7
    assert chat(max_tokens=6).to_decode_params(WARM).max_tokens == 6


def test_log_probabilities_per_route():
    echoed = completion(echo=True, logprobs=2).to_decode_params(WARM)
    assert (echoed.echo, echoed.logprobs, echoed.prompt_logprobs) == (True, 2, 2)
    assert completion(logprobs=1).to_decode_params(WARM).prompt_logprobs is None
    assert chat(logprobs=True).to_decode_params(WARM).logprobs == 0  # the chosen token's only
    assert chat(logprobs=True, top_logprobs=3).to_decode_params(WARM).logprobs == 3


@pytest.mark.parametrize(
    "build, fields",
    [
        (completion, {"max_tokens": 3, "min_tokens": 4}),
        (completion, {"min_tokens": COMPLETIONS_DEFAULT_MAX_TOKENS + 1}),  # over the API's default
        (chat, {"max_completion_tokens": 3, "min_tokens": 4}),
    ],
)
def test_min_tokens_over_the_limit_is_a_400(build, fields):
    with pytest.raises(ValidationError) as raised:
        build(**fields)
    error = from_validation_error(raised.value)
    assert error.status_code == 400 and "min_tokens must be at most max_tokens" in error.message


def test_min_tokens_within_a_default_left_to_the_context_is_accepted():
    # A chat limit left to the context is known only to the decoder, which clamps min_tokens to it.
    assert chat(min_tokens=500).to_decode_params(RequestDefaults()).min_tokens == 500
