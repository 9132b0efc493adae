"""Trajectory rows from a batch: blocks tile the greedy output, states end at the fixed point,
cleaning drops degenerate outputs with reasons, augmentation and retries are deterministic."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import char_tokenizer

from cllm import ar_generate, tiny_model
from cllm.data import rows_to_table, validate_table
from cllm.trajectory import (
    CollectConfig,
    augment_states,
    batch_seed,
    collect_trajectories,
    degenerate_reason,
)

N = 4


@pytest.fixture(scope="module")
def setup():
    tokenizer = char_tokenizer()
    model = tiny_model("llama", vocab_size=128, seed=3)
    texts = ["hello world", "a", "the quick brown fox jumps", "12+34="]
    prompts = [
        {"prompt_id": f"p{i}", "prompt_ids": tokenizer(text)["input_ids"], "label_ids": [5, 6, 2] if i else None}
        for i, text in enumerate(texts)
    ]
    return model, tokenizer, prompts


def greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    return ar_generate(model, torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                       eos_token_id=eos).new_tokens[0]


def test_rows_tile_the_greedy_output(setup):
    model, tokenizer, prompts = setup
    config = CollectConfig(n_token=N, max_new_tokens=11, min_loop_tokens=0)
    result = collect_trajectories(model, tokenizer, prompts, "tiny", config)
    assert result.rejected == {}
    validate_table(rows_to_table(result.rows), "batch", check_version=False)
    for prompt in prompts:
        rows = [r for r in result.rows if r.prompt_id == prompt["prompt_id"]]
        expected = greedy(model, prompt["prompt_ids"], 11, tokenizer.eos_token_id)
        assert [r.block_index for r in rows] == list(range(len(rows)))
        collected = [t for r in rows for t in r.states[-1][: r.fixed_length]]
        assert collected == expected[: len(collected)]
        # A last block whose first (verified) token ends the output needs no iteration: no row.
        assert len(rows) == len(expected) // N + (len(expected) % N >= 2)
        assert len(expected) - len(collected) == (len(expected) % N == 1)
        for r in rows:
            b = r.block_index
            assert r.prefix_ids == prompt["prompt_ids"] + expected[: b * N]
            assert r.prompt_length == len(prompt["prompt_ids"]) and r.prompt_ids == prompt["prompt_ids"]
            assert r.fixed_length == min(N, len(expected) - b * N)
            assert all(len(state) == N for state in r.states)
            assert r.states[0][0] == expected[b * N]  # the first token is verified from the start
            assert r.label_ids == prompt["label_ids"] and r.model == "tiny" and r.n_token == N
            assert r.iterations >= 1
        assert rows[-1].fixed_length < N or len(expected) == 11  # budget 11 = 2 full blocks + 3
    assert max(r.fixed_length for r in result.rows) == N


def test_retried_batch_gives_identical_rows(setup):
    model, tokenizer, prompts = setup
    config = CollectConfig(n_token=N, max_new_tokens=8, min_loop_tokens=0)
    first = collect_trajectories(model, tokenizer, prompts, "tiny", config)
    again = collect_trajectories(model, tokenizer, prompts, "tiny", config)
    assert first.rows == again.rows
    assert batch_seed(0, ["a", "b"]) == batch_seed(0, ["a", "b"]) != batch_seed(1, ["a", "b"])


def test_cleaning_drops_degenerate_outputs():
    assert degenerate_reason([7] * 10, 10, 4) == "degenerate output: one token repeated over 10 tokens"
    assert degenerate_reason([7] * 9, 10, 4) is None
    assert degenerate_reason([1, 2, 3] * 4, 12, 4) == "degenerate output: a 3-token pattern repeated over 12 tokens"
    assert degenerate_reason(list(range(50)), 10, 4) is None
    assert degenerate_reason([7] * 100, 0, 4) is None  # cleaning off


def test_cleaning_in_a_batch(setup):
    model, tokenizer, prompts = setup
    loose = CollectConfig(n_token=N, max_new_tokens=12, min_loop_tokens=0)
    strict = CollectConfig(n_token=N, max_new_tokens=12, min_loop_tokens=4, max_loop_period=2)
    kept = collect_trajectories(model, tokenizer, prompts, "tiny", loose)
    cleaned = collect_trajectories(model, tokenizer, prompts, "tiny", strict)
    outputs = {p["prompt_id"]: [t for r in kept.rows if r.prompt_id == p["prompt_id"]
                                for t in r.states[-1][: r.fixed_length]] for p in prompts}
    expected_rejects = {pid for pid, out in outputs.items() if degenerate_reason(out, 4, 2)}
    assert set(cleaned.rejected) == expected_rejects
    assert expected_rejects == {"p1"}  # its greedy output repeats one token 4 times
    assert all(reason.startswith("degenerate output") for reason in cleaned.rejected.values())
    assert [r for r in kept.rows if r.prompt_id not in expected_rejects] == cleaned.rows


def test_augmentation():
    rng = random.Random(0)
    states = [[1, 9, 9, 9], [1, 2, 9, 9], [1, 2, 3, 4]]
    augmented = augment_states(states, fixed_length=4, rng=rng)
    assert augmented[0] == states[0] and augmented[-1] == states[-1]
    assert states[1] in augmented and len(augmented) == 5  # one copy after each intermediate state
    first_copy = augmented[1]
    # 1 of the 3 wrong tokens (half, rounded down) corrected
    assert sum(a != b for a, b in zip(first_copy, states[-1])) == 2
    assert all(x in (s, f) for x, s, f in zip(first_copy, states[0], states[-1]))
    # positions past fixed_length are padding and never corrected
    padded = augment_states([[5, 8, 8, 8], [5, 6, 0, 0]], fixed_length=2, rng=rng)
    assert padded == [[5, 8, 8, 8], [5, 6, 0, 0]]


def test_augmented_batch_keeps_endpoints(setup):
    model, tokenizer, prompts = setup
    plain = collect_trajectories(model, tokenizer, prompts, "tiny",
                                 CollectConfig(n_token=N, max_new_tokens=8, min_loop_tokens=0))
    augmented = collect_trajectories(model, tokenizer, prompts, "tiny",
                                     CollectConfig(n_token=N, max_new_tokens=8, min_loop_tokens=0, augment=True))
    for a, p in zip(augmented.rows, plain.rows):
        assert a.states[0] == p.states[0] and a.states[-1] == p.states[-1]
        assert len(a.states) >= len(p.states)
