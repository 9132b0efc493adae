"""Collect Jacobi trajectories with Ray Data: prompts in, Parquet trajectory shards out.

    ray job submit --working-dir . -- python pipelines/collect.py \
        --model toy --prompts toy:train --output /abs/path/trajectories --limit 200

Recipe: parse flags -> check the output and read the prompts (fail fast, before Ray starts) ->
skip prompts already written (resume) -> check the cluster can hold the actor pool -> Ray Data:
a pool of generator actors, each holding the model, runs `cllm.trajectory.collect_trajectories`
on batches and writes each batch's rows as one shard into a hidden staging directory -> validate,
then move the shards into the output -> print a summary.

Exactly once: generator actors restart after a crash and Ray Data retries their batch; decoding
is seeded by the batch's prompt ids and the shard is named after them, so a retry rewrites the
same shard with the same rows. Shards become visible only by the final move, after their rows
were checked for duplicates, so a crash never leaves a partial shard that readers take as data;
a rerun then redoes only the prompts not yet written.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cllm.data import (
    TRAJECTORY_SCHEMA,
    commit_staged,
    new_staging_dir,
    read_prompt_ids,
    rows_to_table,
    write_shard,
)
from cllm.hf import load_model, load_tokenizer, model_facts
from cllm.progress import Progress
from cllm.prompts import FORMATS, BadPromptRow, PromptRecord, load_prompts
from cllm.storage import StorageError, check_writable, resolve
from cllm.trajectory import CollectConfig, collect_trajectories
from cllm_pipelines.common import CommonSettings, InputError, absolute_output, add_common_flags, fault_marker
from cllm_raytools import Request, ResourceError, init_ray, require_resources

# What each generator actor reports per prompt (its rows go straight to the staging directory).
SUMMARY_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.string()),
    pa.field("blocks", pa.int32()),
    pa.field("tokens", pa.int32()),
    pa.field("rejected_reason", pa.string()),
])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser, workers_help="generator actors (default: 2)")
    parser.add_argument("--prompts", default="toy:train",
                        help="file, directory, glob or s3:// URI, or toy[-math|-sql|-code][:train|:heldout]")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--output", default="runs/trajectories", help="directory or s3://bucket/prefix")
    parser.add_argument("--n-token", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="generation budget per prompt; prompt + budget must fit the model's context")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="default: 1 when the cluster has GPUs, else 0")
    parser.add_argument("--limit", type=int, default=None, help="read at most this many prompts")
    parser.add_argument("--augment", action="store_true", help="add half-corrected states (the paper's augmentation)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longer prompts are skipped (default: the model's context minus --max-new-tokens)")
    parser.add_argument("--min-loop-tokens", type=int, default=CollectConfig.min_loop_tokens,
                        help="drop outputs looping a short pattern over this many tokens (0: keep all)")
    parser.add_argument("--no-resume", action="store_true", help="collect every prompt even if already written")
    parser.add_argument("--strict", action="store_true", help="a bad input row is fatal")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class CollectSettings:
    """The collect recipe's flags, checked (`collect_settings`)."""

    common: CommonSettings
    prompts: str
    format: str
    output: str  # absolute when local
    config: CollectConfig
    batch_size: int
    gpus_per_worker: float | None  # None: 1 when the cluster has GPUs
    limit: int | None
    max_prompt_tokens: int | None  # None: what the model's context leaves
    resume: bool
    strict: bool


def collect_settings(args: argparse.Namespace) -> CollectSettings:
    """The settings of a run, or InputError for flags that cannot work together."""
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    return CollectSettings(
        common=CommonSettings.from_args(args), prompts=args.prompts, format=args.format,
        output=absolute_output(args.output),
        config=CollectConfig(n_token=args.n_token, max_new_tokens=args.max_new_tokens, seed=args.seed,
                             augment=args.augment, min_loop_tokens=args.min_loop_tokens),
        batch_size=args.batch_size, gpus_per_worker=args.gpus_per_worker, limit=args.limit,
        max_prompt_tokens=args.max_prompt_tokens, resume=not args.no_resume, strict=args.strict,
    )


