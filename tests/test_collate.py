"""Collate: trajectory rows with mixed prefix lengths into padded one-state and packed batches."""

from __future__ import annotations

import random

import pytest
from helpers import PAD, hand_rows, row, trajectory_rows

from cllm import tiny_model
from cllm.collate import (
    PackedBatch,
    batch_tokens,
    collate,
    collate_packed,
    collate_states,
    length_groups,
    packed_width,
    sample_states,
)
from cllm.metrics import IGNORE


def test_prompt_ids_strip_earlier_blocks():
    rows = hand_rows()
    assert rows[0].prompt_ids == [5, 6, 7, 8]
    assert rows[1].prompt_ids == [20, 21, 22]  # one earlier block of 3 ids


def test_state_batch_mixed_prefix_lengths():
    rows = hand_rows()
    batch = collate_states(rows, PAD, labels=True, state_indices=[1, 0])
    assert batch.prefix_lengths.tolist() == [4, 6]
    student = batch.student_sequences
    assert student.input_ids.shape == (2, 9)
    assert student.input_ids[0].tolist() == [5, 6, 7, 8, 9, 4, 2, PAD, PAD]
    assert student.attention_mask[0].tolist() == [1] * 7 + [0, 0]
    assert student.input_ids[1].tolist() == [20, 21, 22, 23, 24, 25, 30, 1, 1]
    assert batch.next_state_sequences.input_ids[0, 4:7].tolist() == [9, 4, 3]
    assert batch.next_state_sequences.input_ids[1, 6:].tolist() == [30, 31, PAD]
    assert batch.fixed_point.tolist() == [[9, 4, 3], [30, 31, PAD]]
    assert batch.fixed_length.tolist() == [3, 2]
    # fixed-point labels stop at the valid part: row 1 trains up to token 31, not the pad after it,
    # and skip the prompt: only generated ids (earlier blocks, then the fixed point) are trained
    labels = batch.fixed_point_sequences.labels
    assert labels[0].tolist() == [IGNORE, IGNORE, IGNORE, 9, 4, 3, IGNORE, IGNORE, IGNORE]
    assert labels[1].tolist() == [IGNORE, IGNORE, 23, 24, 25, 30, 31, IGNORE, IGNORE]
    assert batch.label_sequences.input_ids[1, :4].tolist() == [20, 21, 22, 13]
    assert batch.label_sequences.labels[1, :4].tolist() == [IGNORE, IGNORE, 13, IGNORE]


def test_state_sampling_never_picks_the_fixed_point():
    rows = hand_rows()
    seen = set()
    rng = random.Random(1)
    for _ in range(40):
        batch = collate_states(rows, PAD, rng=rng)
        assert batch.has_target.tolist() == [True, True]
        assert batch.student_state[1].tolist() == [30, 1, 1]  # the only state before its fixed point
        seen.add(tuple(batch.student_state[0].tolist()))
    assert seen == {(9, 1, 2), (9, 4, 2)}


def test_one_state_trajectory_has_no_target():
    batch = collate_states([row("x", 0, 2, [1, 2], [[3, 4]])], PAD)
    assert batch.has_target.tolist() == [False]


