"""Turn trajectory rows into padded training batches of any size (mixed prefix lengths are fine).

A row is one (prompt, block): a `cllm.data.TrajectoryRow`.

Two layouts, both right-padded, consumed by `cllm.losses`:
- `StateBatch`: one sampled student state per row, as separate prefix + state sequences (student,
  next state, fixed point), for plain causal forwards;
- `PackedBatch`: prefix + every state of the block in one sequence, with the 4D mask and position
  ids that make each state see only the prefix and itself. Each state is packed up to its row's
  `fixed_length` only: later positions are never trained and, the mask being causal, change no
  trained logit, so a last block that ends early costs only its real tokens.

AR labels cover only generated text (earlier blocks and the fixed point, or the reference answer),
never the prompt. Chat models and the toy teachers are trained with the prompt masked, so they
predict prompt tokens poorly; at w = 10 those tokens would swamp the loss and cost accuracy.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from cllm.data import TrajectoryRow
from cllm.metrics import IGNORE, right_pad

Item = TypeVar("Item")


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if dataclasses.is_dataclass(value):
        return value.to(device)
    return value


class Movable:
    def to(self, device: torch.device | str):
        """A copy with every tensor on `device`."""
        return dataclasses.replace(
            self, **{f.name: _to(getattr(self, f.name), device) for f in dataclasses.fields(self)}
        )


@dataclass
class SequenceBatch(Movable):
    """Right-padded token sequences. `labels[b, t]` is the token that logit t must predict, or
    IGNORE where no next-token loss applies."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 on real tokens
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)


@dataclass
class StateBatch(Movable):
    """One student state per row: state j, its next state j + 1, and the fixed point, each after
    the row's prefix (all three sequences have the same length per row)."""

    prefix_lengths: torch.Tensor  # (B,)
    student_sequences: SequenceBatch  # prefix + state j
    next_state_sequences: SequenceBatch  # prefix + state j + 1 (the local target)
    fixed_point_sequences: SequenceBatch  # prefix + fixed point; labels cover its valid part
    student_state: torch.Tensor  # (B, n)
    fixed_point: torch.Tensor  # (B, n)
    fixed_length: torch.Tensor  # (B,)
    has_target: torch.Tensor  # (B,) bool: False for a one-state trajectory (nothing to learn)
    label_sequences: SequenceBatch | None  # prompt + label_ids, when collated with labels

    @property
    def rows(self) -> int:
        return self.prefix_lengths.shape[0]