def prompt_budget(context_length: int | None, max_new_tokens: int) -> int | None:
    """The longest prompt the model's context leaves room for, when the context is known."""
    if context_length is None:
        return None
    if max_new_tokens >= context_length:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{context_length}-token context; lower it or set --max-prompt-tokens")
    return context_length - max_new_tokens


def shard_name(prompt_ids: list[str]) -> str:
    """A batch's shard name, fixed by its prompts: a retried batch overwrites its own shard."""
    return hashlib.sha1("\0".join(prompt_ids).encode()).hexdigest()[:24] + ".parquet"


class TrajectoryCollector:
    """Ray Data UDF: loads the model once per actor, then decodes each batch of prompts, writes
    the batch's trajectory rows as one staged shard and returns one summary row per prompt."""

    def __init__(self, model_name: str, config: CollectConfig, staging: str, options: dict[str, Any],
                 fault_marker: str | None = None):
        self.model, self.tokenizer = load_model(model_name)
        self.model_name, self.config = model_name, config
        self.filesystem, self.staging = resolve(staging, options)
        self.fault_marker = fault_marker
        self.batches = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        if self.fault_marker and self.batches == 2 and not os.path.exists(self.fault_marker):
            open(self.fault_marker, "w").close()  # tests: die once, so the batch is retried
            os._exit(1)
        prompts = batch.to_pylist()
        result = collect_trajectories(self.model, self.tokenizer, prompts, self.model_name, self.config)
        if result.rows:
            name = shard_name([prompt["prompt_id"] for prompt in prompts])
            write_shard(rows_to_table(result.rows), f"{self.staging}/{name}", self.filesystem)
        blocks, tokens = Counter(), Counter()
        for row in result.rows:
            blocks[row.prompt_id] += 1
            tokens[row.prompt_id] += row.fixed_length
        summary = [{"prompt_id": p["prompt_id"], "blocks": blocks[p["prompt_id"]], "tokens": tokens[p["prompt_id"]],
                    "rejected_reason": result.rejected.get(p["prompt_id"])} for p in prompts]
        return pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)


def collect(todo: list[PromptRecord], settings: CollectSettings, staging: str, gpus: float) -> dict[str, str]:
    """Run the Ray Data job, printing one progress line. Returns the prompts the cleaning
    rejected, with reasons."""
    import ray

    items = [{"prompt_id": r.prompt_id, "prompt_ids": r.prompt_ids, "label_ids": r.label_ids} for r in todo]
    batches = math.ceil(len(items) / settings.batch_size)
    summaries = ray.data.from_items(items, override_num_blocks=min(batches, 1000)).map_batches(
        TrajectoryCollector,
        fn_constructor_kwargs={"model_name": settings.common.model, "config": settings.config, "staging": staging,
                               "options": settings.common.storage_options, "fault_marker": fault_marker()},
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(settings.common.workers, batches)),  # no idle actors
        num_cpus=1,
        num_gpus=gpus,
        # Exactly-once output relies on Ray Data's defaults for actor pools: a dead actor is
        # restarted (max_restarts=-1) and its batches retried (max_task_retries=-1).
    )
    progress = Progress("collect", len(items), unit="prompts", stream=sys.stdout)
    rejected: dict[str, str] = {}
    done = blocks = tokens = 0
    for batch in summaries.iter_batches(batch_size=None, batch_format="pyarrow"):
        done += batch.num_rows
        blocks += pc.sum(batch.column("blocks")).as_py() or 0
        tokens += pc.sum(batch.column("tokens")).as_py() or 0
        for row in batch.filter(pc.is_valid(batch.column("rejected_reason"))).to_pylist():
            rejected[row["prompt_id"]] = row["rejected_reason"]
        progress.update(done, f"{blocks} blocks, {tokens} tokens, {len(rejected)} rejected")
    progress.close()
    return rejected


