"""Evaluation of AR vs Jacobi decoding: the timing harness and the rows of the paper's Table 1.

This is the library half of `pipelines/evaluate.py` (no Ray here). It times greedy AR and Jacobi
decoding side by side on the same batches and scores quality: a task metric when there is one,
agreement with a baseline model's greedy output, and the held-out loss on reference answers
(`cllm.metrics`). `cllm.report` turns the rows into files and plots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cllm.drafts import PAPER, DecodingOptions
from cllm.execution import CodeProblem, check_completions
from cllm.hf import eos_ids, pad_id
from cllm.jacobi import (
    GenerationStats,
    JacobiOutput,
    RowStats,
    ar_generate,
    jacobi_generate,
    pad_prompts,
)
from cllm.metrics import agreement, repetition_rate
from cllm.sampling import SamplingParams
from cllm.toy import parse_toy_name
from cllm.toy.tasks import check_answer, exact_match, has_task_metric

TokenText = Callable[[int], str]
TaskMetric = Callable[[list[str]], list[bool]]
"""Checks one run's outputs, decoded to text (per prompt, in prompt order): whether each is right."""


@dataclass
class DecodeSettings:
    """How every model is decoded; shared by all models so their numbers compare."""

    n_tokens: list[int] = field(default_factory=lambda: [16])
    max_new_tokens: int = 128
    batch_size: int = 1
    seed: int = 0  # seeds the Jacobi initial guesses, so reruns draw the same guesses
    repeats: int = 1  # timed decodes per batch and method; the fastest counts (noise only slows)
    # Speed is timed on the first `timed_prompts` (None: all) at `batch_size`; the rest are decoded
    # once, untimed, `untimed_batch_size` at a time, for quality and tokens per forward only (a
    # row's outputs and forwards do not depend on its batch): at batch size 1 timing costs 10x.
    timed_prompts: int | None = None
    untimed_batch_size: int = 16
    drafting: dict[str, DecodingOptions] = field(default_factory=lambda: {"paper": PAPER})
    """Jacobi variants to run at every block size, by name ("paper": the paper's rule)."""


@dataclass
class Contender:
    """One model to time, with the prompts tokenized by its own tokenizer (prompt i of every
    contender is the same task)."""

    name: str
    model: torch.nn.Module
    prompts: list[list[int]]
    eos_token_ids: frozenset[int] = frozenset()
    pad_token_id: int = 0


@dataclass
class RunResult:
    """One decoding method (AR, or Jacobi at one block size) over all prompts of one model."""

    decoding: str  # "ar", "jacobi" (the paper's rule) or "jacobi+<variant>"
    n_token: int
    outputs: list[list[int]]  # per prompt, in prompt order
    per_prompt: list[RowStats]
    options: DecodingOptions = PAPER
    seconds: float = 0.0  # decoding wall time summed over the timed batches, warm-up excluded
    timed_new_tokens: int = 0  # tokens those timed batches generated
    example_trajectory: list[list[int]] | None = None  # one block's states, for the Figure 1 plot
    texts: list[str] | None = None  # `outputs` as text, special tokens skipped: what the task metric reads
    correct: list[bool] | None = None  # per prompt: the task metric's verdict, where there is one
    accuracy: float | None = None  # share of `correct`
    exact_match: float | None = None  # sql: share of outputs equal to the reference query

    @property
    def total(self) -> RowStats:
        return GenerationStats(rows=self.per_prompt).total

    @property
    def tokens_per_second(self) -> float:
        return self.timed_new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ModelEvaluation:
    """Everything measured for one model."""

    name: str
    runs: list[RunResult]
    heldout_loss: float | None = None
    token_text: TokenText = str  # how this model's token ids are shown in the trajectory plot
    prompt_ids: list[str] | None = None  # of the prompts, in prompt order: outputs.jsonl names them

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
    exact_match: float | None = None  # sql: share of queries equal to the reference (Spider's EM)
    fed_per_iteration: float = 0.0  # tokens a Jacobi forward fed per row (window and n-grams)
    speedup_over_jacobi: float | None = None  # tokens/s over the same model's paper-rule Jacobi at this n


