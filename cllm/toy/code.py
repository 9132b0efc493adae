"""toy-code: generated Python tasks in HumanEval's form, scored by running their tests (pass@1).

Each task has HumanEval's fields: the prompt (imports, a typed `def` line, a docstring that says
what to compute, with one or two `>>>` examples), the canonical solution (a multi-line body), a
`def check(candidate)` of six asserts and the entry point. The asserts' expected values come from
running the canonical solution, here and now, on generated inputs. Nine families of different
shape (a fold with a predicate, a character transform, counting into a dict, a loop with an early
return, nested conditions, two pointers, index arithmetic, a comprehension, a call to a helper in
the prompt) vary their names, parameters, constants and predicates, so a body must be read from
the prompt. The split is a hash of the specification (the prompt without its examples), so no
held-out task is ever trained on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from cllm.toy import TOY_VERSIONS, Drawn, GeneratedTask

_SOURCE = f"cllm.toy code generator v{TOY_VERSIONS['code']}"
TEST_CASES = 6  # asserts per task
_CANDIDATE_INPUTS = 60  # inputs drawn per task, of which the tests keep those with the most varied results
LIST_PARAMS = ("nums", "values", "numbers", "items", "data", "xs", "scores", "arr", "seq", "vals")
TEXT_PARAMS = ("text", "s", "word", "line", "phrase", "name", "msg")
WORDS = ("apple", "kiwi", "fig", "banana", "plum", "cherry", "lime", "pear", "mango", "grape", "date", "melon")

Inputs = Callable[[random.Random], tuple]
"""Draws one argument tuple for a task's function."""


@dataclass(frozen=True)
class Spec:
    """A task before its examples and tests: everything that decides the body."""

    name: str  # the entry point
    params: str  # the def line's parameters, typed
    returns: str  # its return annotation
    description: str  # the docstring's text
    body: str  # the canonical solution, indented, newline-terminated
    inputs: Inputs
    imports: str = "from typing import List\n"
    helper: str = ""  # a function defined in the prompt, above the task's

    @property
    def header(self) -> str:
        helper = f"{self.helper}\n\n" if self.helper else ""
        return f"{self.imports}\n\n{helper}def {self.name}({self.params}) -> {self.returns}:\n"


def _predicate(rng: random.Random, var: str) -> tuple[str, str]:
    """(English, Python) of a predicate on the integer `var`."""
    k = rng.randint(1, 12)  # inside the lists' range (0-15), so that the constant matters
    d = rng.randint(3, 7)
    return rng.choice((
        (f"greater than {k}", f"{var} > {k}"),
        (f"less than {k}", f"{var} < {k}"),
        (f"at least {k}", f"{var} >= {k}"),
        (f"at most {k}", f"{var} <= {k}"),
        ("even", f"{var} % 2 == 0"),
        ("odd", f"{var} % 2 == 1"),
        (f"divisible by {d}", f"{var} % {d} == 0"),
        (f"equal to {k}", f"{var} == {k}"),
        (f"not equal to {k}", f"{var} != {k}"),
    ))


def _int_list(low: int = 0, high: int = 20, shortest: int = 0, longest: int = 7) -> Inputs:
    return lambda rng: ([rng.randint(low, high) for _ in range(rng.randint(shortest, longest))],)


def _name(rng: random.Random, verbs: tuple[str, ...], nouns: tuple[str, ...]) -> str:
    return f"{rng.choice(verbs)}_{rng.choice(nouns)}"


# -- the families --------------------------------------------------------------------------------


def _fold(rng: random.Random) -> Spec:
    p = rng.choice(LIST_PARAMS)
    text, cond = _predicate(rng, "value")
    what, start, update = rng.choice((
        (f"the sum of the numbers in {p} that are {text}", "0", "total += value"),
        (f"how many numbers in {p} are {text}", "0", "total += 1"),
        (f"the product of the numbers in {p} that are {text} (1 if there are none)", "1", "total *= value"),
        (f"the sum of the squares of the numbers in {p} that are {text}", "0", "total += value * value"),
    ))
    body = (f"    total = {start}\n    for value in {p}:\n        if {cond}:\n            {update}\n"
            f"    return total\n")
    name = _name(rng, ("sum", "total", "fold", "tally", "collect"), ("selected", "matching", "filtered", "picked"))
    return Spec(name,
                f"{p}: List[int]", "int", f"Return {what}.", body, _int_list(0, 15))


