"""Consistency training (CLLM) with Ray Train + DeepSpeed ZeRO on Jacobi trajectory shards.

    ray job submit --working-dir . -- python pipelines/train.py \
        --model toy --trajectories runs/demo/trajectories --output runs/demo/cllm

`--objective jacobi-forcing` trains Jacobi Forcing's progressive-noise objective instead of CLLM's
consistency loss (`cllm.forcing`): the rows of each prompt are grouped into one response record
(Ray Data groupby) and each batch packs whole responses with the noisy-context mask; the same loop
optimises it.

Recipe: parse flags -> check the inputs (shard footers, schema, vocab, DeepSpeed config; before
any worker starts) -> check the cluster can hold the workers -> Ray Data reads the shards (before
the workers take their CPUs, so ingest never waits for one), a TorchTrainer runs `train_loop`
on every worker -> print the summary. Each worker wraps the model in `deepspeed.initialize`, collates its data shard
with `cllm.collate` and optimises `cllm.losses` (consistency + w·AR). Checkpoints are DeepSpeed
checkpoints reported to Ray Train under <output>/train; a rerun with the same --output or a
worker failure (FailureConfig) resumes from the latest one. The end result is a plain Hugging
Face model with its tokenizer in <output>/hf.
"""

from __future__ import annotations

import cllm_raytools  # noqa: F401  (first: it sets Ray's log filter, which Ray reads when imported)

# isort: split
import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import pyarrow as pa
import ray
import ray.train
import torch
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cllm.collate import batch_tokens, collate, length_groups, packed_width, sample_states
from cllm.data import ROW_FIELDS, TrajectoryFormatError, TrajectoryRow, summarize_shards
from cllm.forcing import NoiseSchedule, collate_forcing, forcing_width, group_responses
from cllm.hf import load_model, model_facts
from cllm.losses import AR_TARGETS, DISTANCES, LOSS_KINDS, LossConfig, compute_losses
from cllm.progress import Progress
from cllm.schedule import warmup_cosine
from cllm.storage import resolve
from cllm_pipelines.common import CommonSettings, InputError, absolute_output, add_common_flags, fault_marker
from cllm_raytools import Request, ResourceError, init_ray, require_resources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEEPSPEED = os.path.join(REPO_ROOT, "cluster", "deepspeed", "zero2.json")
# Ray Train 2.x keeps one unconsumed report per worker and its controller drains them every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so reporting every step would cap training
# at one step per 2 s. The driver sets a shorter interval (propagated to the controller by Ray).
REPORT_POLL_INTERVAL_S = "0.1"
RUN_NAME = "train"  # Ray Train run directory under --output; a rerun with the same output resumes it
LR_SCHEDULES = ("cosine", "constant")
OBJECTIVES = ("consistency", "jacobi-forcing")
# Micro-batches a worker draws at a time and groups by length: enough to cut most padding, few enough
# to keep the order random (docs/results.md#training-recipe).
LENGTH_GROUP = 16


