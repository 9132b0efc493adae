"""Measures on token sequences, shared by decoding, evaluation and the toy teacher: common
prefixes, agreement, repetition, right padding with labels, and the loss of reference answers.
A leaf module: it imports nothing from `cllm`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE = -100  # label value that cross-entropy skips


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items `a` and `b` share."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def common_prefix_fraction(output: Sequence[int], reference: Sequence[int]) -> float:
    """Length of the common prefix over the longer sequence's length (1.0 for two empty ones)."""
    longest = max(len(output), len(reference))
    return common_prefix_length(output, reference) / longest if longest else 1.0


def agreement(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(fraction of identical outputs, mean common-prefix fraction) against reference outputs."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    if not outputs:
        return 0.0, 0.0
    identical = sum(list(a) == list(b) for a, b in zip(outputs, references)) / len(outputs)
    prefix = sum(common_prefix_fraction(a, b) for a, b in zip(outputs, references)) / len(outputs)
    return identical, prefix


def repetition_rate(token_ids: Sequence[int], n: int = 4) -> float:
    """Fraction of the n-grams of `token_ids` that already occurred earlier in it: 0 for text
    without repeats, near 1 for a loop. A degenerate, loopy model scores high."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def right_pad(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    label_starts: Sequence[int] | None = None,
    label_ends: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of right-padded `sequences`. Labels follow Hugging
    Face's convention (aligned with the inputs; the model shifts them): sequence b's tokens at
    positions [label_starts[b], label_ends[b]) carry their own id, everything else IGNORE. By
    default every token carries a label."""
    width = max(len(sequence) for sequence in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    for b, sequence in enumerate(sequences):
        length = len(sequence)
        input_ids[b, :length] = torch.tensor(list(sequence), dtype=torch.long)
        attention_mask[b, :length] = 1
        start = 0 if label_starts is None else label_starts[b]
        end = length if label_ends is None else label_ends[b]
        labels[b, start:end] = input_ids[b, start:end]
    return input_ids, attention_mask, labels


@torch.inference_mode()
def answer_loss(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int] | None],
    batch_size: int = 8,
) -> float | None:
    """Mean next-token cross-entropy (nats per token) of reference answers given their prompts.
    Prompts without an answer are skipped; None when no prompt has one."""
    pairs = [(list(p), list(a)) for p, a in zip(prompts, answers) if a]
    if not pairs:
        return None
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        input_ids, attention_mask, labels = right_pad(
            [p + a for p, a in chunk], 0,
            label_starts=[len(p) for p, _ in chunk], label_ends=[len(p) + len(a) for p, a in chunk],
        )
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        total_loss += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        ).item()
        total_tokens += int((targets != IGNORE).sum())
    return total_loss / total_tokens
