"""The decoder deployment's class and its engine loop, in this process: no Ray, no HTTP.

Each test constructs `Decoder` (what a replica runs) on a tiny random Llama saved to disk, or
drives `EngineLoop` and `TokenStream` directly, and compares greedy text with `cllm.ar_generate`.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from helpers import TINY_CONTEXT, Reference, save_tiny_checkpoint

CONTEXT = TINY_CONTEXT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-model-in-process"))
    save_tiny_checkpoint(path, with_eos=False)
    return path


def new_decoder(path: str, **settings):
    """The Decoder deployment's class itself, constructed directly (what a replica runs)."""
    from cllm_serve.decoder import Decoder, DecoderSettings

    return Decoder.func_or_class(DecoderSettings(model=path, **settings))


def decode_request(*prompts, messages=None, **params):
    """A `DecodeRequest` for `prompts` (or chat `messages`) with these `DecodeParams` fields."""
    from cllm_serve.decoder import DecodeRequest
    from cllm_serve.openai_api import DecodeParams

    return DecodeRequest(prompts=prompts, messages=messages, params=DecodeParams(**params))


def test_token_stream_keeps_its_own_max_tokens_and_eos():
    from cllm.detokenize import TextAssembler
    from cllm_serve.batching import Finished, TextDelta, TokenStream

    async def run() -> list:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stream = TokenStream(
            loop, events, TextAssembler(lambda ids: " ".join(map(str, ids)), ()), 4, frozenset({9})
        )
        assert stream.on_tokens([1, 2]) is True
        assert stream.on_tokens([3, 4, 5]) is False  # the engine may verify more than this row wants
        stream.finish(forwards=3)
        ended = TokenStream(
            loop, events, TextAssembler(lambda ids: " ".join(map(str, ids)), ()), 10, frozenset({9}), index=1
        )
        assert ended.on_tokens([7, 9, 8]) is False
        ended.finish(forwards=1)
        await asyncio.sleep(0)
        return [events.get_nowait() for _ in range(events.qsize())]

    assert asyncio.run(run()) == [
        TextDelta("1 2", token_ids=(1, 2)),
        TextDelta(" 3 4", token_ids=(3, 4)),
        Finished("length", 4, 3),
        TextDelta("7", index=1, token_ids=(7, 9)),  # the stop token's own text is left out (vLLM's default)
        Finished("stop", 2, 1, index=1),
    ]


@pytest.mark.parametrize("scheduler", ["dynamic", "continuous"])
def test_decoder_batches_concurrent_requests_and_each_equals_greedy_ar(checkpoint, scheduler):
    from cllm_serve.batching import Accepted, Finished, TextDelta

    torch.set_num_threads(1)
    decoder = new_decoder(checkpoint, n_token=4, batch_wait_ms=200, scheduler=scheduler)
    reference = Reference(checkpoint)
    requests = [
        decode_request("t5 t17 t42", max_tokens=20),
        decode_request((99, 3), max_tokens=7, seed=5),
        decode_request("t64 t65 t66 t67", max_tokens=13),
    ]

    async def run() -> list[list]:
        return await asyncio.gather(*(decoder.complete(request) for request in requests))

    results = asyncio.run(run())
    for request, (accepted, text, finished) in zip(requests, results, strict=True):
        prompt = request.prompts[0]
        prompt_ids = reference.ids(prompt) if isinstance(prompt, str) else list(prompt)
        expected = reference.generate(prompt_ids, request.params.max_tokens)
        assert accepted == Accepted(prompt_tokens=len(prompt_ids))
        decoded = reference.tokenizer.decode(expected, skip_special_tokens=True)
        assert text == TextDelta(decoded, token_ids=tuple(expected))
        assert isinstance(finished, Finished) and finished.completion_tokens == request.params.max_tokens
        assert 1 <= finished.forwards <= request.params.max_tokens
    load = decoder.load()
    assert load.batched_rows == 3 and load.peak_rows >= 2  # rows shared forwards
    if scheduler == "dynamic":
        assert load.batches == 1  # the idle replica waited for company, then took all three


def test_decoder_ar_mode_equals_greedy_ar(checkpoint):
    decoder = new_decoder(checkpoint, mode="ar")
    reference = Reference(checkpoint)
    _, text, finished = asyncio.run(decoder.complete(decode_request("t8 t9", max_tokens=9)))
    assert text.text == reference.text("t8 t9", 9)
    assert finished.forwards == 9  # one token per forward