@dataclass
class TrainSettings:
    """The train recipe's flags, checked (`train_settings`); travels to the workers as the train
    loop config."""

    common: CommonSettings
    trajectories: str
    output: str  # absolute when local
    deepspeed_config: dict
    loss: LossConfig
    packed: bool
    epochs: int
    max_steps: int | None
    lr: float
    lr_schedule: str
    warmup_fraction: float
    batch_size: int
    grad_accum: int
    checkpoint_every: int
    objective: str = "consistency"
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    max_failures: int = 2
    gradient_checkpointing: bool = False
    packed_states: int | None = None  # states packed per row: all, or this many sampled
    length_group: int = LENGTH_GROUP  # micro-batches drawn at a time and grouped by length
    noise: NoiseSchedule | None = None  # set: Jacobi Forcing's objective on whole responses
    verbose: bool = False  # a line per optimizer step instead of a progress line
    fault_marker: str | None = None  # tests only (cllm_pipelines.common.fault_marker)
    pad_token_id: int = 0  # the model's (`checked_inputs` sets it)
    total_steps: int = 0  # optimizer steps the schedule spans (set once the records are counted)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(parser, workers_help="training workers, one CPU (or GPU) each")
    parser.add_argument("--trajectories", default="runs/demo/trajectories", help="shard directory or s3:// URI")
    parser.add_argument("--output", default="runs/demo/cllm", help="directory or s3:// URI (checkpoints, hf/)")
    parser.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto",
                        help="auto: use GPUs when the cluster has them")
    parser.add_argument("--deepspeed", default=DEFAULT_DEEPSPEED, help="DeepSpeed JSON config (ZeRO stage, ...)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="consistency",
                        help="consistency: CLLM's loss (default); jacobi-forcing: progressive noise, whole responses")
    parser.add_argument("--noise-window", type=int, default=4,
                        help="jacobi-forcing: blocks per window of the progressive noise schedule (default 4)")
    parser.add_argument("--min-noise", type=float, default=0.0, help="jacobi-forcing: noise of a window's first block")
    parser.add_argument("--max-noise", type=float, default=1.0, help="jacobi-forcing: noise of a window's last block")
    parser.add_argument("--loss", choices=LOSS_KINDS, default="global")
    parser.add_argument("--distance", choices=DISTANCES, default="fkl")
    parser.add_argument("--ar-weight", type=float, default=10.0)
    parser.add_argument("--ar-target", choices=AR_TARGETS, default="fixed-point")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                        help="cosine: linear warmup, then cosine decay to 0 at the last step (default); constant")
    parser.add_argument("--warmup-fraction", type=float, default=0.03,
                        help="fraction of the steps spent warming up (cosine only; default 0.03)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="rows (blocks; responses for jacobi-forcing) per worker per micro-batch")
    parser.add_argument("--length-group", type=int, default=LENGTH_GROUP,
                        help="micro-batches drawn at a time, their rows grouped by length to save padding "
                             f"(default {LENGTH_GROUP}; 1: random batches)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    parser.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                        help="train every state of a block in one forward (default) or one sampled state")
    parser.add_argument("--packed-states", type=int, default=None, metavar="K",
                        help="pack K of each block's states, K - 1 sampled before the fixed point and "
                             "the fixed point, instead of all (global loss only)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, about a third more compute")
    parser.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from")
    parser.add_argument("--verbose", action="store_true", help="print every optimizer step, not a progress line")
    return parser.parse_args(argv)


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """The settings of a run from its flags, or InputError for flags that cannot work together."""
    settings = TrainSettings(
        common=CommonSettings.from_args(args), trajectories=args.trajectories, output=absolute_output(args.output),
        deepspeed_config=read_deepspeed_config(args.deepspeed),
        loss=LossConfig(kind=args.loss, distance=args.distance, ar_weight=args.ar_weight, ar_target=args.ar_target),
        packed=args.packed, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, lr_schedule=args.lr_schedule,
        warmup_fraction=args.warmup_fraction, batch_size=args.batch_size, grad_accum=args.grad_accum,
        checkpoint_every=args.checkpoint_every, objective=args.objective, use_gpu=args.use_gpu,
        max_failures=args.max_failures, gradient_checkpointing=args.gradient_checkpointing,
        packed_states=args.packed_states, length_group=args.length_group,
        noise=noise_schedule(args.objective, args.noise_window, args.min_noise, args.max_noise),
        verbose=args.verbose, fault_marker=fault_marker(),
    )
    check_settings(settings)
    return settings


def noise_schedule(objective: str, window: int, min_noise: float, max_noise: float) -> NoiseSchedule | None:
    """The noise schedule for --objective jacobi-forcing (None for consistency)."""
    if objective != "jacobi-forcing":
        return None
    try:
        return NoiseSchedule(window=window, min_noise=min_noise, max_noise=max_noise)
    except ValueError as error:
        raise InputError(f"--noise-window/--min-noise/--max-noise: {error}") from error


def check_settings(settings: TrainSettings) -> None:
    """InputError unless the counts are positive and the objective's flags fit together."""
    if min(settings.batch_size, settings.length_group, settings.grad_accum, settings.checkpoint_every) < 1:
        raise InputError("--batch-size, --length-group, --grad-accum and --checkpoint-every must be >= 1")
    if not 0 <= settings.warmup_fraction < 1:
        raise InputError(f"--warmup-fraction must be in [0, 1), got {settings.warmup_fraction}")
    if settings.noise is not None and not settings.packed:
        raise InputError("--objective jacobi-forcing always packs a response's blocks: drop --no-packed")
    if settings.noise is not None and settings.loss.kind != "global":
        raise InputError("--objective jacobi-forcing learns the clean block (a global target): drop --loss local")
    if settings.packed_states is None:
        return
    if settings.packed_states < 2:
        raise InputError(f"--packed-states keeps a student and the fixed point: >= 2, got {settings.packed_states}")
    if not settings.packed or settings.loss.kind != "global" or settings.noise is not None:
        raise InputError("--packed-states samples states of packed rows for the global consistency loss: "
                         "drop --no-packed, --loss local or --objective jacobi-forcing")


# -- input checks (driver, before any worker starts) -------------------------------------------


def read_deepspeed_config(path: str) -> dict:
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read DeepSpeed config {path}: {error}") from error
    stage = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None
    if stage not in (0, 1, 2, 3):
        raise InputError(f"DeepSpeed config {path}: zero_optimization.stage must be 0..3, got {stage!r}")
    return config


def check_trajectories(uri: str, options: dict, vocab_size: int, ar_target: str) -> tuple[list[str], int]:
    """The shard paths and their row count, after checking, from the Parquet footers only, that
    there are rows, that every shard follows the schema, that one block size is used, and that
    the token ids fit the model."""
    try:
        summary = summarize_shards(uri, options)
    except (FileNotFoundError, TrajectoryFormatError) as error:
        raise InputError(str(error)) from error
    if summary.rows == 0 or summary.n_token_range is None:
        raise InputError(f"the trajectory shards under {uri} hold no rows")
    smallest, largest_block = summary.n_token_range
    if smallest != largest_block:
        raise InputError(f"the trajectories mix block sizes {smallest}..{largest_block}; train one n_token at a time")
    if summary.max_token_id >= vocab_size:
        raise InputError(
            f"the trajectories hold token id {summary.max_token_id}, but the model's vocabulary has {vocab_size} ids: "
            "were they collected with another model?"
        )
    if ar_target == "labels" and summary.rows_without_labels:
        raise InputError(f"--ar-target labels, but {summary.rows_without_labels} rows have no label_ids")
    return summary.shards, summary.rows


# -- the per-worker training loop -----------------------------------------------------------


class TrajectoryCollate(ArrowBatchCollateFn):
    """Ray Data batch (Arrow) -> `cllm.collate` batch, or `cllm.forcing` batch of responses."""

    def __init__(self, pad_token_id: int, packed: bool, labels: bool, batch_size: int, seed: int,
                 noise: NoiseSchedule | None = None, packed_states: int | None = None):
        self.pad_token_id, self.packed, self.labels, self.noise = pad_token_id, packed, labels, noise
        self.batch_size, self.packed_states = batch_size, packed_states
        self.rng = random.Random(seed)

    def __call__(self, batch: pa.Table) -> list:
        """A group of rows -> its micro-batches of `batch_size`, each of rows of similar length."""
        if self.noise is not None:  # one record per response (see `response_record`)
            responses = [response_rows(record) for record in batch.to_pylist()]
            return [collate_forcing(group, self.pad_token_id, self.noise, rng=self.rng, labels=self.labels)
                    for group in length_groups(responses, forcing_width, self.batch_size, self.rng)]
        rows = [TrajectoryRow.from_mapping(row) for row in batch.to_pylist()]
        if self.packed_states is not None:
            rows = [sample_states(row, self.packed_states, self.rng) for row in rows]
        return [collate(group, self.pad_token_id, packed=self.packed, labels=self.labels, rng=self.rng)
                for group in length_groups(rows, packed_width, self.batch_size, self.rng)]


def response_record(group: pa.Table) -> pa.Table:
    """Every row of one prompt (a Ray Data group) as one record holding its blocks; a prompt with
    a missing block fails here, naming it."""
    table = group.select(list(ROW_FIELDS))
    blocks = table.to_pylist()
    group_responses([TrajectoryRow.from_mapping(block) for block in blocks])
    # The shards' own types, so that every record has the same schema (a null column included)
    blocks_type = pa.list_(pa.struct(list(table.schema)))
    return pa.table({"prompt_id": [blocks[0]["prompt_id"]], "blocks": pa.array([blocks], type=blocks_type)})


def response_rows(record: dict) -> list[TrajectoryRow]:
    """The blocks of a `response_record`, in order."""
    return group_responses([TrajectoryRow.from_mapping(block) for block in record["blocks"]])[0]


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained
    step: int = 0  # optimizer steps


def engine_config(settings: TrainSettings, world_size: int, use_gpu: bool) -> dict:
    config = dict(settings.deepspeed_config)
    config.update(
        train_micro_batch_size_per_gpu=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        train_batch_size=settings.batch_size * settings.grad_accum * world_size,
        bf16={"enabled": use_gpu},  # fp16 does not exist on CPU, and bf16 on CPU is slow: fp32 there
    )
    return config


def worker_print(message: str) -> None:
    """Progress from a training worker, shown once on the driver. Ray Train routes print() both
    to its logger and to stdout, which showed every line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def step_reporter(settings: TrainSettings, first_step: int) -> Progress | None:
    """Rank 0's progress line (None with --verbose, which prints every step instead); a resumed
    run's rate counts the steps from `first_step` on."""
    if settings.verbose:
        return None
    return Progress("train", settings.total_steps, unit="steps", stream=sys.stdout, start=first_step)


def lr_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule as a multiplier of --lr per optimizer step. The cosine decay matters: at a
    constant rate the CLLM keeps less of the teacher's accuracy."""
    if settings.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine((step + 1) / (settings.total_steps + 1), settings.warmup_fraction)
    )


def total_steps(records: int, settings: TrainSettings) -> int:
    """Optimizer steps of the whole run: --max-steps, or what the epochs give (every worker
    drops its last partial batch)."""
    per_epoch = max(records // (settings.common.workers * settings.batch_size * settings.grad_accum), 1)
    steps = per_epoch * settings.epochs
    return min(steps, settings.max_steps) if settings.max_steps else steps


def use_the_interpreters_ninja() -> None:
    """Put this interpreter's bin directory first on PATH when it holds `ninja` (pip installs one
    with deepspeed). DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH, and ninja
    releases that hash build commands differently (1.11 and 1.13) rebuild what the other built:
    a worker that inherits another PATH than `make deepspeed-ops` had would spend a minute on it."""
    bin_directory = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(bin_directory, "ninja")) and path.split(os.pathsep)[0] != bin_directory:
        os.environ["PATH"] = bin_directory + os.pathsep + path


def new_engine(settings: TrainSettings, device: torch.device, world_size: int):
    """(DeepSpeed engine, its optimizer, the tokenizer) for the model, on `device`."""
    import deepspeed  # on the workers only

    use_gpu = device.type == "cuda"
    model, tokenizer = load_model(settings.common.model, device=device, dtype=torch.float32)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, fused=use_gpu)
    # DeepSpeed steps the scheduler with the optimizer and keeps its state in checkpoints
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler(optimizer, settings),
        config=engine_config(settings, world_size, use_gpu),
    )
    return engine, optimizer, tokenizer


