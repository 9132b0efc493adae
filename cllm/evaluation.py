"""Evaluation of AR vs Jacobi decoding: speed, tokens per forward, quality, and the report.

This is the library half of `pipelines/evaluate.py` (no Ray here). It times greedy AR and Jacobi
decoding side by side on the same batches, measures quality (a task metric when there is one,
agreement with a baseline model's greedy output, held-out next-token loss on reference answers),
and writes the paper's Table 1 as `report.json`, `report.md` and PNG plots.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cllm.jacobi import (
    GenerationStats,
    JacobiOutput,
    RowStats,
    ar_generate,
    jacobi_generate,
    pad_prompts,
)
from cllm.prompts import is_toy_source
from cllm.toy import DEFAULT_DOMAIN, DOMAINS, check_answer, repetition_rate

TokenText = Callable[[int], str]
TaskMetric = Callable[[list[list[int]]], "float | None"]
"""Maps one run's outputs (per prompt, in prompt order) to a task score in [0, 1], or None."""

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SPEEDUP_PNG = "speedup.png"
TPF_HISTOGRAM_PNG = "tpf_histogram.png"
TRAJECTORY_PNG = "trajectory.png"


@dataclass
class DecodeSettings:
    """How every model is decoded; shared by all models so their numbers compare."""

    n_tokens: list[int] = field(default_factory=lambda: [16])
    max_new_tokens: int = 128
    batch_size: int = 1
    seed: int = 0  # seeds the Jacobi initial guesses, so reruns draw the same guesses
    repeats: int = 1  # timed decodes per batch and method; the fastest counts (noise only slows)


@dataclass
class Contender:
    """One model to time, with the prompts tokenized by its own tokenizer (prompt i of every
    contender is the same task)."""

    name: str
    model: torch.nn.Module
    prompts: list[list[int]]
    eos_token_id: int | None = None
    pad_token_id: int = 0


@dataclass
class RunResult:
    """One decoding method (AR, or Jacobi at one block size) over all prompts of one model."""

    decoding: str  # "ar" or "jacobi"
    n_token: int
    outputs: list[list[int]]  # per prompt, in prompt order
    per_prompt: list[RowStats]
    seconds: float = 0.0  # decoding wall time summed over batches, warm-up excluded
    example_trajectory: list[list[int]] | None = None  # one block's states, for the Figure 1 plot
    accuracy: float | None = None  # the task metric of `outputs`, where there is one

    @property
    def total(self) -> RowStats:
        return GenerationStats(rows=self.per_prompt).total

    @property
    def tokens_per_second(self) -> float:
        return self.total.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ModelEvaluation:
    """Everything measured for one model."""

    name: str
    runs: list[RunResult]
    heldout_loss: float | None = None
    token_text: TokenText = str  # how this model's token ids are shown in the trajectory plot

    def run(self, decoding: str, n_token: int) -> RunResult:
        for candidate in self.runs:
            if candidate.decoding == decoding and candidate.n_token == n_token:
                return candidate
        raise KeyError(f"model {self.name!r} has no {decoding} run at n_token={n_token}")


@dataclass
class ReportRow:
    """One line of the table. The first eleven field names are read by other tools: keep them."""

    model: str
    decoding: str
    n_token: int
    tokens_per_forward: float
    tokens_per_second: float
    speedup: float
    accuracy: float | None
    agreement_with_baseline: float  # fraction of prompts whose output equals the baseline's
    heldout_loss: float | None
    fast_forwarded_per_block: float
    stationary_per_block: float
    common_prefix_with_baseline: float  # mean common-prefix length / longer output length
    new_tokens: int
    forwards: int
    seconds: float
    iterations_per_block: float
    repetition: float  # mean share of repeated 4-grams per output: loops show up here


# -- batching and decoding -------------------------------------------------------------------


def _decode(contender: Contender, prompts: Sequence[list[int]], run: RunResult, settings: DecodeSettings) -> JacobiOutput:
    input_ids, attention_mask = pad_prompts(prompts, contender.pad_token_id)
    common = {
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": contender.eos_token_id,
        "pad_token_id": contender.pad_token_id,
    }
    if run.decoding == "ar":
        return ar_generate(contender.model, input_ids, attention_mask, **common)
    generator = torch.Generator().manual_seed(settings.seed)
    return jacobi_generate(
        contender.model, input_ids, attention_mask, n_token=run.n_token, generator=generator,
        return_trajectories=True, **common,
    )


def _pick_example_block(trajectories: list[list[list[int]]]) -> list[list[int]] | None:
    """The first block that took at least three states (something to see converge), else the
    first block at all."""
    blocks = [block for row in trajectories for block in row]
    for block in blocks:
        if len(block) >= 3:
            return block
    return blocks[0] if blocks else None


