"""pass@1 of the toy-code teacher per task family, to see which shapes it has not learned.

Draws held-out tasks family by family with the generator itself (`cllm.toy.code.make_task`, kept
only when the split's hash holds them out), decodes them greedily with the cached teacher
(`$CLLM_CACHE`) and scores them in the sandbox. Prints a row per family and the first failures of
the families named with --show. With --heldout N it scores instead the first N prompts of
`toy-code:heldout`, the set `toy_quality.py` scores, whose mix of families is uneven (the small
families run out of distinct held-out tasks). Run:

    python benchmarks/toy_code_families.py --tasks 30 --show nested comprehension
    python benchmarks/toy_code_families.py --heldout 500
"""

from __future__ import annotations

import argparse
import dataclasses
import random

from cllm.evaluation import greedy_texts
from cllm.execution import CodeProblem, check_completions
from cllm.toy import Drawn, is_heldout_question
from cllm.toy.code import FAMILIES, TASK, CodeTask, draw_task, make_task
from cllm.toy.teacher import load_toy


def heldout_tasks(family: str, count: int, seed: int) -> list[CodeTask]:
    rng = random.Random(f"toy-code-families-{family}-{seed}")
    tasks: dict[str, CodeTask] = {}
    while len(tasks) < count:
        task = make_task(family, rng)
        if is_heldout_question(task.specification):
            tasks.setdefault(task.specification, task)
    return list(tasks.values())


def toy_heldout_tasks(count: int) -> list[CodeTask]:
    """The first `count` prompts of `toy-code:heldout`, drawn again to learn their families."""
    tasks: dict[str, CodeTask] = {}

    def draw(rng: random.Random) -> Drawn:
        task = draw_task(rng)
        tasks[task.prompt] = task
        return task.drawn()

    return [tasks[p.prompt] for p in dataclasses.replace(TASK, draw=draw).prompts("heldout", count, seed=0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=30, help="held-out tasks per family")
    parser.add_argument("--heldout", type=int, help="score the first N prompts of toy-code:heldout instead")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", nargs="*", default=[], choices=sorted(FAMILIES), help="print failures of these")
    args = parser.parse_args()
    model, tokenizer = load_toy("code")
    tasks = (toy_heldout_tasks(args.heldout) if args.heldout else
             [task for family in FAMILIES for task in heldout_tasks(family, args.tasks, args.seed)])
    texts = greedy_texts(model, tokenizer, [tokenizer(task.prompt)["input_ids"] for task in tasks], args.max_new_tokens)
    problems = [CodeProblem(f"{task.family}/{i}", task.prompt, task.test, task.entry_point)
                for i, task in enumerate(tasks)]
    passed = [result.passed for result in check_completions(problems, texts)]
    print(f"pass@1 {sum(passed) / len(passed):.3f} on {len(passed)} held-out tasks")
    for family in FAMILIES:
        outcomes = [ok for task, ok in zip(tasks, passed) if task.family == family]
        print(f"  {family:14s} {sum(outcomes):3d}/{len(outcomes)}")
    for family in args.show:
        failures = [(task, text) for task, text, ok in zip(tasks, texts, passed) if task.family == family and not ok]
        for task, text in failures[:3]:
            print(f"=== {family}\n{task.prompt}--- greedy\n{text}--- canonical\n{task.canonical_solution}")


if __name__ == "__main__":
    main()