def test_decoder_rejects_what_it_cannot_serve(checkpoint):
    from cllm_serve.batching import Rejected
    from cllm_serve.decoder import DecodeRequest

    decoder = new_decoder(checkpoint, n_token=4, max_n_token=8)

    def rejection(request: DecodeRequest) -> Rejected:
        events = asyncio.run(decoder.complete(request))
        assert len(events) == 1 and isinstance(events[0], Rejected), events
        return events[0]

    assert rejection(decode_request("t5", n_token=9)).param == "n_token"
    assert rejection(decode_request((5, 128))).param == "prompt"
    assert rejection(decode_request("")).param == "prompt"
    # The last block looks n_token - 1 = 3 positions ahead: 4090 + 3 + 3 fills the 4096 exactly.
    long_prompt = (5,) * 4090
    assert rejection(decode_request(long_prompt, max_tokens=4)).code == "context_length_exceeded"
    fits = asyncio.run(decoder.complete(decode_request(long_prompt, max_tokens=3)))
    assert fits[-1].completion_tokens == 3


def test_cancelled_request_stops_its_row(checkpoint):
    decoder = new_decoder(checkpoint, n_token=1)

    async def run() -> None:
        task = asyncio.create_task(decoder.complete(decode_request("t5", max_tokens=3000)))
        while decoder.load().generated_tokens == 0 and decoder.load().running_rows == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        task.cancel()  # what Serve does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        while decoder.load().running_rows:  # the decoding thread notices at the row's next token
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert 0 < decoder.load().generated_tokens < 3000


def test_a_cancellation_as_the_next_event_arrives_is_not_lost():
    """Non-streamed requests wait for events with a timeout. Python 3.11's `asyncio.wait_for`
    returns the item and drops a cancellation that lands as the item arrives, so a client that
    left mid-request had its rows decode to the end; `wait_within` must raise instead."""
    from cllm_serve.decoder import wait_within

    async def scenario(wait) -> str:
        queue: asyncio.Queue[int] = asyncio.Queue()
        waiting = asyncio.create_task(wait(queue.get(), 10))
        await asyncio.sleep(0)  # it waits on the queue
        queue.put_nowait(1)  # the item arrives ...
        waiting.cancel()  # ... in the same loop iteration as the cancellation
        try:
            return f"returned {await waiting}"
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(scenario(wait_within)) == "cancelled"

    async def times_out() -> None:
        with pytest.raises(TimeoutError):
            await wait_within(asyncio.Event().wait(), 0.01)
        assert await wait_within(asyncio.sleep(0, result="done"), 1) == "done"

    asyncio.run(times_out())


def test_short_request_arriving_during_a_long_one_finishes_first(checkpoint):
    """Continuous batching: the short request joins the running long one between iterations,
    finishes, and leaves, while the long one keeps going (it is then cancelled)."""

    torch.set_num_threads(1)
    decoder = new_decoder(checkpoint, n_token=4)
    reference = Reference(checkpoint)

    async def run() -> tuple[list, int]:
        long = asyncio.create_task(decoder.complete(decode_request("t5", max_tokens=3000)))
        while decoder.load().running_rows == 0:
            await asyncio.sleep(0.01)
        short = await decoder.complete(decode_request("t7 t8", max_tokens=6))
        still_running = decoder.load().running_rows
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        return short, still_running

    short, still_running = asyncio.run(run())
    assert still_running == 1  # the long request was still decoding when the short one returned
    assert short[1].text == reference.text("t7 t8", 6) and short[-1].completion_tokens == 6


