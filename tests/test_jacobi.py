"""Jacobi decoding is lossless, batched and KV-cached.

Equality tests run the tiny models in float64, so that the different (but equally valid)
summation orders of a cached, batched forward and a plain one cannot flip a near-tied argmax.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hf_greedy

from cllm import ar_generate, jacobi_generate, tiny_model
from cllm.hf import TINY_ARCHITECTURES
from cllm.row import block_statistics

VOCAB = 128
MAX_NEW = 23  # not a multiple of any block size tested


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def model(request):
    return tiny_model(request.param, vocab_size=VOCAB, seed=0, dtype=torch.float64)


def mixed_batch(rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths, left-padded for some rows and right-padded for others."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [12, 5, 9, 3, 7][:rows]
    width = max(lengths)
    input_ids = torch.randint(0, VOCAB, (rows, width), generator=generator)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        if row % 2:
            mask[row, width - length :] = 1  # left padding
        else:
            mask[row, :length] = 1  # right padding
    return input_ids, mask


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("n_token", [1, 4, 16])
def test_jacobi_equals_ar_and_hf_generate(model, rows, n_token):
    input_ids, mask = mixed_batch(rows)
    reference = hf_greedy(model, input_ids, mask, MAX_NEW)
    ar = ar_generate(model, input_ids, mask, max_new_tokens=MAX_NEW)
    jacobi = jacobi_generate(model, input_ids, mask, n_token=n_token, max_new_tokens=MAX_NEW)
    assert ar.new_tokens == reference
    assert jacobi.new_tokens == reference
    assert all(len(tokens) == MAX_NEW for tokens in jacobi.new_tokens)


@pytest.mark.parametrize("n_token", [4, 16])
def test_eos_in_the_middle_of_a_block(model, n_token):
    input_ids, mask = mixed_batch(5)
    free_run = ar_generate(model, input_ids, mask, max_new_tokens=MAX_NEW).new_tokens
    # Pick as EOS a token that row 0 first emits in the middle of a block.
    position = next(
        i for i, token in enumerate(free_run[0]) if i % n_token not in (0, n_token - 1)
        and token not in free_run[0][:i]
    )
    eos = free_run[0][position]
    reference = hf_greedy(model, input_ids, mask, MAX_NEW, eos_token_id=eos)
    jacobi = jacobi_generate(
        model, input_ids, mask, n_token=n_token, max_new_tokens=MAX_NEW, eos_token_id=eos,
        return_trajectories=True,
    )
    assert jacobi.new_tokens == reference
    assert jacobi.new_tokens[0] == free_run[0][: position + 1]
    assert len(jacobi.trajectories[0]) == position // n_token + 1
    fixed_point = jacobi.trajectories[0][-1][-1]
    stop = position % n_token + 1
    assert fixed_point[stop - 1] == eos
    assert fixed_point[stop:] == [0] * (n_token - stop)  # the pad id (default 0) after the stop


def test_float32_equality_on_llama():
    model = tiny_model("llama", vocab_size=VOCAB, seed=3)
    input_ids, mask = mixed_batch(5, seed=4)
    ar = ar_generate(model, input_ids, mask, max_new_tokens=40)
    jacobi = jacobi_generate(model, input_ids, mask, n_token=8, max_new_tokens=40)
    assert jacobi.new_tokens == ar.new_tokens == hf_greedy(model, input_ids, mask, 40)


def test_trajectories_and_stats_add_up(model):
    n_token = 8
    input_ids, mask = mixed_batch(5)
    output = jacobi_generate(
        model, input_ids, mask, n_token=n_token, max_new_tokens=MAX_NEW, return_trajectories=True
    )
    for row, (tokens, blocks, stats) in enumerate(
        zip(output.new_tokens, output.trajectories, output.stats.rows)
    ):
        prompt = input_ids[row][mask[row].bool()].tolist()
        for index, states in enumerate(blocks):
            assert all(len(state) == n_token for state in states)
            start = index * n_token
            valid = min(n_token, len(tokens) - start)
            fixed_point = states[-1]
            assert fixed_point[:valid] == tokens[start : start + valid]
            initial = states[0]
            assert initial[0] == tokens[start]  # the first token of a block is verified
            assert all(token in prompt for token in initial[1:])  # init="prompt"
        assert stats.new_tokens == len(tokens)
        assert len(stats.iterations_per_block) == len(blocks)
        # One prefill, then every forward belongs to exactly one block.
        assert stats.forwards == 1 + sum(stats.iterations_per_block)
        assert stats.tokens_per_forward == pytest.approx(len(tokens) / stats.forwards)
        # A block never needs more iterations than it has tokens (+1 to confirm the fixed point).
        assert all(1 <= iterations <= n_token for iterations in stats.iterations_per_block)
    total = output.stats.total
    assert total.new_tokens == sum(len(tokens) for tokens in output.new_tokens)
    assert total.forwards == sum(row.forwards for row in output.stats.rows)
    assert output.stats.batch_forwards <= total.forwards


def test_repeat_init_and_seeded_prompt_init():
    model = tiny_model("gpt2", vocab_size=VOCAB, seed=0, dtype=torch.float64)
    input_ids, mask = mixed_batch(3)
    repeat = jacobi_generate(
        model, input_ids, mask, n_token=8, max_new_tokens=MAX_NEW, init="repeat",
        return_trajectories=True,
    )
    for blocks in repeat.trajectories:
        for states in blocks:
            assert states[0] == [states[0][0]] * 8

    def seeded(seed):
        return jacobi_generate(
            model, input_ids, mask, n_token=8, max_new_tokens=MAX_NEW,
            generator=torch.Generator().manual_seed(seed), return_trajectories=True,
        )

    first, again, other = seeded(7), seeded(7), seeded(8)
    assert first.trajectories == again.trajectories
    assert first.trajectories != other.trajectories
    assert first.new_tokens == other.new_tokens == repeat.new_tokens


def test_block_statistics_on_a_hand_built_trajectory():
    fixed_point = [1, 2, 3, 4, 5]
    states = [
        [1, 9, 9, 4, 9],  # position 3 guessed right, but not "predicted"
        [1, 2, 9, 4, 5],  # 2 new correct tokens, 4 and 5 correct behind a wrong one
        [1, 2, 3, 4, 5],  # 3 more tokens become correct at once
    ]
    fast_forwarded, stationary = block_statistics(states, fixed_point, valid=5)
    assert fast_forwarded == (2 - 1 - 1) + (5 - 2 - 1)
    assert stationary == 2  # positions 3 and 4 settle at state 1 while position 2 is wrong


def test_streaming_callback_and_cancellation():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0, dtype=torch.float64)
    input_ids, mask = mixed_batch(3)
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def on_tokens(row, tokens):
        streamed[row].extend(tokens)
        return not (row == 1 and len(streamed[row]) >= 5)  # the client of row 1 goes away

    output = jacobi_generate(
        model, input_ids, mask, n_token=8, max_new_tokens=MAX_NEW, on_tokens=on_tokens
    )
    assert streamed[0] == output.new_tokens[0] and len(streamed[0]) == MAX_NEW
    assert streamed[2] == output.new_tokens[2]
    assert 5 <= len(output.new_tokens[1]) < MAX_NEW
    full = ar_generate(model, input_ids, mask, max_new_tokens=MAX_NEW).new_tokens
    assert streamed[1] == output.new_tokens[1] == full[1][: len(output.new_tokens[1])]


def test_per_iteration_work_is_the_unaccepted_part_of_the_block():
    """Count the tokens fed to the model: after the prefill, each forward feeds a row only the
    block tokens not yet accepted into the cache, whatever the prefix length."""
    model = tiny_model("gpt2", vocab_size=VOCAB, seed=0, dtype=torch.float64)
    n_token = 8
    fed: list[tuple[int, int]] = []  # (real tokens fed, attention span) per forward, batch of 1

    def count(_module, _args, kwargs):
        # Batch of 1: no padding, so every fed id is real; the mask's last dim is the keys attended.
        fed.append((kwargs["input_ids"].shape[1], kwargs["attention_mask"].shape[-1]))

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        for prompt_length in (4, 200):
            fed.clear()
            prompt = torch.randint(0, VOCAB, (1, prompt_length), generator=torch.Generator().manual_seed(0))
            output = jacobi_generate(
                model, prompt, n_token=n_token, max_new_tokens=40, return_trajectories=True
            )
            assert fed[0][0] == prompt_length  # the prefix is computed once, in the prefill
            expected = expected_feed_sizes(output.trajectories[0], output.stats.rows[0], n_token)
            assert [tokens for tokens, _ in fed[1:]] == expected
            assert max(expected) <= n_token
            # Keys/values grow only by accepted tokens: the span never exceeds prompt + output + block.
            assert all(span <= prompt_length + 40 + n_token for _, span in fed)
    finally:
        handle.remove()
    # The model does fast-forward here, so some iterations feed much less than a whole block.
    assert min(expected) < n_token - 1


def expected_feed_sizes(blocks, stats, n_token) -> list[int]:
    """From the trajectory alone: each iteration feeds n - (tokens whose input was verified)."""
    sizes = []
    for states, iterations in zip(blocks, stats.iterations_per_block):
        cached = 0
        for before, after in zip(states, states[1:]):
            sizes.append(n_token - cached)
            cached = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), n_token)
        if iterations == len(states):  # one more forward confirmed the fixed point
            sizes.append(n_token - cached)
    return sizes


class ScriptedModel(torch.nn.Module):
    """Predicts the token that `script` holds at the next position, whatever the input: Jacobi
    decoding then gets every block right in one iteration, before any of it is verified."""

    def __init__(self, script: list[int], vocab_size: int = VOCAB):
        super().__init__()
        self.config = tiny_model("llama", vocab_size=vocab_size).config
        self.script = torch.tensor(script)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                past_key_values=None, use_cache=None):
        next_positions = (position_ids + 1).clamp(max=len(self.script) - 1)
        logits = torch.nn.functional.one_hot(self.script[next_positions], self.config.vocab_size)
        return type("Output", (), {"logits": logits.float()})


@pytest.mark.parametrize("stop", ["eos", "budget"])
def test_stop_inside_a_block_that_converges_in_one_jump(stop):
    script = list(range(10, 70))
    prompt = torch.tensor([script[:5]])
    model = ScriptedModel(script)
    eos = script[5 + 5] if stop == "eos" else None
    max_new_tokens = 6 if stop == "eos" else 13  # EOS is the 6th new token; 13 = 8 + 5
    output = jacobi_generate(
        model, prompt, n_token=8, max_new_tokens=max_new_tokens if stop == "budget" else 40,
        eos_token_id=eos, pad_token_id=0, return_trajectories=True,
    )
    assert output.new_tokens == [script[5 : 5 + max_new_tokens]]
    last_state = output.trajectories[0][-1][-1]
    valid = max_new_tokens % 8 or 8
    assert last_state == script[5 + max_new_tokens - valid : 5 + max_new_tokens] + [0] * (8 - valid)
    assert output.stats.rows[0].iterations_per_block[-1] == 2  # one jump, one confirmation


def test_bad_arguments_are_rejected():
    model = tiny_model("llama", vocab_size=VOCAB)
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="n_token"):
        jacobi_generate(model, prompt, n_token=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        jacobi_generate(model, prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="init"):
        jacobi_generate(model, prompt, init="zeros")
    with pytest.raises(ValueError, match="empty prompt"):
        jacobi_generate(model, prompt, torch.tensor([[0, 0, 0]]))
