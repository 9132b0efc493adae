"""The resource check that the recipes and the server run before they start (no cluster: the
cluster's totals are stubbed)."""

from __future__ import annotations

import time

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
