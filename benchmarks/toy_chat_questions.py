"""Accuracy of the toy-chat teacher per question kind, to see which the teacher has not learned.

Decodes the held-out conversations of `toy_quality.py` greedily with the cached teacher
(`$CLLM_CACHE`), scores each with `cllm.toy.chat.check_answer`, and prints a row per question
kind (a booking's people, time and name; a basket's or stock's one count, list, total and
biggest count), per number of user turns, and the first failures of the kinds named with
--show. Run:

    python benchmarks/toy_chat_questions.py --prompts 500 --show total biggest
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from cllm.evaluation import greedy_texts
from cllm.toy.chat import check_answer
from cllm.toy.tasks import toy_prompts
from cllm.toy.teacher import load_toy

KINDS = {  # the question's words, first match wins
    "How many people": "people", "What time": "time", "What name": "name", "in total": "total",
    "biggest count": "biggest", "What is in": "list", "What do we have": "list", "How many": "count",
}


def question_kind(question: str) -> str:
    return next(kind for words, kind in KINDS.items() if words in question)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500, help="held-out conversations")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--show", nargs="*", default=[], choices=sorted(set(KINDS.values())),
                        help="print failures of these kinds")
    args = parser.parse_args()
    model, tokenizer = load_toy("chat")
    prompts = toy_prompts("heldout", "chat", limit=args.prompts)
    texts = greedy_texts(model, tokenizer, [tokenizer(p.prompt)["input_ids"] for p in prompts], args.max_new_tokens)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    by_turns: dict[int, list[bool]] = defaultdict(list)
    failures: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for prompt, text in zip(prompts, texts):
        ok = check_answer(text, prompt.answer)
        kind = question_kind(prompt.messages[-1][1])
        by_kind[kind].append(ok)
        by_turns[sum(role == "user" for role, _ in prompt.messages)].append(ok)
        if not ok:
            failures[kind].append((prompt.messages[-1][1], text, prompt.answer))
    everything = [ok for outcomes in by_kind.values() for ok in outcomes]
    print(f"accuracy {sum(everything) / len(everything):.3f} on {len(everything)} held-out conversations")
    for kind in dict.fromkeys(KINDS.values()):
        print(f"  {kind:8s} {sum(by_kind[kind]):3d}/{len(by_kind[kind])}")
    for turns in sorted(by_turns):
        print(f"  {turns} user turn{'s' if turns > 1 else ' '} {sum(by_turns[turns]):3d}/{len(by_turns[turns])}")
    for kind in args.show:
        for question, text, reference in failures[kind][:3]:
            print(f"=== {kind}: {question}\n--- greedy\n{text}\n--- reference\n{reference}")


if __name__ == "__main__":
    main()
