"""End-to-end tests of the Serve application over real HTTP, with the official `openai` client.

One Serve instance for the module, on a private local Ray (loopback only), serving a tiny random
Llama saved to disk with a small word-level tokenizer, through two applications:

- `main` (route prefix /): autoscaled Decoder (1 to 2 replicas), continuous batching;
- `tight` (route prefix /tight): one replica that takes one request at a time and queues one more,
  for the over-capacity and client-disconnect cases.

Every greedy text is compared with `cllm.ar_generate` (greedy AR) on the same model in this
process. test_decoder.py tests the decoder deployment's class in this process, without Ray.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from helpers import TINY_CONTEXT, Reference, free_port, save_tiny_checkpoint

slow = pytest.mark.slow  # the tests that need the Serve instance

CONFIG = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"
API_KEY = "test-key-123"
MODEL_NAME = "tiny"
CONTEXT = TINY_CONTEXT
FUZZ_CONTEXT = 48
N_TOKEN = 4
PROMPTS = ["t5 t17 t42", "t99 t3", "t64 t65 t66 t67 t68", "t120"]


class Server:
    def __init__(self, url: str, reference: Reference):
        self.url = url
        self.reference = reference
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, **{"timeout": 120, **kwargs})

    def decoder_load(self, app: str):
        from ray import serve

        return serve.get_deployment_handle("Decoder", app_name=app).load.remote().result(timeout_s=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from cllm_serve.app import BuilderArgs, build_app

    torch.set_num_threads(1)  # the machine is small and shared; replicas have their own threads
    path = str(tmp_path_factory.mktemp("tiny-model"))
    save_tiny_checkpoint(path)
    path_without_eos = str(tmp_path_factory.mktemp("tiny-model-without-eos"))
    save_tiny_checkpoint(path_without_eos, with_eos=False)
    path_short = str(tmp_path_factory.mktemp("tiny-model-short-context"))
    save_tiny_checkpoint(path_short, context=FUZZ_CONTEXT)
    port = free_port()
    if ray.is_initialized():  # another module's connection: ours needs its own runtime_env
        ray.shutdown()
    ray.init(
        address="local",  # a private instance, never a cluster that happens to run on this machine
        num_cpus=4,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",  # loopback only
        # Serve gives its replicas the driver's runtime_env: the API key reaches the ingress so.
        runtime_env={"env_vars": {"CLLM_API_KEY": API_KEY}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = dict(served_model_name=MODEL_NAME, n_token=N_TOKEN, num_cpus=0.5, ingress_num_cpus=0.25)
        main = BuilderArgs(
            model=path,
            **common,
            max_batch_size=8,
            batch_wait_ms=100,  # generous, so concurrent test requests surely share a batch
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=4,
            max_ongoing_requests=8,
            autoscaling_overrides={
                "upscale_delay_s": 1,
                "downscale_delay_s": 3,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 2,
            },
        )
        tight = BuilderArgs(
            model=path_without_eos, **common, max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1
        )
        # For the fuzz test: a short context bounds the work of any request that reaches decoding.
        fuzz = BuilderArgs(model=path_short, **common, max_batch_size=8, body_timeout_s=5)
        serve.run(build_app(main), name="main", route_prefix="/")
        serve.run(build_app(tight), name="tight", route_prefix="/tight")
        serve.run(build_app(fuzz), name="fuzz", route_prefix="/fuzz")
        yield Server(f"http://127.0.0.1:{port}", Reference(path))
    finally:
        serve.shutdown()
        ray.shutdown()


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI error object of `response`, after checking its status and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# -- happy paths ----------------------------------------------------------------------------------


@slow
def test_health_and_models(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert [model.id for model in server.client.models.list()] == [MODEL_NAME]
    assert server.client.models.retrieve(MODEL_NAME).id == MODEL_NAME


@slow
def test_completion_equals_greedy_ar_with_usage(server):
    for prompt, max_tokens in zip(PROMPTS[:2], (24, 40)):
        response = server.client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        choice = response.choices[0]
        expected_ids = server.reference.generate(server.reference.ids(prompt), max_tokens)
        assert choice.text == server.reference.tokenizer.decode(expected_ids, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if expected_ids[-1] == 2 else "length")
        usage = response.usage
        assert usage.prompt_tokens == len(server.reference.ids(prompt))
        assert usage.completion_tokens == len(expected_ids)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert 1 <= usage.forwards <= usage.completion_tokens
        assert usage.tokens_per_forward == pytest.approx(usage.completion_tokens / usage.forwards)


@slow
def test_drafting_options_over_http_change_no_text(server):
    """`drafting` in extra_body turns each technique on for one request: the text is the same."""
    prompt = PROMPTS[0]
    plain = server.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=40)
    drafted = server.client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=40,
        extra_body={"drafting": {"lookup": True, "recycle_candidates": 2, "blocks_in_flight": 2}},
    )
    assert drafted.choices[0].text == plain.choices[0].text == server.reference.text(prompt, 40)
    bad = {"model": MODEL_NAME, "prompt": prompt, "drafting": {"blocks_in_flight": 0}}
    assert error_of(server.post("/v1/completions", json=bad), 400)["param"].startswith("drafting")
    unknown = {"model": MODEL_NAME, "prompt": prompt, "drafting": {"speculate": True}}
    assert error_of(server.post("/v1/completions", json=unknown), 400)["param"].startswith("drafting")


@slow
def test_completion_from_token_ids(server):
    ids = server.reference.ids(PROMPTS[2])
    response = server.client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=16)
    assert response.choices[0].text == server.reference.text(PROMPTS[2], 16)


@slow
def test_chat_equals_greedy_ar(server):
    messages = [{"role": "system", "content": "t7 t8"}, {"role": "user", "content": "t9 t10 t11"}]
    response = server.client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=20, extra_body={"n_token": 8}
    )
    # The tokenizer has no chat template: the documented plain fallback.
    expected = server.reference.text("system: t7 t8\nuser: t9 t10 t11\nassistant:", 20)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens >= 1


@slow
def test_streaming_completion(server):
    stream = server.client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPTS[0],
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len([text for text in texts if text]) > 1  # really streamed, not one blob
    assert "".join(texts) == server.reference.text(PROMPTS[0], 30)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


@slow
def test_streaming_chat_ends_with_done(server):
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "t30 t31"}],
        "max_tokens": 12,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == server.reference.text("user: t30 t31\nassistant:", 12)


@slow
def test_stop_sequence_cuts_the_text(server):
    full = server.reference.text(PROMPTS[2], 30)
    words = full.split()
    stop = f" {words[len(words) // 2]}"  # a word in the middle, with its leading space
    expected = full[: full.index(stop)]
    response = server.client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=30, stop=[stop]
    )
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=30, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected


@slow
def test_concurrent_requests_share_a_batch_and_match_alone(server):
    requests = list(zip(PROMPTS, (30, 12, 25, 18)))
    alone = {(prompt, n): server.reference.text(prompt, n) for prompt, n in requests}
    before = server.decoder_load("main")

    def ask(request: tuple[str, int]) -> str:
        prompt, max_tokens = request
        response = server.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens)
        return response.choices[0].text

    with ThreadPoolExecutor(len(requests)) as pool:
        texts = list(pool.map(ask, requests))
    after = server.decoder_load("main")
    assert texts == [alone[request] for request in requests]
    assert after.batched_rows - before.batched_rows == len(requests)
    assert after.peak_rows >= 2  # rows shared forwards


@slow
def test_sampling_with_a_seed_is_reproducible_and_n_gives_choices(server):
    def ask(**kwargs):
        return server.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=16, **kwargs)

    first = ask(temperature=0.9, top_p=0.95, seed=42, n=3)
    again = ask(temperature=0.9, top_p=0.95, seed=42, n=3)
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({choice.text for choice in first.choices}) > 1
    assert 3 <= first.usage.completion_tokens <= 3 * 16  # the three choices' tokens together
    assert first.usage.prompt_tokens == len(server.reference.ids(PROMPTS[1]))
    greedy = ask(temperature=0, n=2, extra_body={"top_k": 5})
    assert [choice.text for choice in greedy.choices] == [server.reference.text(PROMPTS[1], 16)] * 2
    streamed = server.client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "t30"}], max_tokens=8, temperature=0.9, seed=7,
        n=2, stream=True,
    )
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    alone = server.client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "t30"}], max_tokens=8, temperature=0.9, seed=7, n=2,
    )
    assert [texts[0], texts[1]] == [choice.message.content for choice in alone.choices]


@slow
def test_one_bad_request_does_not_fail_its_batch(server):
    bodies = [
        {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 20},
        {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 20, "seed": -(2**63) - 1},  # out of range
        {"model": MODEL_NAME, "prompt": PROMPTS[2], "max_tokens": 20, "temperature": 0.8, "seed": 3},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: server.post("/v1/completions", json=body), bodies))
    assert error_of(replies[1], 400)["param"] == "seed"
    assert replies[0].json()["choices"][0]["text"] == server.reference.text(PROMPTS[0], 20)
    assert replies[2].status_code == 200 and replies[2].json()["usage"]["completion_tokens"] >= 1


@slow
def test_logprobs_in_openai_shapes(server):
    prompt_ids = server.reference.ids(PROMPTS[0])
    ids = server.reference.generate(prompt_ids, 6)
    with torch.inference_mode():
        logits = server.reference.model(input_ids=torch.tensor([prompt_ids + ids])).logits[0]
    forced = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1]
    expected = forced.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist()
    tokens = [server.reference.tokenizer.decode([token]) for token in ids]

    completion = server.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == tokens
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(len(top) in (2, 3) and token in top for top, token in zip(logprobs.top_logprobs, tokens))
    assert logprobs.text_offset[0] == 0

    messages = [{"role": "user", "content": "t9 t10"}]
    chat = server.client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode()) for entry in content)
    streamed = server.client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=5, logprobs=True, stream=True
    )
    entries = [entry for chunk in streamed for choice in chunk.choices if choice.logprobs
               for entry in choice.logprobs.content]
    assert [entry.logprob for entry in entries] == pytest.approx([entry.logprob for entry in content], abs=1e-5)
    plain = server.client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=3)
    assert plain.choices[0].logprobs is None


@slow
def test_a_request_joining_a_running_batch_leaves_the_others_unchanged(server):
    """A long stream is decoding when short requests join its batch and leave it: every text is
    still the one the request gets alone, and the short requests finish first."""
    # Its greedy text runs all 400 tokens (no EOS), seconds of decoding: the short requests' lead
    # does not hang on a few hundred milliseconds (a 62-token one once finished before them).
    long_prompt, long_tokens = "t0 t1 t2", 400

    async def scenario() -> tuple[str, list[str], float, list[float]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
            started = time.monotonic()
            stream = await client.completions.create(
                model=MODEL_NAME, prompt=long_prompt, max_tokens=long_tokens, stream=True
            )
            chunks = aiter(stream)
            text = (await anext(chunks)).choices[0].text  # the long one is decoding now

            async def short(prompt: str) -> tuple[str, float]:
                reply = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6)
                return reply.choices[0].text, time.monotonic() - started

            shorts = asyncio.gather(*(short(prompt) for prompt in PROMPTS[:2]))
            async for chunk in chunks:
                if chunk.choices:
                    text += chunk.choices[0].text
            long_done = time.monotonic() - started
            results = await shorts
        return text, [reply for reply, _ in results], long_done, [at for _, at in results]

    text, shorts, long_done, short_done = asyncio.run(scenario())
    print(f"short requests done at {max(short_done):.2f} s, the long one at {long_done:.2f} s")
    assert text == server.reference.text(long_prompt, long_tokens)
    assert shorts == [server.reference.text(prompt, 6) for prompt in PROMPTS[:2]]
    assert max(short_done) < long_done


# -- compatibility: prompt forms, echo, nulls, vLLM's extensions, stream framing ---------------


@slow
def test_several_prompts_and_token_id_lists_give_n_choices_each(server):
    prompts = ["t5 t6", "t7"]
    reply = server.client.completions.create(model=MODEL_NAME, prompt=prompts, n=2, max_tokens=5)
    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    assert [choice.text for choice in reply.choices] == [server.reference.text(p, 5) for p in prompts for _ in "ab"]
    ids = [server.reference.ids(prompt) for prompt in prompts]
    by_ids = server.client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5)
    assert [choice.text for choice in by_ids.choices] == [server.reference.text(p, 5) for p in prompts]
    assert by_ids.usage.prompt_tokens == sum(len(i) for i in ids)
    stream = server.client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=5, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert list(texts.values()) == [server.reference.text(p, 5) for p in prompts]


@slow
def test_echo_nulls_unknown_fields_and_the_default_max_tokens(server):
    reply = server.client.completions.create(model=MODEL_NAME, prompt="t5 t6", max_tokens=4, echo=True)
    assert reply.choices[0].text == "t5 t6" + server.reference.text("t5 t6", 4)
    body = {
        "model": MODEL_NAME, "prompt": "t5 t6", "max_tokens": None, "temperature": None, "top_p": None, "n": None,
        "stream": None, "stop": None, "seed": None, "logprobs": None, "echo": None, "suffix": None, "user": None,
        "best_of": None, "logit_bias": None, "presence_penalty": None, "frequency_penalty": None,
        "some_future_field": {"x": 1},  # unknown: accepted and logged, as vLLM does
    }
    response = server.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    expected = server.reference.generate(server.reference.ids("t5 t6"), 16)  # OpenAI's default max_tokens
    assert choice["text"] == server.reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert response.json()["usage"]["completion_tokens"] == len(expected)
    messages = [{"role": "user", "content": "t5"}, {"role": "assistant", "content": None}]
    chat = {"model": MODEL_NAME, "messages": messages, "max_tokens": 3, "tools": None, "tool_choice": None,
            "response_format": {"type": "text"}, "stream_options": None, "logprobs": None, "top_logprobs": None}
    assert server.post("/v1/chat/completions", json=chat).status_code == 200


@slow
def test_echo_with_logprobs_scores_the_prompt_like_a_plain_forward(server):
    """What lm-evaluation-harness's loglikelihood requests send (local-completions): token ids,
    echo, logprobs=1, max_tokens=1. The prompt's log-probabilities equal a plain forward's."""
    reference = server.reference
    prompts = [reference.ids("t5 t17 t42 t8"), reference.ids("t99 t3 t64")]
    reply = server.client.completions.create(
        model=MODEL_NAME, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    for choice, ids in zip(reply.choices, prompts, strict=True):
        generated = reference.generate(ids, 1)
        with torch.inference_mode():
            logits = reference.model(input_ids=torch.tensor([ids + generated])).logits[0]
        expected = logits.log_softmax(-1)[:-1].gather(-1, torch.tensor(ids[1:] + generated)[:, None]).squeeze(-1)
        scores = choice.logprobs.token_logprobs
        assert scores[0] is None and choice.logprobs.top_logprobs[0] is None  # nothing before the first
        assert scores[1:] == pytest.approx(expected.tolist(), abs=1e-4)
        assert choice.logprobs.tokens == [reference.tokenizer.decode([token]) for token in ids + generated]
        greedy = [max(top.values()) == score for top, score in zip(choice.logprobs.top_logprobs[1:], scores[1:])]
        assert greedy[-1]  # the generated token is the argmax (temperature 0)
        assert choice.text == reference.tokenizer.decode(ids) + reference.tokenizer.decode(generated)


@slow
def test_stop_token_ids_ignore_eos_include_stop_and_stop_reason(server):
    reference = server.reference
    prompt = "t5 t17 t42"
    ids = reference.generate(reference.ids(prompt), 12, with_eos=False)
    k = next(k for k in range(1, 12) if ids[k] not in ids[:k])
    stop_id = ids[k]
    common = dict(model=MODEL_NAME, prompt=prompt, max_tokens=12)
    reply = server.client.completions.create(**common, extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop_id
    assert choice.text == reference.tokenizer.decode(ids[:k]) and reply.usage.completion_tokens == k + 1
    kept = server.client.completions.create(
        **common, extra_body={"stop_token_ids": [stop_id], "ignore_eos": True, "include_stop_str_in_output": True}
    )
    assert kept.choices[0].text == reference.tokenizer.decode(ids[: k + 1])
    full = server.client.completions.create(**common, extra_body={"ignore_eos": True})
    assert full.choices[0].text == reference.tokenizer.decode(ids) and full.usage.completion_tokens == 12
    word = reference.tokenizer.decode([ids[k]])
    by_text = server.client.completions.create(**common, stop=[word], extra_body={"ignore_eos": True})
    assert by_text.choices[0].model_extra["stop_reason"] == word
    at_least = server.client.completions.create(**common, extra_body={"min_tokens": 5, "ignore_eos": True})
    assert at_least.usage.completion_tokens == 12


@slow
def test_a_stream_keeps_one_id_and_created_and_include_usage_as_openai(server):
    def chunks(**extra) -> list[dict]:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "t5"}], "max_tokens": 6, "stream": True}
        response = server.post("/v1/chat/completions", json={**body, **extra})
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]

    with_usage = chunks(stream_options={"include_usage": True})
    assert len({chunk["id"] for chunk in with_usage}) == 1 and len({chunk["created"] for chunk in with_usage}) == 1
    assert all(chunk["usage"] is None for chunk in with_usage[:-1])
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] >= 1
    assert all("usage" not in chunk for chunk in chunks())
    assert all("usage" not in chunk for chunk in chunks(stream_options={"include_usage": False}))


# -- operations: /metrics, /tokenize, /detokenize, /version, /v1/models --------------------------


@slow
def test_metrics_tokenize_detokenize_version_and_max_model_len(server):
    server.client.completions.create(model=MODEL_NAME, prompt="t5", max_tokens=4, stream=False)
    for _ in server.client.completions.create(model=MODEL_NAME, prompt="t5", max_tokens=4, stream=True):
        pass
    metrics = httpx.get(f"{server.url}/metrics", timeout=30)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    values = {
        line.split(" ")[0]: float(line.split(" ")[-1]) for line in metrics.text.splitlines() if line and line[0] != "#"
    }
    for name in ("cllm_time_to_first_token_seconds_count", "cllm_time_per_output_token_seconds_count",
                 "cllm_queue_time_seconds_count", "cllm_tokens_per_forward_count"):
        assert values[name] >= 1, name
    assert "cllm_num_requests_waiting" in values and "cllm_num_requests_running" in values
    assert values['cllm_http_requests_total{route="/v1/completions",status="200"}'] >= 2
    tokens = server.post("/tokenize", json={"model": MODEL_NAME, "prompt": "t5 t6"}).json()
    assert tokens["tokens"] == server.reference.ids("t5 t6") and tokens["count"] == 2
    assert tokens["max_model_len"] == CONTEXT
    chat = server.post("/tokenize", json={"messages": [{"role": "user", "content": "t5"}]})
    assert chat.status_code == 200 and chat.json()["count"] >= 1
    assert server.post("/detokenize", json={"tokens": [5, 6]}).json() == {"prompt": "t5 t6"}
    assert error_of(server.post("/detokenize", json={"tokens": [5, 999]}), 400)["param"] == "tokens"
    assert error_of(server.post("/tokenize", json={"prompt": "t5", "messages": []}), 400)
    assert httpx.get(f"{server.url}/version", timeout=30).json()["version"]
    assert server.client.models.list().data[0].model_extra["max_model_len"] == CONTEXT


# -- errors ---------------------------------------------------------------------------------------


@slow
@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL_NAME, "prompt": "t5", "max_tokens": "5"}, "max_tokens"),  # wrong type
        ({"model": MODEL_NAME, "prompt": "t5", "max_tokens": 0}, "max_tokens"),  # out of range
        ({"model": MODEL_NAME, "prompt": "t5", "n_token": 0}, "n_token"),
        ({"model": MODEL_NAME, "prompt": "t5", "n_token": 1000}, "n_token"),
        ({"model": MODEL_NAME, "prompt": "t5", "temperature": 2.5}, "temperature"),
        ({"model": MODEL_NAME, "prompt": "t5", "top_p": 0}, "top_p"),
        ({"model": MODEL_NAME, "prompt": "t5", "top_k": -2}, "top_k"),
        ({"model": MODEL_NAME, "prompt": "t5", "seed": 2**64}, "seed"),  # out of range: a 400, not a crash
        ({"model": MODEL_NAME, "prompt": "t5", "n": 0}, "n"),
        ({"model": MODEL_NAME, "prompt": "t5", "n": 17}, "n"),
        ({"model": MODEL_NAME, "prompt": "t5", "logprobs": 21}, "logprobs"),
        ({"model": MODEL_NAME, "prompt": "t5", "suffix": "t9"}, "suffix"),
        ({"model": MODEL_NAME, "prompt": "t5", "echo": True, "logprobs": 1, "stream": True}, None),
        ({"model": MODEL_NAME, "prompt": "t5", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL_NAME, "prompt": "t5", "stop": "x" * 257}, "stop"),
        ({"model": MODEL_NAME, "prompt": "t5", "max_tokens": 3, "min_tokens": 4}, None),
        ({"model": MODEL_NAME, "prompt": "t5", "min_tokens": 17}, None),  # over the default 16
        ({"model": MODEL_NAME, "prompt": "t5", "stop_token_ids": [999]}, "stop_token_ids"),
        ({"model": MODEL_NAME, "prompt": 5}, "prompt"),
        ({"model": MODEL_NAME, "prompt": []}, "prompt"),
        ({"model": MODEL_NAME, "prompt": [[5], []]}, "prompt"),
        ({"model": MODEL_NAME, "prompt": [5, 999]}, "prompt"),  # token id outside the vocabulary
        ({"model": MODEL_NAME, "prompt": ""}, "prompt"),
        ({"prompt": "t5"}, "model"),
    ],
)
def test_invalid_completion_requests_are_400(server, body, param):
    assert error_of(server.post("/v1/completions", json=body), 400)["param"] == param


@slow
def test_invalid_chat_requests_are_400(server):
    empty = {"model": MODEL_NAME, "messages": []}
    assert error_of(server.post("/v1/chat/completions", json=empty), 400)["param"] == "messages"
    top_alone = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "t5"}], "top_logprobs": 2}
    assert "logprobs" in error_of(server.post("/v1/chat/completions", json=top_alone), 400)["message"]
    bad_role = {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "t5"}]}
    assert error_of(server.post("/v1/chat/completions", json=bad_role), 400)["param"].startswith("messages")
    user = [{"role": "user", "content": "t5"}]
    tools = {"model": MODEL_NAME, "messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert "tools" in error_of(server.post("/v1/chat/completions", json=tools), 400)["message"]
    json_mode = {"model": MODEL_NAME, "messages": user, "response_format": {"type": "json_object"}}
    assert error_of(server.post("/v1/chat/completions", json=json_mode), 400)["param"] == "response_format"
    image = {"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    assert error_of(server.post("/v1/chat/completions", json=image), 400)["param"].startswith("messages")
    big_seed = {"model": MODEL_NAME, "messages": user, "seed": -(2**70)}
    assert error_of(server.post("/v1/chat/completions", json=big_seed), 400)["param"] == "seed"


@slow
def test_malformed_json_is_400(server):
    response = server.post(
        "/v1/completions",
        content=b'{"model": "tiny", "prompt": ',
        headers={"Content-Type": "application/json"},
    )
    assert error_of(response, 400)["code"] == "invalid_json"
    assert error_of(server.post("/v1/completions", json=[1, 2]), 400)["type"] == "invalid_request_error"


@slow
def test_prompt_plus_max_tokens_over_context_is_400(server):
    error = error_of(
        server.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "t5 t6", "max_tokens": CONTEXT}),
        400,
    )
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=MODEL_NAME, prompt="t5", max_tokens=CONTEXT + 1)


@slow
def test_unknown_model_is_404(server):
    error = error_of(server.post("/v1/completions", json={"model": "gpt-9", "prompt": "t5"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "t5"}])
    error_of(httpx.get(f"{server.url}/v1/nowhere", headers=server.headers), 404)


@slow
def test_missing_or_wrong_api_key_is_401(server):
    body = {"model": MODEL_NAME, "prompt": "t5", "max_tokens": 2}
    error_of(httpx.post(f"{server.url}/v1/completions", json=body), 401)
    wrong = {"Authorization": "Bearer not-the-key"}
    assert (
        error_of(httpx.post(f"{server.url}/v1/completions", json=body, headers=wrong), 401)["type"]
        == "authentication_error"
    )
    error_of(httpx.get(f"{server.url}/v1/models", headers={"Authorization": API_KEY}), 401)  # no "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


@slow
def test_oversized_body_is_refused(server):
    body = {"model": MODEL_NAME, "prompt": "t5 " * 400_000}
    assert error_of(server.post("/v1/completions", json=body), 413)["code"] == "request_too_large"


# -- capacity and disconnects (the `tight` app: one request at a time, one queued, no EOS) -----


LONG = {"model": MODEL_NAME, "prompt": "t11 t12", "max_tokens": 3000, "n_token": 1}


@slow
def test_a_body_that_never_arrives_is_408(server):
    """A client that announces a body and stalls is answered once `body_timeout_s` (5 s on the
    fuzz app) has passed, instead of holding the request forever."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(
            b"POST /fuzz/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\": "
        )
        started = time.monotonic()
        reply = connection.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert 4 < time.monotonic() - started < 30