@dataclass
class PackedBatch(Movable):
    """prefix + state_0 + … + state_{k-1} per row, each state cut to the row's fixed_length,
    right-padded to (B, L)."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 on real tokens
    position_ids: torch.Tensor  # (B, L): the prefix counts from 0, every state restarts after it
    attention_allowed: torch.Tensor  # (B, 1, L, L) bool: query may attend to key
    states: torch.Tensor  # (B, K, n), rows with fewer states repeat their fixed point
    state_counts: torch.Tensor  # (B,) k per row; the fixed point is state k - 1
    fixed_length: torch.Tensor  # (B,)
    prediction_index: torch.Tensor  # (B, K, n): index of the logit that predicts states[b, j, i]
    # (for i >= fixed_length, which no loss counts, that of the state's last packed token)
    ar_labels: torch.Tensor  # (B, L): next-token labels of prefix + fixed point, IGNORE elsewhere
    label_sequences: SequenceBatch | None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def _check_rows(rows: Sequence[TrajectoryRow], labels: bool) -> int:
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    n_token = rows[0].n_token
    for row in rows:
        if not row.prefix_ids:
            raise ValueError(f"row {row.prompt_id!r} block {row.block_index} has an empty prefix")
        if any(len(state) != n_token for state in row.states):
            raise ValueError(f"all states in a batch must have {n_token} ids (row {row.prompt_id!r})")
        if not 1 <= row.fixed_length <= n_token:
            raise ValueError(f"row {row.prompt_id!r} has fixed_length {row.fixed_length}, expected 1..{n_token}")
        if labels and row.label_ids is None:
            raise ValueError(f"row {row.prompt_id!r} has no label_ids, needed for the labels AR target")
    return n_token


# -- plain sequences -----------------------------------------------------------------------


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    trained_lengths: Sequence[int] | None = None,
    prompt_lengths: Sequence[int] | None = None,
) -> SequenceBatch:
    """Right-pad `sequences`. Next-token labels cover each sequence's tokens after its first
    `prompt_lengths` (none by default) and up to its first `trained_lengths` (all by default),
    aligned to the logits: logit t predicts token t + 1."""
    input_ids, attention_mask, token_labels = right_pad(sequences, pad_token_id, prompt_lengths, trained_lengths)
    labels = torch.full_like(token_labels, IGNORE)
    labels[:, :-1] = token_labels[:, 1:]
    batch, width = input_ids.shape
    position_ids = torch.arange(width).expand(batch, width).clone()
    return SequenceBatch(input_ids, attention_mask, position_ids, labels)


def label_batch(rows: Sequence[TrajectoryRow], pad_token_id: int) -> SequenceBatch:
    """Prompt + ground-truth answer per row, labels on the answer (the `labels` AR target)."""
    prompts = [row.prompt_ids for row in rows]
    return pad_sequences(
        [prompt + list(row.label_ids) for prompt, row in zip(prompts, rows)],
        pad_token_id,
        prompt_lengths=[len(prompt) for prompt in prompts],
    )


# -- one state per row -----------------------------------------------------------------------


def collate_states(
    rows: Sequence[TrajectoryRow],
    pad_token_id: int,
    rng: random.Random | None = None,
    labels: bool = False,
    state_indices: Sequence[int] | None = None,
) -> StateBatch:
    """Sample one student state per row, uniformly among the states before the fixed point
    (`state_indices` picks them instead), and lay out its three sequences."""
    n_token = _check_rows(rows, labels)
    rng = rng or random.Random(0)
    prefixes, students, nexts, fixed_points, fixed_lengths, has_target = [], [], [], [], [], []
    for b, row in enumerate(rows):
        states = [list(state) for state in row.states]
        last = len(states) - 1
        if last == 0:
            index = 0
        elif state_indices is not None:
            index = min(state_indices[b], last - 1)
        else:
            index = rng.randrange(last)
        prefixes.append(list(row.prefix_ids))
        students.append(states[index])
        nexts.append(states[min(index + 1, last)])
        fixed_points.append(states[last])
        fixed_lengths.append(row.fixed_length)
        has_target.append(last > 0)
    prefix_lengths = [len(prefix) for prefix in prefixes]
    return StateBatch(
        prefix_lengths=torch.tensor(prefix_lengths),
        student_sequences=pad_sequences([p + s for p, s in zip(prefixes, students)], pad_token_id),
        next_state_sequences=pad_sequences([p + s for p, s in zip(prefixes, nexts)], pad_token_id),
        fixed_point_sequences=pad_sequences(
            [p + f for p, f in zip(prefixes, fixed_points)],
            pad_token_id,
            trained_lengths=[length + valid for length, valid in zip(prefix_lengths, fixed_lengths)],
            prompt_lengths=[row.prompt_length for row in rows],
        ),
        student_state=torch.tensor(students, dtype=torch.long).view(len(rows), n_token),
        fixed_point=torch.tensor(fixed_points, dtype=torch.long).view(len(rows), n_token),
        fixed_length=torch.tensor(fixed_lengths),
        has_target=torch.tensor(has_target),
        label_sequences=label_batch(rows, pad_token_id) if labels else None,
    )


# -- every state in one sequence ---------------------------------------------------------------

# Segment ids of a packed sequence: the shared prefix (every segment sees it) and padding; the
# packed parts (states, blocks) are segments 0, 1, ...
PREFIX_SEGMENT, PAD_SEGMENT = -1, -2


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(..., L, L) bool from segment ids (..., L): a query sees the keys up to itself that lie in
    the prefix or in its own segment. Pad queries match their own segment (pads), so no query
    row is fully masked."""
    width = segments.shape[-1]
    causal = torch.ones((width, width), dtype=torch.bool, device=segments.device).tril()
    query, key = segments[..., :, None], segments[..., None, :]
    return causal & ((key == PREFIX_SEGMENT) | (query == key))


