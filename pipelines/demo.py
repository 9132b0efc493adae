"""The whole CLLM loop on the offline default, end to end: `make demo`.

    python pipelines/demo.py [--domain math|sql|code|chat] [--budget quick|long] [--fresh]

Stages, each with its artifacts under --output (default runs/demo/ for math, runs/demo-<domain>/
otherwise):
  1. teacher   build (first time only, cached under ~/.cache/cllm) or load the toy teacher of
               --domain (math by default; `make demo DOMAIN=sql`, `DOMAIN=code`, `DOMAIN=chat`);
  2. collect   Jacobi trajectories of the teacher on the toy training prompts (trajectories/),
               with pipelines/collect.py on a local Ray;
  3. train     consistency-train the CLLM with DeepSpeed on 2 CPU workers (cllm/hf), with
               pipelines/train.py on a local Ray;
  4. evaluate  teacher vs CLLM, AR vs Jacobi, on the held-out prompts (report/), with
               pipelines/evaluate.py;
then print the table, the report path and the wall time of every stage.

Each stage keeps a marker (stages/<name>.json) with its settings, marked finished, with its wall
time, only after success. A rerun reuses every finished stage whose settings (and those of every
stage before it) are unchanged; a stage that must run again first deletes outputs made with other
settings, while an interrupted one resumes. --fresh deletes --output and starts over. BUDGET=long (or
--budget long) trades time for stronger numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cllm.hf import load_model
from cllm.losses import ArTarget
from cllm.toy import DEFAULT_DOMAIN, DOMAINS, parse_toy_name, toy_version
from cllm_raytools import RAY_NOISE, quiet_libraries

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"


@dataclass(frozen=True)
class Budget:
    """How much work each stage does: `quick` is sized for a first run on 2 CPU cores, `long` for
    stronger figures (docs/results.md#first-run-time)."""

    train_prompts: int  # toy training prompts to collect trajectories on
    n_token: int  # Jacobi block size, for collection and the CLLM
    collect_max_new_tokens: int
    train_epochs: int  # passes over the trajectories
    train_max_steps: int | None  # or fewer steps
    train_lr: float
    eval_prompts: int
    eval_n_tokens: tuple[int, ...]
    eval_max_new_tokens: int
    eval_repeats: int = 3  # timed decodes per batch and method, the fastest counts
    eval_timed_prompts: int | None = None  # speed timed on these first prompts at batch size 1 (None: all)
    train_packed_states: int | None = None  # states packed per row: all, or this many sampled
    train_ar_target: ArTarget = "fixed-point"  # the AR term's target: the fixed point, or the prompts' answers
    collect_batch_size: int = 16


BUDGETS = {
    # A minute-long check that the loop runs end to end (tests use it); no effect to see.
    "tiny": Budget(
        train_prompts=8, n_token=4, collect_max_new_tokens=8, train_epochs=1, train_max_steps=2, train_lr=5e-4,
        eval_prompts=3, eval_n_tokens=(4,), eval_max_new_tokens=8,
    ),
    # More prompts seen once keep more accuracy than passes over fewer, and 500 scored prompts show
    # a quality loss that 100 hide (docs/results.md#training-recipe), but their speed is timed on
    # 100: at batch size 1 every prompt costs 10x. One block size, the trained one, is scored. 4
    # packed states of the 11 or so a block has put the time into more rows, which raises TPF at a
    # higher rate; the AR term trains on the prompts' reference answers, as the teacher's fixed
    # points would teach its errors (docs/results.md#training-recipe).
    "quick": Budget(
        train_prompts=3000, n_token=16, collect_max_new_tokens=96, train_epochs=1, train_max_steps=None,
        train_lr=1e-3, train_packed_states=4, train_ar_target="labels",
        eval_prompts=500, eval_n_tokens=(16,), eval_max_new_tokens=96, eval_repeats=1, eval_timed_prompts=100,
    ),
    "long": Budget(
        train_prompts=3000, n_token=16, collect_max_new_tokens=96, train_epochs=3, train_max_steps=None,
        train_lr=3e-4,
        eval_prompts=1000, eval_n_tokens=(8, 16), eval_max_new_tokens=96, eval_repeats=1,
    ),
}
# Toy SQL's answers are one or two blocks, so as many training blocks take more prompts. Short
# answers let collection batch 32 prompts.
_SQL_LENGTHS = {"collect_max_new_tokens": 64, "eval_max_new_tokens": 64, "collect_batch_size": 32}
# Toy code's bodies are two to four blocks, so 6,500 prompts give about as many training blocks as
# 18,000 of SQL's, and keep a first run, whose teacher takes 13 minutes, under 35 (docs/results.md#toy-code).
_CODE_QUICK = replace(BUDGETS["quick"], train_prompts=6_500, **_SQL_LENGTHS)
# Toy chat's replies are at most about 70 tokens, cut at 80 (docs/results.md#toy-chat).
_CHAT_LENGTHS = {"collect_max_new_tokens": 80, "eval_max_new_tokens": 80}
_CHAT_QUICK = replace(BUDGETS["quick"], train_prompts=8_000, **_CHAT_LENGTHS)
DOMAIN_BUDGETS = {
    "chat": {"quick": _CHAT_QUICK,
             "long": replace(_CHAT_QUICK, train_epochs=3, eval_prompts=1000, eval_n_tokens=(8, 16))},
    "code": {"quick": _CODE_QUICK, "long": replace(_CODE_QUICK, train_prompts=16_000)},
    "sql": {
        # 10,000 prompts keep a first run under 25 minutes; more reach a higher TPF (docs/results.md#toy-sql).
        "quick": replace(BUDGETS["quick"], train_prompts=10_000, **_SQL_LENGTHS),
        "long": replace(BUDGETS["long"], train_prompts=27_000, train_epochs=1, eval_prompts=500, **_SQL_LENGTHS),
    },
}


def budget_for(domain: str, name: str) -> Budget:
    """The budget `name` as sized for `domain` (math's, unless the domain has its own)."""
    return DOMAIN_BUDGETS.get(domain, {}).get(name, BUDGETS[name])


@dataclass(frozen=True)
class DemoConfig:
    domain: str
    budget_name: str
    budget: Budget
    output: Path
    fresh: bool
    model: str  # the teacher: a toy name, hub id or local directory
    train_prompts: str
    heldout_prompts: str
    workers: int
    seed: int


@dataclass
class Stage:
    name: str
    description: str
    settings: dict  # what the stage's own result depends on
    action: Callable[[], None]
    outputs: tuple[Path, ...] = ()  # deleted before a rerun with other settings (no stale resume)


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=DOMAINS, default=DEFAULT_DOMAIN,
                        help=f"toy domain: the teacher and prompts (default: {DEFAULT_DOMAIN})")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default=os.environ.get("BUDGET") or "quick",
                        help="quick (the default, or the BUDGET environment variable), long, or tiny (a smoke check)")
    parser.add_argument("--fresh", action="store_true", help="delete --output and run every stage again")
    parser.add_argument("--output", help="artifact directory (default: runs/demo for math, runs/demo-<domain>)")
    parser.add_argument("--model", help="teacher: toy name, hub id or local directory (default: toy-<domain>)")
    parser.add_argument("--train-prompts", help="prompts to collect on (default: toy-<domain>:train)")
    parser.add_argument("--heldout-prompts", help="prompts to evaluate on (default: toy-<domain>:heldout)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers for collect and train (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.budget not in BUDGETS:
        parser.error(f"unknown budget {args.budget!r}; choose from {sorted(BUDGETS)}")
    # math keeps the plain names it always had (`toy`, runs/demo)
    toy = "toy" if args.domain == DEFAULT_DOMAIN else f"toy-{args.domain}"
    output = args.output or ("runs/demo" if args.domain == DEFAULT_DOMAIN else f"runs/demo-{args.domain}")
    return DemoConfig(
        domain=args.domain, budget_name=args.budget, budget=budget_for(args.domain, args.budget),
        output=Path(output).resolve(),
        fresh=args.fresh, model=args.model or toy, train_prompts=args.train_prompts or f"{toy}:train",
        heldout_prompts=args.heldout_prompts or f"{toy}:heldout", workers=args.workers, seed=args.seed,
    )


# -- the stages ------------------------------------------------------------------------------


def run_script(script: str, *args: str) -> None:
    """Run one pipeline as its own process, as a user would; its progress streams through.
    Unless RAY_ADDRESS says otherwise, each stage starts its own local Ray: a bare `ray.init()`
    would join whatever cluster `ray start` last left on this machine. The stage's stderr passes
    through but for RAY_NOISE: Ray's skip setting filters what workers forward, not what the
    stage's own Ray core prints (an `E ... core_worker.cc` line for Ray Data's actor pool)."""
    command = [sys.executable, str(PIPELINES / script), *args]
    print("$ " + " ".join(command[1:]), flush=True)
    environment = {"RAY_ADDRESS": "local", **os.environ}
    noise = re.compile(RAY_NOISE.encode())
    with subprocess.Popen(command, cwd=REPO, env=environment, stderr=subprocess.PIPE) as process:
        for line in process.stderr:
            if not noise.search(line):
                sys.stderr.write(line.decode(errors="replace"))
                sys.stderr.flush()
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)


