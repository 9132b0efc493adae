"""Jacobi Forcing's objective: the noise schedule, the packed layout and its noisy-context mask,
packed losses and gradients equal to one block at a time, and the effect on a tiny model's TPF."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import PAD, row, trajectory_rows

from cllm import jacobi_generate, tiny_model
from cllm.forcing import (
    NoiseSchedule,
    collate_forcing,
    first_difference,
    forcing_width,
    group_responses,
    noise_ratio,
    noisy_state_index,
)
from cllm.losses import LossConfig, compute_losses, consistency_distance, next_token_loss
from cllm.metrics import IGNORE
from cllm.trajectory import CollectConfig
from cllm.trajectory import trajectory_rows as collect_rows

N_TOKEN = 4


def test_schedule_rises_linearly_within_each_window():
    schedule = NoiseSchedule(window=4)
    assert [schedule.target(j) for j in range(6)] == pytest.approx([0, 1 / 3, 2 / 3, 1, 0, 1 / 3])
    assert [schedule.target(j, phase=2) for j in range(4)] == pytest.approx([2 / 3, 1, 0, 1 / 3])
    assert [schedule.window_start(j, phase=2) for j in range(5)] == [0, 0, 2, 2, 2]
    assert NoiseSchedule(window=1).target(5) == 1.0
    with pytest.raises(ValueError, match="window"):
        NoiseSchedule(window=0)


def test_noisy_state_is_the_one_nearest_the_target_noise():
    fixed = [1, 2, 3, 4]
    block = row("p", 0, 2, [7, 8], [[1, 9, 9, 9], [1, 2, 9, 9], [1, 2, 3, 9], fixed])
    assert [noise_ratio(state, fixed, 4) for state in block.states] == [0.75, 0.5, 0.25, 0.0]
    assert noise_ratio([1, 2, 9, 9], fixed, valid=2) == 0.0  # differences past the valid part do not count
    assert first_difference([1, 2, 9, 9], fixed, 4) == 2
    assert [noisy_state_index(block, target) for target in (1.0, 0.6, 0.3, 0.0)] == [0, 1, 2, 3]


def test_responses_need_every_block():
    blocks = [row("a", 1, 2, [7, 8, 1, 2, 3, 4], [[5, 6, 7, 8]]), row("a", 0, 2, [7, 8], [[1, 2, 3, 4]])]
    assert [r.block_index for r in group_responses(blocks)[0]] == [0, 1]
    with pytest.raises(ValueError, match="blocks \\[1\\]"):
        group_responses(blocks[:1])


@pytest.fixture(scope="module")
def model_and_responses():
    model = tiny_model("llama", vocab_size=64, seed=1)
    prompts = [[5, 9, 13, 2], [7, 8, 9, 10, 11, 12, 40, 41], [33, 2, 17]]
    responses = group_responses(trajectory_rows(model, prompts, n_token=N_TOKEN, max_new_tokens=14))
    assert max(len(blocks) for blocks in responses) >= 4  # several windows at window=2
    assert any(blocks[-1].fixed_length < N_TOKEN for blocks in responses)  # and padded last blocks
    return model, responses


def _layout(batch, b: int, prompt_length: int, blocks: int) -> dict[str, range]:
    """Packed index ranges of one row: prompt, noisy_j, clean_j."""
    spans = {"prompt": range(prompt_length)}
    for j in range(blocks):
        start = prompt_length + 2 * j * N_TOKEN
        spans[f"noisy{j}"] = range(start, start + N_TOKEN)
        spans[f"clean{j}"] = range(start + N_TOKEN, start + 2 * N_TOKEN)
    return spans


def test_packed_layout_and_positions(model_and_responses):
    _, responses = model_and_responses
    schedule = NoiseSchedule(window=2)
    batch = collate_forcing(responses, PAD, schedule, phases=[0] * len(responses))
    for b, blocks in enumerate(responses):
        spans = _layout(batch, b, blocks[0].prompt_length, len(blocks))
        assert batch.input_ids[b, list(spans["prompt"])].tolist() == blocks[0].prompt_ids
        for j, block in enumerate(blocks):
            noisy = block.states[noisy_state_index(block, schedule.target(j))]
            assert batch.input_ids[b, list(spans[f"noisy{j}"])].tolist() == noisy
            assert batch.input_ids[b, list(spans[f"clean{j}"])].tolist() == block.fixed_point
            expected = list(range(len(block.prefix_ids), len(block.prefix_ids) + N_TOKEN))
            assert batch.position_ids[b, list(spans[f"noisy{j}"])].tolist() == expected
            assert batch.position_ids[b, list(spans[f"clean{j}"])].tolist() == expected
        # AR: every generated token once, on the clean blocks
        generated = [t for block in blocks for t in block.fixed_point[: block.fixed_length]]
        labels = batch.ar_labels[b]
        assert labels[labels != IGNORE].tolist() == generated
        # what `forcing_width` promises (training's length groups sort by it): the row's real tokens
        assert batch.attention_mask[b].sum().item() == forcing_width(blocks)


def test_no_noisy_token_sees_a_later_block_or_its_own_clean_copy(model_and_responses):
    _, responses = model_and_responses
    schedule = NoiseSchedule(window=2)
    phases = [1, 0, 1]
    batch = collate_forcing(responses, PAD, schedule, phases=phases)
    for b, (blocks, phase) in enumerate(zip(responses, phases)):
        spans = _layout(batch, b, blocks[0].prompt_length, len(blocks))
        allowed = batch.attention_allowed[b, 0]
        for j in range(len(blocks)):
            start = schedule.window_start(j, phase)
            for query in spans[f"noisy{j}"]:
                keys = set(allowed[query].nonzero().flatten().tolist())
                expected = set(spans["prompt"]) | {k for k in spans[f"noisy{j}"] if k <= query}
                expected |= {k for i in range(start) for k in spans[f"clean{i}"]}
                expected |= {k for i in range(start, j) for k in spans[f"noisy{i}"]}
                assert keys == expected, (b, j, query)
            for query in spans[f"clean{j}"]:
                keys = set(allowed[query].nonzero().flatten().tolist())
                expected = set(spans["prompt"]) | {k for i in range(j) for k in spans[f"clean{i}"]}
                assert keys == expected | {k for k in spans[f"clean{j}"] if k <= query}
    assert bool(batch.attention_allowed.any(dim=-1).all())  # no fully masked query (pads see themselves)


def test_noisy_logits_ignore_what_comes_later(model_and_responses):
    """Changing every later block, and block j's clean copy, leaves noisy block j's logits as they are."""
    model, responses = model_and_responses
    blocks = max(responses, key=len)
    schedule = NoiseSchedule(window=8)
    batch = collate_forcing([blocks], PAD, schedule, phases=[0])
    j = 1
    spans = _layout(batch, 0, blocks[0].prompt_length, len(blocks))
    changed = batch.input_ids.clone()
    later = [k for i in range(j + 1, len(blocks)) for k in (*spans[f"noisy{i}"], *spans[f"clean{i}"])]
    changed[0, later + list(spans[f"clean{j}"])] = 63
    allowed = batch.attention_allowed
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = [model(input_ids=ids, attention_mask=mask, position_ids=batch.position_ids).logits[0]
                  for ids in (batch.input_ids, changed)]
    noisy = list(spans[f"noisy{j}"])
    torch.testing.assert_close(logits[0][noisy], logits[1][noisy])
    assert not torch.allclose(logits[0][later], logits[1][later])


def _one_block_at_a_time(model, responses, schedule, phases, config):
    """Every noisy block through plain causal forwards: the student reads prompt + the clean blocks
    of earlier windows + the noisy blocks of its window up to itself; the target reads prompt +
    the clean blocks up to its own; AR reads prompt + all clean blocks."""
    consistency = ar = None
    states = 0
    for blocks, phase in zip(responses, phases):
        prompt = blocks[0].prompt_ids
        generated = [t for block in blocks for t in block.fixed_point[: block.fixed_length]]
        noisy = [block.states[noisy_state_index(block, schedule.target(j, phase))] for j, block in enumerate(blocks)]
        for j, block in enumerate(blocks):
            start = schedule.window_start(j, phase)
            context = [t for b in blocks[:start] for t in b.fixed_point] + [t for s in noisy[start:j] for t in s]
            student = prompt + context + noisy[j]
            target = prompt + [t for b in blocks[: j + 1] for t in b.fixed_point]
            at = torch.arange(N_TOKEN) + len(prompt) + j * N_TOKEN
            student_logits = model(input_ids=torch.tensor([student])).logits[0, at]
            target_logits = model(input_ids=torch.tensor([target])).logits[0, at]
            predicted = j * N_TOKEN + torch.arange(N_TOKEN) + 1
            first_wrong = first_difference(noisy[j], block.fixed_point, block.fixed_length)
            mask = (predicted < len(generated)) & (torch.arange(N_TOKEN) >= first_wrong)
            tokens = torch.tensor(generated + [PAD] * (N_TOKEN + 1))[predicted]
            terms = consistency_distance(student_logits, target_logits, tokens, mask, config.distance)
            consistency = terms if consistency is None else consistency + terms
            states += bool(mask.any())
        sequence = prompt + [t for b in blocks for t in b.fixed_point]
        labels = torch.full((len(sequence),), IGNORE)
        labels[len(prompt) - 1 : len(prompt) - 1 + len(generated)] = torch.tensor(generated)
        terms = next_token_loss(model(input_ids=torch.tensor([sequence])).logits, labels[None])
        ar = terms if ar is None else ar + terms
    return consistency, ar, states


@pytest.mark.parametrize("distance", ["fkl", "ce"])
@pytest.mark.parametrize("window", [2, 8])
def test_packed_equals_one_block_at_a_time(model_and_responses, distance, window):
    model, responses = model_and_responses
    schedule, phases, config = NoiseSchedule(window=window), [1, 0, 1], LossConfig(distance=distance)
    consistency, ar, states = _one_block_at_a_time(model, responses, schedule, phases, config)
    packed = compute_losses(model, collate_forcing(responses, PAD, schedule, phases=phases), config)
    assert packed.states == states > 0
    assert int(packed.consistency.tokens) == int(consistency.tokens) > 0
    torch.testing.assert_close(packed.consistency.total, consistency.total, rtol=1e-4, atol=1e-4)
    assert int(packed.ar.tokens) == int(ar.tokens)
    torch.testing.assert_close(packed.ar.total, ar.total, rtol=1e-4, atol=1e-4)


def test_packed_gradients_equal_one_block_at_a_time(model_and_responses):
    model, responses = model_and_responses
    schedule, phases, config = NoiseSchedule(window=2), [0, 1, 0], LossConfig()
    model.zero_grad()
    consistency, ar, _ = _one_block_at_a_time(model, responses, schedule, phases, config)
    (consistency.mean() + config.ar_weight * ar.mean()).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compute_losses(model, collate_forcing(responses, PAD, schedule, phases=phases), config).loss.backward()
    for want, parameter in zip(expected, model.parameters()):
        torch.testing.assert_close(parameter.grad, want, rtol=1e-3, atol=1e-5)
    model.zero_grad()


def test_phases_are_drawn_from_the_rng(model_and_responses):
    _, responses = model_and_responses
    schedule = NoiseSchedule(window=4)
    first = collate_forcing(responses, PAD, schedule, rng=random.Random(3))
    assert torch.equal(first.input_ids, collate_forcing(responses, PAD, schedule, rng=random.Random(3)).input_ids)
    drawn = {tuple(collate_forcing(responses, PAD, schedule, rng=random.Random(seed)).input_ids.flatten().tolist())
             for seed in range(8)}
    assert len(drawn) > 1  # other phases pick other noisy states


@pytest.mark.slow
def test_jacobi_forcing_raises_jacobi_tpf():
    """Trained on its own trajectories from a few random initial guesses per prompt, the model
    reaches the fixed point in fewer iterations from guesses it has never seen."""
    from test_train import PROMPTS, VOCAB

    def tpf(model) -> float:
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        output = jacobi_generate(model, input_ids, attention_mask, n_token=8, max_new_tokens=32, pad_token_id=PAD,
                                 generator=torch.Generator().manual_seed(12345))
        return output.stats.total.tokens_per_forward

    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    prompts = PROMPTS[:4]
    before = tpf(model)
    rows = [row for seed in range(4) for row in collect_rows(
        model, [{"prompt_id": f"p{index}-{seed}", "prompt_ids": prompt} for index, prompt in enumerate(prompts)],
        "tiny", CollectConfig(n_token=8, max_new_tokens=32, min_loop_tokens=0, seed=seed)).rows]
    responses = group_responses(rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(80):
        batch = collate_forcing(responses, PAD, NoiseSchedule(window=2), rng=rng)
        output = compute_losses(model, batch, LossConfig(ar_weight=1.0))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    model.eval()
    after = tpf(model)
    print(f"Jacobi TPF on the training prompts: before {before:.2f}, after {after:.2f}")
    assert before < 1.2
    assert after > 1.25 * before
