"""The Ray helpers that the recipes (`cllm_pipelines`) and the server (`cllm_serve`) share:
joining a cluster or starting a local Ray, quiet logs, and checking that the cluster can hold
what a stage or a deployment asks for before it starts. Installed as `cllm_raytools`."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass

# Lines that Ray's processes print and that ask nothing of a user of these recipes; the driver
# drops them from what workers and the raylet forward to it, by Ray's documented setting
# RAY_DEDUP_LOGS_SKIP_REGEX (docs.ray.io: "Configuring Logging", log deduplication). Ray reads
# it when imported, so it is set before `import ray`; a user's own setting wins.
RAY_NOISE = "|".join((
    # Ray Data's actor pools and Ray Train's watcher pass their own ObjectRefs to restartable
    # actors (ray-project/ray#53727); nothing in the recipes' arguments causes it.
    r"has constructor arguments in the object store",
    r"PYTHON worker processes have been started",  # Ray's helper actors on a small node
    r"Progress bars disabled",  # the recipes print their own progress line
    r"ExecutionOptions.exclude_resources. is deprecated|self\.exclude_resources = exclude_resources",  # Ray Train
    r"DeepSpeed \S+ built successfully",  # DeepSpeed loading its CPU comm op
))
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_NOISE)

import ray  # noqa: E402  (after the setting above)

PENDING_REPORT_INTERVAL_S = 30.0


def quiet_libraries() -> None:
    """Keep the libraries' own chatter out of a stage's output, which has one progress line of
    its own: no per-file progress bars from transformers, no per-operator bars from Ray Data. The
    environment variables reach the processes a local Ray starts."""
    import transformers

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # configured already if ray.data was imported
    # Ray Data warns once per process that its bars are off, which is the point
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def init_ray(min_logical_cpus: int) -> None:
    """Join the cluster that RAY_ADDRESS names (as under `ray job submit`); otherwise start a
    local Ray with at least `min_logical_cpus` logical CPUs. On a 2-core machine the stage's own
    actors or training workers would otherwise hold every CPU and starve Ray Data's tasks.
    Ray's INFO logs (in this process and in every worker) and RAY_NOISE stay out of the output."""
    import ray.data

    quiet_libraries()
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():  # a caller (demo, benchmark, test) started Ray already
        return
    quiet = {"logging_config": ray.LoggingConfig(log_level="WARNING"), "log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(**quiet)
    else:
        # Ray's default for a new local cluster is token authentication, which it announces at
        # every start with a warning; the setting (RAY_AUTH_MODE) stays the user's.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_logical_cpus), **quiet)


@dataclass(frozen=True)
class Request:
    """What a stage asks the cluster for: `count` bundles of `cpus` and `gpus` each, named by the
    flag that sets the count (for the error message)."""

    flag: str
    count: int
    cpus: float
    gpus: float = 0.0

    def shortfall(self, resources: dict[str, float]) -> str | None:
        """Why `resources` (cluster totals) cannot hold the request, or None if they can."""
        for name, per_bundle in (("GPU", self.gpus), ("CPU", self.cpus)):
            needed = self.count * per_bundle
            have = resources.get(name, 0.0)
            if per_bundle > 0 and needed > have + 1e-9:
                return (f"{self.flag} {self.count} needs {_amount(needed)} {name}s; "
                        f"the cluster has {_amount(have)}")
        return None


def _amount(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class ResourceError(RuntimeError):
    """The cluster cannot hold what a stage asks for."""


def require_resources(request: Request, wait_s: float = 0.0, wait_option: str = "--wait-for-resources SECONDS") -> None:
    """Return once the cluster's total resources can hold `request`. With `wait_s` 0 an
    impossible request raises ResourceError at once (its message suggests `wait_option`);
    otherwise (an autoscaling cluster) a line says what is pending every
    PENDING_REPORT_INTERVAL_S, and ResourceError comes after `wait_s`."""
    deadline = time.monotonic() + wait_s
    next_report = 0.0
    while True:
        shortfall = request.shortfall(ray.cluster_resources())
        if shortfall is None:
            return
        now = time.monotonic()
        if now >= deadline:
            hint = "" if wait_s else f"; on an autoscaling cluster pass {wait_option}"
            waited = f" after waiting {wait_s:.0f} s" if wait_s else ""
            raise ResourceError(f"{shortfall}{waited}{hint}")
        if now >= next_report:
            left = math.ceil(deadline - now)
            print(f"pending: {shortfall}; waiting up to {left} s more for nodes to join", file=sys.stderr, flush=True)
            next_report = now + PENDING_REPORT_INTERVAL_S
        time.sleep(1.0)