def load_teacher(model: str) -> None:
    """Load the teacher once, which builds a toy teacher on first use (then it is cached)."""
    load_model(model, device="cpu")


def teacher_settings(model: str) -> dict:
    """What the teacher stage's result depends on: the model name and, for a toy teacher, its
    version, so that a new toy teacher reruns every stage after it."""
    toy = parse_toy_name(model)
    return {"model": model} if toy is None else {"model": model, "toy_version": toy_version(toy.domain)}


def build_stages(config: DemoConfig) -> list[Stage]:
    budget, output = config.budget, config.output
    trajectories, cllm, report = output / "trajectories", output / "cllm", output / "report"
    collect_args = [
        "--model", config.model, "--prompts", config.train_prompts, "--output", str(trajectories),
        "--n-token", str(budget.n_token), "--max-new-tokens", str(budget.collect_max_new_tokens),
        "--limit", str(budget.train_prompts), "--batch-size", str(budget.collect_batch_size),
        "--workers", str(config.workers), "--seed", str(config.seed),
    ]
    train_args = [
        "--model", config.model, "--trajectories", str(trajectories), "--output", str(cllm),
        "--workers", str(config.workers), "--epochs", str(budget.train_epochs), "--lr", str(budget.train_lr),
        *(["--max-steps", str(budget.train_max_steps)] if budget.train_max_steps else []),
        *(["--packed-states", str(budget.train_packed_states)] if budget.train_packed_states else []),
        *(["--ar-target", budget.train_ar_target] if budget.train_ar_target != "fixed-point" else []),
        "--seed", str(config.seed),
    ]
    evaluate_args = [
        "--models", f"teacher={config.model}", f"cllm={cllm / 'hf'}", "--baseline", "teacher",
        "--prompts", config.heldout_prompts, "--n-token", *map(str, budget.eval_n_tokens),
        "--max-new-tokens", str(budget.eval_max_new_tokens), "--limit", str(budget.eval_prompts),
        "--repeats", str(budget.eval_repeats),
        *(["--timed-prompts", str(budget.eval_timed_prompts)] if budget.eval_timed_prompts else []),
        "--output", str(report), "--seed", str(config.seed),
    ]
    return [
        Stage("teacher", f"build or load the teacher ({config.model})", teacher_settings(config.model),
              lambda: load_teacher(config.model)),
        Stage("collect", f"collect Jacobi trajectories on {budget.train_prompts} prompts", {"args": collect_args},
              lambda: run_script("collect.py", *collect_args), outputs=(trajectories,)),
        Stage("train", f"consistency-train the CLLM, DeepSpeed on {config.workers} workers", {"args": train_args},
              lambda: run_script("train.py", *train_args), outputs=(cllm,)),
        Stage("evaluate", "evaluate teacher vs CLLM, AR vs Jacobi, on held-out prompts", {"args": evaluate_args},
              lambda: run_script("evaluate.py", *evaluate_args), outputs=(report,)),
    ]