def restored_state(engine, rank: int) -> tuple[TrainState, bool]:
    """Where training stands: the latest checkpoint's state (and True), or a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(), False
    with checkpoint.as_directory() as directory:
        _, client_state = engine.load_checkpoint(directory)
    state = TrainState(**client_state["progress"])
    if rank == 0:
        worker_print(f"resuming from the checkpoint at step {state.step}")
    return state, True


def epoch_batches(shard, settings: TrainSettings, epoch: int, rank: int):
    """This worker's micro-batches of one epoch, shuffled and grouped by length."""
    collate_fn = TrajectoryCollate(
        settings.pad_token_id, settings.packed, settings.loss.ar_target == "labels", settings.batch_size,
        seed=settings.common.seed * 100_003 + epoch * 1009 + rank, noise=settings.noise,
        packed_states=settings.packed_states,
    )
    group_size = settings.batch_size * settings.length_group
    groups = shard.iter_torch_batches(
        batch_size=group_size, collate_fn=collate_fn,
        local_shuffle_buffer_size=2 * group_size, local_shuffle_seed=settings.common.seed + epoch,
    )
    return (batch for group in groups for batch in group)


def finished(settings: TrainSettings, state: TrainState) -> bool:
    return settings.max_steps is not None and state.step >= settings.max_steps


