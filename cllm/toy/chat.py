"""toy-chat: generated multi-turn conversations in ShareGPT form, with a checkable final answer.

An assistant keeps track of something the user states and then changes: a shopping basket, a stock
of goods, or a restaurant booking. The conversation has a system message and 1-3 user turns; every
earlier assistant turn restates the whole state, and the final turn answers a question about it
(a number, a name or a short list) in a formulaic sentence that ends "The answer is X.". Numbers
stay small and every change is one addition or subtraction, as in toy math, so a tiny model learns
the task; the items, names and counts are copied from the conversation.

The prompt is the conversation up to the final reply rendered through the teacher's ChatML chat
template (`CHAT_TEMPLATE`, which its tokenizer carries), ready for the assistant's reply. It is
rendered here with the template itself, exactly as transformers' `apply_chat_template` renders it
(a test holds `cllm.hf.render_chat` on the teacher's tokenizer to the same text), so a toy prompt
and a ShareGPT file of the same conversations give identical token ids. The split is a hash of the
whole conversation; held-out conversations are distinct. Accuracy compares the final answer's
value with the reference's (a list in any order).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from cllm.toy import TOY_VERSIONS, Drawn, GeneratedTask

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`)."""

Message = tuple[str, str]  # (role, text), as `cllm.hf.Message`

_SOURCE = f"cllm.toy chat generator v{TOY_VERSIONS['chat']}"
_ANSWER_RE = re.compile(r"The answer is ([^.\n]+)\.")
_NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Ava")
# Eight items a scenario: every item is seen often enough in a few million tokens to be copied.
_BASKET_ITEMS = (("apple", "apples"), ("pen", "pens"), ("cup", "cups"), ("plate", "plates"), ("lemon", "lemons"),
                 ("candle", "candles"), ("towel", "towels"), ("egg", "eggs"))
_STOCK_ITEMS = (("hammer", "hammers"), ("saw", "saws"), ("drill", "drills"), ("ladder", "ladders"),
                ("bucket", "buckets"), ("broom", "brooms"), ("lamp", "lamps"), ("lock", "locks"))
_HOURS = tuple(range(5, 11))  # the booking's time, "7 pm"


