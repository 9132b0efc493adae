"""Print evaluation reports as one Markdown table, so a results table is read from the runs
themselves (`report.json`, written by `pipelines/evaluate.py` through `cllm.report.write_report`)
and its numbers cannot drift from them.

    python benchmarks/results_table.py runs/demo/report/report.json runs/demo-sql/report/report.json

One line per model and decoding method of each report, in the report's order. Speedup is over
that report's baseline (its greedy AR tokens/s), so speedups are comparable within a report only.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("prompts", "n prompts", "model", "decoding", "n", "TPF", "speedup", "accuracy", "exact match",
           "identical to baseline")
ALIGN = ("---", "---:", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:")


def _number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}{suffix}"


def _percent(value: float | None) -> str:
    return _number(None if value is None else 100 * value, 1, "%")


def report_lines(report: dict) -> list[str]:
    """The table's lines for one parsed report.json."""
    settings = report.get("settings", {})
    prompts = str(settings.get("prompts", "–"))
    # `limit` is the number of prompts asked for; None or 0 means the whole source.
    limit = settings.get("limit") or "all"
    return [
        f"| {prompts} | {limit} | {row['model']} | {row['decoding']} | {row['n_token']} "
        f"| {_number(row['tokens_per_forward'])} | {_number(row['speedup'], suffix='×')} "
        f"| {_percent(row.get('accuracy'))} | {_percent(row.get('exact_match'))} "
        f"| {_percent(row.get('agreement_with_baseline'))} |"
        for row in report["rows"]
    ]


def markdown(paths: Sequence[Path]) -> str:
    """The Markdown table of every report in `paths`, one header for all."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(ALIGN) + "|"]
    for path in paths:
        lines += report_lines(json.loads(Path(path).read_text()))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files (or the folders holding them)")
    args = parser.parse_args(argv)
    paths = [path / "report.json" if path.is_dir() else path for path in args.reports]
    print(markdown(paths), end="")


if __name__ == "__main__":
    main()
