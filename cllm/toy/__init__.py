"""The toy setting: tasks and tiny teachers that the project builds itself, so everything runs
offline. This module is the one home of toy names: `toy`, `toy-math`, `toy-code`, `toy-sql`,
`toy-chat`, each optionally with a split, as in `toy-math:heldout`.

- `cllm.toy.tasks`: the task generators, splits, prompts and answer checking (light, no model);
- `cllm.toy.teacher`: the teacher's tokenizer, training and cached build (imports transformers).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

DOMAINS = ("math", "code", "sql", "chat")
DEFAULT_DOMAIN = "math"
SPLITS = ("train", "heldout")
TOY_NAMES = ("toy", *(f"toy-{domain}" for domain in DOMAINS))
TOY_VERSIONS = {"math": "3", "code": "6", "sql": "2", "chat": "3"}
"""Each domain's teacher version, in its cache path: bump it when a corpus, tokenizer or training
change makes the domain's cached teachers stale."""


@dataclass(frozen=True)
class ToyPrompt:
    """One task instance: the exact text the teacher is given and the reference continuation."""

    prompt_id: str
    prompt: str
    answer: str
    domain: str
    split: str
    source: str = ""  # the generator's name and version
    test: str = ""  # code: HumanEval's `def check(candidate)`, which the answer's body must pass
    entry_point: str = ""  # code: the function `check` is called on
    messages: tuple[tuple[str, str], ...] = ()  # chat: the conversation (role, text) that `prompt` renders


def stable_hash(text: str) -> int:
    """A hash that is the same in every process and release (unlike `hash`): splits use it."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def toy_prompt_id(domain: str, text: str) -> str:
    return f"toy-{domain}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


QUESTION_HELDOUT_MODULUS = 20  # a generated question is held out when its hash is 0 modulo this (5%)


def is_heldout_question(question: str) -> bool:
    return stable_hash(question) % QUESTION_HELDOUT_MODULUS == 0


class Drawn(NamedTuple):
    """One drawn task instance. A draw may return a plain (question, prompt, answer) tuple."""

    question: str  # what decides the split: the task's specification
    prompt: str
    answer: str
    test: str = ""  # code only (ToyPrompt.test)
    entry_point: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # chat only (ToyPrompt.messages)


Draw = Callable[[random.Random], "tuple[str, str, str] | Drawn"]
"""Draws one task instance: (its question, the prompt text, the reference answer[, test, entry point,
messages])."""


@dataclass(frozen=True)
class GeneratedTask:
    """The splits of a generated domain (math, sql, code, chat). The question's hash decides the split, so no
    held-out question can reach training; each split has its own random stream only so that the
    rarer held-out questions are found fast. Held-out prompts ask distinct questions: toy SQL's
    common ones ("How many stores are there?", over many schemas) would otherwise fill a score,
    55 of its first 500 prompts being one question, and one error would count 55 times."""

    domain: str
    draw: Draw
    source: str  # ToyPrompt.source: the generator's name and version
    train_prompts: int = 5_000  # `prompts(split, None)`'s defaults
    heldout_prompts: int = 1_000
    max_heldout_prompts: int | None = None  # held-out prompts one may ask for (None: any number)
    teacher_draw: Draw | None = None  # the teacher's stream, when it weights questions unlike `draw`
    answer_prefix: str = " "  # joins prompt and answer (code: none, its body starts with its indent; chat:
    # none, the template's generation prompt ends the line)
    # With `ToyConfig.loss_on_prompt`, the part of a prompt that carries loss: code's stops before its
    # examples, whose random inputs no model predicts.
    labelled_prompt: Callable[[str], str] = lambda prompt: prompt

    def _example(self, rng: random.Random, split: str, draw: Draw | None = None) -> tuple[str, ToyPrompt]:
        drawn = Drawn(*(draw or self.draw)(rng))
        example = ToyPrompt(toy_prompt_id(self.domain, drawn.prompt), drawn.prompt, self.answer_prefix + drawn.answer,
                            self.domain, split, self.source, drawn.test, drawn.entry_point, drawn.messages)
        return drawn.question, example

    def examples(self, split: str, seed: int) -> Iterator[ToyPrompt]:
        """Stream of distinct prompts of one split (held-out: of distinct questions). A split with
        few held-out questions runs dry and then never yields: `prompts` stops at `max_heldout_prompts`."""
        rng = random.Random(f"toy-{self.domain}-{split}-{seed}")
        seen: set[str] = set()
        want_heldout = split == "heldout"
        while True:
            question, example = self._example(rng, split)
            key = question if want_heldout else example.prompt
            if is_heldout_question(question) != want_heldout or key in seen:
                continue
            seen.add(key)
            yield example

    def training_documents(self, seed: int) -> Iterator[ToyPrompt]:
        """The teacher's training stream: fresh prompts (repeats allowed), never a held-out question,
        drawn by `teacher_draw` when the task has one."""
        rng = random.Random(f"toy-{self.domain}-train-stream-{seed}")
        while True:
            question, example = self._example(rng, "train", self.teacher_draw)
            if not is_heldout_question(question):
                yield example

    def prompts(self, split: str, limit: int | None, seed: int) -> list[ToyPrompt]:
        """The first `limit` prompts of a split; ValueError past `max_heldout_prompts`."""
        default = self.train_prompts if split == "train" else self.heldout_prompts
        count = default if limit is None else limit
        if split == "heldout" and self.max_heldout_prompts is not None and count > self.max_heldout_prompts:
            raise ValueError(f"toy-{self.domain}:heldout has {self.max_heldout_prompts} prompts (distinct held-out "
                             f"questions), not {count}")
        stream = self.examples(split, seed)
        return [next(stream) for _ in range(count)]


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


def toy_version(domain: str | None) -> str:
    """The teacher version of a toy domain (`DEFAULT_DOMAIN` when None)."""
    return TOY_VERSIONS[resolve_domain(domain)]


def resolve_domain(domain: str | None) -> str:
    """`domain`, or DEFAULT_DOMAIN for None; ValueError for an unknown one."""
    domain = DEFAULT_DOMAIN if domain is None else domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown toy domain {domain!r}; choose from {DOMAINS}")
    return domain
