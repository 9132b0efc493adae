"""benchmarks/results_table.py: a report.json written by `cllm.report.write_report` prints as the
Markdown rows that docs/results.md quotes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cllm.evaluation import ModelEvaluation, RunResult
from cllm.jacobi import RowStats
from cllm.report import write_report

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "results_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(decoding: str, n_token: int, forwards: list[int], seconds: float, accuracy: float) -> RunResult:
    """Two prompts answered [1, 2, 3] and [4, 5] (5 tokens, all timed), in the given forwards per prompt."""
    per_prompt = [RowStats(forwards=f, new_tokens=n, iterations_per_block=[f]) for f, n in zip(forwards, [3, 2])]
    return RunResult(decoding=decoding, n_token=n_token, outputs=[[1, 2, 3], [4, 5]], per_prompt=per_prompt,
                     seconds=seconds, timed_new_tokens=5, accuracy=accuracy)


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    pytest.importorskip("matplotlib")  # write_report draws its plots too
    evaluations = [
        ModelEvaluation("teacher", [run("ar", 1, [3, 2], seconds=1.0, accuracy=1.0)]),
        ModelEvaluation("cllm", [run("jacobi", 4, [1, 1], seconds=0.5, accuracy=0.5)]),
    ]
    write_report(evaluations, "teacher", tmp_path, settings={"prompts": "toy-math:heldout", "limit": 2})
    return tmp_path


TEACHER = "| toy-math:heldout | 2 | teacher | ar | 1 | 1.00 | 1.00× | 100.0% | – | 100.0% |"
CLLM = "| toy-math:heldout | 2 | cllm | jacobi | 4 | 2.50 | 2.00× | 50.0% | – | 100.0% |"


def test_a_report_prints_one_row_per_model_and_method(report_dir):
    lines = load_script().markdown([report_dir / "report.json"]).splitlines()
    assert lines[0].startswith("| prompts | n prompts | model | decoding | n | TPF | speedup | accuracy |")
    assert lines[2:] == [TEACHER, CLLM]


def test_several_reports_share_one_header(report_dir, capsys):
    load_script().main([str(report_dir), str(report_dir / "report.json")])  # a folder or the file
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == [TEACHER, CLLM, TEACHER, CLLM]
    assert sum(line.startswith("| prompts |") for line in lines) == 1
