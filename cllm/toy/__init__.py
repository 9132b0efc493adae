"""The toy setting: tasks and tiny teachers that the project builds itself, so everything runs
offline. This module is the one home of toy names: `toy`, `toy-math`, `toy-code`, `toy-sql`, each
optionally with a split, as in `toy-math:heldout`.

- `cllm.toy.tasks`: the task generators, splits, prompts and answer checking (light, no model);
- `cllm.toy.teacher`: the teacher's tokenizer, training and cached build (imports transformers).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DOMAINS = ("math", "code", "sql")
DEFAULT_DOMAIN = "math"
SPLITS = ("train", "heldout")
TOY_NAMES = ("toy", *(f"toy-{domain}" for domain in DOMAINS))
TOY_VERSION = "1"
"""Bump when a corpus, tokenizer or training change makes cached teachers stale."""


@dataclass(frozen=True)
class ToyPrompt:
    """One task instance: the exact text the teacher is given and the reference continuation."""

    prompt_id: str
    prompt: str
    answer: str
    domain: str
    split: str
    source: str = ""  # code: "<stdlib file>:<function>"; math, sql: the generator's name


def stable_hash(text: str) -> int:
    """A hash that is the same in every process and release (unlike `hash`): splits use it."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def toy_prompt_id(domain: str, text: str) -> str:
    return f"toy-{domain}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


@dataclass(frozen=True)
class ToyName:
    """A parsed toy name: the domain (`toy` alone means DEFAULT_DOMAIN) and, for prompt sources,
    the split (`train` when not given)."""

    domain: str
    split: str = "train"


def parse_toy_name(name: str) -> ToyName | None:
    """`ToyName` for `toy`, `toy-<domain>` or either with `:<split>`; None for anything else (a
    hub id, a directory, a file). A toy name with an unknown split raises ValueError."""
    base, separator, split = name.partition(":")
    if base not in TOY_NAMES:
        return None
    if separator and split not in SPLITS:
        raise ValueError(f"unknown split {split!r} in {name!r}; choose from {SPLITS}")
    domain = DEFAULT_DOMAIN if base == "toy" else base.removeprefix("toy-")
    return ToyName(domain, split or "train")


def is_toy_name(name: str) -> bool:
    return name.partition(":")[0] in TOY_NAMES


def resolve_domain(domain: str | None) -> str:
    """`domain`, or DEFAULT_DOMAIN for None; ValueError for an unknown one."""
    domain = DEFAULT_DOMAIN if domain is None else domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown toy domain {domain!r}; choose from {DOMAINS}")
    return domain
