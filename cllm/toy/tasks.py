"""The toy tasks as one interface over the domains: prompts of a split, and answer checking."""

from __future__ import annotations

from cllm.toy import SPLITS, ToyPrompt, resolve_domain
from cllm.toy import code as code_task
from cllm.toy import math as math_task


def toy_prompts(split: str = "train", domain: str | None = None, limit: int | None = None,
                seed: int = 0) -> list[ToyPrompt]:
    """Prompts of a toy domain's split, each with its reference answer, in a fixed order.

    math: a fixed number of distinct generated problems (any `limit` works: the generator is
    endless). code: every extracted pair of the split's modules."""
    domain = resolve_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if domain == "math":
        return math_task.prompts(split, limit, seed)
    return code_task.prompts(split, limit)


def has_task_metric(domain: str | None) -> bool:
    """Whether `check_answer` scores the domain (code has no task metric)."""
    return resolve_domain(domain) == "math"


def check_answer(domain: str | None, generated_text: str, reference_answer: str) -> bool | None:
    """The domain's task metric on one output: math, whether the final number matches the
    reference; None for a domain without a metric (code)."""
    domain = resolve_domain(domain)
    if domain == "math":
        return math_task.check_answer(generated_text, reference_answer)
    return None