def quiet_worker(device: torch.device) -> None:
    """Ray Train logs every report at INFO through a logger its level setting does not reach:
    keep this worker's log at WARNING, so the progress line is the output. DeepSpeed is told the
    accelerator instead of warning that it guessed one, and its use of a deprecated collective
    is not ours to act on."""
    logging.getLogger().setLevel(logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)


def train_loop(config: dict[str, Any]) -> None:
    use_the_interpreters_ninja()
    settings: TrainSettings = config["settings"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    quiet_worker(device)
    torch.manual_seed(settings.common.seed)
    engine, optimizer, tokenizer = new_engine(settings, device, world_size)
    state, resumed = restored_state(engine, rank)

    shard = ray.train.get_dataset_shard("train")
    meter = StepMeter(device, settings.loss)
    reporter = step_reporter(settings, state.step) if rank == 0 else None
    checkpointed_step, metrics = state.step, {}
    for epoch in range(state.epoch, settings.epochs):
        if finished(settings, state):
            break
        for index, batch in enumerate(epoch_batches(shard, settings, epoch, rank)):
            if epoch == state.epoch and index < state.batches_in_epoch:
                continue  # trained before the restart
            steps_before = engine.global_steps
            output = compute_losses(engine, batch.to(device), settings.loss)
            engine.backward(output.loss)
            engine.step()
            meter.add(batch, output)
            state = TrainState(epoch=epoch, batches_in_epoch=index + 1, step=engine.global_steps)
            if state.step == steps_before:
                continue  # still accumulating gradients
            metrics = meter.step_metrics(state, optimizer.param_groups[0]["lr"])
            if rank == 0:
                report_step(reporter, metrics, settings.total_steps)
            if state.step % settings.checkpoint_every == 0 or finished(settings, state):
                save_checkpoint(engine, state, metrics)
                checkpointed_step = state.step
                maybe_inject_fault(settings.fault_marker, rank, resumed)
            else:
                ray.train.report(metrics)
            if finished(settings, state):
                break
        else:
            state = TrainState(epoch=epoch + 1, batches_in_epoch=0, step=engine.global_steps)
    if state.step != checkpointed_step:  # the final state, unless just saved
        save_checkpoint(engine, state, metrics)
    if reporter is not None:
        reporter.close(summary_line(metrics, settings.total_steps) if metrics else "nothing left to train")

    export_model(engine, tokenizer, settings, rank)


def summary_line(metrics: dict[str, float], total_steps: int) -> str:
    return (f"finished step {metrics['step']} of {total_steps}: loss {metrics['loss']:.4f} (consistency "
            f"{metrics['consistency_loss']:.4f}, AR {metrics['ar_loss']:.4f}), {metrics['states_per_s']:.1f} states/s")


def report_step(reporter: Progress | None, metrics: dict[str, float], total_steps: int) -> None:
    if reporter is None:
        worker_print(format_metrics(metrics, total_steps))
    else:
        reporter.update(metrics["step"], f"loss {metrics['loss']:.4f} states/s {metrics['states_per_s']:.1f}")


class StepMeter:
    """Losses and throughput summed over all workers, per optimizer step."""

    def __init__(self, device: torch.device, loss: LossConfig):
        self.device, self.loss = device, loss
        self.started = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        # rows, tokens, states, consistency sum/count, AR sum/count
        self.sums = torch.zeros(7, dtype=torch.float64)

    def add(self, batch, output) -> None:
        self.sums += torch.tensor([
            batch.rows, batch_tokens(batch), output.states,
            output.consistency.total.item(), output.consistency.tokens.item(),
            output.ar.total.item(), output.ar.tokens.item(),
        ], dtype=torch.float64)

    def step_metrics(self, state: TrainState, lr: float) -> dict[str, float]:
        totals = self.sums.to(self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        rows, tokens, states, consistency, consistency_tokens, ar, ar_tokens = totals.tolist()
        elapsed = time.perf_counter() - self.started
        self.started = time.perf_counter()
        self._reset()
        consistency_loss, ar_loss = consistency / max(consistency_tokens, 1), ar / max(ar_tokens, 1)
        return {
            "step": state.step,
            "epoch": state.epoch,
            "loss": self.loss.combine(consistency_loss, ar_loss),
            "consistency_loss": consistency_loss,
            "ar_loss": ar_loss,
            "samples_per_s": rows / elapsed,
            "tokens_per_s": tokens / elapsed,
            "states_per_s": states / elapsed,
            "lr": lr,
        }


def format_metrics(metrics: dict[str, float], total_steps: int) -> str:
    return (
        f"step {metrics['step']}/{total_steps} epoch {metrics['epoch']} loss {metrics['loss']:.4f} "
        f"consistency {metrics['consistency_loss']:.4f} ar {metrics['ar_loss']:.4f} "
        f"samples/s {metrics['samples_per_s']:.2f} tokens/s {metrics['tokens_per_s']:.0f} "
        f"states/s {metrics['states_per_s']:.2f} lr {metrics['lr']:.2e}"
    )


def save_checkpoint(engine, state: TrainState, metrics: dict[str, float]) -> None:
    """Every worker writes its DeepSpeed shards to a local directory and reports it; Ray Train
    merges them into one checkpoint in storage."""
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=f"step_{state.step}", client_state={"progress": asdict(state)})
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_step_{state.step:08d}",
        )


