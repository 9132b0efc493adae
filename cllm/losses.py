"""CLLM training losses: global and local consistency plus the autoregressive (AR) loss.

docs/design.md ("The method") defines it. For a block with prefix x, states y⁽⁰⁾ … y⁽ᵏ⁾ = y* (the fixed
point) and a student state y, the consistency loss at block position i is

    D( q_θ⁻(· | x, t_{<i}) ‖ q_θ(· | x, y_{<i}) )

where the target t is the fixed point (global) or the next state y⁽ʲ⁺¹⁾ (local), and θ⁻ means the
target logits are detached. Positions count only from the first one where y differs from y*
(earlier ones are already right, as in the official code), and only below `fixed_length` (a row's
last block is padded after EOS/budget). The prefix is never a consistency position.

Two ways to compute the same quantities:
- one state at a time (`StateBatch`): plain causal forwards of prefix + state, prefix + target and
  prefix + fixed point, as the reference implementation does with one sampled state per row;
- packed (`PackedBatch`): prefix + y⁽⁰⁾ + … + y⁽ᵏ⁾ in ONE forward with a 4D attention mask in
  which every state sees the prefix and itself only, and position ids restart after the prefix
  for each state. Every state of the block is trained in that single pass, and the fixed-point
  segment doubles as the AR sequence and the global target.

Jacobi Forcing's objective (`forcing_losses`, on a `cllm.forcing.ForcingBatch`) uses the same
distances and AR loss: in one forward over prompt + (noisy, clean) block pairs with the
noisy-context mask, each noisy logit learns the detached clean logit at its position.

Losses are token means over the batch; `LossTerms` keeps sums and counts so that any split of
the same states (packed or not) adds up to the same value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F

from cllm.cache import additive_mask
from cllm.collate import PackedBatch, SequenceBatch, StateBatch
from cllm.forcing import ForcingBatch
from cllm.metrics import IGNORE

LossKind = Literal["global", "local"]
Distance = Literal["fkl", "rkl", "ce"]
ArTarget = Literal["fixed-point", "labels"]
LOSS_KINDS: tuple[str, ...] = ("global", "local")
DISTANCES: tuple[str, ...] = ("fkl", "rkl", "ce")
AR_TARGETS: tuple[str, ...] = ("fixed-point", "labels")
T = TypeVar("T", torch.Tensor, float)


@dataclass(frozen=True)
class LossConfig:
    kind: LossKind = "global"
    distance: Distance = "fkl"
    ar_weight: float = 10.0  # the official code's weight
    ar_target: ArTarget = "fixed-point"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("kind", self.kind, LOSS_KINDS),
            ("distance", self.distance, DISTANCES),
            ("ar_target", self.ar_target, AR_TARGETS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def combine(self, consistency: T, ar: T) -> T:
        """The training loss from the two token means (tensors, or floats for reports)."""
        return consistency + self.ar_weight * ar


@dataclass
class LossTerms:
    """A summed loss and the number of tokens it sums over."""

    total: torch.Tensor
    tokens: torch.Tensor

    def mean(self) -> torch.Tensor:
        # clamp: a batch with no trainable position gives 0 while keeping the autograd graph
        return self.total / self.tokens.clamp(min=1)

    def __add__(self, other: LossTerms) -> LossTerms:
        return LossTerms(self.total + other.total, self.tokens + other.tokens)


@dataclass
class LossOutput:
    loss: torch.Tensor  # consistency + ar_weight · AR, what is back-propagated
    consistency: LossTerms
    ar: LossTerms
    states: int  # student states trained in this batch


# -- the method, on tensors -------------------------------------------------------------------


def consistency_mask(states: torch.Tensor, fixed_point: torch.Tensor, fixed_length: torch.Tensor) -> torch.Tensor:
    """Which block positions of `states` (..., n) count: from the first position that differs
    from `fixed_point` (broadcastable to states) on, and below `fixed_length` (...)."""
    positions = torch.arange(states.shape[-1], device=states.device)
    valid = positions < fixed_length.unsqueeze(-1)
    differs = (states != fixed_point) & valid
    from_first_difference = differs.cumsum(dim=-1) > 0
    return from_first_difference & valid


def consistency_distance(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    target_tokens: torch.Tensor,
    mask: torch.Tensor,
    distance: Distance,
) -> LossTerms:
    """Summed distance over the masked positions. Logits are (..., V); `target_logits` is
    detached here, so no gradient ever reaches the target. `ce` uses `target_tokens`."""
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    target_log_probs = F.log_softmax(target_logits.detach().float(), dim=-1)
    if distance == "fkl":  # KL(target ‖ student)
        per_position = (target_log_probs.exp() * (target_log_probs - student_log_probs)).sum(-1)
    elif distance == "rkl":  # KL(student ‖ target)
        per_position = (student_log_probs.exp() * (student_log_probs - target_log_probs)).sum(-1)
    elif distance == "ce":
        per_position = -student_log_probs.gather(-1, target_tokens.unsqueeze(-1)).squeeze(-1)
    else:
        raise ValueError(f"unknown distance {distance!r}")
    per_position = per_position.masked_fill(~mask, 0.0)
    return LossTerms(per_position.sum(), mask.sum())


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> LossTerms:
    """Summed cross-entropy of logits (B, L, V) against `labels` (B, L) aligned to them
    (IGNORE where nothing is trained)."""
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return LossTerms(total, (labels != IGNORE).sum())


def _local_target_tokens(distance: Distance, target_logits: torch.Tensor, fixed_point: torch.Tensor) -> torch.Tensor:
    """Hard targets for `ce`. Global: the fixed point. Local: what the next state's detached
    logits predict, the hard version of its soft target (the fixed point would make local ce
    identical to global ce)."""
    return target_logits.detach().argmax(dim=-1) if distance == "ce" else fixed_point


# -- model forwards ---------------------------------------------------------------------------


def _logits(model: torch.nn.Module, sequences: SequenceBatch) -> torch.Tensor:
    return model(
        input_ids=sequences.input_ids,
        attention_mask=sequences.attention_mask,
        position_ids=sequences.position_ids,
        use_cache=False,
    ).logits


def _block_logits(logits: torch.Tensor, prefix_lengths: torch.Tensor, n_token: int) -> torch.Tensor:
    """Of a prefix + block sequence's logits (B, L, V), the n that predict the block's tokens:
    position i of the block is predicted at index prefix_length - 1 + i."""
    offsets = prefix_lengths[:, None] - 1 + torch.arange(n_token, device=logits.device)
    return logits.gather(1, offsets[:, :, None].expand(-1, -1, logits.shape[-1]))


def _parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def state_losses(model: torch.nn.Module, batch: StateBatch, config: LossConfig) -> LossOutput:
    """Losses with one student state per row, with plain causal forwards."""
    n_token = batch.fixed_point.shape[1]
    student_logits = _block_logits(_logits(model, batch.student_sequences), batch.prefix_lengths, n_token)
    fixed_point_logits = None
    if config.kind == "global" or config.ar_target == "fixed-point":
        # with gradient: it is the AR sequence; consistency_distance detaches its use as target
        fixed_point_logits = _logits(model, batch.fixed_point_sequences)
    if config.kind == "global":
        target_logits = _block_logits(fixed_point_logits, batch.prefix_lengths, n_token)
        target_tokens = batch.fixed_point
    else:
        with torch.no_grad():
            target_logits = _block_logits(_logits(model, batch.next_state_sequences), batch.prefix_lengths, n_token)
        target_tokens = _local_target_tokens(config.distance, target_logits, batch.fixed_point)
    mask = consistency_mask(batch.student_state, batch.fixed_point, batch.fixed_length)
    mask &= batch.has_target[:, None]
    consistency = consistency_distance(student_logits, target_logits, target_tokens, mask, config.distance)
    if config.ar_target == "labels":
        ar = _label_loss(model, batch.label_sequences)
    else:
        ar = next_token_loss(fixed_point_logits, batch.fixed_point_sequences.labels)
    return _loss_output(consistency, ar, config, states=int(batch.has_target.sum()))


def _packed_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_allowed: torch.Tensor,
                    position_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a packed sequence whose segments see only what `attention_allowed` lets them."""
    return model(
        input_ids=input_ids,
        attention_mask=additive_mask(attention_allowed, _parameter_dtype(model)),
        position_ids=position_ids,
        use_cache=False,
    ).logits