# -- batching and decoding -------------------------------------------------------------------


def _decode(contender: Contender, start: int, stop: int, run: RunResult, settings: DecodeSettings) -> JacobiOutput:
    """Prompts start..stop of `contender`; prompt i's Jacobi guesses are seeded with seed + i, so
    they do not depend on how the prompts are batched."""
    input_ids, attention_mask = pad_prompts(contender.prompts[start:stop], contender.pad_token_id)
    common = {
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": contender.eos_token_ids,
        "pad_token_id": contender.pad_token_id,
    }
    if run.decoding == "ar":
        return ar_generate(contender.model, input_ids, attention_mask, **common)
    return jacobi_generate(
        contender.model, input_ids, attention_mask, n_token=run.n_token,
        sampling=SamplingParams(seed=settings.seed + start), return_trajectories=run.options == PAPER,
        decoding=run.options, **common,
    )


@torch.inference_mode()
def greedy_texts(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 batch_size: int = 25) -> list[str]:
    """Greedy AR decodes of token-id prompts, in batches, each up to the model's EOS, as text:
    for scripts that score a model's outputs without timing them."""
    eos, pad = eos_ids(tokenizer, model.generation_config), pad_id(tokenizer)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = pad_prompts(prompts[start : start + batch_size], pad)
        output = ar_generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad)
        texts += [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in output.new_tokens]
    return texts


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
    timed batch's fastest decode counts. `on_batch(done, total)` reports progress."""
    counts = {len(contender.prompts) for contender in contenders}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every contender needs the same, non-zero number of prompts, got {sorted(counts)}")
    if settings.repeats < 1 or settings.batch_size < 1 or settings.untimed_batch_size < 1:
        raise ValueError("repeats and batch sizes must be >= 1, got "
                         f"{settings.repeats}, {settings.batch_size}, {settings.untimed_batch_size}")
    if settings.timed_prompts is not None and settings.timed_prompts < 1:
        raise ValueError(f"timed_prompts must be >= 1 (or None: all), got {settings.timed_prompts}")
    methods = [("ar", 1, PAPER)] + [
        ("jacobi" if name == "paper" else f"jacobi+{name}", n, options)
        for n in settings.n_tokens
        for name, options in settings.drafting.items()
    ]
    runs = {
        c.name: [RunResult(decoding, n, outputs=[], per_prompt=[], options=options) for decoding, n, options in methods]
        for c in contenders
    }
    every = [(contender, run) for contender in contenders for run in runs[contender.name]]
    for contender, run in every:
        _decode(contender, 0, settings.batch_size, run, settings)
    batches = _batches(counts.pop(), settings)
    for done, (start, stop, timed) in enumerate(batches, start=1):
        fastest = [math.inf] * len(every)
        for repeat in range(settings.repeats if timed else 1):
            for index, (contender, run) in enumerate(every):
                began = time.perf_counter()
                output = _decode(contender, start, stop, run, settings)
                fastest[index] = min(fastest[index], time.perf_counter() - began)
                if repeat == 0:  # decoding is deterministic: later repeats only retime it
                    _record(run, output)
                    if timed:
                        run.timed_new_tokens += sum(map(len, output.new_tokens))
        if timed:
            for (_, run), seconds in zip(every, fastest):
                run.seconds += seconds
        if on_batch is not None:
            on_batch(done, len(batches))
    return runs


def _batches(prompts: int, settings: DecodeSettings) -> list[tuple[int, int, bool]]:
    """(start, stop, timed) of every batch: the timed prompts first, then the untimed rest."""
    timed = prompts if settings.timed_prompts is None else min(settings.timed_prompts, prompts)
    timed_batches = [(start, min(start + settings.batch_size, timed), True)
                     for start in range(0, timed, settings.batch_size)]
    return timed_batches + [(start, min(start + settings.untimed_batch_size, prompts), False)
                            for start in range(timed, prompts, settings.untimed_batch_size)]