def maybe_inject_fault(marker: str | None, rank: int, resumed: bool) -> None:
    """Testing aid for FailureConfig: the last worker fails once, right after a checkpoint."""
    if marker is None or resumed or rank == 0 or os.path.exists(marker):
        return
    with open(marker, "w") as handle:
        handle.write("injected\n")
    # The controller registers a reported checkpoint when it next polls the workers; failing at
    # once can beat that poll, and the run then restarts from scratch.
    time.sleep(20 * float(REPORT_POLL_INTERVAL_S))
    raise RuntimeError(f"injected worker failure ({marker})")


def export_model(engine, tokenizer, settings: TrainSettings, rank: int) -> None:
    """Save a consolidated Hugging Face model + tokenizer to <output>/hf. Under ZeRO-3 every
    worker takes part in gathering the parameter shards; rank 0 writes."""
    import deepspeed

    zero3 = engine.zero_optimization_stage() == 3
    parameters = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None, enabled=zero3):
        if rank != 0:
            return
        filesystem, path = resolve(f"{settings.output.rstrip('/')}/hf", settings.common.storage_options)
        with tempfile.TemporaryDirectory() as staging:
            engine.module.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if filesystem.exists(path):
                filesystem.rm(path, recursive=True)
            filesystem.put(staging.rstrip("/") + "/", path, recursive=True)
    worker_print(f"exported the trained model to {settings.output.rstrip('/')}/hf")


