"""Jacobi Forcing (arXiv 2512.14681): the training layout of its progressive-noise objective.

Where CLLM trains every state of one block against that block's fixed point, Jacobi Forcing
trains a whole response at once, one noisy state per block, with noisy context:

- **Progressive noise schedule.** Blocks are grouped into windows of `window` consecutive blocks;
  within a window the target noise rises linearly from `min_noise` to `max_noise`. A state's noise
  is the share of its block from the first token that differs from the fixed point on, and each
  block contributes the state of its trajectory whose noise is nearest its target.
- **Packing and the noisy-context mask.** One sequence holds the prompt, then for each block j its
  noisy state and its clean block (the fixed point): prompt, noisy_0, clean_0, noisy_1, clean_1, …
  Both copies of block j take the positions block j has in the response. A clean block sees the
  prompt and the earlier clean blocks, so the clean blocks form the plain AR sequence; a noisy
  block sees the prompt, the clean blocks of earlier windows and the noisy blocks of its own window
  before it, so later blocks learn to predict under noisy context, as in a Jacobi block of
  several sub-blocks. Nothing sees a later block.
- **Losses** (in `cllm.losses`): each noisy logit, from the first token that differs from the fixed
  point on, learns the detached clean logit at the same position (it predicts the same next
  token), plus the AR loss on the clean blocks.

Our responses span a few blocks where the paper's span hundreds, so every response starts its
windows at a random phase (a new one each epoch): with a fixed phase the first blocks of every
response would always be drawn at the lowest noise and never trained.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cllm.collate import PAD_SEGMENT, PREFIX_SEGMENT, Movable, SequenceBatch, label_batch, segment_mask
from cllm.data import TrajectoryRow
from cllm.metrics import IGNORE


@dataclass(frozen=True)
class NoiseSchedule:
    """The progressive noise schedule: `window` blocks rise linearly from min to max noise."""

    window: int = 4
    min_noise: float = 0.0
    max_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"the noise window must be >= 1 block, got {self.window}")
        if not 0.0 <= self.min_noise <= self.max_noise <= 1.0:
            raise ValueError(f"need 0 <= min_noise <= max_noise <= 1, got {self.min_noise}, {self.max_noise}")

    def slot(self, block_index: int, phase: int) -> int:
        """Where block `block_index` sits in its window, for a response starting at `phase`."""
        return (block_index + phase) % self.window

    def target(self, block_index: int, phase: int = 0) -> float:
        if self.window == 1:
            return self.max_noise
        step = (self.max_noise - self.min_noise) / (self.window - 1)
        return self.min_noise + step * self.slot(block_index, phase)

    def window_start(self, block_index: int, phase: int = 0) -> int:
        """The first block of the window that holds `block_index`."""
        return max(0, block_index - self.slot(block_index, phase))


def first_difference(state: Sequence[int], fixed_point: Sequence[int], valid: int) -> int:
    """The first of the `valid` leading positions where `state` differs from `fixed_point`, or
    len(state) when none does."""
    for position in range(valid):
        if state[position] != fixed_point[position]:
            return position
    return len(state)


def noise_ratio(state: Sequence[int], fixed_point: Sequence[int], valid: int) -> float:
    """The share of the block from its first wrong token on (0 for the fixed point itself)."""
    return (len(state) - first_difference(state, fixed_point, valid)) / len(state)


def noisy_state_index(row: TrajectoryRow, target: float) -> int:
    """The state of `row`'s trajectory whose noise is nearest `target` (the earliest on a tie)."""
    fixed_point = row.states[-1]
    distances = [abs(noise_ratio(state, fixed_point, row.fixed_length) - target) for state in row.states]
    return distances.index(min(distances))


def group_responses(rows: Sequence[TrajectoryRow]) -> list[list[TrajectoryRow]]:
    """Rows grouped by prompt into whole responses, blocks in order. A response must have every
    block from 0 on: Jacobi Forcing packs them all into one sequence."""
    by_prompt: dict[str, list[TrajectoryRow]] = defaultdict(list)
    for row in rows:
        by_prompt[row.prompt_id].append(row)
    responses = []
    for prompt_id, blocks in by_prompt.items():
        blocks.sort(key=lambda row: row.block_index)
        indices = [row.block_index for row in blocks]
        if indices != list(range(len(blocks))):
            raise ValueError(f"prompt {prompt_id!r} has blocks {indices}, not 0..{len(blocks) - 1}: Jacobi Forcing "
                             "trains whole responses, so collect every block of a prompt into the same shards")
        responses.append(blocks)
    return responses


