"""Evaluate models the way the paper's Table 1 does: greedy AR vs Jacobi decoding, base vs CLLM.

    python pipelines/evaluate.py --models teacher=toy cllm=runs/demo/cllm/hf \
        --prompts toy:heldout --n-token 8 16 --limit 64 --output runs/demo/report

For every model: AR and Jacobi tokens/s timed side by side in this one process (warm-up first,
the same batches, every model and method taking turns batch by batch), tokens per forward,
speedup over the baseline model's AR, fast-forwarded and stationary tokens per block, and quality
(the task metric where there is one: exact final answers for toy math, execution accuracy and
exact match for toy SQL, pass@1 for code (toy code, HumanEval or MBPP JSONL files: every output's
tests run in a sandboxed subprocess, `cllm.execution`); agreement with the baseline's greedy
output; held-out loss on reference answers). Writes report.json, report.md and PNG plots into --output,
and outputs.jsonl: every decode's text per prompt (model, decoding, n_token, prompt_id, text,
new_tokens, correct), as the task metric read it, to inspect generations or compare other decoders
with them (benchmarks/served_vs_evaluated.py compares a server's replies). One process keeps the
timing fair, so there is no Ray here.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from cllm.drafts import TECHNIQUES, DecodingOptions, variant
from cllm.evaluation import (
    Contender,
    DecodeSettings,
    ModelEvaluation,
    ReportRow,
    RunResult,
    compare_decoding,
    exact_match_metric,
    score_task,
    task_metric,
)
from cllm.hf import eos_ids, load_model, pad_id
from cllm.metrics import answer_loss
from cllm.progress import Progress
from cllm.prompts import PromptRecord, load_prompts
from cllm.report import REPORT_MD, markdown_table, visible_token, write_report
from cllm.storage import storage_options
from cllm_pipelines.common import add_s3_endpoint_flag, add_seed_flag
from cllm_raytools import quiet_libraries


@dataclass
class EvaluateConfig:
    models: dict[str, str]  # name -> hub id, local directory, or toy name; in table order
    baseline: str
    prompts: str
    format: str
    n_tokens: list[int]
    max_new_tokens: int
    limit: int | None
    batch_size: int
    output: str
    seed: int
    repeats: int
    timed_prompts: int | None = None  # timed at --batch-size; the rest decoded untimed (None: all timed)
    s3_endpoint: str | None = None  # of an S3-compatible store holding --prompts
    drafting: dict[str, DecodingOptions] | None = None  # Jacobi variants by name (None: the paper's rule)


def _model_spec(text: str) -> tuple[str, str]:
    name, separator, path = text.partition("=")
    if not separator:  # a bare path names itself
        return text, text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def parse_args(argv: list[str] | None = None) -> EvaluateConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=_model_spec, default=[("teacher", "toy")],
                        metavar="NAME=PATH", help="models to compare, in table order (default: teacher=toy)")
    parser.add_argument("--baseline", help="model whose greedy AR is the 1.0x reference (default: the first)")
    parser.add_argument("--prompts", default="toy:heldout",
                        help="prompt source, as in collect: a toy split, or JSONL/JSON/Parquet files (.gz too), local "
                             "or s3://, e.g. HumanEval.jsonl.gz (default: toy:heldout)")
    parser.add_argument("--format", default="auto", help="prompt file format, as in collect (default: auto)")
    parser.add_argument("--n-token", dest="n_tokens", nargs="+", type=int, default=[16],
                        help="Jacobi block sizes to evaluate (default: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=64, help="number of prompts (default: 64; 0 for all)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts decoded together (default: 1, as in the paper)")
    parser.add_argument("--output", default="runs/evaluate", help="report directory (default: runs/evaluate)")
    parser.add_argument("--timed-prompts", type=int, default=0,
                        help="time speed on the first N prompts only, at --batch-size; the rest are decoded once, "
                             "untimed, 16 at a time, for quality and tokens per forward (default: 0, time all)")
    add_seed_flag(parser, help_text="seed of the Jacobi initial guesses")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed decodes per batch and method, the fastest counts (default: 3)")
    add_s3_endpoint_flag(parser, help_text="endpoint URL of an S3-compatible store for --prompts")
    drafting = parser.add_argument_group("drafting beyond the paper's rule (cllm.drafts; outputs stay exactly AR's)")
    drafting.add_argument("--drafting", nargs="+", default=["paper"], metavar="VARIANT",
                          help=f"Jacobi variants, each a row per block size: paper (the paper's rule), all, or "
                               f"techniques among {', '.join(TECHNIQUES)} joined by '+' (default: paper)")
    drafting.add_argument("--recycle-candidates", type=int, default=2,
                          help="n-grams verified beside the window per forward (default: 2)")
    drafting.add_argument("--recycle-length", type=int, default=4, help="tokens per n-gram (default: 4)")
    drafting.add_argument("--blocks-in-flight", type=int, default=2, help="blocks refined at once (default: 2)")
    drafting.add_argument("--next-block-share", type=float, default=0.1,
                          help="share of the active block verified before the next one starts (default: 0.1)")
    args = parser.parse_args(argv)
    try:
        techniques = DecodingOptions(
            lookup=True, recycle_candidates=args.recycle_candidates, recycle_length=args.recycle_length,
            blocks_in_flight=args.blocks_in_flight, next_block_share=args.next_block_share,
        )
        drafting_variants = {name: variant(name, techniques) for name in dict.fromkeys(args.drafting)}
    except ValueError as error:
        parser.error(str(error))
    if args.timed_prompts < 0:
        parser.error(f"--timed-prompts must be >= 0, got {args.timed_prompts}")
    models = dict(args.models)
    if len(models) != len(args.models):
        parser.error("model names must be unique")
    baseline = args.baseline or next(iter(models))
    if baseline not in models:
        parser.error(f"--baseline {baseline!r} is not one of --models {list(models)}")
    return EvaluateConfig(
        models=models, baseline=baseline, prompts=args.prompts, format=args.format,
        n_tokens=args.n_tokens, max_new_tokens=args.max_new_tokens, limit=args.limit or None,
        batch_size=args.batch_size, output=args.output, seed=args.seed,
        repeats=args.repeats, timed_prompts=args.timed_prompts or None, s3_endpoint=args.s3_endpoint,
        drafting=drafting_variants,
    )


@dataclass
class LoadedModel:
    contender: Contender
    tokenizer: object
    records: list[PromptRecord]


def load(name: str, path: str, config: EvaluateConfig) -> LoadedModel:
    """A model with its prompts, tokenized by its own tokenizer."""
    model, tokenizer = load_model(path)
    records, bad_rows = load_prompts(config.prompts, tokenizer, format=config.format, limit=config.limit,
                                     storage_options=storage_options(config.s3_endpoint))
    if bad_rows:
        print(f"[{name}] skipped {len(bad_rows)} unusable prompt rows, e.g. {bad_rows[0]}", file=sys.stderr)
    print(f"[{name}] {path}: {len(records)} prompts", file=sys.stderr, flush=True)
    contender = Contender(
        name, model, [list(record.prompt_ids) for record in records],
        eos_token_ids=eos_ids(tokenizer, model.generation_config), pad_token_id=pad_id(tokenizer),
    )
    return LoadedModel(contender, tokenizer, records)


def measure_quality(loaded: LoadedModel, runs: list[RunResult], config: EvaluateConfig) -> ModelEvaluation:
    """Held-out loss on the reference answers, and every run's outputs as text with the task
    metric's verdicts."""
    tokenizer, records, contender = loaded.tokenizer, loaded.records, loaded.contender

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    evaluation = ModelEvaluation(
        contender.name, runs, token_text=lambda token: visible_token(tokenizer.decode([token])),
        prompt_ids=[record.prompt_id for record in records],
    )
    labels = [record.label_ids for record in records]
    evaluation.heldout_loss = answer_loss(
        contender.model, contender.prompts, labels, batch_size=max(config.batch_size, 8)
    )
    references = [record.answer for record in records]
    prompts = [record.prompt for record in records]
    problems = [record.problem for record in records]
    score_task(evaluation, decode, task_metric(config.prompts, references, prompts, problems),
               exact_match_metric(config.prompts, references))
    return evaluation


