"""The continuous-batching engine: rows join and leave between iterations, with their own block
sizes, budgets and EOS, on a per-slot KV cache, and every greedy row still equals Hugging Face
`generate` of that row alone (fp32)."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_greedy

from cllm import Engine, RequestParams, SamplingParams, jacobi_generate, pad_prompts, tiny_model
from cllm.cache import SlotCache

VOCAB = 128


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return tiny_model(request.param, vocab_size=VOCAB, seed=3)


def prompt_of(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    ids = torch.tensor([prompt])
    return hf_greedy(model, ids, torch.ones_like(ids), max_new_tokens, eos_token_id=eos)[0]


def run_all(engine: Engine) -> dict[int, object]:
    finished = {}
    while engine.has_unfinished():
        finished.update((request.request_id, request) for request in engine.step())
    return finished


def test_rows_that_join_at_different_steps_with_different_blocks_equal_generate(model):
    """Five requests (n_token 1, 4, 8, 16, 3; budgets 9 to 30) on an engine of three slots: two
    start together, one joins mid-flight, two wait for slots that earlier rows free."""
    requests = [(prompt_of(length, seed), n, budget) for seed, (length, n, budget) in enumerate(
        [(12, 4, 30), (5, 16, 17), (9, 1, 9), (3, 8, 25), (7, 3, 21)]
    )]
    engine = Engine(model, max_rows=3)
    ids = [engine.add_request(p, RequestParams(max_new_tokens=b, n_token=n)) for p, n, b in requests[:2]]
    finished = {}
    for _ in range(3):
        finished.update((request.request_id, request) for request in engine.step())
    assert engine.running == 2 and not finished
    ids += [engine.add_request(p, RequestParams(max_new_tokens=b, n_token=n)) for p, n, b in requests[2:]]
    engine.step()
    assert engine.running == 3 and engine.waiting == 2  # the slots are full: the rest wait
    finished.update(run_all(engine))
    for request_id, (prompt, _, budget) in zip(ids, requests):
        assert finished[request_id].tokens == reference(model, prompt, budget)
        assert finished[request_id].finish_reason == "length"
    assert engine.running == 0 and engine.waiting == 0


def test_eos_mid_block_and_per_request_eos(model):
    prompt = prompt_of(10, 7)
    free_run = reference(model, prompt, 20)
    position = next(i for i, token in enumerate(free_run) if i % 8 not in (0, 7) and token not in free_run[:i])
    eos = free_run[position]
    engine = Engine(model, max_rows=4)
    with_eos = engine.add_request(prompt, RequestParams(max_new_tokens=20, n_token=8, eos_token_ids=frozenset([eos])))
    without = engine.add_request(prompt, RequestParams(max_new_tokens=20, n_token=8))
    finished = run_all(engine)
    assert finished[with_eos].tokens == free_run[: position + 1] == reference(model, prompt, 20, eos)
    assert finished[with_eos].finish_reason == "stop"
    assert finished[without].tokens == free_run


def test_abort_frees_the_slot_at_once_and_leaves_the_others_unchanged(model):
    prompts = [prompt_of(6, seed) for seed in range(3)]
    engine = Engine(model, max_rows=2)
    first, second, third = (engine.add_request(p, RequestParams(max_new_tokens=24, n_token=4)) for p in prompts)
    for _ in range(3):
        engine.step()
    assert engine.running == 2 and engine.waiting == 1
    engine.abort(first)
    assert engine.running == 1  # freed now, not at the next step
    finished = {request.request_id: request for request in engine.step()}
    assert finished[first].finish_reason == "cancelled"
    assert engine.running == 2  # the waiting request took the slot
    aborted = finished[first].tokens
    assert 0 < len(aborted) < 24 and aborted == reference(model, prompts[0], 24)[: len(aborted)]
    finished.update(run_all(engine))
    assert finished[second].tokens == reference(model, prompts[1], 24)
    assert finished[third].tokens == reference(model, prompts[2], 24)
    engine.abort(third)  # finished or unknown ids are ignored
    engine.abort(12345)
    assert not engine.has_unfinished() and engine.step() == []


def test_cancel_from_the_token_callback(model):
    prompt = prompt_of(8, 11)
    seen: list[int] = []

    def on_tokens(new_ids, logprobs):
        seen.extend(new_ids)
        return len(seen) < 5

    engine = Engine(model)
    request = engine.add_request(prompt, RequestParams(max_new_tokens=30, n_token=4), on_tokens)
    result = run_all(engine)[request]
    assert result.finish_reason == "cancelled" and result.tokens == seen
    assert 5 <= len(seen) < 30 and seen == reference(model, prompt, 30)[: len(seen)]


def test_prefill_computes_last_position_logits_and_the_cache_grows_in_place(model):
    shapes: list[tuple[int, ...]] = []
    handle = model.register_forward_hook(lambda _m, _a, output: shapes.append(tuple(output.logits.shape)))
    try:
        engine = Engine(model, max_rows=4)
        for seed, length in enumerate((40, 7, 23)):
            engine.add_request(prompt_of(length, seed), RequestParams(max_new_tokens=12, n_token=4))
        engine.step()
        keys = engine.cache.layers[0].keys
        storage, capacity = keys.data_ptr(), keys.shape
        lengths = []
        while engine.has_unfinished():
            lengths.append(max((row.length for row in engine._running), default=0))
            engine.step()
    finally:
        handle.remove()
    assert shapes[0] == (3, 1, VOCAB)  # one prefill for the three prompts, last positions only
    assert all(shape[1] <= 4 for shape in shapes[1:])  # iterations: the unverified block at most
    assert engine.cache.layers[0].keys.data_ptr() == storage  # written in place, never rebuilt
    assert engine.cache.layers[0].keys.shape == capacity
    assert max(lengths) <= 40 + 12  # each row holds its prompt and accepted tokens, no more


class RaisesOnLongPrompts(torch.nn.Module):
    """A model whose prefill runs out of memory on prompts longer than `limit` tokens."""

    def __init__(self, model, limit: int):
        super().__init__()
        self.inner, self.limit = model, limit
        self.config = model.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, cache=None, logits_to_keep=0, **kwargs):
        if input_ids.shape[1] > self.limit:
            raise torch.OutOfMemoryError("simulated: the prompt does not fit")
        return self.inner(input_ids=input_ids, cache=cache, logits_to_keep=logits_to_keep, **kwargs)


def test_a_failing_request_fails_alone(model):
    engine = Engine(RaisesOnLongPrompts(model, limit=30), max_rows=4)
    short = [prompt_of(6, seed) for seed in range(2)]
    ids = [engine.add_request(p, RequestParams(max_new_tokens=10, n_token=4)) for p in short]
    too_long = engine.add_request(prompt_of(50, 9), RequestParams(max_new_tokens=10, n_token=4))
    finished = run_all(engine)
    assert finished[too_long].finish_reason == "error"
    assert isinstance(finished[too_long].error, torch.OutOfMemoryError)
    for request_id, prompt in zip(ids, short):
        assert finished[request_id].tokens == reference(model, prompt, 10)


def test_bad_requests_and_unsupported_models_are_refused():
    model = tiny_model("llama", vocab_size=VOCAB)
    engine = Engine(model)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, VOCAB])
    with pytest.raises(ValueError, match="n_token"):
        RequestParams(n_token=0)
    mixed = tiny_model("qwen2", vocab_size=VOCAB, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match="full attention or one shared sliding window"):
        SlotCache(mixed, max_slots=2)


def test_sliding_window_is_applied_by_the_mask():
    """Mistral's window of 16 positions, on sequences longer than that: still equal to generate."""
    model = tiny_model("mistral", vocab_size=VOCAB, seed=3, sliding_window=16)
    engine = Engine(model, max_rows=2)
    prompts = [prompt_of(20, 1), prompt_of(9, 2)]
    ids = [engine.add_request(p, RequestParams(max_new_tokens=20, n_token=4)) for p in prompts]
    finished = run_all(engine)
    for request_id, prompt in zip(ids, prompts):
        assert finished[request_id].tokens == reference(model, prompt, 20)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("n_token", [1, 5])