def collate_packed(rows: Sequence[TrajectoryRow], pad_token_id: int, labels: bool = False) -> PackedBatch:
    """Pack each row as prefix + all its states, each cut to the row's fixed_length."""
    n_token = _check_rows(rows, labels)
    batch = len(rows)
    max_states = max(len(row.states) for row in rows)
    width = max(packed_width(row) for row in rows)

    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segments = torch.full((batch, width), PAD_SEGMENT, dtype=torch.long)
    states = torch.empty((batch, max_states, n_token), dtype=torch.long)
    prediction_index = torch.zeros((batch, max_states, n_token), dtype=torch.long)
    ar_labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    block_positions = torch.arange(n_token)

    for b, row in enumerate(rows):
        span = row.fixed_length  # packed tokens per state
        prefix = torch.tensor(list(row.prefix_ids), dtype=torch.long)
        row_states = torch.tensor([list(state) for state in row.states], dtype=torch.long)
        prefix_length, count = len(prefix), len(row_states)
        states[b, :count] = row_states
        states[b, count:] = row_states[-1]
        input_ids[b, :prefix_length] = prefix
        position_ids[b, :prefix_length] = torch.arange(prefix_length)
        segments[b, :prefix_length] = PREFIX_SEGMENT
        for j in range(count):
            start = prefix_length + j * span
            input_ids[b, start : start + span] = row_states[j, :span]
            position_ids[b, start : start + span] = prefix_length + block_positions[:span]
            segments[b, start : start + span] = j
            # token 0 of a state is predicted by the prefix's last logit, token i by the state's i - 1
            within = (block_positions - 1).clamp(max=span - 1)
            prediction_index[b, j] = torch.where(block_positions == 0, prefix_length - 1, start + within)
        # AR on what the teacher generated: the earlier blocks in the prefix, then the fixed point
        prompt_end = row.prompt_length
        ar_labels[b, prompt_end - 1 : prefix_length - 1] = prefix[prompt_end:]
        fixed_point_index = prediction_index[b, count - 1, :span]
        ar_labels[b, fixed_point_index] = row_states[-1, :span]

    return PackedBatch(
        input_ids=input_ids,
        attention_mask=(segments != PAD_SEGMENT).long(),
        position_ids=position_ids,
        attention_allowed=segment_mask(segments).unsqueeze(1),
        states=states,
        state_counts=torch.tensor([len(row.states) for row in rows]),
        fixed_length=torch.tensor([row.fixed_length for row in rows]),
        prediction_index=prediction_index,
        ar_labels=ar_labels,
        label_sequences=label_batch(rows, pad_token_id) if labels else None,
    )


def collate(
    rows: Sequence[TrajectoryRow],
    pad_token_id: int,
    packed: bool,
    labels: bool = False,
    rng: random.Random | None = None,
) -> StateBatch | PackedBatch:
    """The training batch for `rows`: packed, or one sampled state per row."""
    if packed:
        return collate_packed(rows, pad_token_id, labels=labels)
    return collate_states(rows, pad_token_id, rng=rng, labels=labels)


def sample_states(row: TrajectoryRow, count: int, rng: random.Random) -> TrajectoryRow:
    """`row` with `count` of its states (all, if it has no more): count - 1 drawn uniformly from
    those before the fixed point, in trajectory order, then the fixed point. The global loss's
    target is the fixed point, so any subset of states is a valid (cheaper) packed row; the local
    loss needs consecutive states and cannot use this."""
    if count < 2:
        raise ValueError(f"a sampled row keeps at least 2 states (a student and the fixed point), got {count}")
    last = len(row.states) - 1
    if last < count:
        return row
    picked = [*sorted(rng.sample(range(last), count - 1)), last]
    return dataclasses.replace(row, states=[row.states[index] for index in picked])


def packed_width(row: TrajectoryRow) -> int:
    """Tokens `collate_packed` lays out for `row`."""
    return len(row.prefix_ids) + len(row.states) * row.fixed_length


def length_groups(
    items: Sequence[Item], length: Callable[[Item], int], batch_size: int, rng: random.Random
) -> list[list[Item]]:
    """Cut `items` into full batches of `batch_size` items of similar `length`, in a random order
    (a remainder of fewer items is dropped). A batch is padded to its longest item, so grouping
    by length saves the padding (docs/results.md#training-recipe)."""
    ordered = sorted(items, key=length)
    full = len(ordered) - len(ordered) % batch_size
    batches = [list(ordered[start : start + batch_size]) for start in range(0, full, batch_size)]
    rng.shuffle(batches)
    return batches


def batch_tokens(batch: StateBatch | PackedBatch) -> int:
    """Real tokens one training step feeds the model: prefix + student state and prefix + fixed
    point for a `StateBatch`, the whole packed sequence otherwise (plus label sequences)."""
    if isinstance(batch, StateBatch):
        fed = int(batch.student_sequences.attention_mask.sum() + batch.fixed_point_sequences.attention_mask.sum())
    else:  # PackedBatch, or cllm.forcing.ForcingBatch
        fed = int(batch.attention_mask.sum())
    if batch.label_sequences is not None:
        fed += int(batch.label_sequences.attention_mask.sum())
    return fed
