"""toy-code: (docstring -> function source) pairs extracted with `ast` from the running
interpreter's standard library, CodeSearchNet-Python style, split into train / held-out by
top-level module. Raw source of the training modules is there for pretraining the teacher."""

from __future__ import annotations

import ast
import sysconfig
import textwrap
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from cllm.toy import SPLITS, ToyPrompt, stable_hash, toy_prompt_id

PROMPT_PREFIX = "Please generate code based on the following doc:\n"
PROMPT_SEPARATOR = "\nCode:\n"
HELDOUT_MODULUS = 10  # a top-level stdlib module is held out when its hash is 0 modulo this
_SKIPPED_STDLIB_PARTS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "site-packages",
    "dist-packages", "ensurepip", "__pycache__", "pydoc_data", "encodings", "__phello__",
})
_MAX_DOCSTRING_CHARS = 400
_MAX_CODE_CHARS = 800
_MAX_RAW_FILE_CHARS = 200_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    """Pure-Python stdlib modules, in sorted (deterministic) order, without tests, demos and
    generated data tables."""
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_STDLIB_PARTS.intersection(relative.parts) or relative.parts[0].startswith("config-"):
            continue
        files.append(path)
    return files


def code_module(path: Path) -> str:
    """The top-level module a stdlib file belongs to: the split unit, so a package is never split."""
    return path.relative_to(stdlib_root()).parts[0].removesuffix(".py")


def is_heldout(module: str) -> bool:
    return stable_hash(module) % HELDOUT_MODULUS == 0


def code_prompt(docstring: str) -> str:
    return f"{PROMPT_PREFIX}{docstring}{PROMPT_SEPARATOR}"


def function_pairs(source: str) -> Iterator[tuple[str, str, str]]:
    """(name, docstring, dedented source without the docstring) for every documented function
    (methods and nested functions included) in the Python `source`, in `ast.walk` order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        body = node.body
        # Skip one-liners and functions whose docstring shares a line with the header or the code.
        if not docstring or len(body) < 2 or body[0].lineno <= node.lineno:
            continue
        if body[1].lineno <= body[0].end_lineno:
            continue
        kept = lines[node.lineno - 1 : body[0].lineno - 1] + lines[body[0].end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        # Caps keep prompt + code within the teacher's context.
        if len(docstring) <= _MAX_DOCSTRING_CHARS and len(code) <= _MAX_CODE_CHARS:
            yield node.name, docstring, code


@cache
def corpus() -> dict[str, tuple[ToyPrompt, ...]]:
    """Both splits, from one pass over the standard library, in file order. Held-out pairs whose
    prompt also occurs in training (an overriding method that copies its parent's docstring, say)
    are dropped, so that no held-out prompt is ever seen in training."""
    splits: dict[str, list[ToyPrompt]] = {name: [] for name in SPLITS}
    for path in _stdlib_files():
        split = "heldout" if is_heldout(code_module(path)) else "train"
        source = path.read_text(encoding="utf-8", errors="replace")
        relative = path.relative_to(stdlib_root()).as_posix()
        for function, docstring, code in function_pairs(source):
            prompt = code_prompt(docstring)
            splits[split].append(ToyPrompt(toy_prompt_id("code", prompt + code), prompt, code, "code",
                                           split, f"{relative}:{function}"))
    seen = {example.prompt for example in splits["train"]}
    splits["heldout"] = [example for example in splits["heldout"] if example.prompt not in seen]
    return {split: tuple(examples) for split, examples in splits.items()}


def prompts(split: str, limit: int | None) -> list[ToyPrompt]:
    examples = list(corpus()[split])
    return examples if limit is None else examples[:limit]


def raw_texts() -> list[str]:
    """Source of the training modules, for pretraining (held-out modules are never included)."""
    return [
        path.read_text(encoding="utf-8", errors="replace")[:_MAX_RAW_FILE_CHARS]
        for path in _stdlib_files()
        if not is_heldout(code_module(path))
    ]