def test_logprobs_equal_teacher_forced_logprobs(model, temperature, n_token):
    """A verified token's logits come from its true prefix, so its log-probability (and the top
    alternatives) equal those of one plain forward over prompt + output."""
    prompts = [prompt_of(length, seed) for seed, length in enumerate((9, 4, 13))]
    output = jacobi_generate(
        model, *pad_prompts(prompts, 0), n_token=n_token, max_new_tokens=17, logprobs=3,
        sampling=SamplingParams(temperature=temperature, seed=0),
    )
    for prompt, tokens, logprobs in zip(prompts, output.new_tokens, output.logprobs):
        assert [entry.token for entry in logprobs] == tokens
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0]
        forced = logits.log_softmax(-1)[len(prompt) - 1 : -1]
        expected = forced.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor([entry.logprob for entry in logprobs]), expected, atol=1e-4)
        top_values, top_ids = forced.topk(3, dim=-1)
        assert [[token for token, _ in entry.top] for entry in logprobs] == top_ids.tolist()
        assert torch.allclose(torch.tensor([[v for _, v in entry.top] for entry in logprobs]), top_values, atol=1e-4)


def test_min_tokens_masks_eos_like_generate_min_new_tokens(model):
    """EOS is forbidden before `min_tokens` (its logits masked, as vLLM and HF do), in every
    block position, so greedy Jacobi output equals `generate(min_new_tokens=...)` exactly."""
    prompt = prompt_of(6, seed=11)
    free = reference(model, prompt, 24)
    first = next(k for k in range(2, 10) if free[k] not in free[:k])
    eos = free[first]  # a greedy token's first appearance: without min_tokens the output ends there
    for n_token in (1, 4, 8):
        engine = Engine(model, max_rows=2)
        early = engine.add_request(prompt, RequestParams(max_new_tokens=24, n_token=n_token,
                                                         eos_token_ids=frozenset({eos})))
        late = engine.add_request(prompt, RequestParams(max_new_tokens=24, n_token=n_token,
                                                        eos_token_ids=frozenset({eos}), min_tokens=10))
        finished = run_all(engine)
        assert finished[early].tokens == free[: first + 1]
        ids = torch.tensor([prompt])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=10,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, len(prompt):].tolist()
        expected = expected[: expected.index(eos) + 1] if eos in expected else expected
        assert finished[late].tokens == expected and len(expected) > 10 and eos not in expected[:10]