def test_packed_layout_mask_and_positions():
    rows = hand_rows()
    batch = collate_packed(rows, PAD, labels=True)
    assert isinstance(batch, PackedBatch)
    assert batch.input_ids.shape == (2, 13)  # row 0: 4 + 3·3; row 1: 6 + 2·2 (fixed_length 2)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9, 1, 2, 9, 4, 2, 9, 4, 3]
    assert batch.input_ids[1].tolist() == [20, 21, 22, 23, 24, 25, 30, 1, 30, 31, PAD, PAD, PAD]
    assert batch.attention_mask[1].tolist() == [1] * 10 + [0] * 3
    assert batch.position_ids[1, 6:10].tolist() == [6, 7, 6, 7]
    # positions restart after the prefix for each state
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 4, 5, 6]
    assert batch.state_counts.tolist() == [3, 2]
    assert batch.states[1, 2].tolist() == [30, 31, PAD]  # missing state repeats the fixed point

    allowed = batch.attention_allowed[0, 0]
    second_state = range(7, 10)
    for query in second_state:
        keys = allowed[query].nonzero().flatten().tolist()
        assert keys == [0, 1, 2, 3] + list(range(7, query + 1))  # prefix + itself, causally
    assert allowed[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert bool(batch.attention_allowed.any(dim=-1).all())  # no fully masked query (pads see themselves)

    # token 0 of each state is predicted by the last prefix logit, token i by the state's own i - 1
    assert batch.prediction_index[0].tolist() == [[3, 4, 5], [3, 7, 8], [3, 10, 11]]
    # row 1's position 2 is past its fixed_length: never trained, it points at the state's last token
    assert batch.prediction_index[1, :2].tolist() == [[5, 6, 7], [5, 8, 9]]
    # AR labels: the prefix's generated ids (not the prompt), then the valid fixed point at its
    # prediction indices
    assert batch.ar_labels[0].tolist() == [IGNORE, IGNORE, IGNORE, 9] + [IGNORE] * 6 + [4, 3, IGNORE]
    assert batch.ar_labels[1].tolist() == [IGNORE, IGNORE, 23, 24, 25, 30, IGNORE, IGNORE, 31] + [IGNORE] * 4
    assert batch_tokens(batch) == 13 + 10 + int(batch.label_sequences.attention_mask.sum())


def test_collate_real_trajectories_any_batch_size():
    model = tiny_model("llama", vocab_size=64, seed=3)
    prompts = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 40], [33, 2, 17, 21, 60]]
    rows = trajectory_rows(model, prompts, n_token=4, max_new_tokens=10)
    assert len({len(r.prefix_ids) for r in rows}) > 3
    for size in (1, 2, len(rows)):
        for packed in (False, True):
            batch = collate(rows[:size], PAD, packed=packed, labels=True)
            assert batch_tokens(batch) > 0
            if packed:
                assert batch.states.shape[0] == size


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "empty list"),
        ([row("x", 0, 1, [1], [[1, 2], [1]])], "must have 2 ids"),
        ([row("x", 0, 0, [], [[1, 2]])], "empty prefix"),
        ([row("x", 0, 1, [1], [[1, 2]], fixed_length=3)], "fixed_length 3, expected 1..2"),
    ],
)
def test_collate_rejects_bad_rows(rows, message):
    with pytest.raises(ValueError, match=message):
        collate_packed(rows, PAD)


def test_labels_required_when_asked():
    with pytest.raises(ValueError, match="no label_ids"):
        collate_states([row("x", 0, 1, [1], [[1, 2]])], PAD, labels=True)


def test_length_groups_are_full_batches_of_similar_length():
    lengths = list(range(50, 0, -1))
    random.Random(1).shuffle(lengths)
    batches = length_groups(lengths, lambda length: length, batch_size=4, rng=random.Random(0))
    assert [len(batch) for batch in batches] == [4] * 12  # the 2 longest, left over, are dropped
    assert sorted(length for batch in batches for length in batch) == list(range(1, 49))
    assert all(max(batch) - min(batch) == 3 for batch in batches)  # consecutive lengths
    assert [min(batch) for batch in batches] != sorted(min(batch) for batch in batches)  # in a random order


def test_length_groups_cut_the_padding_of_real_rows():
    model = tiny_model("llama", vocab_size=64, seed=3)
    prompts = [[5] * length for length in (2, 30, 3, 28, 4, 25, 5, 27)]
    rows = trajectory_rows(model, prompts, n_token=4, max_new_tokens=8)
    def padded(batches):
        return sum(collate_packed(batch, PAD).input_ids.numel() for batch in batches)
    grouped = length_groups(rows, packed_width, batch_size=2, rng=random.Random(0))
    by_width = sorted(rows, key=packed_width)
    mixed = [[by_width[index], by_width[-1 - index]] for index in range(len(rows) // 2)]  # short with long
    assert sorted(id(row) for batch in grouped for row in batch) == sorted(id(row) for row in rows)
    assert padded(grouped) < 0.8 * padded(mixed)
    assert packed_width(rows[0]) == collate_packed(rows[:1], PAD).input_ids.shape[1]


def test_sample_states_keeps_the_fixed_point_and_the_order():
    states = [[index, 0] for index in range(10)]
    full = row("x", 0, 1, [1], states)
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        sampled = sample_states(full, 4, rng)
        picked = [state[0] for state in sampled.states]
        assert len(picked) == 4 and picked[-1] == 9 and picked == sorted(set(picked))
        seen.update(picked[:-1])
    assert seen == set(range(9))  # every state before the fixed point is drawn
    short = row("y", 0, 1, [1], states[:3])
    assert sample_states(short, 4, rng) is short
    with pytest.raises(ValueError, match="at least 2 states"):
        sample_states(full, 1, rng)
