"""The evaluation report: the paper's Table 1 as Markdown, the plots, and the files
(`report.json`, `report.md`, `outputs.jsonl`, PNGs). matplotlib loads only when a plot is drawn."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from cllm.evaluation import ModelEvaluation, ReportRow, RunResult, TokenText, report_rows

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
OUTPUTS_JSONL = "outputs.jsonl"
SPEEDUP_PNG = "speedup.png"
TPF_HISTOGRAM_PNG = "tpf_histogram.png"
TRAJECTORY_PNG = "trajectory.png"


def _cell(value: float | None, digits: int = 2, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[ReportRow]) -> str:
    """The rows as a Markdown table in the spirit of the paper's Table 1."""
    header = (
        "| model | decoding | n | TPF | iterations/block | fed/iteration | tokens/s | speedup | vs Jacobi "
        "| accuracy | exact match | identical to baseline "
        "| common prefix | held-out loss | repetition | fast-fwd/block | stationary/block |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.model} | {r.decoding} | {r.n_token} | {_cell(r.tokens_per_forward)} "
        f"| {_cell(r.iterations_per_block)} | {_cell(r.fed_per_iteration, 1)} "
        f"| {_cell(r.tokens_per_second, 1)} | {_cell(r.speedup)}× | {_cell(r.speedup_over_jacobi)}× "
        f"| {_cell(r.accuracy, percent=True)} "
        f"| {_cell(r.exact_match, percent=True)} | {_cell(r.agreement_with_baseline, percent=True)} "
        f"| {_cell(r.common_prefix_with_baseline, percent=True)} "
        f"| {_cell(r.heldout_loss, 3)} | {_cell(r.repetition, percent=True)} "
        f"| {_cell(r.fast_forwarded_per_block)} | {_cell(r.stationary_per_block)} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(rows: Sequence[ReportRow], path: Path) -> None:
    plt = _pyplot()
    labels = [f"{r.model}\n{r.decoding}" + (f" n={r.n_token}" if r.decoding != "ar" else "") for r in rows]
    colors = ["tab:gray" if r.decoding == "ar" else "tab:blue" for r in rows]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.3 * len(rows)), 3.8))
    bars = axes.bar(range(len(rows)), [r.speedup for r in rows], color=colors)
    axes.bar_label(bars, labels=[f"{r.speedup:.2f}×" for r in rows], fontsize=8)
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylabel("speedup over baseline AR (tokens/s)")
    axes.set_title("Wall-clock speedup")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_tpf_histogram(evaluations: Sequence[ModelEvaluation], path: Path) -> None:
    """Distribution over prompts of tokens per forward, one histogram per Jacobi run."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.8))
    for evaluation in evaluations:
        for run in evaluation.runs:
            if run.decoding == "ar":
                continue
            values = [row.tokens_per_forward for row in run.per_prompt]
            axes.hist(values, bins=20, alpha=0.55, label=f"{evaluation.name} {run.decoding} n={run.n_token}")
    axes.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_xlabel("tokens per forward (per prompt)")
    axes.set_ylabel("prompts")
    axes.set_title("Jacobi tokens per forward")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def converged_mask(states: Sequence[Sequence[int]]) -> list[list[bool]]:
    """Per state and position: the token already equals the fixed point and keeps it until the
    end (what the paper's Figure 1 highlights)."""
    fixed_point = states[-1]
    mask = [[False] * len(state) for state in states]
    for position in range(len(fixed_point)):
        for index in range(len(states) - 1, -1, -1):
            if states[index][position] != fixed_point[position]:
                break
            mask[index][position] = True
    return mask


def plot_trajectory(states: Sequence[Sequence[int]], token_text: TokenText, path: Path, title: str = "") -> None:
    """One Jacobi trajectory like the paper's Figure 1: a row of block tokens per iteration, with
    the tokens that have converged highlighted."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    converged = converged_mask(states)
    width = len(states[0])
    figure, axes = plt.subplots(figsize=(max(6.0, 0.75 * width), 0.5 * len(states) + 1.2))
    for row, state in enumerate(states):
        for column, token in enumerate(state):
            color = "#8fd18f" if converged[row][column] else "#f3f3f3"
            axes.add_patch(Rectangle((column, row), 1, 1, facecolor=color, edgecolor="white"))
            axes.text(column + 0.5, row + 0.5, token_text(token), ha="center", va="center",
                      fontsize=7, family="monospace")
    axes.set_xlim(0, width)
    axes.set_ylim(len(states), 0)
    iterations = ["guess"] + [f"iter {i}" for i in range(1, len(states))]
    axes.set_yticks([i + 0.5 for i in range(len(states))], iterations, fontsize=7)
    axes.set_xticks([i + 0.5 for i in range(width)], [str(i + 1) for i in range(width)], fontsize=7)
    axes.set_xlabel("block position (green: converged to the fixed point)")
    axes.set_title(title or "Jacobi trajectory", fontsize=9)
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def visible_token(text: str, limit: int = 6) -> str:
    """A decoded token made printable in one short cell: whitespace shown as symbols, other
    unprintable characters escaped, long tokens cut."""
    symbols = {"\n": "⏎", "\t": "⇥", " ": "·"}
    shown = "".join(symbols.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


# -- writing the report ----------------------------------------------------------------------


def trajectory_to_plot(
    evaluations: Sequence[ModelEvaluation], baseline: str
) -> tuple[ModelEvaluation, RunResult] | None:
    """The Jacobi run whose example block is drawn: the last non-baseline model (the CLLM in
    `teacher=... cllm=...`) at its largest block size, falling back to the baseline's."""
    others = [e for e in evaluations if e.name != baseline]
    candidates = list(reversed(others)) + [e for e in evaluations if e.name == baseline]
    for evaluation in candidates:
        jacobi = [r for r in evaluation.runs if r.decoding == "jacobi" and r.example_trajectory]
        if jacobi:
            return evaluation, max(jacobi, key=lambda run: run.n_token)
    return None


def write_report(
    evaluations: Sequence[ModelEvaluation],
    baseline: str,
    output_dir: str | Path,
    settings: dict | None = None,
) -> list[ReportRow]:
    """Write report.json, report.md, outputs.jsonl and the three plots into `output_dir`; return
    the rows."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    rows = report_rows(evaluations, baseline)
    (output / REPORT_JSON).write_text(
        json.dumps({"baseline": baseline, "settings": settings or {}, "rows": [asdict(r) for r in rows]}, indent=2)
        + "\n"
    )
    settings_line = ", ".join(f"{k}={v}" for k, v in (settings or {}).items())
    (output / REPORT_MD).write_text(
        f"# CLLM evaluation\n\nBaseline: `{baseline}` (speedup is over its greedy AR tokens/s; agreement is "
        f"with its greedy AR output).\n\nSettings: {settings_line}\n\n{markdown_table(rows)}"
    )
    write_outputs(evaluations, output / OUTPUTS_JSONL)
    plot_speedup(rows, output / SPEEDUP_PNG)
    plot_tpf_histogram(evaluations, output / TPF_HISTOGRAM_PNG)
    chosen = trajectory_to_plot(evaluations, baseline)
    if chosen is not None:
        evaluation, run = chosen
        states = run.example_trajectory
        plot_trajectory(
            states, evaluation.token_text, output / TRAJECTORY_PNG,
            title=f"{evaluation.name}, Jacobi n={run.n_token}: "
            f"{len(states)} states from the initial guess to the fixed point",
        )
    return rows


def write_outputs(evaluations: Sequence[ModelEvaluation], path: Path) -> None:
    """Every decoded text, one JSON line per (model, decoding, n_token, prompt) of the runs that
    `score_task` decoded, so generations can be read and other tools (a server's replies) compared
    with them. `decoding` and `n_token` are those of report.json's rows; `correct` is the task
    metric's verdict (null without one); `prompt_id` is the prompt's position when the evaluation
    has no ids."""
    with path.open("w") as file:
        for evaluation in evaluations:
            for run in evaluation.runs:
                if run.texts is None:
                    continue
                ids = evaluation.prompt_ids or [str(index) for index in range(len(run.texts))]
                correct = run.correct if run.correct is not None else [None] * len(run.texts)
                for prompt_id, output, text, verdict in zip(ids, run.outputs, run.texts, correct):
                    line = {"model": evaluation.name, "decoding": run.decoding, "n_token": run.n_token,
                            "prompt_id": prompt_id, "text": text, "new_tokens": len(output), "correct": verdict}
                    file.write(json.dumps(line) + "\n")