def test_prompt_logprobs_equal_a_plain_forward_and_leave_the_output_unchanged(model):
    """`prompt_logprobs`: each prompt token's log-probability given those before it (what
    `echo` with `logprobs` returns), from the prefill; rows without it share their prefill."""
    prompts = [prompt_of(7, seed=21), prompt_of(4, seed=22), prompt_of(9, seed=23)]
    engine = Engine(model, max_rows=3)
    ids = [
        engine.add_request(prompts[0], RequestParams(max_new_tokens=5, n_token=4)),
        engine.add_request(prompts[1], RequestParams(max_new_tokens=5, n_token=4, prompt_logprobs=2)),
        engine.add_request(prompts[2], RequestParams(max_new_tokens=5, n_token=4, prompt_logprobs=0)),
    ]
    finished = run_all(engine)
    assert finished[ids[0]].prompt_logprobs is None
    for request_id, prompt, k in zip(ids[1:], prompts[1:], (2, 0)):
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
        entries = finished[request_id].prompt_logprobs
        assert [entry.token for entry in entries] == prompt[1:]
        assert [entry.logprob for entry in entries] == pytest.approx(
            expected.gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1).tolist(), abs=1e-4
        )
        assert all(len(entry.top) == k for entry in entries)
        if k:
            assert [entry.top[0][0] for entry in entries] == expected.argmax(-1).tolist()
    for request_id, prompt in zip(ids, prompts):
        assert finished[request_id].tokens == reference(model, prompt, 5)
