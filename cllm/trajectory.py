"""Trajectory collection: a batch of tokenized prompts in, trajectory rows (cllm.data schema) out.

The teacher decodes the batch with `jacobi_generate(..., return_trajectories=True)`; each block of
each row becomes one row holding its prefix and its states. Prompts whose output is degenerate
(a long run of one token, or a loop of a short n-gram) are dropped with a reason, as the paper
cleans its data. Optional augmentation (the paper's): after each intermediate state, insert a
copy in which a random half of the still-wrong tokens are set to their fixed-point tokens.

Decoding is seeded from the batch's own prompt ids, so a retried batch yields the same rows.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cllm.data import TrajectoryRow
from cllm.hf import eos_ids, pad_id
from cllm.jacobi import jacobi_generate, pad_prompts


@dataclass(frozen=True)
class CollectConfig:
    n_token: int = 16
    max_new_tokens: int = 256
    seed: int = 0
    augment: bool = False
    # Cleaning: an output is degenerate when some span of at least `min_loop_tokens` tokens
    # repeats a pattern of at most `max_loop_period` tokens. 0 disables cleaning.
    min_loop_tokens: int = 48
    max_loop_period: int = 8


@dataclass
class BatchResult:
    rows: list[TrajectoryRow]
    rejected: dict[str, str] = field(default_factory=dict)  # prompt_id -> reason


def degenerate_reason(tokens: Sequence[int], min_loop_tokens: int, max_loop_period: int) -> str | None:
    """Why `tokens` is degenerate (a repeated token or n-gram loop), or None if it is not."""
    if min_loop_tokens <= 0:
        return None
    for period in range(1, max_loop_period + 1):
        span = 0  # length of the current stretch where tokens[i] == tokens[i - period]
        for i in range(period, len(tokens)):
            span = span + 1 if tokens[i] == tokens[i - period] else 0
            if span and span + period >= min_loop_tokens:
                what = "one token repeated" if period == 1 else f"a {period}-token pattern repeated"
                return f"degenerate output: {what} over {span + period} tokens"
    return None


def augment_states(states: list[list[int]], fixed_length: int, rng: random.Random) -> list[list[int]]:
    """The trajectory with, after each intermediate state, a copy in which a random half of the
    tokens still differing from the fixed point (on its valid positions) are corrected."""
    fixed_point = states[-1]
    augmented: list[list[int]] = []
    for state in states[:-1]:
        augmented.append(state)
        wrong = [i for i in range(fixed_length) if state[i] != fixed_point[i]]
        corrected = rng.sample(wrong, len(wrong) // 2)
        if corrected:
            copy = list(state)
            for i in corrected:
                copy[i] = fixed_point[i]
            augmented.append(copy)
    augmented.append(fixed_point)
    return augmented


def block_rows(
    prompt: Mapping[str, Any],
    new_tokens: list[int],
    trajectories: list[list[list[int]]],
    iterations: list[int],
    stop_ids: frozenset[int],
    model_name: str,
    config: CollectConfig,
    rng: random.Random,
) -> list[TrajectoryRow]:
    """One row per block of one prompt. Block b's prefix is the prompt plus the first b*n
    generated tokens; its fixed point is valid on min(n, tokens left) positions."""
    n = config.n_token
    prompt_ids = list(prompt["prompt_ids"])
    rows = []
    for index, (states, forwards) in enumerate(zip(trajectories, iterations)):
        fixed_length = min(n, len(new_tokens) - index * n)
        if config.augment:
            states = augment_states(states, fixed_length, rng)
        rows.append(TrajectoryRow(
            prompt_id=prompt["prompt_id"],
            block_index=index,
            prompt_length=len(prompt_ids),
            prefix_ids=prompt_ids + new_tokens[: index * n],
            states=states,
            eos=any(token in stop_ids for token in states[-1][:fixed_length]),
            label_ids=prompt.get("label_ids"),
            model=model_name,
            n_token=n,
            fixed_length=fixed_length,
            iterations=forwards,
        ))
    return rows


def batch_seed(seed: int, prompt_ids: Sequence[str]) -> int:
    """A seed fixed by the run seed and the batch's prompt ids, so retries reproduce a batch."""
    digest = hashlib.sha1("\0".join([str(seed), *prompt_ids]).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def collect_trajectories(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Mapping[str, Any]],
    model_name: str,
    config: CollectConfig = CollectConfig(),
) -> BatchResult:
    """Decode `prompts` (mappings with `prompt_id`, `prompt_ids` and optional `label_ids`) as one
    left-padded batch and return their trajectory rows and the prompts dropped, with reasons."""
    stop_ids = eos_ids(tokenizer, getattr(model, "generation_config", None))
    return trajectory_rows(model, prompts, model_name, config, stop_ids, pad_id(tokenizer))


def trajectory_rows(
    model: torch.nn.Module,
    prompts: Sequence[Mapping[str, Any]],
    model_name: str,
    config: CollectConfig,
    stop_ids: frozenset[int] = frozenset(),
    padding: int = 0,
) -> BatchResult:
    """`collect_trajectories` given the EOS ids and the pad id instead of a tokenizer."""
    if not prompts:
        return BatchResult(rows=[])
    input_ids, attention_mask = pad_prompts([p["prompt_ids"] for p in prompts], padding)
    seed = batch_seed(config.seed, [p["prompt_id"] for p in prompts])
    output = jacobi_generate(
        model,
        input_ids,
        attention_mask,
        n_token=config.n_token,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=padding,
        generator=torch.Generator().manual_seed(seed),
        return_trajectories=True,
    )
    rng = random.Random(seed)
    result = BatchResult(rows=[])
    for prompt, new_tokens, trajectories, stats in zip(
        prompts, output.new_tokens, output.trajectories, output.stats.rows
    ):
        reason = degenerate_reason(new_tokens, config.min_loop_tokens, config.max_loop_period)
        if reason is None and not trajectories:
            reason = "no trajectory: the first generated token ended the output"
        if reason is not None:
            result.rejected[prompt["prompt_id"]] = reason
            continue
        result.rows.extend(block_rows(
            prompt, new_tokens, trajectories, stats.iterations_per_block, stop_ids, model_name, config, rng
        ))
    return result