def test_sampling_seed_n_and_logprobs_in_the_decoder(checkpoint):
    from cllm_serve.batching import Accepted, Finished, TextDelta
    from cllm_serve.decoder import DecodeRequest

    torch.set_num_threads(1)
    decoder = new_decoder(checkpoint, n_token=4)
    reference = Reference(checkpoint)

    def texts(request: DecodeRequest) -> list[str]:
        events = asyncio.run(decoder.complete(request))
        assert events[0] == Accepted(prompt_tokens=len(reference.ids("t5 t6")), choices=request.params.n)
        finished = [event for event in events if isinstance(event, Finished)]
        assert sorted(event.index for event in finished) == list(range(request.params.n))
        by_choice = {event.index: event.text for event in events if isinstance(event, TextDelta)}
        return [by_choice[index] for index in range(request.params.n)]

    warm = decode_request("t5 t6", max_tokens=12, temperature=1.0, seed=11, n=3)
    first = texts(warm)
    assert texts(warm) == first  # the same seed gives the same text
    assert len(set(first)) > 1  # the choices use different seeds
    assert texts(decode_request("t5 t6", max_tokens=12, temperature=1.0, seed=12, n=3)) != first
    assert texts(decode_request("t5 t6", max_tokens=12, n=2)) == [reference.text("t5 t6", 12)] * 2

    events = asyncio.run(decoder.complete(decode_request("t5 t6", max_tokens=5, logprobs=2)))
    entries = events[1].logprobs
    ids = reference.generate(reference.ids("t5 t6"), 5)
    assert [entry.token for entry in entries] == [reference.tokenizer.decode([token]) for token in ids]
    with torch.inference_mode():
        logits = reference.model(input_ids=torch.tensor([reference.ids("t5 t6") + ids])).logits[0]
    forced = logits.log_softmax(-1)[len(reference.ids("t5 t6")) - 1 : -1]
    expected = forced.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist()
    assert [entry.logprob for entry in entries] == pytest.approx(expected, abs=1e-4)
    assert all(len(entry.top) == 2 for entry in entries)


def test_one_failing_request_fails_alone_in_the_engine_loop(checkpoint):
    """An out-of-memory prefill on one long prompt fails that request; the others finish."""
    from cllm import Engine, RequestParams
    from cllm.detokenize import TextAssembler
    from cllm_serve.batching import EngineJob, EngineLoop, Failed, Finished, TextDelta, TokenStream

    reference = Reference(checkpoint)
    model = reference.model

    class RaisesOnLongPrompts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        @property
        def device(self):
            return model.device

        def forward(self, input_ids, cache=None, logits_to_keep=0, **kwargs):
            if input_ids.shape[1] > 30:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return model(input_ids=input_ids, cache=cache, logits_to_keep=logits_to_keep, **kwargs)

    async def run() -> dict[int, list]:
        loop = asyncio.get_running_loop()
        engine_loop = EngineLoop(lambda: Engine(RaisesOnLongPrompts(), max_rows=4), batch_wait_s=0)
        queues = {}
        for index, prompt in enumerate(([5, 6, 7], [5] * 40, [9, 10])):
            queues[index] = asyncio.Queue()
            words = TextAssembler(lambda ids: " ".join(map(str, ids)), ())
            stream = TokenStream(loop, queues[index], words, 8, frozenset())
            engine_loop.submit(EngineJob(prompt, RequestParams(max_new_tokens=8, n_token=4), stream))
        results = {}
        for index, queue in queues.items():
            events = []
            while not events or not isinstance(events[-1], (Finished, Failed)):
                events.append(await queue.get())
            results[index] = events
        assert engine_loop.alive
        engine_loop.shutdown()
        assert not engine_loop.alive
        return results

    results = asyncio.run(run())
    assert isinstance(results[1][-1], Failed) and "out of memory" in results[1][-1].message
    for index, prompt in ((0, [5, 6, 7]), (2, [9, 10])):
        assert isinstance(results[index][-1], Finished) and results[index][-1].completion_tokens == 8
        text = "".join(event.text for event in results[index] if isinstance(event, TextDelta))
        assert text == " ".join(map(str, reference.generate(prompt, 8)))


def test_check_health_fails_once_the_engine_loop_stops(checkpoint):
    decoder = new_decoder(checkpoint)
    decoder.check_health()
    decoder.__del__()  # what Serve calls when the replica shuts down
    with pytest.raises(RuntimeError, match="engine"):
        decoder.check_health()


def test_a_stream_whose_reader_is_gone_does_not_stop_the_engine_loop(checkpoint):
    from cllm import Engine, RequestParams
    from cllm.detokenize import TextAssembler
    from cllm_serve.batching import EngineJob, EngineLoop, Finished, TokenStream

    model = Reference(checkpoint).model
    engine_loop = EngineLoop(lambda: Engine(model, max_rows=2), batch_wait_s=0)

    def job(loop, queue) -> EngineJob:
        stream = TokenStream(loop, queue, TextAssembler(lambda ids: str(len(ids)), ()), 40, frozenset())
        return EngineJob([5, 6, 7], RequestParams(max_new_tokens=40, n_token=4), stream)

    async def abandon() -> None:  # submits, then its event loop closes before the row is done
        engine_loop.submit(job(asyncio.get_running_loop(), asyncio.Queue()))

    async def finish() -> Finished:
        queue: asyncio.Queue = asyncio.Queue()
        engine_loop.submit(job(asyncio.get_running_loop(), queue))
        while not isinstance(event := await queue.get(), Finished):
            pass
        return event

    asyncio.run(abandon())
    assert asyncio.run(finish()).completion_tokens == 40
    assert engine_loop.alive
    engine_loop.shutdown()