def packed_losses(model: torch.nn.Module, batch: PackedBatch, config: LossConfig) -> LossOutput:
    """Losses for every state of every row's block in one forward (see the module docstring)."""
    logits = _packed_forward(model, batch.input_ids, batch.attention_allowed, batch.position_ids)
    # state_logits[b, j, i] predicts token i of state j of row b
    index = batch.prediction_index.flatten(1)
    state_logits = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1]))
    state_logits = state_logits.view(*batch.states.shape, logits.shape[-1])

    batch_index = torch.arange(batch.states.shape[0], device=logits.device)
    last = batch.state_counts - 1
    fixed_point = batch.states[batch_index, last]
    if config.kind == "global":
        target_logits = state_logits[batch_index, last].unsqueeze(1).expand_as(state_logits)
        target_tokens = fixed_point.unsqueeze(1).expand_as(batch.states)
    else:  # state j learns from state j + 1; the last state has no successor and is masked below
        target_logits = torch.cat([state_logits[:, 1:], state_logits[:, -1:]], dim=1)
        target_tokens = _local_target_tokens(config.distance, target_logits, fixed_point.unsqueeze(1))
        target_tokens = target_tokens.expand_as(batch.states)
    students = torch.arange(batch.states.shape[1], device=logits.device) < last[:, None]
    mask = consistency_mask(batch.states, fixed_point.unsqueeze(1), batch.fixed_length[:, None])
    mask &= students[:, :, None]
    consistency = consistency_distance(state_logits, target_logits, target_tokens, mask, config.distance)
    if config.ar_target == "labels":
        ar = _label_loss(model, batch.label_sequences)
    else:  # prefix + fixed point, read off the same forward
        ar = next_token_loss(logits, batch.ar_labels)
    return _loss_output(consistency, ar, config, states=int(students.sum()))