def compare_decoding(
    contenders: Sequence[Contender],
    settings: DecodeSettings,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, list[RunResult]]:
    """Greedy AR and Jacobi (at every block size in `settings.n_tokens`) for every contender, on
    the same prompts in the same batches. Returns each contender's runs, AR first.

    For a fair wall-clock comparison every (model, method) first decodes the first batch once
    untimed (warm-up: allocator, kernels, caches); then, batch by batch, all models and methods
    take turns, so a slow spell of a shared machine hits them alike, and with `repeats` > 1 each
    batch's fastest decode counts. `on_batch(done, total)` reports progress."""
    counts = {len(contender.prompts) for contender in contenders}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every contender needs the same, non-zero number of prompts, got {sorted(counts)}")
    if settings.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {settings.repeats}")
    methods = [("ar", 1)] + [("jacobi", n) for n in settings.n_tokens]
    runs = {c.name: [RunResult(decoding, n, outputs=[], per_prompt=[]) for decoding, n in methods] for c in contenders}
    timed = [(contender, run) for contender in contenders for run in runs[contender.name]]
    for contender, run in timed:
        _decode(contender, contender.prompts[: settings.batch_size], run, settings)
    starts = range(0, counts.pop(), settings.batch_size)
    for done, start in enumerate(starts, start=1):
        fastest = [math.inf] * len(timed)
        for repeat in range(settings.repeats):
            for index, (contender, run) in enumerate(timed):
                began = time.perf_counter()
                output = _decode(contender, contender.prompts[start : start + settings.batch_size], run, settings)
                fastest[index] = min(fastest[index], time.perf_counter() - began)
                if repeat == 0:  # decoding is deterministic: later repeats only retime it
                    _record(run, output)
        for (_, run), seconds in zip(timed, fastest):
            run.seconds += seconds
        if on_batch is not None:
            on_batch(done, len(starts))
    return runs


def _record(run: RunResult, output: JacobiOutput) -> None:
    run.outputs.extend(output.new_tokens)
    run.per_prompt.extend(output.stats.rows)
    if run.example_trajectory is None and output.trajectories is not None:
        run.example_trajectory = _pick_example_block(output.trajectories)


# -- quality ---------------------------------------------------------------------------------


def common_prefix_fraction(output: Sequence[int], reference: Sequence[int]) -> float:
    """Length of the common prefix over the longer sequence's length (1.0 for two empty ones)."""
    longest = max(len(output), len(reference))
    if longest == 0:
        return 1.0
    common = 0
    for a, b in zip(output, reference):
        if a != b:
            break
        common += 1
    return common / longest