def test_a_chat_template_that_refuses_the_messages_is_a_rejection(tmp_path):
    """Templates raise on what they do not support (a system message, roles out of turn): the
    client's error (400 at the ingress), not a 500."""
    from transformers import AutoTokenizer

    from cllm_serve.batching import Rejected
    from cllm_serve.openai_api import DecodeParams

    save_tiny_checkpoint(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }} {% endfor %}"
    )
    tokenizer.save_pretrained(str(tmp_path))
    decoder = new_decoder(str(tmp_path), n_token=4)
    refused = asyncio.run(decoder.complete(decode_request(messages=(("system", "t5"), ("user", "t6")), max_tokens=3)))
    assert len(refused) == 1 and isinstance(refused[0], Rejected) and refused[0].param == "messages"
    assert "System role not supported" in refused[0].message
    served = asyncio.run(decoder.complete(decode_request(messages=(("user", "t6"),), max_tokens=3)))
    assert served[-1].completion_tokens == 3
    # Chat without max_tokens: the rest of the context (vLLM's default), less the Jacobi lookahead,
    # or the server's default_max_tokens within it; a client's limit past it is refused.
    assert decoder._max_tokens(10, DecodeParams(), 4) == CONTEXT - 10 - 3
    assert decoder._max_tokens(10, DecodeParams(default_max_tokens=50), 4) == 50
    assert decoder._max_tokens(CONTEXT - 20, DecodeParams(default_max_tokens=50), 4) == 17
    assert isinstance(decoder._max_tokens(CONTEXT - 20, DecodeParams(max_tokens=50), 4), Rejected)
    # The largest seeds still give n choices (seed + index wraps instead of overflowing).
    wrapped = asyncio.run(decoder.complete(decode_request("t5", max_tokens=3, seed=2**63 - 1, n=2, temperature=1.0)))
    assert sum(event.completion_tokens for event in wrapped if hasattr(event, "completion_tokens")) == 6


def test_token_stream_text_is_complete_utf8_for_a_byte_fallback_tokenizer():
    """The decoder's streams emit whole characters only, and their concatenation is the decoded
    output, whatever groups of tokens the engine verifies at once; a stop string still cuts it."""
    import random

    from helpers import byte_fallback_tokenizer

    from cllm.detokenize import TextAssembler
    from cllm_serve.batching import Finished, TextDelta, TokenStream

    tokenizer = byte_fallback_tokenizer()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = "the café 中文 🙂 naïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    async def run(stops: tuple[str, ...], seed: int) -> tuple[list[str], Finished]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        stream = TokenStream(loop, events, TextAssembler(decode, stops), 100, frozenset({tokenizer.eos_token_id}))
        rng, start = random.Random(seed), 0
        while start < len(ids) and stream.on_tokens(ids[start : (start := start + rng.randint(1, 5))]):
            pass
        stream.finish(forwards=1)
        await asyncio.sleep(0)
        received = [events.get_nowait() for _ in range(events.qsize())]
        return [event.text for event in received if isinstance(event, TextDelta)], received[-1]

    for seed in range(5):
        deltas, finished = asyncio.run(run((), seed))
        assert "".join(deltas) == text and all("\ufffd" not in delta for delta in deltas)
        assert finished.finish_reason == "stop" and finished.stop_reason is None
        deltas, finished = asyncio.run(run(("🙂",), seed))
        assert "".join(deltas) == "the café 中文 " and finished.stop_reason == "🙂"


def test_health_fails_when_no_decoder_answers():
    """`/health` asks a decoder replica; one that does not answer in time (none running, all
    stuck) makes it a 503 rather than a cheerful 200."""
    import types

    from cllm_serve.ingress import IngressSettings, OpenAIIngress
    from cllm_serve.openai_api import ApiError

    def ingress(answer) -> types.SimpleNamespace:
        decoder = types.SimpleNamespace(max_model_len=types.SimpleNamespace(remote=answer))
        return types.SimpleNamespace(
            _decoder=decoder, _settings=IngressSettings(served_model_name="m", health_timeout_s=0.2)
        )

    async def silent():
        await asyncio.sleep(3600)

    async def broken():
        raise RuntimeError("no replica")

    async def answering():
        return CONTEXT

    health = OpenAIIngress.func_or_class.health  # the route's method, on a stand-in replica
    for answer in (silent, broken):
        with pytest.raises(ApiError) as refused:
            asyncio.run(health(ingress(answer)))
        assert refused.value.status_code == 503 and refused.value.code == "unhealthy"
    assert asyncio.run(health(ingress(answering))) == {"status": "ok"}


