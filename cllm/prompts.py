"""Prompt sources: dataset files (JSONL, JSON or Parquet; local, glob or `s3://`) in the paper's
formats, and the toy corpora, turned into tokenized prompts with ground-truth label ids.

Formats (`--format`): gsm8k (`question`/`answer`), spider (`question`/`query`, optional schema
text), code-search-net (`docstring`/`code` or `func_documentation_string`/`func_code_string`),
sharegpt (`conversations`: an optional system turn, then human and model turns in turn; every
turn before the last model turn is the prompt and that turn is the label), the code benchmarks
humaneval (`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`) and mbpp (`task_id`,
`text`, `code`, `test_list`, optional `test_setup_code`), and the generic `{"prompt", "answer"}`
(`jsonl` or `generic`). `auto` picks one per file from its first row. Files may be gzipped
(`.jsonl.gz`). A code benchmark's record carries the `CodeProblem` that scores it by execution.

A prompt is wrapped in the tokenizer's chat template when it has one (`cllm.hf.encode_chat`, the
rendering serve's chat route uses too: a ShareGPT conversation is rendered whole, system message
included, with the template's generation prompt), else in the format's plain template (the generic
format's prompt is used as is; ShareGPT's is Vicuna's, as the paper's models use). Code benchmarks
are completions and never take a chat template: the model continues the prompt's code. Bad rows
are collected as `BadPromptRow`s with their file and row number instead of raising, unless
`strict=True`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.parquet as pq

from cllm.execution import MBPP_STOP_SEQUENCES, CodeProblem
from cllm.hf import Message, encode_chat, has_chat_template
from cllm.storage import display_path
from cllm.toy import parse_toy_name
from cllm.toy.tasks import toy_prompts

FORMATS = ("auto", "gsm8k", "spider", "code-search-net", "sharegpt", "humaneval", "mbpp", "jsonl", "generic")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
_COMPLETION_FORMATS = frozenset({"humaneval", "mbpp"})  # the model continues the prompt: no chat template


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str  # stable across reruns: the toy id, or a hash of file name and row number
    prompt_ids: list[int]  # template included, as fed to the model
    label_ids: list[int] | None  # ground-truth answer followed by EOS, when the data has one
    prompt: str  # the templated prompt text
    answer: str | None  # the ground-truth answer text
    source: str
    row: int  # 1-based row (line) number in `source`
    problem: CodeProblem | None = None  # code: the tests that score a completion by execution


@dataclass(frozen=True)
class BadPromptRow:
    source: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.row}: {self.reason}"


class BadPromptRowError(ValueError):
    """A bad input row under `strict=True`, or the reason a row is bad."""


@dataclass(frozen=True)
class _Example:
    """A row reduced to the user's request and the reference answer."""

    request: str
    answer: str | None
    problem: CodeProblem | None = None
    messages: tuple[Message, ...] = ()  # sharegpt: the conversation before the answer (request: its last turn)


# -- formats -------------------------------------------------------------------------------------


def _text(row: dict, *names: str) -> str:
    """The first of `names` present in `row`, which must be non-empty text."""
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if not isinstance(value, str):
                raise BadPromptRowError(f"field {name!r} is not text (got {type(value).__name__})")
            if not value.strip():
                raise BadPromptRowError(f"field {name!r} is empty")
            return value
    raise BadPromptRowError(f"missing field {' or '.join(repr(name) for name in names)}")


def _optional_text(row: dict, *names: str) -> str | None:
    try:
        return _text(row, *names)
    except BadPromptRowError:
        return None


def _gsm8k(row: dict) -> _Example:
    return _Example(_text(row, "question"), _optional_text(row, "answer"))


def _spider(row: dict) -> _Example:
    question = _text(row, "question")
    schema = _optional_text(row, "schema", "db_schema", "context")
    request = f"{schema}\n\n{question}" if schema else question
    return _Example(request, _optional_text(row, "query"))


def _code_search_net(row: dict) -> _Example:
    return _Example(
        _text(row, "docstring", "func_documentation_string"),
        _optional_text(row, "code", "func_code_string"),
    )


# ShareGPT's speakers (and OpenAI's roles, which some files use) as chat-template roles.
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "model": "assistant"}