def _record(run: RunResult, output: JacobiOutput) -> None:
    run.outputs.extend(output.new_tokens)
    run.per_prompt.extend(output.stats.rows)
    if run.example_trajectory is None and output.trajectories is not None:
        run.example_trajectory = _pick_example_block(output.trajectories)


# -- the table -------------------------------------------------------------------------------


def task_metric(
    prompts_spec: str,
    references: Sequence[str | None],
    prompts: Sequence[str] | None = None,
    problems: Sequence[CodeProblem | None] | None = None,
) -> TaskMetric | None:
    """The task metric of the prompts' source, checking a run's texts: pass@1 when every prompt is
    a code problem (`toy-code:heldout`, HumanEval or MBPP files: each output runs its problem's
    tests in the sandbox); for a toy source with a metric (`toy:heldout`: the final answer matches
    the reference answer text; `toy-sql:heldout`: execution accuracy on the database each prompt's
    schema describes, so `prompts` are needed); else None (other data files, or a prompt without a
    reference)."""
    if problems and all(problem is not None for problem in problems):
        return code_tests_pass(problems)
    toy = parse_toy_name(prompts_spec)
    if toy is None or not has_task_metric(toy.domain) or not references or None in references:
        return None
    if toy.domain == "sql" and (prompts is None or len(prompts) != len(references)):
        return None
    prompt_texts = list(prompts) if prompts is not None else [None] * len(references)

    def checks(texts: list[str]) -> list[bool]:
        return [bool(check_answer(toy.domain, t, r, p)) for t, r, p in zip(texts, references, prompt_texts)]

    return checks


def code_tests_pass(problems: Sequence[CodeProblem]) -> TaskMetric:
    """Whether each text, cut at HumanEval's stop sequences, passes its problem's tests in the
    sandbox (all cores at once); their share is pass@1."""

    def checks(texts: list[str]) -> list[bool]:
        return [result.passed for result in check_completions(problems, texts)]

    return checks


def exact_match_metric(prompts_spec: str, references: Sequence[str | None]) -> TaskMetric | None:
    """Whether each text equals its reference query (toy sql's exact match), else None."""
    toy = parse_toy_name(prompts_spec)
    if toy is None or toy.domain != "sql" or not references or None in references:
        return None

    def checks(texts: list[str]) -> list[bool]:
        return [bool(exact_match(toy.domain, t, r)) for t, r in zip(texts, references)]

    return checks


def score_task(evaluation: ModelEvaluation, decode: Callable[[list[int]], str], metric: TaskMetric | None = None,
               exact: TaskMetric | None = None) -> None:
    """Decode every run's outputs to text once, and score the texts with the task metric and exact
    match (None without): the report's accuracy and outputs.jsonl read the same texts."""
    for run in evaluation.runs:
        run.texts = [decode(output) for output in run.outputs]
        run.correct = metric(run.texts) if metric else None
        run.accuracy = _share(run.correct)
        run.exact_match = _share(exact(run.texts)) if exact else None


def _share(flags: list[bool] | None) -> float | None:
    return None if flags is None else sum(flags) / max(len(flags), 1)


def report_rows(evaluations: Sequence[ModelEvaluation], baseline: str) -> list[ReportRow]:
    """The table: one row per model and decoding method. Speedup is tokens/s over the baseline
    model's greedy AR tokens/s; agreement is with the baseline's greedy AR output."""
    by_name = {evaluation.name: evaluation for evaluation in evaluations}
    if baseline not in by_name:
        raise ValueError(f"baseline {baseline!r} is not among the models {list(by_name)}")
    reference = by_name[baseline].run("ar", 1)
    rows = []
    for evaluation in evaluations:
        plain = {run.n_token: run for run in evaluation.runs if run.decoding == "jacobi"}
        for run in evaluation.runs:
            total = run.total
            over_jacobi = None
            if run.decoding.startswith("jacobi+") and run.n_token in plain:
                over_jacobi = _ratio(run.tokens_per_second, plain[run.n_token].tokens_per_second)
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
                    exact_match=run.exact_match,
                    fed_per_iteration=total.fed_per_iteration,
                    speedup_over_jacobi=over_jacobi,
                )
            )
    return rows


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0