# -- the recipe -------------------------------------------------------------------------------


def ray_filesystem(uri: str, options: dict) -> tuple[PyFileSystem | None, str]:
    """(filesystem for Ray, path inside it): None and an absolute path for local storage."""
    if "://" not in uri:
        return None, os.path.abspath(uri)
    filesystem, path = resolve(uri, options)
    return PyFileSystem(FSSpecHandler(filesystem)), path


@dataclass(frozen=True)
class TrainInputs:
    """What the driver found in the inputs before any worker starts."""

    shards: list[str]
    rows: int
    vocab_size: int


def checked_inputs(settings: TrainSettings) -> tuple[TrainSettings, TrainInputs]:
    """The model's facts and the trajectory shards, checked against each other and against the
    settings (InputError otherwise); the settings get the model's pad id."""
    facts = model_facts(settings.common.model)
    shards, rows = check_trajectories(settings.trajectories, settings.common.storage_options, facts.vocab_size,
                                      settings.loss.ar_target)
    check_batch_fills(rows, "rows", settings)
    return replace(settings, pad_token_id=facts.pad_id), TrainInputs(shards, rows, facts.vocab_size)


def check_batch_fills(records: int, what: str, settings: TrainSettings) -> None:
    if records < settings.common.workers * settings.batch_size:
        raise InputError(f"{records} {what} cannot fill a batch of {settings.batch_size} "
                         f"on {settings.common.workers} workers")