_CHAR_CLASSES = (
    ("a vowel", 'ch in "aeiou"'),
    ("a digit", "ch.isdigit()"),
    ("an upper-case letter", "ch.isupper()"),
    ("a space", 'ch == " "'),
    ("a lower-case letter", "ch.islower()"),
)


def _random_text(rng: random.Random) -> tuple:
    alphabet = "abcdeiouxyzABEOZ019  "
    return ("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))),)


def _transform(rng: random.Random) -> Spec:
    p = rng.choice(TEXT_PARAMS)
    letter = rng.choice("abcdexyz")
    text, cond = rng.choice((*_CHAR_CLASSES, (f'the letter "{letter}"', f'ch == "{letter}"')))
    mark = rng.choice("*#-_.!?")
    changes = [(f'replaced by "{mark}"', f'"{mark}"'), ("doubled", "ch * 2"), ("removed", None)]
    if "upper" not in text and "digit" not in text and text != "a space":  # upper-casing would change nothing
        changes.append(("upper-cased", "ch.upper()"))
    how, new = rng.choice(changes)
    # Double quotes, unlike the examples' reprs, so that a quote in the docstring opens only the
    # letter or the mark to copy; `ch = "-"` quotes it after a space, as the docstring does.
    change = "continue" if new is None else f"ch = {new}"
    body = (f"    parts = []\n    for ch in {p}:\n        if {cond}:\n            {change}\n"
            f"        parts.append(ch)\n    return \"\".join(parts)\n")
    return Spec(_name(rng, ("mask", "rewrite", "convert", "clean", "edit"), ("text", "chars", "string", "letters")),
                f"{p}: str", "str", f"Return {p} with every character that is {text} {how}.", body, _random_text)


def _count_into_dict(rng: random.Random) -> Spec:
    p = rng.choice(LIST_PARAMS)
    words = rng.random() < 0.4
    if words:
        noun, var = "words", "word"
        key_text, key = rng.choice((("length", "len(word)"), ("first letter", "word[0]"), ("last letter", "word[-1]")))
        inputs: Inputs = lambda r: ([r.choice(WORDS) for _ in range(r.randint(0, 7))],)  # noqa: E731
        element, value = "str", "1"
        aggregate = "how many words have it"
    else:
        noun, var = "numbers", "value"
        d = rng.randint(2, 6)
        key_text, key = rng.choice(((f"remainder modulo {d}", f"value % {d}"), ("last digit", "value % 10"),
                                    ("tens digit", "value // 10")))
        inputs = _int_list(0, 40)
        element = "int"
        aggregate, value = rng.choice((("how many numbers have it", "1"),
                                       ("the sum of the numbers that have it", "value")))
    body = (f"    counts = {{}}\n    for {var} in {p}:\n        key = {key}\n"
            f"        counts[key] = counts.get(key, 0) + {value}\n    return counts\n")
    key_type = "str" if key.startswith("word[") else "int"
    return Spec(_name(rng, ("count", "group", "histogram", "tally"), ("by_key", "keys", "buckets", "groups")),
                f"{p}: List[{element}]", f"Dict[{key_type}, int]",
                f"Return a dict that maps each {key_text} of the {noun} in {p} to {aggregate}.", body, inputs,
                imports="from typing import Dict, List\n")


def _early_return(rng: random.Random) -> Spec:
    p = rng.choice(LIST_PARAMS)
    text, cond = _predicate(rng, "value")
    default = rng.choice(("-1", "0", "None"))
    returns = "Optional[int]" if default == "None" else "int"
    kind = rng.randrange(3)
    if kind < 2:
        found = ("index", "the index of the first number") if kind == 0 else ("value", "the first number")
        what = f"{found[1]} in {p} that is {text}, or {default} if there is none"
        body = (f"    for index in range(len({p})):\n        value = {p}[index]\n        if {cond}:\n"
                f"            return {found[0]}\n    return {default}\n")
    else:
        what = f"the last number in {p} that is {text}, or {default} if there is none"
        body = (f"    for index in range(len({p}) - 1, -1, -1):\n        if {p}[index] {cond.split(' ', 1)[1]}:\n"
                f"            return {p}[index]\n    return {default}\n")
    return Spec(_name(rng, ("find", "locate", "search", "first", "seek"), ("match", "hit", "target", "entry")),
                f"{p}: List[int]", returns, f"Return {what}.", body, _int_list(0, 15),
                imports="from typing import List, Optional\n")


def _nested_conditions(rng: random.Random) -> Spec:
    p = rng.choice(LIST_PARAMS)
    k = rng.randint(1, 12)
    outer_text, outer = rng.choice(((f"greater than {k}", f"value > {k}"), (f"less than {k}", f"value < {k}"),
                                    (f"at least {k}", f"value >= {k}"), (f"at most {k}", f"value <= {k}")))
    d = rng.randint(3, 5)
    inner_text, inner = rng.choice((("even", "value % 2 == 0"), ("odd", "value % 2 == 1"),
                                    (f"divisible by {d}", f"value % {d} == 0")))
    m = rng.randint(2, 9)
    actions = [("add it", "total += value"), ("subtract it", "total -= value"), (f"add {m}", f"total += {m}"),
               (f"add it times {m}", f"total += value * {m}"), (f"subtract {m}", f"total -= {m}")]
    (then_text, then_code), (else_text, else_code) = rng.sample(actions, 2)
    # Each action follows its condition, as in the body, so the inner `else` reads the docstring's
    # "otherwise": four labels matched to four branches by their order were never learned at this
    # size (docs/results.md#toy-code).
    description = (f"Start a total at 0. For each number in {p} that is {outer_text}: if it is {inner_text}, "
                   f"{then_text}; otherwise {else_text}. Return the total.")
    body = (f"    total = 0\n    for value in {p}:\n        if {outer}:\n            if {inner}:\n"
            f"                {then_code}\n            else:\n                {else_code}\n    return total\n")
    return Spec(_name(rng, ("score", "weigh", "net", "balance", "sum"), ("split", "mixed", "signed", "branches")),
                f"{p}: List[int]", "int", description, body, _int_list(0, 15))


def _two_pointers(rng: random.Random) -> Spec:
    p = rng.choice(LIST_PARAMS)
    what, combine = rng.choice((
        ("sums", f"{p}[left] + {p}[right]"),
        ("products", f"{p}[left] * {p}[right]"),
        ("differences (the earlier number minus the later one)", f"{p}[left] - {p}[right]"),
        ("maximums", f"max({p}[left], {p}[right])"),
        ("minimums", f"min({p}[left], {p}[right])"),
    ))
    description = (f"Pair the first number of {p} with the last, the second with the second last, and so on, "
                   f"and return the list of the pairs' {what}. A middle number is left out.")
    body = (f"    result = []\n    left = 0\n    right = len({p}) - 1\n    while left < right:\n"
            f"        result.append({combine})\n        left += 1\n        right -= 1\n    return result\n")
    return Spec(_name(rng, ("pair", "fold", "mirror", "zip"), ("ends", "edges", "outside_in", "pairs")),
                f"{p}: List[int]", "List[int]", description, body, _int_list(0, 15))


def _index_arithmetic(rng: random.Random) -> Spec:
    p = rng.choice(LIST_PARAMS)
    k = rng.randint(1, 3)
    what, op = rng.choice((("difference between", "-"), ("sum of", "+"), ("product of", "*")))
    position = "position" if k == 1 else "positions"
    description = (f"Return, for each number of {p} from index {k} on, the {what} it and the number {k} "
                   f"{position} before it.")
    body = (f"    result = []\n    for i in range({k}, len({p})):\n        result.append({p}[i] {op} {p}[i - {k}])\n"
            f"    return result\n")
    return Spec(_name(rng, ("step", "lag", "shift", "window"), ("diffs", "deltas", "gaps", "changes")),
                f"{p}: List[int]", "List[int]", description, body, _int_list(0, 15))


def _comprehension(rng: random.Random) -> Spec:
    p = rng.choice(LIST_PARAMS)
    text, cond = _predicate(rng, "value")
    k = rng.randint(2, 9)
    mapped, expression = rng.choice(((f"each number times {k}", f"value * {k}"),
                                     (f"each number plus {k}", f"value + {k}"),
                                     (f"each number minus {k}", f"value - {k}"),
                                     ("the square of each number", "value * value")))
    order, finish = rng.choice((("in their original order", "mapped"), ("sorted in increasing order", "sorted(mapped)"),
                                ("sorted in decreasing order", "sorted(mapped, reverse=True)")))
    description = f"Return {mapped} of {p} that is {text}, {order}."
    body = (f"    kept = [value for value in {p} if {cond}]\n    mapped = [{expression} for value in kept]\n"
            f"    return {finish}\n")
    return Spec(_name(rng, ("map", "select", "scale", "build"), ("kept", "chosen", "list", "values")),
                f"{p}: List[int]", "List[int]", description, body, _int_list(0, 15))


def _helper_call(rng: random.Random) -> Spec:
    p = rng.choice(LIST_PARAMS)
    helper = rng.choice(("weight", "score", "bonus", "cost", "rank", "points"))
    k, m = rng.randint(2, 5), rng.randint(1, 9)
    helper_body = rng.choice((f"value * {k} - {m}", f"value % {k} + {m}", f"(value + {m}) // {k}",
                              f"{m} - value if value > {k} else value"))
    helper_def = f"def {helper}(value: int) -> int:\n    return {helper_body}"
    kind = rng.randrange(3)
    if kind == 0:
        description = f"Return the largest {helper}(value) over the numbers in {p}, or None if {p} is empty."
        returns = "Optional[int]"
        body = (f"    best = None\n    for value in {p}:\n        current = {helper}(value)\n"
                f"        if best is None or current > best:\n            best = current\n    return best\n")
    elif kind == 1:
        text, cond = _predicate(rng, "value")
        description = f"Return the sum of {helper}(value) over the numbers in {p} that are {text}."
        returns = "int"
        body = (f"    total = 0\n    for value in {p}:\n        if {cond}:\n            total += {helper}(value)\n"
                f"    return total\n")
    else:
        bound = rng.randint(0, 10)
        description = f"Return the numbers in {p} whose {helper}(value) is greater than {bound}, in order."
        returns = "List[int]"
        body = (f"    result = []\n    for value in {p}:\n        if {helper}(value) > {bound}:\n"
                f"            result.append(value)\n    return result\n")
    return Spec(_name(rng, ("apply", "use", "rate", "measure"), (helper, f"by_{helper}", "all")),
                f"{p}: List[int]", returns, description, body, _int_list(0, 15),
                imports="from typing import List, Optional\n", helper=helper_def)


FAMILIES: dict[str, Callable[[random.Random], Spec]] = {
    "fold": _fold,
    "transform": _transform,
    "count": _count_into_dict,
    "early_return": _early_return,
    "nested": _nested_conditions,
    "two_pointers": _two_pointers,
    "index": _index_arithmetic,
    "comprehension": _comprehension,
    "helper": _helper_call,
}


# -- tasks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeTask:
    """One task in HumanEval's form, with the family that made it."""

    family: str
    specification: str  # what decides the split: the prompt without its examples
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    def drawn(self) -> Drawn:
        """The task as `GeneratedTask` draws it: its specification decides the split."""
        return Drawn(self.specification, self.prompt, self.canonical_solution, self.test, self.entry_point)


def _call(name: str, arguments: tuple) -> str:
    return f"{name}({', '.join(map(repr, arguments))})"


_INTEGER_LITERAL = re.compile(r"(?<![\w.])\d+(?![\w.])")


def _compile(spec: Spec, body: str) -> Callable:
    namespace: dict = {}
    exec(spec.header + body, namespace)  # noqa: S102 - the generator's own code
    return namespace[spec.name]


def _outcome(function: Callable, arguments: tuple) -> str:
    try:
        return repr(function(*arguments))
    except Exception as error:  # a mutant may fail where the solution does not
        return type(error).__name__


def _off_by_one_mutants(spec: Spec) -> list[Callable]:
    """The canonical solution with one integer constant raised by one, for each constant."""
    return [_compile(spec, f"{spec.body[: m.start()]}{int(m.group()) + 1}{spec.body[m.end():]}")
            for m in _INTEGER_LITERAL.finditer(spec.body)]


def _test_inputs(spec: Spec, function: Callable, rng: random.Random) -> list[tuple]:
    """TEST_CASES different argument tuples, chosen from drawn ones so that the tests catch a wrong
    constant: greedily those that tell the most off-by-one mutants from the solution, then one per
    distinct result, then the rest, each in draw order."""
    drawn: dict[str, tuple] = {}
    for _ in range(_CANDIDATE_INPUTS):
        arguments = spec.inputs(rng)
        drawn.setdefault(repr(arguments), arguments)
    candidates = list(drawn.values())
    expected = [_outcome(function, arguments) for arguments in candidates]
    mutants = _off_by_one_mutants(spec)
    caught = [{index for index, mutant in enumerate(mutants) if _outcome(mutant, arguments) != result}
              for arguments, result in zip(candidates, expected)]
    chosen: list[int] = []
    remaining = set().union(*caught) if caught else set()
    while remaining and len(chosen) < TEST_CASES:
        best = max(range(len(candidates)), key=lambda i: len(caught[i] & remaining))
        chosen.append(best)
        remaining -= caught[best]
    seen_results = {expected[i] for i in chosen}
    for i, result in enumerate(expected):
        if len(chosen) < TEST_CASES and i not in chosen and result not in seen_results:
            chosen.append(i)
            seen_results.add(result)
    chosen += [i for i in range(len(candidates)) if i not in chosen][: TEST_CASES - len(chosen)]
    return [candidates[i] for i in chosen]


def make_task(family: str, rng: random.Random) -> CodeTask:
    """A task of `family`: its expected values come from running the canonical solution (our own
    code, so in this process) on drawn inputs chosen to catch wrong constants (`_test_inputs`);
    the docstring shows the first one or two. Specifications whose results barely vary (a predicate no input meets) are
    drawn again, so that the tests tell a right body from a wrong one."""
    while True:
        spec = FAMILIES[family](rng)
        function = _compile(spec, spec.body)
        inputs = _test_inputs(spec, function, rng)
        results = [function(*arguments) for arguments in inputs]
        if len(inputs) == TEST_CASES and len(set(map(repr, results))) >= 3:
            break
    shown = "".join(f"    >>> {_call(spec.name, args)}\n    {result!r}\n"
                    for args, result in zip(inputs, results[: rng.choice((1, 2))]))
    prompt = f'{spec.header}    """{spec.description}\n{shown}    """\n'
    asserts = "".join(f"    assert candidate({', '.join(map(repr, args))}) == {result!r}\n"
                      for args, result in zip(inputs, results))
    test = f"def check(candidate):\n{asserts}"
    return CodeTask(family, f'{spec.header}    """{spec.description}', prompt, spec.body, test, spec.name)


def specification(prompt: str) -> str:
    """A toy-code prompt without its docstring examples: the part that decides the split, and the
    part the teacher's loss covers."""
    return prompt.split("\n    >>> ", 1)[0]


# The teacher's stream draws more often the families whose bodies copy a mark or the constant of an
# arithmetic phrase ("plus 9", "add it times 2"): drawn a ninth of the time each, they were copied
# by 2 builds in 5. The two smallest families, which every build learned, are drawn least
# (docs/results.md#toy-code).
TRAIN_FAMILY_WEIGHTS = {"fold": 2, "transform": 4, "count": 2, "early_return": 2, "nested": 4, "two_pointers": 1,
                        "index": 1, "comprehension": 4, "helper": 2}


def draw_task(rng: random.Random, family_weights: dict[str, float] | None = None) -> CodeTask:
    """A task of a family drawn uniformly, or by `family_weights`."""
    if family_weights is None:  # `choice`, not `choices`: the splits' random streams stay as scored
        return make_task(rng.choice(tuple(FAMILIES)), rng)
    return make_task(rng.choices(tuple(family_weights), tuple(family_weights.values()))[0], rng)


def _draw(rng: random.Random, family_weights: dict[str, float] | None = None) -> Drawn:
    return draw_task(rng, family_weights).drawn()


TASK = GeneratedTask("code", _draw, _SOURCE, answer_prefix="",
                     teacher_draw=partial(_draw, family_weights=TRAIN_FAMILY_WEIGHTS), labelled_prompt=specification)