def test_drafting_options_change_no_text_and_bad_ones_are_refused(checkpoint):
    """A replica drafting with every technique, and requests that turn them off or on, all give
    greedy AR's text; an option out of range is the client's error."""
    from cllm_serve.batching import Finished, Rejected, TextDelta

    decoder = new_decoder(checkpoint, n_token=4, lookup=True, recycle_candidates=2, blocks_in_flight=2)
    reference = Reference(checkpoint)
    expected = reference.text("t5 t9 t5", 40)
    for drafting in ((), (("lookup", False), ("recycle_candidates", 0), ("blocks_in_flight", 1)),
                     (("recycle_length", 2), ("next_block_share", 0.5))):
        events = asyncio.run(decoder.complete(decode_request("t5 t9 t5", max_tokens=40, drafting=drafting)))
        assert isinstance(events[-1], Finished), events
        assert "".join(event.text for event in events if isinstance(event, TextDelta)) == expected
    refused = asyncio.run(decoder.complete(decode_request("t5", drafting=(("blocks_in_flight", 0),))))
    assert isinstance(refused[0], Rejected) and refused[0].param == "drafting"


def save_chatml_word_model(directory) -> str:
    """A tiny random Llama behind a ChatML word-level tokenizer (`<|im_start|>` = 1, `<|im_end|>` =
    2, roles, `w6` ... `w63`), `<|im_end|>` its EOS in the tokenizer and the generation config, as
    toy-chat's teacher has it. Seed 14's greedy reply to `CHAT` is `w57 w17 w31` then `<|im_end|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cllm import tiny_model
    from cllm.toy.chat import CHAT_TEMPLATE

    vocabulary = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "system": 3, "user": 4, "assistant": 5,
                  **{f"w{i}": i for i in range(6, 64)}}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE)
    model = tiny_model("llama", vocab_size=64, seed=14)
    model.generation_config.eos_token_id = [2]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


CHAT = (("system", "w7 w8"), ("user", "w9 w10 w11"), ("assistant", "w12 w13"), ("user", "w14"))


def test_a_chat_request_renders_through_the_template_and_stops_at_im_end(tmp_path):
    """Serve's chat route renders the messages as collect and evaluate render a ShareGPT record of
    the same conversation (one `cllm.hf.encode_chat`), and the reply ends where the template ends a
    turn: at `<|im_end|>`, finish_reason `stop`, its text never in the reply."""
    import json

    from cllm import ar_generate
    from cllm.hf import encode_chat, load_model
    from cllm.prompts import load_prompts
    from cllm.toy.chat import sharegpt_record
    from cllm_serve.batching import Finished, TextDelta

    path = save_chatml_word_model(tmp_path / "model")
    model, tokenizer = load_model(path, device="cpu")
    sharegpt = tmp_path / "chat.jsonl"
    sharegpt.write_text(json.dumps(sharegpt_record(CHAT, "w20 w21")) + "\n")
    (record,), bad = load_prompts(str(sharegpt), tokenizer)
    assert bad == [] and record.label_ids == [20, 21, 2]
    assert record.prompt_ids == encode_chat(tokenizer, CHAT)[1] == [1, 3, 7, 8, 2, 1, 4, 9, 10, 11, 2, 1, 5, 12, 13,
                                                                    2, 1, 4, 14, 2, 1, 5]
    decoder = new_decoder(path, n_token=4)
    assert decoder.tokenize(None, CHAT) == record.prompt_ids
    events = asyncio.run(decoder.complete(decode_request(messages=CHAT, max_tokens=20)))
    finished = events[-1]
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    assert isinstance(finished, Finished) and finished.finish_reason == "stop" and finished.stop_reason is None
    assert text == "w57 w17 w31" and "<|im_end|>" not in text and finished.completion_tokens == 4
    # What evaluate decodes from the same ids (greedy AR, the model's EOS ids) is the same reply.
    prompt = torch.tensor([record.prompt_ids])
    greedy = ar_generate(model, prompt, torch.ones_like(prompt), max_new_tokens=20, eos_token_id=2).new_tokens[0]
    assert greedy == [57, 17, 31, 2] and tokenizer.decode(greedy, skip_special_tokens=True) == text
