"""The toy tasks as one interface over the domains: prompts of a split, and answer checking."""

from __future__ import annotations

from functools import lru_cache

from cllm.toy import SPLITS, ToyPrompt, resolve_domain
from cllm.toy import chat as chat_task
from cllm.toy import code as code_task
from cllm.toy import math as math_task
from cllm.toy import sql as sql_task


def toy_prompts(split: str = "train", domain: str | None = None, limit: int | None = None,
                seed: int = 0) -> list[ToyPrompt]:
    """Prompts of a toy domain's split, each with its reference answer, in a fixed order.

    math, code, chat: a fixed number of distinct generated prompts (any `limit` works: the generator is
    endless). sql: the same, but its held-out split has 500 (distinct questions)."""
    domain = resolve_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return list(_generated_prompts(split, domain, limit, seed))


GENERATED_TASKS = {"math": math_task.TASK, "sql": sql_task.TASK, "code": code_task.TASK, "chat": chat_task.TASK}
"""Every toy domain's generator: its splits (here) and its teacher's training stream (teacher.py)."""


@lru_cache(maxsize=4)  # an evaluation loads the prompts once per model; SQL's held-out take 25 s
def _generated_prompts(split: str, domain: str, limit: int | None, seed: int) -> tuple[ToyPrompt, ...]:
    return tuple(GENERATED_TASKS[domain].prompts(split, limit, seed))


def has_task_metric(domain: str | None) -> bool:
    """Whether `check_answer` scores the domain. Code is scored by running each prompt's tests
    (`ToyPrompt.test`, through `cllm.execution`), not by comparing with the answer."""
    return resolve_domain(domain) in ("math", "sql", "chat")


def check_answer(domain: str | None, generated_text: str, reference_answer: str,
                 prompt: str | None = None) -> bool | None:
    """The domain's task metric on one output: math, whether the final number matches the
    reference; chat, whether the final answer's value does; sql, whether the query returns the
    reference's result on the database of the `prompt`'s schema (execution accuracy; required for
    sql); None for code (see `has_task_metric`)."""
    domain = resolve_domain(domain)
    if domain == "math":
        return math_task.check_answer(generated_text, reference_answer)
    if domain == "chat":
        return chat_task.check_answer(generated_text, reference_answer)
    if domain == "sql":
        if prompt is None:
            raise ValueError("toy-sql answers are checked on the database of their prompt's schema: pass prompt")
        return sql_task.execution_match(generated_text, reference_answer, prompt)
    return None


def exact_match(domain: str | None, generated_text: str, reference_answer: str) -> bool | None:
    """Spider's second metric, for sql: the query equals the reference up to whitespace and the
    case outside string literals. None for the other domains."""
    if resolve_domain(domain) != "sql":
        return None
    return sql_task.exact_match(generated_text, reference_answer)