@slow
def test_over_capacity_is_503_quickly(server):
    async def scenario() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(
            base_url=f"{server.url}/tight", headers=server.headers, timeout=120
        ) as client:
            async with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
                lines = running.aiter_lines()  # held: dropping the iterator would close the stream
                await anext(lines)  # the one slot is busy now
                queued = asyncio.create_task(client.post("/v1/completions", json=LONG))
                await asyncio.sleep(1.0)  # ... and the one queue place is taken
                started = time.monotonic()
                refused = await client.post("/v1/completions", json={**LONG, "max_tokens": 2})
                elapsed = time.monotonic() - started
                queued.cancel()
            return refused, elapsed

    refused, elapsed = asyncio.run(scenario())
    error = error_of(refused, 503)
    assert error["type"] == "server_error" and error["code"] == "overloaded"
    assert elapsed < 5


@slow
def test_disconnect_mid_stream_stops_generation(server):
    before = server.decoder_load("tight")
    with httpx.stream(
        "POST", f"{server.url}/tight/v1/completions", json={**LONG, "stream": True}, headers=server.headers
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    # The connection is closed. The replica takes one request at a time, so this one only runs
    # once the abandoned row has stopped.
    small = server.post("/tight/v1/completions", json={**LONG, "max_tokens": 3})
    assert small.status_code == 200
    after = server.decoder_load("tight")
    assert after.running_rows == 0 and after.queued == 0
    abandoned_tokens = (
        after.generated_tokens - before.generated_tokens - small.json()["usage"]["completion_tokens"]
    )
    assert abandoned_tokens < LONG["max_tokens"] // 2, abandoned_tokens


def abandoned_tokens(server, before, small: httpx.Response) -> int:
    """Tokens the tight replica generated for requests whose clients left, once `small` (which
    the one-slot replica only starts after the abandoned rows stopped) is done."""
    assert small.status_code == 200, small.text
    after = server.decoder_load("tight")
    assert after.running_rows == 0 and after.queued == 0
    return after.generated_tokens - before.generated_tokens - small.json()["usage"]["completion_tokens"]


@slow
def test_disconnect_of_a_non_streaming_request_stops_generation(server):
    before = server.decoder_load("tight")
    # The client gives up and its connection closes. It waits only 0.5 s: the tiny model decodes
    # about 800 tokens/s here, and the bound below must not depend on how fast a machine is.
    with pytest.raises(httpx.ReadTimeout):
        server.post("/tight/v1/completions", json=LONG, timeout=0.5)
    small = server.post("/tight/v1/completions", json={**LONG, "max_tokens": 3})
    assert abandoned_tokens(server, before, small) < LONG["max_tokens"] // 2


@slow
def test_disconnect_while_queued_or_before_the_first_byte_never_decodes(server):
    """A stream holds the one slot; a second request waits (queued) and its client leaves before
    any byte came back. Only the first one's partial output may have cost anything."""
    before = server.decoder_load("tight")

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=f"{server.url}/tight", headers=server.headers, timeout=120) as client:
            async with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
                lines = running.aiter_lines()
                await anext(lines)  # the one slot is busy now
                for body in ({**LONG, "stream": True}, LONG):  # queued, then gone without a byte
                    waiting = asyncio.create_task(client.post("/v1/completions", json=body))
                    await asyncio.sleep(0.5)  # queued by now; short, as the stream decodes meanwhile
                    assert not waiting.done()
                    waiting.cancel()  # closes its connection
                    with pytest.raises(asyncio.CancelledError):
                        await waiting

    asyncio.run(scenario())
    small = server.post("/tight/v1/completions", json={**LONG, "max_tokens": 3})
    assert abandoned_tokens(server, before, small) < LONG["max_tokens"] // 2