# -- running them ----------------------------------------------------------------------------


def _marker(output: Path, stage: Stage) -> Path:
    return output / "stages" / f"{stage.name}.json"


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_stages(stages: list[Stage], output: Path) -> dict[str, tuple[float, bool]]:
    """Run the stages in order. A stage is reused when it finished before with the same settings
    as its own and every earlier stage's; otherwise it runs, after its outputs are deleted if
    they came from other settings (same settings: the stage's own resume picks up). Returns each
    stage's wall time in seconds and whether it was reused."""
    times: dict[str, tuple[float, bool]] = {}
    key: dict | None = None
    for number, stage in enumerate(stages, start=1):
        key = {"settings": stage.settings, "after": key}  # an upstream change reaches every later stage
        heading = f"[{number}/{len(stages)}] {stage.name}: {stage.description}"
        marker_path = _marker(output, stage)
        marker = _read_marker(marker_path)
        if marker is not None and marker.get("key") == key and marker.get("finished"):
            print(f"{heading} -- reusing the finished stage ({marker['seconds']:.0f}s when it ran)", flush=True)
            times[stage.name] = (marker["seconds"], True)
            continue
        print(f"\n{heading}", flush=True)
        if marker is not None and marker.get("key") != key:
            for path in stage.outputs:
                shutil.rmtree(path, ignore_errors=True)
        marker_path.parent.mkdir(parents=True, exist_ok=True)
        marker_path.write_text(json.dumps({"key": key, "finished": False}))
        started = time.perf_counter()
        stage.action()
        seconds = time.perf_counter() - started
        # Marked finished only now, after success, so an interrupted stage is never reused.
        marker_path.write_text(json.dumps({"key": key, "finished": True, "seconds": seconds}, indent=2))
        print(f"[{number}/{len(stages)}] {stage.name} done in {seconds:.0f}s", flush=True)
        times[stage.name] = (seconds, False)
    return times


def print_summary(config: DemoConfig, times: dict[str, tuple[float, bool]]) -> None:
    report = config.output / "report" / "report.md"
    print("\n" + report.read_text())
    print(f"domain: {config.domain}; teacher: {config.model}; budget: {config.budget_name} {asdict(config.budget)}")
    print("wall time per stage:")
    for name, (seconds, reused) in times.items():
        print(f"  {name:<9} {seconds / 60:6.1f} min" + ("  (reused from an earlier run)" if reused else ""))
    print(f"  {'total':<9} {sum(s for s, _ in times.values()) / 60:6.1f} min")
    print(f"\nreport: {report} (plots beside it)")


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    quiet_libraries()
    if config.fresh and config.output.exists():
        shutil.rmtree(config.output)
    config.output.mkdir(parents=True, exist_ok=True)
    times = run_stages(build_stages(config), config.output)
    print_summary(config, times)


if __name__ == "__main__":
    main()