def main(argv: list[str] | None = None) -> list[ReportRow]:
    config = parse_args(argv)
    quiet_libraries()
    loaded = [load(name, path, config) for name, path in config.models.items()]
    settings = DecodeSettings(
        n_tokens=config.n_tokens, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, seed=config.seed,
        repeats=config.repeats, timed_prompts=config.timed_prompts,
        drafting=config.drafting or DecodeSettings().drafting,
    )
    prompts = len(loaded[0].records)
    timed = prompts if config.timed_prompts is None else min(config.timed_prompts, prompts)
    print(f"timing AR vs Jacobi n={config.n_tokens} on {timed} of {prompts} prompts, models interleaved batch by "
          "batch", file=sys.stderr, flush=True)
    batches = math.ceil(timed / config.batch_size) + math.ceil((prompts - timed) / settings.untimed_batch_size)
    progress = Progress("evaluate", batches, unit="batches")
    runs = compare_decoding([model.contender for model in loaded], settings,
                            on_batch=lambda done, total: progress.update(done))
    progress.close()
    evaluations = [measure_quality(model, runs[model.contender.name], config) for model in loaded]
    rows = write_report(evaluations, config.baseline, config.output, settings=asdict(config))
    print(markdown_table(rows))
    print(f"report: {Path(config.output) / REPORT_MD}")
    return rows


if __name__ == "__main__":
    main()
