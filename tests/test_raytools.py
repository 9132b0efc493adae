"""The resource check that the recipes and the server run before they start (no cluster: the
cluster's totals are stubbed), and the Ray log lines that the driver skips."""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest

import cllm_raytools
from cllm_raytools import Request, ResourceError, require_resources


def test_a_request_names_what_is_missing():
    assert Request("--workers", 4, cpus=1, gpus=1).shortfall({"CPU": 16, "GPU": 2}) == (
        "--workers 4 needs 4 GPUs; the cluster has 2"
    )
    assert Request("--workers", 3, cpus=1).shortfall({"CPU": 2.0}) == "--workers 3 needs 3 CPUs; the cluster has 2"
    assert Request("min_replicas", 3, cpus=0.5).shortfall({"CPU": 1.0}) == (
        "min_replicas 3 needs 1.5 CPUs; the cluster has 1"
    )
    assert Request("--workers", 2, cpus=1, gpus=1).shortfall({"CPU": 2, "GPU": 2}) is None


def test_an_impossible_request_fails_at_once_and_a_pending_one_says_what_it_waits_for(monkeypatch, capsys):
    totals = iter([{"CPU": 2}, {"CPU": 2}, {"CPU": 4}])
    monkeypatch.setattr(cllm_raytools.ray, "cluster_resources", lambda: {"CPU": 2})
    started = time.monotonic()
    with pytest.raises(ResourceError, match=r"--workers 3 needs 3 CPUs; the cluster has 2; .*--wait-for-resources"):
        require_resources(Request("--workers", 3, cpus=1))
    assert time.monotonic() - started < 1

    monkeypatch.setattr(cllm_raytools.ray, "cluster_resources", lambda: next(totals))
    monkeypatch.setattr(cllm_raytools.time, "sleep", lambda seconds: None)
    require_resources(Request("--workers", 3, cpus=1), wait_s=60)  # the third look finds 4 CPUs
    pending = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pending:")]
    assert pending == [
        "pending: --workers 3 needs 3 CPUs; the cluster has 2; waiting up to 60 s more for nodes to join"
    ]


RAY_NOISE_LINES = [
    "[2026-12-03 12:53:12,714 E 8960 8998] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'ebd25c38' has constructor arguments in the object store and max_restarts > 0. If the arguments in the object "
    "store go out of scope or are lost, the actor restart will fail.",
    "[2026-12-03 10:33:42,076 W 27957 27957] (raylet) worker_pool.cc:1796: WARNING: 16 PYTHON worker processes have "
    "been started on node: a065 with address: 192.0.2.2, which is 8x the maximum expected startup concurrency (2).",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "/v/ray/data/_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: "
    "`ExecutionOptions.exclude_resources` is deprecated and will be removed after January 2027.",
    "  self.exclude_resources = exclude_resources",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
]
OUR_LINES = [
    "train:  50% 1/2 steps [0m05s < 0m05s, 0.17 steps/s] loss 8.5394 states/s 3.7",
    "train: finished step 2 of 2: loss 8.8969 (consistency 4.2664, AR 0.4631), 182.9 states/s",
    "resuming from the checkpoint at step 10",
    "Traceback (most recent call last):",
]


def test_ray_noise_matches_the_noise_and_none_of_our_lines():
    noise = re.compile(cllm_raytools.RAY_NOISE)
    assert all(noise.search(line) for line in RAY_NOISE_LINES)
    assert not any(noise.search(line) for line in OUR_LINES)


def test_every_module_that_imports_ray_sets_the_filter_first():
    """Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported: in a recipe, cllm_raytools comes
    first. (`serve run` imports Ray itself, before the server's modules.)"""
    root = Path(__file__).resolve().parents[1]
    for path in root.glob("pipelines/*.py"):
        imports = [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.Import | ast.ImportFrom)]
        names = [alias.name if isinstance(node, ast.Import) else node.module or ""
                 for node in imports for alias in node.names]
        first_ray = next((i for i, name in enumerate(names) if name == "ray" or name.startswith("ray.")), None)
        if first_ray is not None:
            assert "cllm_raytools" in names[:first_ray], path.name