def _sharegpt(row: dict) -> _Example:
    """The conversation up to its last (model) turn, which is the label. Turns must go system (optional,
    first), then human and model in turn; a conversation that ends with a human turn has no reply to
    learn."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadPromptRowError("missing field 'conversations' (a non-empty list of turns)")
    messages: list[Message] = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise BadPromptRowError(f"turn {number} is not an object (got {type(turn).__name__})")
        speaker = str(turn.get("from", turn.get("role", "")))
        role = _SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise BadPromptRowError(f"turn {number} has an unknown speaker {speaker!r}")
        try:
            messages.append((role, _text(turn, "value", "content")))
        except BadPromptRowError as error:
            raise BadPromptRowError(f"turn {number}: {error}") from None
    first = 1 if messages[0][0] == "system" else 0
    for number, (role, _) in enumerate(messages[first:], start=first + 1):
        expected = "user" if (number - first) % 2 == 1 else "assistant"
        if role != expected:
            raise BadPromptRowError(f"roles out of order: turn {number} is {role}, expected {expected}")
    if len(messages) == first:
        raise BadPromptRowError("'conversations' has no human turn")
    if messages[-1][0] != "assistant":
        raise BadPromptRowError("'conversations' ends with a human turn (no reply to learn)")
    return _Example(messages[-2][1], messages[-1][1], messages=tuple(messages[:-1]))


def _task_id(row: dict) -> str:
    if row.get("task_id") is None:
        raise BadPromptRowError("missing field 'task_id'")
    return str(row["task_id"])


def _humaneval(row: dict) -> _Example:
    prompt = _text(row, "prompt")
    problem = CodeProblem(_task_id(row), prompt, _text(row, "test"), _text(row, "entry_point"))
    return _Example(prompt, _optional_text(row, "canonical_solution"), problem)


def _mbpp_entry_point(code: str, tests: list[str]) -> str:
    """The function of MBPP's reference code that the tests call (its last top-level one if none is)."""
    try:
        names = [node.name for node in ast.parse(code).body if isinstance(node, ast.FunctionDef)]
    except SyntaxError as error:
        raise BadPromptRowError(f"field 'code' is not valid Python ({error.msg})") from None
    if not names:
        raise BadPromptRowError("field 'code' defines no function")
    called = [name for name in names if any(f"{name}(" in test for test in tests)]
    return (called or names)[-1]


def _mbpp(row: dict) -> _Example:
    """MBPP as a completion task: the description and the first test in a docstring, then the model
    writes the whole function; `check` runs the row's asserts, which call the function by name."""
    text, code = _text(row, "text", "prompt"), _text(row, "code")
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise BadPromptRowError("field 'test_list' is not a non-empty list of assert statements")
    entry_point = _mbpp_entry_point(code, tests)
    prompt = f'"""\n{text.strip()}\n{tests[0].strip()}\n"""\n'
    setup = _optional_text(row, "test_setup_code") or ""
    check = "def check(candidate):\n" + "".join(f"    {test.strip()}\n" for test in tests)
    problem = CodeProblem(_task_id(row), prompt, f"{setup}\n{check}", entry_point, MBPP_STOP_SEQUENCES)
    return _Example(prompt, code, problem)


def _generic(row: dict) -> _Example:
    return _Example(_text(row, "prompt"), _optional_text(row, "answer", "completion", "response"))


_EXTRACTORS: dict[str, Callable[[dict], _Example]] = {
    "gsm8k": _gsm8k,
    "spider": _spider,
    "code-search-net": _code_search_net,
    "sharegpt": _sharegpt,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "jsonl": _generic,
    "generic": _generic,
}

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
# The paper's plain templates, used when the tokenizer has no chat template (sharegpt: `_vicuna`).
_PLAIN_TEMPLATES = {
    "gsm8k": "Question: {request}\nAnswer: Let's think step by step.\n",
    "spider": "Translate the question into SQL.\n{request}\nSQL: ",
    "code-search-net": "Please generate code based on the following doc:\n{request}\n",
    "humaneval": "{request}",
    "mbpp": "{request}",
    "jsonl": "{request}",
    "generic": "{request}",
}


