"""toy-math: generated GSM8K-style word problems with formulaic step-by-step answers ending
"The answer is N.", scored by the exact final number. The split is a hash of the question, so no
held-out question can ever appear in training."""

from __future__ import annotations

import random
import re

from cllm.toy import TOY_VERSIONS, GeneratedTask

_NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Ava")
_ITEMS = ("apples", "books", "pens", "cookies", "stickers", "marbles", "cards", "shells", "toys", "coins")
_SOURCE = f"cllm.toy math generator v{TOY_VERSIONS['math']}"
_ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")


def problem(rng: random.Random) -> tuple[str, str]:
    """One word problem (question, answer). Four templates, one or two steps, + and - only, and
    operands up to 15 (9 for the others) so that a tiny model learns the arithmetic in minutes.
    The answers repeat a fixed sentence structure, which is what lets consistency training
    fast-forward through them."""
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    template = rng.randrange(4)
    a = rng.randint(2, 15)
    b = rng.randint(1, 9)
    if template == 0:  # gain
        question = (f"{name} has {a} {item}. {friend} gives {name} {b} more {item}. "
                    f"How many {item} does {name} have now?")
        steps = [f"{name} gets {b} more, so {name} has {a} + {b} = {a + b} {item}."]
        result = a + b
    elif template == 1:  # loss
        b = min(b, a - 1)
        question = (f"{name} has {a} {item}. {name} gives {b} {item} to {friend}. "
                    f"How many {item} does {name} have now?")
        steps = [f"{name} gives away {b}, so {name} has {a} - {b} = {a - b} {item}."]
        result = a - b
    elif template == 2:  # gain then loss
        c = rng.randint(1, min(9, a + b - 1))
        question = (f"{name} has {a} {item}. {name} buys {b} more {item}. Then {name} gives {c} {item} "
                    f"to {friend}. How many {item} does {name} have now?")
        steps = [f"{name} buys {b} more, so {name} has {a} + {b} = {a + b} {item}.",
                 f"{name} gives away {c}, so {name} has {a + b} - {c} = {a + b - c} {item}."]
        result = a + b - c
    else:  # two people together
        question = (f"{name} has {a} {item}. {friend} has {b} more {item} than {name}. "
                    f"How many {item} do they have together?")
        steps = [f"{friend} has {a} + {b} = {a + b} {item}.",
                 f"Together they have {a} + {a + b} = {a + a + b} {item}."]
        result = a + a + b
    answer = " ".join([f"{name} starts with {a} {item}.", *steps, f"The answer is {result}."])
    return question, answer


def math_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _draw(rng: random.Random) -> tuple[str, str, str]:
    question, answer = problem(rng)
    return question, math_prompt(question), answer


TASK = GeneratedTask("math", _draw, _SOURCE)


def final_number(text: str) -> int | None:
    """The N of the first "The answer is N." in `text`, if any."""
    match = _ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


def check_answer(generated_text: str, reference_answer: str) -> bool:
    """Whether the final number matches the reference's."""
    expected = final_number(reference_answer)
    return expected is not None and final_number(generated_text) == expected