def forcing_losses(model: torch.nn.Module, batch: ForcingBatch, config: LossConfig) -> LossOutput:
    """Jacobi Forcing's losses for whole responses in one forward (see `cllm.forcing`). Its
    target is always the clean block, so `config.kind` does not apply."""
    logits = _packed_forward(model, batch.input_ids, batch.attention_allowed, batch.position_ids)
    vocab = logits.shape[-1]
    student_logits = logits.gather(1, batch.student_index[:, :, None].expand(-1, -1, vocab))
    target_logits = logits.gather(1, batch.target_index[:, :, None].expand(-1, -1, vocab))
    consistency = consistency_distance(student_logits, target_logits, batch.target_tokens, batch.trained,
                                       config.distance)
    if config.ar_target == "labels":
        ar = _label_loss(model, batch.label_sequences)
    else:  # the clean blocks, read off the same forward
        ar = next_token_loss(logits, batch.ar_labels)
    return _loss_output(consistency, ar, config, states=int(batch.noisy_states.sum()))


def _label_loss(model: torch.nn.Module, label_sequences: SequenceBatch | None) -> LossTerms:
    if label_sequences is None:
        raise ValueError("ar_target='labels' needs batches collated with labels=True")
    return next_token_loss(_logits(model, label_sequences), label_sequences.labels)


def _loss_output(consistency: LossTerms, ar: LossTerms, config: LossConfig, states: int) -> LossOutput:
    return LossOutput(loss=config.combine(consistency.mean(), ar.mean()), consistency=consistency, ar=ar, states=states)


def compute_losses(model: torch.nn.Module, batch: StateBatch | PackedBatch | ForcingBatch,
                   config: LossConfig) -> LossOutput:
    """The training loss of one collated batch: CLLM's, packed or one state per row, or Jacobi
    Forcing's."""
    if isinstance(batch, ForcingBatch):
        return forcing_losses(model, batch, config)
    if isinstance(batch, PackedBatch):
        return packed_losses(model, batch, config)
    return state_losses(model, batch, config)