@dataclass
class Summary:
    prompts_read: int
    bad_rows: list[BadPromptRow]
    already_written: int
    submitted: int
    rejected: dict[str, str]
    written: pa.Table  # the rows this run committed
    output: str
    seconds: float

    def print(self) -> None:
        blocks = self.written.num_rows
        tokens = pc.sum(self.written.column("fixed_length")).as_py() or 0
        iterations = pc.mean(self.written.column("iterations")).as_py() or 0.0
        prompts = len(set(self.written.column("prompt_id").to_pylist()))
        print("\n== collect summary ==")
        print(f"prompts read:          {self.prompts_read}")
        print(f"  bad input rows:      {len(self.bad_rows)}")
        for bad in self.bad_rows[:20]:
            print(f"    {bad}")
        if len(self.bad_rows) > 20:
            print(f"    ... and {len(self.bad_rows) - 20} more")
        print(f"  already written:     {self.already_written} (skipped: resume)")
        print(f"  collected:           {self.submitted}")
        print(f"  rejected (cleaning): {len(self.rejected)}")
        for reason, count in Counter(self.rejected.values()).most_common():
            print(f"    {count} x {reason}")
        print(f"prompts written:       {prompts} to {self.output}")
        print(f"blocks (trajectories): {blocks}")
        print(f"tokens:                {tokens}")
        if blocks:
            print(f"seconds:               {self.seconds:.1f} (Ray start and model loading included)")
            print(f"trajectories/s:        {blocks / self.seconds:.2f}")
            print(f"tokens/s:              {tokens / self.seconds:.1f}")
            print(f"mean iterations/block: {iterations:.2f}")


def read_prompts(settings: CollectSettings) -> tuple[list[PromptRecord], list[BadPromptRow]]:
    """The prompts (and the bad rows), once the output is known to be writable: everything is
    checked before Ray starts."""
    options = settings.common.storage_options
    check_writable(settings.output, options)
    facts = model_facts(settings.common.model)
    longest = settings.max_prompt_tokens or prompt_budget(facts.context_length, settings.config.max_new_tokens)
    return load_prompts(
        settings.prompts, load_tokenizer(settings.common.model), format=settings.format, limit=settings.limit,
        strict=settings.strict, max_prompt_tokens=longest, storage_options=options,
    )


def start_ray(settings: CollectSettings) -> float:
    """Start or join Ray and check that the cluster holds the actor pool; returns GPUs per actor."""
    import ray

    init_ray(min_logical_cpus=settings.common.workers)
    gpus = settings.gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    require_resources(Request("--workers", settings.common.workers, cpus=1, gpus=gpus),
                      settings.common.wait_for_resources_s)
    return gpus


def main(argv: list[str] | None = None) -> int:
    try:
        settings = collect_settings(parse_args(argv))
        records, bad_rows = read_prompts(settings)
    except (StorageError, FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    options = settings.common.storage_options
    existing = read_prompt_ids(settings.output, options) if settings.resume else set()
    todo = [record for record in records if record.prompt_id not in existing]
    print(f"{len(records)} prompts accepted, {len(bad_rows)} bad rows, "
          f"{len(records) - len(todo)} already written, {len(todo)} to collect", flush=True)

    started = time.monotonic()
    rejected: dict[str, str] = {}
    written = TRAJECTORY_SCHEMA.empty_table()
    if todo:
        try:
            gpus = start_ray(settings)
        except ResourceError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        staging = new_staging_dir(settings.output)
        rejected = collect(todo, settings, staging, gpus)
        written = commit_staged(staging, settings.output, options, existing)
    Summary(
        prompts_read=len(records) + len(bad_rows), bad_rows=bad_rows, already_written=len(records) - len(todo),
        submitted=len(todo), rejected=rejected, written=written, output=settings.output,
        seconds=time.monotonic() - started,
    ).print()
    if (todo and written.num_rows == 0) or not records:
        print("error: no trajectories were written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