def agreement(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(fraction of identical outputs, mean common-prefix fraction) against reference outputs."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    if not outputs:
        return 0.0, 0.0
    identical = sum(list(a) == list(b) for a, b in zip(outputs, references)) / len(outputs)
    prefix = sum(common_prefix_fraction(a, b) for a, b in zip(outputs, references)) / len(outputs)
    return identical, prefix


@torch.inference_mode()
def heldout_loss(
    model, prompts: Sequence[list[int]], answers: Sequence[list[int] | None], batch_size: int = 8
) -> float | None:
    """Mean next-token cross-entropy (nats per token) of reference answers given their prompts.
    Prompts without an answer are skipped; None when no prompt has one."""
    pairs = [(p, a) for p, a in zip(prompts, answers) if a]
    if not pairs:
        return None
    total_loss, total_tokens = 0.0, 0
    device = model.device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        sequences = [list(p) + list(a) for p, a in chunk]
        width = max(len(s) for s in sequences)
        # Right padding; only answer positions carry a label.
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
        labels = torch.tensor(
            [[-100] * len(p) + list(a) + [-100] * (width - len(p) - len(a)) for p, a in chunk], device=device
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        total_loss += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-100, reduction="sum",
        ).item()
        total_tokens += int((labels[:, 1:] != -100).sum())
    return total_loss / total_tokens


# -- the table -------------------------------------------------------------------------------


def toy_task_domain(prompts_spec: str) -> str | None:
    """The toy domain of a prompt source such as `toy:heldout` or `toy-code:heldout` (its task
    metric is `cllm.toy.check_answer`), or None for data files, which have no task metric here."""
    if not is_toy_source(prompts_spec):
        return None
    name = prompts_spec.partition(":")[0]
    return DEFAULT_DOMAIN if name == "toy" else name.split("-", 1)[1]


def exact_answer_metric(
    domain: str | None, decode: Callable[[list[int]], str], references: Sequence[str | None]
) -> TaskMetric | None:
    """The task metric of a toy domain as a function of a run's outputs (math: the final answer
    matches the reference answer text). None without a domain or without a reference for every
    prompt; the metric itself gives None for a domain that has none (code)."""
    if domain not in DOMAINS or not references or any(reference is None for reference in references):
        return None

    def accuracy(outputs: list[list[int]]) -> float | None:
        checks = [check_answer(domain, decode(o), r) for o, r in zip(outputs, references)]
        if any(check is None for check in checks):
            return None
        return sum(checks) / len(checks)

    return accuracy


def score_task(evaluation: ModelEvaluation, metric: TaskMetric | None) -> None:
    """Score every run of `evaluation` with the task metric (None without one)."""
    for run in evaluation.runs:
        run.accuracy = metric(run.outputs) if metric else None


def report_rows(evaluations: Sequence[ModelEvaluation], baseline: str) -> list[ReportRow]:
    """The table: one row per model and decoding method. Speedup is tokens/s over the baseline
    model's greedy AR tokens/s; agreement is with the baseline's greedy AR output."""
    by_name = {evaluation.name: evaluation for evaluation in evaluations}
    if baseline not in by_name:
        raise ValueError(f"baseline {baseline!r} is not among the models {list(by_name)}")
    reference = by_name[baseline].run("ar", 1)
    rows = []
    for evaluation in evaluations:
        for run in evaluation.runs:
            total = run.total
            identical, prefix = agreement(run.outputs, reference.outputs)
            blocks = max(total.blocks, 1)
            rows.append(
                ReportRow(
                    model=evaluation.name,
                    decoding=run.decoding,
                    n_token=run.n_token,
                    tokens_per_forward=total.tokens_per_forward,
                    tokens_per_second=run.tokens_per_second,
                    speedup=_ratio(run.tokens_per_second, reference.tokens_per_second),
                    accuracy=run.accuracy,
                    agreement_with_baseline=identical,
                    heldout_loss=evaluation.heldout_loss,
                    fast_forwarded_per_block=total.fast_forwarded / blocks,
                    stationary_per_block=total.stationary / blocks,
                    common_prefix_with_baseline=prefix,
                    new_tokens=total.new_tokens,
                    forwards=total.forwards,
                    seconds=run.seconds,
                    iterations_per_block=total.mean_iterations_per_block,
                    repetition=sum(map(repetition_rate, run.outputs)) / max(len(run.outputs), 1),
                )
            )
    return rows


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _cell(value: float | None, digits: int = 2, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[ReportRow]) -> str:
    """The rows as a Markdown table in the spirit of the paper's Table 1."""
    header = (
        "| model | decoding | n | TPF | tokens/s | speedup | accuracy | identical to baseline "
        "| common prefix | held-out loss | repetition | fast-fwd/block | stationary/block |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.model} | {r.decoding} | {r.n_token} | {_cell(r.tokens_per_forward)} "
        f"| {_cell(r.tokens_per_second, 1)} | {_cell(r.speedup)}× | {_cell(r.accuracy, percent=True)} "
        f"| {_cell(r.agreement_with_baseline, percent=True)} | {_cell(r.common_prefix_with_baseline, percent=True)} "
        f"| {_cell(r.heldout_loss, 3)} | {_cell(r.repetition, percent=True)} | {_cell(r.fast_forwarded_per_block)} | {_cell(r.stationary_per_block)} |"
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
    labels = [f"{r.model}\n{r.decoding}" + (f" n={r.n_token}" if r.decoding == "jacobi" else "") for r in rows]
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
            if run.decoding != "jacobi":
                continue
            values = [row.tokens_per_forward for row in run.per_prompt]
            axes.hist(values, bins=20, alpha=0.55, label=f"{evaluation.name} n={run.n_token}")
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
    axes.set_yticks([i + 0.5 for i in range(len(states))], ["guess"] + [f"iter {i}" for i in range(1, len(states))], fontsize=7)
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
    """Write report.json, report.md and the three plots into `output_dir`; return the rows."""
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
    plot_speedup(rows, output / SPEEDUP_PNG)
    plot_tpf_histogram(evaluations, output / TPF_HISTOGRAM_PNG)
    chosen = trajectory_to_plot(evaluations, baseline)
    if chosen is not None:
        evaluation, run = chosen
        states = run.example_trajectory
        plot_trajectory(
            states, evaluation.token_text, output / TRAJECTORY_PNG,
            title=f"{evaluation.name}, Jacobi n={run.n_token}: {len(states)} states from the initial guess to the fixed point",
        )
    return rows

