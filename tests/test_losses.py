"""Consistency and AR losses on hand-built tensors and on a tiny model's own trajectories."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import PAD, hand_rows, trajectory_rows

from cllm import tiny_model
from cllm.collate import collate_packed, collate_states
from cllm.losses import (
    LossConfig,
    LossTerms,
    compute_losses,
    consistency_distance,
    consistency_mask,
)


def test_mask_starts_at_first_difference_and_stops_at_fixed_length():
    fixed_point = torch.tensor([[1, 2, 3, 4, 5]])
    states = torch.tensor([[1, 2, 9, 4, 9], [1, 2, 3, 4, 5], [7, 2, 3, 4, 5]])
    mask = consistency_mask(states, fixed_point, torch.tensor([5, 5, 3]))
    assert mask.tolist() == [
        [False, False, True, True, True],  # from the first wrong token on, right ones after it included
        [False] * 5,  # the fixed point itself: nothing to learn
        [True, True, True, False, False],  # a padded last block: nothing past fixed_length
    ]
    # a difference only in the padded tail does not count
    assert not consistency_mask(torch.tensor([[1, 2, 9]]), torch.tensor([[1, 2, 0]]), torch.tensor([2])).any()


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 7, generator=generator)
    target = torch.randn(2, 4, 7, generator=generator)
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    tokens = torch.randint(7, (2, 4), generator=generator)
    return student, target, mask, tokens


def test_forward_and_reverse_kl_equal_a_direct_computation(logits):
    student, target, mask, tokens = logits
    p_target, p_student = target.softmax(-1), student.softmax(-1)
    forward = sum(
        sum(p_target[b, i, v] * torch.log(p_target[b, i, v] / p_student[b, i, v]) for v in range(7))
        for b, i in mask.nonzero().tolist()
    )
    reverse = sum(
        sum(p_student[b, i, v] * torch.log(p_student[b, i, v] / p_target[b, i, v]) for v in range(7))
        for b, i in mask.nonzero().tolist()
    )
    cross_entropy = sum(-torch.log(p_student[b, i, tokens[b, i]]) for b, i in mask.nonzero().tolist())
    for distance, expected in (("fkl", forward), ("rkl", reverse), ("ce", cross_entropy)):
        terms = consistency_distance(student, target, tokens, mask, distance)
        assert int(terms.tokens) == 6
        torch.testing.assert_close(terms.total, expected, rtol=1e-5, atol=1e-6)
    # and forward KL matches torch's own KL on the masked positions
    kl = torch.nn.functional.kl_div(student.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="none")
    torch.testing.assert_close(consistency_distance(student, target, tokens, mask, "fkl").total, kl.sum(-1)[mask].sum())


def test_no_gradient_reaches_the_detached_target(logits):
    student, target, mask, tokens = logits
    student.requires_grad_(True)
    target.requires_grad_(True)
    for distance in ("fkl", "rkl"):
        student.grad = None
        consistency_distance(student, target, tokens, mask, distance).total.backward()
        assert target.grad is None
        assert student.grad.abs().sum() > 0
        assert student.grad[~mask].abs().sum() == 0  # masked positions contribute nothing


def test_empty_mask_gives_zero_with_a_graph(logits):
    student, target, _, tokens = logits
    student.requires_grad_(True)
    terms = consistency_distance(student, target, tokens, torch.zeros(2, 4, dtype=torch.bool), "fkl")
    mean = terms.mean()
    assert mean.item() == 0.0 and mean.requires_grad
    assert (LossTerms(torch.tensor(2.0), torch.tensor(1)) + LossTerms(torch.tensor(4.0), torch.tensor(3))).mean() == 1.5


@pytest.fixture(scope="module")
def model_and_rows():
    model = tiny_model("llama", vocab_size=64, seed=1)
    prompts = [[5, 9, 13, 2], [7, 8, 9, 10, 11, 12, 40, 41], [33, 2, 17]]
    rows = trajectory_rows(model, prompts, n_token=5, max_new_tokens=13)
    assert max(len(row.states) for row in rows) >= 3  # multi-state trajectories exist
    assert any(row.fixed_length < 5 for row in rows)  # and padded last blocks
    return model, rows


def test_zero_consistency_when_states_equal_the_fixed_point(model_and_rows):
    model, rows = model_and_rows
    converged = [dataclasses.replace(row, states=[row.states[-1]] * 3) for row in rows]
    for packed in (False, True):
        batch = collate_packed(converged, PAD) if packed else collate_states(converged, PAD)
        output = compute_losses(model, batch, LossConfig())
        assert output.consistency.total.item() == 0.0
        assert int(output.consistency.tokens) == 0
        assert output.ar.mean().item() > 0  # the AR loss still trains


def test_local_differs_from_global_on_multi_state_trajectories(model_and_rows):
    model, rows = model_and_rows
    multi = [row for row in rows if len(row.states) >= 3]
    batch = collate_states(multi, PAD, state_indices=[0] * len(multi))
    local = compute_losses(model, batch, LossConfig(kind="local"))
    global_ = compute_losses(model, batch, LossConfig(kind="global"))
    assert local.consistency.mean().item() > 0 and global_.consistency.mean().item() > 0
    assert abs(local.consistency.mean().item() - global_.consistency.mean().item()) > 1e-3
    torch.testing.assert_close(local.ar.mean(), global_.ar.mean())  # same AR sequence


def _one_state_at_a_time(model, rows, config):
    """Every student state of every row through the plain (unpacked) path, summed."""
    consistency = ar = None
    states = 0
    for state_index in range(max(len(row.states) for row in rows) - 1):
        eligible = [row for row in rows if len(row.states) - 1 > state_index]
        batch = collate_states(eligible, PAD, labels=True, state_indices=[state_index] * len(eligible))
        output = compute_losses(model, batch, config)
        consistency = output.consistency if consistency is None else consistency + output.consistency
        states += output.states
    ar = compute_losses(model, collate_states(rows, PAD, labels=True), config).ar
    return consistency, ar, states


@pytest.mark.parametrize("kind", ["global", "local"])
@pytest.mark.parametrize("distance", ["fkl", "rkl", "ce"])
def test_packed_equals_one_state_at_a_time(model_and_rows, kind, distance):
    model, rows = model_and_rows
    config = LossConfig(kind=kind, distance=distance)
    consistency, ar, states = _one_state_at_a_time(model, rows, config)
    packed = compute_losses(model, collate_packed(rows, PAD, labels=True), config)
    assert packed.states == states
    assert int(packed.consistency.tokens) == int(consistency.tokens) > 0
    torch.testing.assert_close(packed.consistency.total, consistency.total, rtol=1e-4, atol=1e-4)
    assert int(packed.ar.tokens) == int(ar.tokens)
    torch.testing.assert_close(packed.ar.total, ar.total, rtol=1e-4, atol=1e-4)


def test_packed_gradients_equal_unpacked(model_and_rows):
    """The packed loss back-propagates exactly like the per-state computation (global fkl + AR)."""
    model, rows = model_and_rows
    config = LossConfig()
    model.zero_grad()
    consistency, ar, _ = _one_state_at_a_time(model, rows, config)
    (consistency.mean() + config.ar_weight * ar.mean()).backward()
    unpacked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compute_losses(model, collate_packed(rows, PAD), config).loss.backward()
    for expected, parameter in zip(unpacked, model.parameters()):
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-3, atol=1e-5)
    model.zero_grad()


def test_labels_target_and_total(model_and_rows):
    model, rows = model_and_rows
    batch = collate_packed(rows, PAD, labels=True)
    fixed = compute_losses(model, batch, LossConfig(ar_weight=10.0))
    labels = compute_losses(model, batch, LossConfig(ar_target="labels", ar_weight=2.0))
    # AR trains generated ids only, never the prompt: earlier blocks + the fixed point, or the answer
    assert int(fixed.ar.tokens) == sum(row.block_index * 5 + row.fixed_length for row in rows)
    assert int(labels.ar.tokens) == sum(len(row.label_ids) for row in rows)
    torch.testing.assert_close(fixed.loss, fixed.consistency.mean() + 10.0 * fixed.ar.mean())
    torch.testing.assert_close(labels.loss, labels.consistency.mean() + 2.0 * labels.ar.mean())
    with pytest.raises(ValueError, match="labels=True"):
        compute_losses(model, collate_packed(rows, PAD), LossConfig(ar_target="labels"))
    with pytest.raises(ValueError, match="distance"):
        LossConfig(distance="kl")


def test_hand_rows_losses_are_finite():
    model = tiny_model("qwen2", vocab_size=64, seed=2)
    for packed in (False, True):
        batch = collate_packed(hand_rows(), PAD) if packed else collate_states(hand_rows(), PAD)
        output = compute_losses(model, batch, LossConfig(kind="local"))
        assert torch.isfinite(output.loss)