def detect_format(row: Any) -> str | None:
    """The format a row's fields point to, or None."""
    if not isinstance(row, dict):
        return None
    if "conversations" in row:
        return "sharegpt"
    if {"prompt", "test", "entry_point"} <= row.keys():
        return "humaneval"
    if "test_list" in row and ("text" in row or "prompt" in row):
        return "mbpp"
    if "question" in row and "query" in row:
        return "spider"
    if "question" in row:
        return "gsm8k"
    if "docstring" in row or "func_documentation_string" in row:
        return "code-search-net"
    if "prompt" in row:
        return "generic"
    return None


# -- reading files -------------------------------------------------------------------------------


def _expand(spec: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    """(filesystem, files, base directory) for a file, a directory, or a glob; local or remote."""
    filesystem, path = fsspec.core.url_to_fs(spec, **options)
    if any(char in path for char in "*?["):
        files = sorted(filesystem.glob(path))
        base = path[: min(path.find(char) for char in "*?[" if char in path)].rsplit("/", 1)[0]
    elif filesystem.isdir(path):
        files = sorted(p for p in filesystem.find(path) if p.endswith(_FILE_SUFFIXES))
        base = path
    elif filesystem.isfile(path):
        files, base = [path], posixpath.dirname(path)
    else:
        raise FileNotFoundError(f"prompt source {spec!r} does not exist")
    files = [f for f in files if not posixpath.basename(f).startswith((".", "_"))]
    if not files:
        raise FileNotFoundError(f"prompt source {spec!r} holds no {'/'.join(_FILE_SUFFIXES)} files")
    return filesystem, files, base


def _rows(filesystem: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[int, Any]]:
    """(1-based row number, parsed row or BadPromptRowError) for each row of a file."""
    plain = path.removesuffix(".gz")
    if plain.endswith(".parquet"):
        with filesystem.open(path, "rb") as handle:
            for number, row in enumerate(pq.read_table(handle).to_pylist(), start=1):
                yield number, row
        return
    with filesystem.open(path, "r", encoding="utf-8", compression="infer") as handle:
        text = handle.read()
    if plain.endswith(".json") and text.lstrip().startswith("["):  # a JSON array, e.g. Spider's
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            yield 1, BadPromptRowError(f"not valid JSON ({error.msg} at line {error.lineno})")
            return
        yield from enumerate(rows, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            yield number, BadPromptRowError(f"not JSON ({error.msg})")


# -- templates and tokens ------------------------------------------------------------------------


def _tokenize_prompt(tokenizer, fmt: str, example: _Example, use_chat_template: bool) -> tuple[str, list[int]]:
    messages = example.messages or (("user", example.request),)
    if use_chat_template and fmt not in _COMPLETION_FORMATS and has_chat_template(tokenizer):
        return encode_chat(tokenizer, messages)
    if fmt == "sharegpt":
        text = _vicuna(messages, tokenizer.eos_token or "</s>")
    else:
        text = _PLAIN_TEMPLATES[fmt].format(request=example.request)
    return text, tokenizer(text)["input_ids"]


def _vicuna(messages: tuple[Message, ...], end_of_reply: str) -> str:
    """Vicuna v1.1's rendering (FastChat's), the paper's chat format: the system message (else
    Vicuna's), then `USER: ... ASSISTANT: ...</s>` per exchange, ending with `ASSISTANT:`."""
    system = messages[0][1] if messages[0][0] == "system" else _VICUNA_SYSTEM
    turns = messages[1:] if messages[0][0] == "system" else messages
    said = "".join(f"USER: {text} " if role == "user" else f"ASSISTANT: {text}{end_of_reply}" for role, text in turns)
    return f"{system} {said}ASSISTANT:"


def _label_ids(tokenizer, answer: str | None) -> list[int] | None:
    if answer is None:
        return None
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def _file_prompt_id(name: str, row: int) -> str:
    return hashlib.sha1(f"{name}\0{row}".encode()).hexdigest()[:16]


# -- entry points --------------------------------------------------------------------------------


def load_prompts(
    spec: str,
    tokenizer,
    format: str = "auto",
    max_prompt_tokens: int | None = None,
    limit: int | None = None,
    strict: bool = False,
    storage_options: dict[str, Any] | None = None,
    use_chat_template: bool = True,
) -> tuple[list[PromptRecord], list[BadPromptRow]]:
    """Tokenized prompts from `spec`, and the rows that were skipped with their reasons.

    `spec` is a file, directory or glob (local or a URI such as `s3://bucket/prompts/*.jsonl`),
    or a toy source: `toy`, `toy:heldout`, `toy-math:train`, `toy-sql:heldout`, `toy-code:heldout`,
    `toy-chat:heldout`, ... (split defaults to train). Raises FileNotFoundError for a missing source,
    ValueError for an unknown format or a file whose format cannot be detected, BadPromptRowError
    for a bad row when `strict`."""
    if format not in FORMATS:
        raise ValueError(f"unknown prompt format {format!r}; choose from {', '.join(FORMATS)}")
    toy = parse_toy_name(spec)
    if toy is not None:
        examples = _toy_examples(toy.domain, toy.split, spec, limit, tokenizer)
    else:
        examples = _file_examples(spec, format, storage_options or {}, use_chat_template, tokenizer)
    records: list[PromptRecord] = []
    bad_rows: list[BadPromptRow] = []
    first_rows: dict[str, int] = {}  # prompt id -> row that used it first
    for item in examples:
        if not isinstance(item, BadPromptRow):
            if max_prompt_tokens is not None and len(item.prompt_ids) > max_prompt_tokens:
                item = BadPromptRow(item.source, item.row,
                              f"prompt has {len(item.prompt_ids)} tokens, over the maximum {max_prompt_tokens}")
            elif item.prompt_id in first_rows:
                # A trajectory is keyed by prompt id: a second copy could only collide with the first.
                item = BadPromptRow(item.source, item.row, f"duplicate of row {first_rows[item.prompt_id]} "
                                                     f"(same prompt id {item.prompt_id})")
        if isinstance(item, BadPromptRow):
            if strict:
                raise BadPromptRowError(str(item))
            bad_rows.append(item)
            continue
        first_rows[item.prompt_id] = item.row
        records.append(item)
        if limit is not None and len(records) >= limit:
            break
    return records, bad_rows


def _toy_examples(domain: str, split: str, spec: str, limit: int | None, tokenizer) -> Iterator[PromptRecord]:
    for row, item in enumerate(toy_prompts(split, domain, limit=limit), start=1):
        # Toy prompts carry their template already; encoding prepends BOS as in teacher training
        # (chat's tokenizer has none: its prompt is the rendered conversation, as encode_chat encodes it).
        problem = CodeProblem(item.prompt_id, item.prompt, item.test, item.entry_point) if item.test else None
        yield PromptRecord(item.prompt_id, tokenizer(item.prompt)["input_ids"],
                           _label_ids(tokenizer, item.answer), item.prompt, item.answer, spec, row, problem)


def _file_examples(
    spec: str, format: str, options: dict[str, Any], use_chat_template: bool, tokenizer
) -> Iterator[PromptRecord | BadPromptRow]:
    filesystem, files, base = _expand(spec, options)
    for path in files:
        source = display_path(filesystem, path)
        name = posixpath.relpath(path, base) if base else posixpath.basename(path)
        fmt = None if format == "auto" else format
        for row, parsed in _rows(filesystem, path):
            if isinstance(parsed, BadPromptRowError):
                yield BadPromptRow(source, row, str(parsed))
                continue
            if fmt is None:
                fmt = detect_format(parsed)
                if fmt is None:
                    fields = sorted(parsed) if isinstance(parsed, dict) else type(parsed).__name__
                    raise ValueError(
                        f"{source}: cannot detect the prompt format from row {row} (fields {fields}); "
                        f"pass one of {', '.join(FORMATS[1:])}"
                    )
            if not isinstance(parsed, dict):
                yield BadPromptRow(source, row, f"not a JSON object (got {type(parsed).__name__})")
                continue
            try:
                example = _EXTRACTORS[fmt](parsed)
            except BadPromptRowError as error:
                yield BadPromptRow(source, row, str(error))
                continue
            text, ids = _tokenize_prompt(tokenizer, fmt, example, use_chat_template)
            yield PromptRecord(_file_prompt_id(name, row), ids, _label_ids(tokenizer, example.answer),
                               text, example.answer, source, row, example.problem)