# -- fuzzing: nothing a client sends gives a 5xx or hangs ---------------------------------------

FUZZ_EXAMPLES = {"/v1/completions": 900, "/v1/chat/completions": 700, "/tokenize": 250, "/detokenize": 250}


def fuzz_cases(schema, path: str, examples: int) -> list[tuple[str, str, object]]:
    """(method, path, body) of `examples` generated requests: 3 in 4 valid by the schema (their
    `model` set to the served one, so they reach decoding), the rest invalid (schemathesis's
    negative mode: wrong types, missing fields, non-JSON bodies)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    operation = schema[path]["POST"]
    cases: list[tuple[str, str, object]] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(
        operation.as_strategy().map(lambda case: (case, True)),
        operation.as_strategy().map(lambda case: (case, True)),
        operation.as_strategy().map(lambda case: (case, True)),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE).map(lambda case: (case, False)),
    ))
    def collect(generated) -> None:
        case, valid = generated
        body = case.body
        if valid and isinstance(body, dict) and "model" in body:
            body = {**body, "model": MODEL_NAME}
        cases.append((case.method, case.formatted_path, body))

    collect()
    return cases


@slow
def test_fuzzing_the_openapi_schema_gives_no_5xx_and_no_hang(server):
    """schemathesis generates request bodies from the app's own OpenAPI schema, sent over HTTP
    (8 at a time) to the `fuzz` app, whose short context bounds the work of those that decode."""
    import schemathesis

    base = f"{server.url}/fuzz"
    schema = schemathesis.openapi.from_dict(httpx.get(f"{base}/openapi.json", timeout=30).json())
    cases = [case for path, examples in FUZZ_EXAMPLES.items() for case in fuzz_cases(schema, path, examples)]

    def send(client: httpx.Client, method: str, path: str, body: object) -> tuple[int | None, str]:
        payload = {"content": body} if isinstance(body, (bytes, str)) else {"json": body}
        try:
            response = client.request(method, f"{base}{path}", **payload)
        except httpx.TimeoutException:
            return None, f"hang: {body!r:.300}"
        return response.status_code, f"{response.status_code}: {body!r:.300} -> {response.text[:300]}"

    with httpx.Client(headers=server.headers, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda case: (case[1], *send(client, *case)), cases))
    statuses: dict[int | None, int] = {}
    for _, status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    failures = [detail for _, status, detail in results if status is None or status >= 500]
    decoded = sum(1 for path, status, _ in results if status == 200 and path.startswith("/v1/"))
    hangs = statuses.get(None, 0)
    print(f"fuzz: {len(results)} cases, {decoded} decoded (200 from /v1), {len(failures) - hangs} responses"
          f" >= 500, {hangs} hangs; statuses {statuses}")
    assert not failures, failures[:5]
    assert len(results) >= 2000 and decoded >= 300  # 382 when this was written: cases do reach decoding


# -- autoscaling (last: it leaves the main app busy for a while) --------------------------------


def running_decoders() -> int:
    from ray import serve

    return serve.status().applications["main"].deployments["Decoder"].replica_states.get("RUNNING", 0)


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@slow
def test_autoscaling_up_under_load_and_back_down(server):
    assert wait_for(lambda: running_decoders() == 1, 60)
    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            server.client.completions.create(model=MODEL_NAME, prompt="t40 t41", max_tokens=200)

    workers = [threading.Thread(target=keep_busy) for _ in range(12)]
    for worker in workers:
        worker.start()
    try:
        scaled_up = wait_for(lambda: running_decoders() == 2, 120)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert scaled_up
    assert wait_for(lambda: running_decoders() == 1, 120)


# -- the Serve config file ------------------------------------------------------------------------


def decoder_options(config: dict) -> dict:
    from ray.serve.schema import ServeDeploySchema

    from cllm_serve.app import BuilderArgs

    application = ServeDeploySchema.model_validate(config).applications[0]
    assert application.import_path == "cllm_serve.app:build_app"  # the installed name: any node imports it
    BuilderArgs.model_validate(application.args)  # what `serve run` will hand to the builder
    decoder = next(deployment for deployment in application.deployments if deployment.name == "Decoder")
    return decoder.dict(exclude_unset=True)


def test_config_yaml_and_its_documented_cpu_override():
    options = decoder_options(yaml.safe_load(CONFIG.read_text()))
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["graceful_shutdown_timeout_s"] >= 60  # a scale-down drains its streams
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(options["autoscaling_config"])
    assert options["max_ongoing_requests"] >= 1 and options["max_queued_requests"] >= 1
    # The exact command the config's header documents for CPU-only machines.
    cpu = subprocess.run(
        ["sed", "s/num_gpus: 1/num_gpus: 0/", str(CONFIG)], capture_output=True, text=True, check=True
    )
    assert decoder_options(yaml.safe_load(cpu.stdout))["ray_actor_options"]["num_gpus"] == 0