@dataclass
class ForcingBatch(Movable):
    """Responses packed as prompt + (noisy_j, clean_j) for every block j, right-padded to (B, L),
    with the pairs of logits the consistency loss compares: P = blocks x n per row, padded."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 on real tokens
    position_ids: torch.Tensor  # (B, L): both copies of block j take block j's positions
    attention_allowed: torch.Tensor  # (B, 1, L, L) bool: the noisy-context mask
    student_index: torch.Tensor  # (B, P): a noisy block's logit (it predicts the next token)
    target_index: torch.Tensor  # (B, P): the clean logit at the same position (the detached target)
    target_tokens: torch.Tensor  # (B, P): the token both predict (the `ce` distance's target)
    trained: torch.Tensor  # (B, P) bool: from the first wrong token of the noisy block on, in the response
    noisy_states: torch.Tensor  # (B,) noisy blocks with at least one trained position
    ar_labels: torch.Tensor  # (B, L): next-token labels of the clean blocks, IGNORE elsewhere
    label_sequences: SequenceBatch | None

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def _visible_segments(blocks: int, schedule: NoiseSchedule, phase: int) -> torch.Tensor:
    """(S, S) bool over the segments 0..2·blocks-1 (noisy block j is segment 2j, clean block j
    2j + 1): which other segment a query segment sees whole (its own it sees causally; the
    prompt, `PREFIX_SEGMENT`, every segment sees)."""
    visible = torch.zeros((2 * blocks, 2 * blocks), dtype=torch.bool)
    for j in range(blocks):
        visible[2 * j + 1, 1 : 2 * j : 2] = True  # clean_j: clean blocks before it
        start = schedule.window_start(j, phase)
        visible[2 * j, 1 : 2 * start : 2] = True  # noisy_j: clean blocks of earlier windows,
        visible[2 * j, 2 * start : 2 * j : 2] = True  # and the noisy blocks of its window before it
    return visible


def forcing_width(blocks: Sequence[TrajectoryRow]) -> int:
    """Tokens `collate_forcing` lays out for one response: its prompt, then a noisy and a clean
    copy of each block."""
    return blocks[0].prompt_length + 2 * len(blocks) * blocks[0].n_token


def collate_forcing(
    responses: Sequence[Sequence[TrajectoryRow]],
    pad_token_id: int,
    schedule: NoiseSchedule,
    rng: random.Random | None = None,
    labels: bool = False,
    phases: Sequence[int] | None = None,
) -> ForcingBatch:
    """Pack each response (its rows, blocks 0..T-1 in order; see `group_responses`), one noisy
    state per block picked by the schedule. Each response's window phase is drawn from `rng`
    unless `phases` gives them."""
    if not responses or any(not blocks for blocks in responses):
        raise ValueError("cannot collate an empty response list or an empty response")
    rng = rng or random.Random(0)
    n_token = responses[0][0].n_token
    for blocks in responses:
        if any(row.n_token != n_token or len(row.states[-1]) != n_token for row in blocks):
            raise ValueError(f"all blocks in a batch must have {n_token} ids (prompt {blocks[0].prompt_id!r})")
    if labels and any(blocks[0].label_ids is None for blocks in responses):
        raise ValueError("a response has no label_ids, needed for the labels AR target")
    if phases is None:
        phases = [rng.randrange(schedule.window) for _ in responses]
    batch = len(responses)
    widths = [forcing_width(blocks) for blocks in responses]
    width, pairs = max(widths), max(len(blocks) for blocks in responses) * n_token

    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    allowed = torch.zeros((batch, width, width), dtype=torch.bool)
    student_index = torch.zeros((batch, pairs), dtype=torch.long)
    target_index = torch.zeros((batch, pairs), dtype=torch.long)
    target_tokens = torch.zeros((batch, pairs), dtype=torch.long)
    trained = torch.zeros((batch, pairs), dtype=torch.bool)
    noisy_states = torch.zeros(batch, dtype=torch.long)
    ar_labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    offsets = torch.arange(n_token)

    for b, (blocks, phase) in enumerate(zip(responses, phases)):
        prompt = blocks[0].prompt_ids
        prompt_length, count = len(prompt), len(blocks)
        generated = [token for row in blocks for token in row.states[-1][: row.fixed_length]]
        segments = torch.full((width,), PAD_SEGMENT, dtype=torch.long)
        input_ids[b, :prompt_length] = torch.tensor(prompt)
        position_ids[b, :prompt_length] = torch.arange(prompt_length)
        segments[:prompt_length] = PREFIX_SEGMENT
        ar_labels[b, prompt_length - 1] = generated[0]
        for j, row in enumerate(blocks):
            noisy = row.states[noisy_state_index(row, schedule.target(j, phase))]
            noisy_start, clean_start = prompt_length + 2 * j * n_token, prompt_length + (2 * j + 1) * n_token
            for start, tokens, segment in ((noisy_start, noisy, 2 * j), (clean_start, row.states[-1], 2 * j + 1)):
                input_ids[b, start : start + n_token] = torch.tensor(tokens)
                position_ids[b, start : start + n_token] = prompt_length + j * n_token + offsets
                segments[start : start + n_token] = segment
            # logit t of block j predicts generated token j·n + t + 1 (the next block's first at t = n - 1)
            predicted = j * n_token + offsets + 1
            in_response = predicted < len(generated)
            next_tokens = torch.tensor(generated + [pad_token_id] * (n_token + 1))[predicted]
            pair = slice(j * n_token, (j + 1) * n_token)
            student_index[b, pair] = noisy_start + offsets
            target_index[b, pair] = clean_start + offsets
            target_tokens[b, pair] = torch.where(in_response, next_tokens, pad_token_id)
            first_wrong = first_difference(noisy, row.states[-1], row.fixed_length)
            trained[b, pair] = in_response & (offsets >= first_wrong)
            noisy_states[b] += bool(trained[b, pair].any())
            ar_labels[b, clean_start + offsets[in_response]] = next_tokens[in_response]
        index, packed = segments.clamp(min=0), segments >= 0
        whole = _visible_segments(count, schedule, phase)[index[:, None], index[None, :]]
        allowed[b] = segment_mask(segments) | (whole & packed[:, None] & packed[None, :])

    return ForcingBatch(
        input_ids=input_ids,
        attention_mask=(torch.arange(width) < torch.tensor(widths)[:, None]).long(),
        position_ids=position_ids,
        attention_allowed=allowed.unsqueeze(1),
        student_index=student_index,
        target_index=target_index,
        target_tokens=target_tokens,
        trained=trained,
        noisy_states=noisy_states,
        ar_labels=ar_labels,
        label_sequences=label_batch([blocks[0] for blocks in responses], pad_token_id) if labels else None,
    )