def _join(parts: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class _Counts:
    """A basket or a stock: (item, count) in the order the items came in, and how to say them."""

    def __init__(self, kind: str, items: list[tuple[str, int]], names: dict[str, tuple[str, str]]):
        self.kind, self.items, self.names = kind, items, names

    def noun(self, item: str, count: int) -> str:
        singular, plural = self.names[item]
        return singular if count == 1 else plural

    def say(self, item: str, count: int) -> str:
        return f"{count} {self.noun(item, count)}"

    def state(self) -> str:
        """The state as a ledger, each count after its item ("cups 8"): every later reply reads a count
        right after writing its item, a copy a tiny model learns early (an induction head), where
        "8 cups" asks for the count before the item that finds it (docs/results.md#toy-chat)."""
        listed = _join([f"{item} {count}" for item, count in self.items])
        return f"Your basket has {listed}." if self.kind == "basket" else f"We have {listed}."

    def count(self, item: str) -> int:
        return dict(self.items)[item]

    def set(self, item: str, count: int) -> None:
        self.items = [(name, count if name == item else old) for name, old in self.items]


def _item_names(items: Sequence[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Items by their plural, which names them in answers."""
    return {plural: (singular, plural) for singular, plural in items}


def _change(rng: random.Random, counts: _Counts, pool: list[str]) -> tuple[str, str]:
    """One change to a basket or stock: (the user's words, the assistant's account of it, without the
    restated state). More of an item, fewer of one, a new item (at most 3 in all, so that a reply
    that restates them stays short), or an item gone. Counts stay single digits, distinct within
    the state, so that a count names its item: copying an item after its count is then never
    ambiguous for a tiny model."""
    item = rng.choice([name for name, _ in counts.items])
    count = counts.count(item)
    basket = counts.kind == "basket"
    free = [value for value in range(1, 10) if value not in {c for _, c in counts.items}]
    more = [value - count for value in free if value > count]
    fewer = [count - value for value in free if value < count]
    kinds = [kind for kind, possible in (("more", more), ("fewer", fewer), ("new", pool and len(counts.items) < 3),
                                         ("gone", len(counts.items) > 1)) if possible]
    kind = rng.choice(kinds)
    if kind == "more":
        added = rng.choice(more)
        total = count + added
        counts.set(item, total)
        user = (f"Add {added} more {counts.noun(item, added)}." if basket
                else f"A delivery brought {counts.say(item, added)}.")
        return user, f"You add {added} to {item} {count}: {count} + {added} = {total}, so {item} {total}."
    if kind == "fewer":
        removed = rng.choice(fewer)
        left = count - removed
        counts.set(item, left)
        said = counts.say(item, removed)
        user, account = (f"Take out {said}.", "take out {} from") if basket else (f"We sold {said}.", "sell {} of")
        return user, f"You {account.format(removed)} {item} {count}: {count} - {removed} = {left}, so {item} {left}."
    if kind == "new":
        new = pool.pop()
        added = rng.choice(free)
        counts.items.append((new, added))
        said = counts.say(new, added)
        return (f"Also add {said}." if basket else f"A delivery brought {said}."), f"You add {new} {added}."
    counts.items = [(name, old) for name, old in counts.items if name != item]
    plural = counts.names[item][1]
    return (f"Remove the {plural}." if basket else f"We sold all the {plural}."), f"You remove the {plural}."


def _counts_question(rng: random.Random, counts: _Counts) -> tuple[str, str, str]:
    """(question, answer, value) about a basket or stock: one item's count, the total, the
    biggest count, or the list of items (by their plural: "apples"). Every answer restates the
    whole state first, which it then reads from."""
    basket = counts.kind == "basket"
    where = "in my basket" if basket else "in stock"
    plural = {item: counts.names[item][1] for item, _ in counts.items}
    counted = [count for _, count in counts.items]
    kinds = ["count", "list", "total", "biggest"] if len(counts.items) > 1 else ["count", "list", "total"]
    kind = rng.choice(kinds)
    if kind == "count":
        item = rng.choice([name for name, _ in counts.items])
        count = counts.count(item)
        return f"How many {plural[item]} are {where}?", f"{counts.state()} You have {item} {count}.", str(count)
    if kind == "list":
        names = _join([item for item, _ in counts.items])
        question = "What is in my basket?" if basket else "What do we have in stock?"
        return question, f"{counts.state()} The items are {names}.", names
    if kind == "biggest":
        # A running maximum, one comparison a step, as the total is a running sum. It answers with
        # the count: which item holds it was asked in three formats and never learned
        # (docs/results.md#toy-chat).
        best, steps = counted[0], []
        for count in counted[1:]:
            steps.append(f"{best} or {count} gives {max(best, count)}")
            best = max(best, count)
        question = f"What is the biggest count {where}?"
        return question, f"{counts.state()} The biggest: {', '.join(steps)}.", str(best)
    steps, total = [], counted[0]
    for count in counted[1:]:  # one addition per step, as toy math writes its sums
        steps.append(f"{total} + {count} = {total + count}")
        total += count
    sums = f"In total {', '.join(steps)}." if steps else f"In total there are {total} items."
    return f"How many items are {where} in total?", f"{counts.state()} {sums}", str(total)


def _turns(rng: random.Random, system: str, opening: str, state: Callable[[], str],
           change: Callable[[], tuple[str, str]], user_turns: int) -> tuple[list[Message], str, list[str]]:
    """The conversation before its question, for any scenario: (messages, the words the last user
    turn says before its question, the start of the final reply). With one user turn that turn is the
    opening itself. Otherwise the opening and each change get a reply that restates the `state()`,
    and half the time one last `change()` comes with the question, its account starting the reply."""
    messages: list[Message] = [("system", system)]
    if user_turns == 1:
        return messages, opening, []
    messages += [("user", opening), ("assistant", f"Noted. {state()}")]
    for _ in range(user_turns - 2):
        said, done = change()
        messages += [("user", said), ("assistant", f"{done} {state()}")]
    if rng.random() < 0.5:
        said, done = change()
        return messages, said, [done]
    return messages, "", []


def _counts_conversation(rng: random.Random, kind: str, user_turns: int) -> tuple[list[Message], str, str]:
    """A basket or stock conversation: (messages up to the final reply, the final reply, its value)."""
    if kind == "basket":
        names = _item_names(rng.sample(_BASKET_ITEMS, 6))
        system = "You keep track of the user's basket."
    else:
        names = _item_names(rng.sample(_STOCK_ITEMS, 6))
        system = "You keep track of the shop's stock."
    pool = list(names)
    start = [pool.pop() for _ in range(rng.randint(1, 3))]
    counts = _Counts(kind, list(zip(start, rng.sample(range(1, 10), len(start)))), names)
    opening = (f"Please put {_join([counts.say(i, c) for i, c in counts.items])} in my basket."
               if kind == "basket" else f"We have {_join([counts.say(i, c) for i, c in counts.items])}.")
    messages, user, reply = _turns(rng, system, opening, counts.state, lambda: _change(rng, counts, pool), user_turns)
    question, answer, value = _counts_question(rng, counts)
    messages.append(("user", f"{user} {question}".strip()))
    reply += [answer, f"The answer is {value}."]
    return messages, " ".join(reply), value


def _booking_conversation(rng: random.Random, user_turns: int) -> tuple[list[Message], str, str]:
    """A restaurant booking (people, time, name) changed over the turns, then one of its facts asked."""
    people, hour, name = rng.randint(2, 8), rng.choice(_HOURS), rng.choice(_NAMES)
    system = "You keep track of the user's table booking."

    def state() -> str:
        return f"Your table is for {people} people at {hour} pm under the name {name}."

    def change() -> tuple[str, str]:
        nonlocal people, hour, name
        kind = rng.choice([kind for kind, possible in (("more", people < 9), ("fewer", people > 2), ("time", True),
                                                       ("name", True)) if possible])
        if kind == "more":  # a single digit, as the counts of a basket
            added = rng.randint(1, min(4, 9 - people))
            people += added
            return (f"{added} more {'friend is' if added == 1 else 'friends are'} coming.",
                    f"You add {added}, so it is {people - added} + {added} = {people} people.")
        if kind == "fewer":
            removed = rng.randint(1, people - 2)
            people -= removed
            return (f"{removed} {'person cannot' if removed == 1 else 'people cannot'} come.",
                    f"You remove {removed}, so it is {people + removed} - {removed} = {people} people.")
        if kind == "time":
            hour = rng.choice([h for h in _HOURS if h != hour])
            return f"Please move it to {hour} pm.", f"You move it to {hour} pm."
        name = rng.choice([n for n in _NAMES if n != name])
        return f"Put it under the name {name}.", f"You change the name to {name}."

    opening = f"Book a table for {people} people at {hour} pm under the name {name}."
    messages, user, reply = _turns(rng, system, opening, state, change, user_turns)
    kind = rng.choice(["people", "time", "name"])
    if kind == "people":
        question, answer, value = "How many people is my table for?", f"It is for {people} people.", str(people)
    elif kind == "time":
        question, answer, value = "What time is my table?", f"It is at {hour} pm.", f"{hour} pm"
    else:
        question, answer, value = "What name is my table under?", f"It is under the name {name}.", name
    messages.append(("user", f"{user} {question}".strip()))
    reply += [state(), answer, f"The answer is {value}."]
    return messages, " ".join(reply), value


def conversation(rng: random.Random) -> tuple[list[Message], str]:
    """One conversation: (messages up to the final reply, the final reply). A system message, then
    1-3 user turns; the earlier assistant turns each restate the whole state."""
    user_turns = rng.randint(1, 3)
    scenario = rng.randrange(3)
    if scenario == 2:
        messages, reply, _ = _booking_conversation(rng, user_turns)
    else:
        messages, reply, _ = _counts_conversation(rng, "basket" if scenario == 0 else "stock", user_turns)
    return messages, reply


@lru_cache(maxsize=1)
def _compiled_template():
    # transformers' own environment for chat templates: a sandbox with trim_blocks and lstrip_blocks.
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(CHAT_TEMPLATE)


def chat_prompt(messages: Sequence[Message]) -> str:
    """The conversation rendered through `CHAT_TEMPLATE`, ready for the assistant's reply."""
    return _compiled_template().render(messages=[{"role": role, "content": text} for role, text in messages],
                                       add_generation_prompt=True)


def _draw(rng: random.Random) -> Drawn:
    messages, reply = conversation(rng)
    prompt = chat_prompt(messages)
    return Drawn(prompt, prompt, reply, messages=tuple(messages))


TASK = GeneratedTask("chat", _draw, _SOURCE, answer_prefix="")


def sharegpt_record(messages: Sequence[Message], reply: str) -> dict:
    """The ShareGPT form of a conversation and its final reply."""
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [*messages, ("assistant", reply)]
    return {"conversations": [{"from": speaker[role], "value": text} for role, text in turns]}


def final_value(text: str) -> str | None:
    """The X of the first "The answer is X." in `text`, if any."""
    match = _ANSWER_RE.search(text)
    return match.group(1).strip() if match else None


def _normalized(value: str) -> tuple[str, ...]:
    """A value as the sorted items of its list (a single value is a list of one)."""
    return tuple(sorted(part.strip().lower() for part in re.split(r",|\band\b", value) if part.strip()))


def check_answer(generated_text: str, reference_answer: str) -> bool:
    """Whether the final answer's value matches the reference's: a number, a name, a time, or a
    list of items in any order."""
    expected, got = final_value(reference_answer), final_value(generated_text)
    return expected is not None and got is not None and _normalized(got) == _normalized(expected)