def wait_for_free_cpus(timeout_s: float = 5.0) -> None:
    """Ray's view of free resources trails tasks that just finished (the reader's sampling
    tasks) by a moment; executing a dataset while it still shows no free CPU draws Ray Data's
    warning that the job will hang, for nothing. Wait for the view, at most `timeout_s`: a
    cluster that really has no free CPU still gets the warning."""
    deadline = time.monotonic() + timeout_s
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.1)


def training_data(settings: TrainSettings, inputs: TrainInputs) -> tuple[ray.data.Dataset, int]:
    """The trajectories as a materialized Ray dataset (one record per response for Jacobi
    Forcing), and its record count."""
    data_filesystem, _ = ray_filesystem(settings.trajectories, settings.common.storage_options)
    # Read now, while no worker holds a CPU: Ray Data excludes the training workers' resources
    # from its own budget, so on a cluster whose CPUs all go to workers a streaming read would
    # wait forever. Trajectories are small next to the model, so the object store holds them.
    # Parquet's V1 reader: V2 reads footers on a pool of 32 actors, 32 Python processes for a
    # few hundred small shards, which on 2 cores took 4x longer than V1's read tasks.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    dataset = ray.data.read_parquet(inputs.shards, filesystem=data_filesystem).select_columns(list(ROW_FIELDS))
    wait_for_free_cpus()
    if settings.noise is None:
        return dataset.materialize(), inputs.rows
    # Jacobi Forcing trains whole responses: one record per prompt. As many shuffle partitions as
    # the cluster has CPUs (Ray's default, 200, is for big clusters).
    partitions = min(len(inputs.shards), max(1, int(ray.cluster_resources().get("CPU", 1))))
    dataset = dataset.groupby("prompt_id", num_partitions=partitions).map_groups(
        response_record, batch_format="pyarrow").materialize()
    records = dataset.count()
    check_batch_fills(records, "responses", settings)
    return dataset, records


def new_trainer(settings: TrainSettings, dataset: ray.data.Dataset, use_gpu: bool) -> TorchTrainer:
    storage_filesystem, storage_path = ray_filesystem(settings.output, settings.common.storage_options)
    return TorchTrainer(
        train_loop,
        train_loop_config={"settings": settings},
        scaling_config=ScalingConfig(num_workers=settings.common.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            logging_config=ray.LoggingConfig(log_level="WARNING"),  # no line per report
        ),
        datasets={"train": dataset},
    )


def print_result(result: ray.train.Result, output: str, seconds: float) -> None:
    metrics = result.metrics or {}
    print(json.dumps({
        "steps": metrics.get("step"),
        "loss": metrics.get("loss"),
        "consistency_loss": metrics.get("consistency_loss"),
        "ar_loss": metrics.get("ar_loss"),
        "seconds": round(seconds, 1),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "model": f"{output.rstrip('/')}/hf",
    }))


def main(argv: list[str] | None = None) -> int:
    try:  # fail fast: everything that can be checked without the cluster is checked here
        settings, inputs = checked_inputs(train_settings(parse_args(argv)))
    except (InputError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{inputs.rows} trajectory rows in {len(inputs.shards)} shards; model {settings.common.model} "
          f"(vocab {inputs.vocab_size}); objective {settings.objective}", flush=True)

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)
    init_ray(min_logical_cpus=settings.common.workers)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    use_gpu = settings.use_gpu == "yes" or (settings.use_gpu == "auto" and has_gpus)
    try:
        require_resources(Request("--workers", settings.common.workers, cpus=1, gpus=1 if use_gpu else 0),
                          settings.common.wait_for_resources_s)
        dataset, records = training_data(settings, inputs)
    except (ResourceError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = replace(settings, total_steps=total_steps(records, settings))
    started = time.monotonic()
    result = new_trainer(settings, dataset, use_gpu).fit()
    print_result(result, settings.output, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
