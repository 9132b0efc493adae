"""What the Ray entry points share: joining a cluster, or starting a local Ray that fits the stage."""

from __future__ import annotations

import os

import ray


def init_ray(min_logical_cpus: int) -> None:
    """Join the cluster that RAY_ADDRESS names (as under `ray job submit`); otherwise start a
    local Ray with at least `min_logical_cpus` logical CPUs. On a 2-core machine the stage's own
    actors or training workers would otherwise hold every CPU and starve Ray Data's tasks."""
    if ray.is_initialized():  # a caller (demo, benchmark, test) started Ray already
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init()
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_logical_cpus))
