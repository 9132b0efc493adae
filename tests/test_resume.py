"""Resumption after a decoder replica dies, in this process: the ingress's `ResumableCall` against
scripted decoder calls, and the decoder continuing a choice from the ids an earlier replica
verified. The kills on a real Ray are in test_serve_resume.py."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch
from helpers import Reference, byte_fallback_tokenizer, save_tiny_checkpoint
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError

from cllm.detokenize import TextAssembler
from cllm_serve.batching import Accepted, Failed, Finished, TextDelta, TokenStream
from cllm_serve.decoder import Decoder, DecodeRequest, DecoderSettings, ResumedChoice
from cllm_serve.openai_api import DecodeParams
from cllm_serve.resume import ResumableCall, ResumePolicy, ResumptionFailed

# -- the ingress's side, against scripted calls --------------------------------------------------


class ScriptedCall:
    """A decoder call that yields `events`, then raises `error` (or hangs, or ends)."""

    def __init__(self, events: list, error: BaseException | None = None, hang: bool = False):
        self.events = list(events)
        self.error = error
        self.hang = hang
        self.cancelled = False

    async def __anext__(self):
        await asyncio.sleep(0)
        if self.events:
            return self.events.pop(0)
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class Decoders:
    """`start` for ResumableCall: hands out the scripted calls in order, keeping the requests."""

    def __init__(self, *calls: ScriptedCall):
        self.calls = list(calls)
        self.requests: list[DecodeRequest] = []

    def start(self, request: DecodeRequest) -> ScriptedCall:
        self.requests.append(request)
        return self.calls.pop(0)


def drain(call: ResumableCall) -> list:
    async def run() -> list:
        return [event async for event in call]

    return asyncio.run(run())


REQUEST = DecodeRequest(prompts=("t5 t6",), params=DecodeParams(max_tokens=10, n=2))
POLICY = ResumePolicy(attempts=3, timeout_s=5)


def test_a_death_mid_stream_resumes_each_open_choice_after_its_ids():
    decoders = Decoders(
        ScriptedCall(
            [Accepted(2, choices=2), TextDelta("a b", 0, token_ids=(5, 6)), TextDelta("x", 1, token_ids=(9,)),
             Finished("stop", 1, 1, index=1), TextDelta("", 0, token_ids=(7,))],
            error=ActorDiedError(),
        ),
        ScriptedCall([Accepted(2, choices=1), TextDelta(" c d", 0, token_ids=(8,)), Finished("length", 4, 1, 0,
                                                                                          carried_tokens=3)]),
    )
    resumed = []
    call = ResumableCall(decoders.start, REQUEST, POLICY, on_resume=lambda: resumed.append(1))
    events = drain(call)
    assert decoders.requests[0] == REQUEST
    assert decoders.requests[1].resume == (ResumedChoice(0, (5, 6, 7), len("a b")),)  # choice 1 had ended
    assert [type(event) for event in events].count(Accepted) == 1  # the client hears of one call
    assert "".join(event.text for event in events if isinstance(event, TextDelta) and event.index == 0) == "a b c d"
    assert call.resumptions == 1 and resumed == [1]


def test_a_death_before_acceptance_sends_the_request_again():
    decoders = Decoders(ScriptedCall([], error=ActorDiedError()), ScriptedCall([Accepted(2), Finished("stop", 0, 1)]))
    events = drain(ResumableCall(decoders.start, REQUEST, POLICY))
    assert decoders.requests == [REQUEST, REQUEST] and isinstance(events[0], Accepted)


def test_the_requests_own_failure_is_never_retried():
    own_error = RayTaskError("generate", "Traceback ...", ValueError("bad input")).as_instanceof_cause()
    decoders = Decoders(ScriptedCall([Accepted(2)], error=own_error), ScriptedCall([]))
    with pytest.raises(ValueError):
        drain(ResumableCall(decoders.start, REQUEST, POLICY))
    # Even when the decoder's own code raised a Ray actor error, it is the request's failure.
    nested = RayTaskError("generate", "Traceback ...", ActorDiedError()).as_instanceof_cause()
    decoders = Decoders(ScriptedCall([Accepted(2)], error=nested), ScriptedCall([]))
    with pytest.raises(RayTaskError):
        drain(ResumableCall(decoders.start, REQUEST, POLICY))
    assert len(decoders.requests) == 1
    # A choice that failed (a Failed event) ends; only the open one resumes.
    decoders = Decoders(
        ScriptedCall([Accepted(2, choices=2), Failed("out of memory", 0)], error=ActorDiedError()),
        ScriptedCall([Accepted(2), Finished("stop", 0, 1, index=1)]),
    )
    drain(ResumableCall(decoders.start, REQUEST, POLICY))
    assert decoders.requests[1].resume == (ResumedChoice(1, (), 0),)


def test_attempts_are_bounded_and_every_failed_start_counts():
    calls = [ScriptedCall([Accepted(2)], error=ActorDiedError())] + [
        ScriptedCall([], error=DeploymentUnavailableError("Decoder")) for _ in range(5)
    ]
    decoders = Decoders(*calls)
    call = ResumableCall(decoders.start, REQUEST, ResumePolicy(attempts=3, timeout_s=30))
    with pytest.raises(ResumptionFailed, match="3 resumption attempt"):
        drain(call)
    assert call.resumptions == 3 and len(decoders.requests) == 4


def test_no_replica_taking_the_request_over_fails_within_the_time_bound():
    decoders = Decoders(ScriptedCall([Accepted(2)], error=ActorDiedError()), ScriptedCall([], hang=True))
    started = time.monotonic()
    with pytest.raises(ResumptionFailed):
        drain(ResumableCall(decoders.start, REQUEST, ResumePolicy(attempts=3, timeout_s=0.5)))
    assert time.monotonic() - started < 3


def test_resumption_off_and_deaths_after_the_last_choice():
    decoders = Decoders(ScriptedCall([Accepted(2)], error=ActorDiedError()))
    with pytest.raises(ActorDiedError):
        drain(ResumableCall(decoders.start, REQUEST, ResumePolicy(attempts=0)))
    # Every choice had ended: the reply is complete, nothing to resume.
    one = DecodeRequest(prompts=("t5",), params=DecodeParams(max_tokens=3))
    decoders = Decoders(ScriptedCall([Accepted(1), Finished("stop", 1, 1)], error=ActorDiedError()))
    events = drain(ResumableCall(decoders.start, one, POLICY))
    assert len(decoders.requests) == 1 and isinstance(events[-1], Finished)


# -- the decoder's side: a token stream and a decoder continuing a choice ------------------------


def test_a_resumed_token_stream_continues_byte_exact_at_any_seam():
    """Whatever deltas reached the client before the replica died, the new replica's text after
    the same ids completes it exactly, through multi-byte characters and pending stop strings."""
    tokenizer = byte_fallback_tokenizer()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = "the café 中文 🙂 naïve the end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    eos = frozenset({tokenizer.eos_token_id})

    async def deltas(stream: TokenStream, queue: asyncio.Queue, rest: list[int], rng: random.Random) -> list:
        start = 0
        while start < len(rest) and stream.on_tokens(rest[start : (start := start + rng.randint(1, 4))]):
            pass
        stream.finish(forwards=1)
        await asyncio.sleep(0)
        return [queue.get_nowait() for _ in range(queue.qsize())]

    async def run(stops: tuple[str, ...], seed: int) -> None:
        loop, rng = asyncio.get_running_loop(), random.Random(seed)
        first_queue, second_queue = asyncio.Queue(), asyncio.Queue()
        whole = await deltas(TokenStream(loop, first_queue, TextAssembler(decode, stops), 100, eos), first_queue,
                             ids, rng)
        whole_text = "".join(event.text for event in whole if isinstance(event, TextDelta))
        received = [event for event in whole if isinstance(event, TextDelta)][: rng.randint(0, len(whole) - 2)]
        carried = [token for event in received for token in event.token_ids]
        sent = "".join(event.text for event in received)
        resumed = TokenStream(loop, second_queue, TextAssembler(decode, stops), 100, eos)
        if resumed.resume(carried, len(sent)):
            rest = await deltas(resumed, second_queue, ids[len(carried):], rng)
        else:
            resumed.finish(forwards=0)
            await asyncio.sleep(0)
            rest = [second_queue.get_nowait() for _ in range(second_queue.qsize())]
        assert sent + "".join(event.text for event in rest if isinstance(event, TextDelta)) == whole_text
        ended, resumed_end = whole[-1], rest[-1]
        assert (resumed_end.finish_reason, resumed_end.stop_reason) == (ended.finish_reason, ended.stop_reason)
        assert resumed_end.carried_tokens == len(carried)
        if not stops:  # a stop string's match counts the ids of the group that completed it
            assert resumed_end.completion_tokens == ended.completion_tokens

    for seed in range(20):
        asyncio.run(run((), seed))
        asyncio.run(run(("🙂",), seed))
        asyncio.run(run(("the end",), seed))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-model-resume"))
    save_tiny_checkpoint(path, with_eos=False)
    return path


def complete(decoder: Decoder, request: DecodeRequest) -> list:
    return asyncio.run(decoder.complete(request))


def test_a_resumed_choice_equals_the_uninterrupted_one(checkpoint):
    """Greedy: the text after any number of carried ids is the rest of greedy AR's; usage counts
    every token the client got, and the prompt's log-probabilities are still the prompt's."""
    torch.set_num_threads(1)
    decoder = Decoder.func_or_class(DecoderSettings(model=checkpoint, n_token=4))
    reference = Reference(checkpoint)
    params = DecodeParams(max_tokens=20, min_tokens=12, logprobs=1, prompt_logprobs=1, echo=True)
    request = DecodeRequest(prompts=("t5 t17 t42",), params=params)
    expected = reference.generate(reference.ids("t5 t17 t42"), 20)
    _, whole, finished = complete(decoder, request)  # the echo and the output, merged
    echo = "t5 t17 t42"
    assert whole.text == echo + reference.tokenizer.decode(expected)
    assert whole.token_ids == tuple(expected) and finished.carried_tokens == 0
    for cut in (1, 7, 19, 20):
        sent_chars = len(echo) + len(reference.tokenizer.decode(expected[:cut]))
        resume = (ResumedChoice(0, tuple(expected[:cut]), sent_chars),)
        accepted, *deltas, done = complete(decoder, DecodeRequest(**{**request.__dict__, "resume": resume}))
        assert accepted.choices == 1
        text = "".join(delta.text for delta in deltas)
        assert reference.tokenizer.decode(expected[:cut]) + text == reference.tokenizer.decode(expected)
        assert [token for delta in deltas for token in delta.token_ids] == expected[cut:]
        assert (done.completion_tokens, done.carried_tokens, done.finish_reason) == (20, cut, "length")
        assert done.forwards == 0 if cut == 20 else done.forwards >= 1
        if cut < 20:  # the prompt's log-probabilities cover the prompt only, as before the seam
            assert len(done.prompt_logprobs) == len(finished.prompt_logprobs)
            for ours, theirs in zip(done.prompt_logprobs[1:], finished.prompt_logprobs[1:], strict=True):
                assert ours.token == theirs.token and ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)


def test_a_resumed_sampled_choice_completes_and_progress_is_held_for_the_interval(checkpoint):
    decoder = Decoder.func_or_class(DecoderSettings(model=checkpoint, n_token=4))
    request = DecodeRequest(prompts=("t9",), params=DecodeParams(max_tokens=30, temperature=0.9, seed=3, n=2))
    resume = (ResumedChoice(1, (40, 41, 42), len("t40 t41 t42")),)
    resumed = complete(decoder, DecodeRequest(**{**request.__dict__, "resume": resume}))
    assert resumed[0].choices == 1 and {event.index for event in resumed[1:]} == {1}
    assert resumed[-1].completion_tokens == 30 and resumed[-1].carried_tokens == 3
    # Held events: one merged delta, and no wait for the interval once every choice has ended.
    started = time.monotonic()
    events = []

    async def run() -> None:
        held = DecodeRequest(prompts=("t9",), params=DecodeParams(max_tokens=30), event_interval_s=30)
        async for event in decoder.generate(held):
            events.append(event)

    asyncio.run(run())
    assert time.monotonic() - started < 10
    assert [type(event) for event in events] == [Accepted, TextDelta, Finished]
    assert len(events[1].token_ids) == 30
