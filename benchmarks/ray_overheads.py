"""Ray's fixed costs per stage, measured with no-op work on a local Ray that this script starts.

- Ray Data: start-up of a 2-actor `map_batches` pool, and the cost per batch of an actor-pool
  `map_batches` with a trivial class UDF (many one-row batches).
- Ray Train: `TorchTrainer.fit()` start-up with 2 CPU workers, and the cost per `ray.train.report`,
  back to back and after a 0.2 s "step" (with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1, as
  pipelines/train.py sets it).
- Ray Serve: per-request latency of a trivial deployment through a DeploymentHandle and over HTTP
  (httpx), median and p99, beside a plain Ray actor call.

Each figure is a per-unit cost to set beside a model forward; docs/design.md ("Scale") uses them.
Run it while no `ray stop` can happen (the slow tests' cluster fixture stops every Ray process on
the machine):

    .venv/bin/python benchmarks/ray_overheads.py            # about 1-2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Ray Train 2.x drains each worker's pending report every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default); pipelines/train.py sets 0.1 s. It must be in the environment before ray.init.
REPORT_INTERVAL_S = "0.1"
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = REPORT_INTERVAL_S
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402
import ray.train  # noqa: E402
from ray import serve  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import free_port  # noqa: E402  (tests/helpers.py)


class Noop:
    """A trivial class UDF: what a Ray Data actor pool costs with no work inside. Each batch
    carries the wall-clock time at which its actor finished construction."""

    def __init__(self):
        self.ready = time.time()

    def __call__(self, batch):
        batch["ready"] = [self.ready] * len(batch["x"])
        return batch


def data_run(batches: int, rows_per_batch: int) -> tuple[float, float]:
    """One actor-pool `map_batches` pass (a fresh 2-actor pool each time), set up as
    pipelines/collect.py does: in-memory items, one block per batch, 1 CPU per actor. Returns the
    pass's wall seconds and the seconds from its start until the last actor seen was ready."""
    items = [{"x": i} for i in range(batches * rows_per_batch)]
    dataset = ray.data.from_items(items, override_num_blocks=batches).map_batches(
        Noop, batch_size=rows_per_batch, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1
    )
    started, started_wall = time.perf_counter(), time.time()
    rows, ready = 0, started_wall
    for batch in dataset.iter_batches(batch_size=None):
        rows += len(batch["x"])
        ready = max(ready, *batch["ready"])
    assert rows == len(items)
    return time.perf_counter() - started, ready - started_wall


def noop_train_loop(config: dict) -> None:
    """Report `reports` times back to back, then `slow_reports` times after a `step_s` sleep each
    (a stand-in for a training step). Rank 0 writes the seconds of both loops to a file (a local
    cluster shares the filesystem; Ray 2.60 keeps no metrics from reports without a checkpoint)."""
    started = time.perf_counter()
    for step in range(config["reports"]):
        ray.train.report({"step": step})
    fast = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(config["slow_reports"]):
        time.sleep(config["step_s"])
        ray.train.report({"step": step})
    slow = time.perf_counter() - started
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["timing_file"], "w") as file:
            json.dump({"fast": fast, "slow": slow}, file)


def train_run(config: dict, storage: str) -> tuple[float, dict]:
    """`TorchTrainer.fit()` (2 CPU workers, gloo) on a loop that only reports: returns the fit's
    wall seconds and rank 0's seconds inside its two report loops."""
    config = {**config, "timing_file": os.path.join(storage, "loop_seconds.json")}
    trainer = TorchTrainer(
        noop_train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="noop", storage_path=storage),
    )
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    assert result.error is None, result.error
    with open(config["timing_file"]) as file:
        return seconds, json.load(file)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Echo:
    async def __call__(self, request=None) -> str:
        return "ok"


@ray.remote(num_cpus=0.5)
class PlainActor:
    def ping(self) -> str:
        return "ok"


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p99 * 1e3


def timed(call, requests: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-batches", type=int, default=400, help="batches in the long Ray Data pass")
    parser.add_argument("--train-reports", type=int, default=50, help="reports in the training run")
    parser.add_argument("--serve-requests", type=int, default=200, help="timed requests per Serve path")
    args = parser.parse_args()

    rows: list[tuple[str, str, str]] = []  # (stage, figure, value)
    wall = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        # Ray Data. Each pass starts its own pool, so the short pass is start-up plus the fixed
        # cost of one execution; the slope between the passes is the cost of one more batch.
        data_run(2, 1)  # warm-up: imports and worker processes
        short = [data_run(2, 1) for _ in range(3)]
        short_pass = statistics.median(seconds for seconds, _ in short)
        pool_ready = statistics.median(ready for _, ready in short)
        long_pass, _ = data_run(args.data_batches, 1)
        per_batch = (long_pass - short_pass) / (args.data_batches - 2)
        rows += [
            ("Ray Data", "2-actor pool: actors ready after", f"{pool_ready:.2f} s"),
            ("Ray Data", "2-actor pool: whole pass of 2 batches", f"{short_pass:.2f} s"),
            ("Ray Data", f"actor-pool map_batches, per batch ({args.data_batches} x 1 row)",
             f"{per_batch * 1e3:.1f} ms"),
        ]

        # Ray Train.
        step_s, slow_reports = 0.2, 10
        config = {"reports": args.train_reports, "slow_reports": slow_reports, "step_s": step_s}
        with tempfile.TemporaryDirectory() as storage:
            fit, loops = train_run(config, storage)
        per_report = loops["fast"] / args.train_reports
        added = (loops["slow"] - slow_reports * step_s) / slow_reports
        rows += [
            ("Ray Train", "TorchTrainer.fit() outside the loop, 2 CPU workers",
             f"{fit - loops['fast'] - loops['slow']:.2f} s"),
            ("Ray Train", f"ray.train.report back to back, per report ({args.train_reports})",
             f"{per_report * 1e3:.1f} ms"),
            ("Ray Train", f"ray.train.report after a {step_s:.1f} s step, added per report",
             f"{added * 1e3:.1f} ms"),
        ]

        # Ray Serve, with a plain Ray actor call beside it for scale.
        actor = PlainActor.remote()
        plain = percentiles(timed(lambda: ray.get(actor.ping.remote()), args.serve_requests))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(Echo.bind(), name="echo", route_prefix="/")
        via_handle = percentiles(timed(lambda: handle.remote().result(), args.serve_requests))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            def get() -> None:
                response = client.get("/")
                response.raise_for_status()
            via_http = percentiles(timed(get, args.serve_requests))
        for label, (median, p99) in (
            ("plain Ray actor call (reference)", plain),
            ("DeploymentHandle request", via_handle),
            ("HTTP request (httpx, keep-alive)", via_http),
        ):
            rows.append(("Ray Serve", f"{label}, median / p99", f"{median:.1f} / {p99:.1f} ms"))
    finally:
        serve.shutdown()
        ray.shutdown()

    width = max(len(figure) for _, figure, _ in rows)
    print(f"\nRay {ray.__version__} overheads, local Ray with num_cpus=2 on {os.cpu_count()} cores "
          f"(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={REPORT_INTERVAL_S}, as pipelines/train.py sets it)")
    print(f"{'stage':<11}{'figure':<{width + 2}}value")
    print("-" * (width + 30))
    for stage, figure, value in rows:
        print(f"{stage:<11}{figure:<{width + 2}}{value}")
    print(f"total wall time {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
