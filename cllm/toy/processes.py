"""Data parallelism for the toy teachers' CPU builds: ranks started as fresh interpreters, and
one all-reduce that sums their gradients."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def run_ranks(module: str, function: str, processes: int, rendezvous: str) -> None:
    """Run `module.function(rank, rendezvous)` in `processes` fresh interpreters and wait for all;
    if one fails, stop the others (they would wait on it in the next all-reduce forever) and raise.
    Fresh interpreters rather than multiprocessing children, which would re-import the caller's
    main module (a script without a main guard, a Ray worker)."""
    package_root = str(Path(__file__).resolve().parents[2])
    search_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": search_path}
    code = f"import sys; from {module} import {function}; {function}(int(sys.argv[1]), sys.argv[2])"
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(rank), rendezvous], env=environment)
             for rank in range(processes)]
    try:
        failed = _wait_all(ranks)
    finally:
        for rank in ranks:  # on an interrupt or a failure, none is left running
            rank.kill()
            rank.wait()
    if failed:
        raise RuntimeError(f"{module}.{function}: rank(s) {failed} failed; see their output above")


def _wait_all(ranks: Sequence[subprocess.Popen]) -> list[int]:
    """Wait until every rank has exited, or one has failed; the ranks that failed."""
    while True:
        codes = [rank.poll() for rank in ranks]
        failed = [index for index, code in enumerate(codes) if code not in (None, 0)]
        if failed or all(code == 0 for code in codes):
            return failed
        time.sleep(0.2)


def sum_across_processes(parameters: Sequence[torch.nn.Parameter], extras: torch.Tensor) -> torch.Tensor:
    """Sum every process's gradients and `extras` in one all-reduce; the summed extras. Each
    gradient is a sum over the process's rows divided by the whole batch's count, so the sums are
    the whole batch's."""
    gradients = [parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                 for parameter in parameters]
    flat = torch.cat([gradient.reshape(-1) for gradient in gradients] + [extras.reshape(-1)])
    torch.distributed.all_reduce(flat)
    offset = 0
    for parameter, gradient in zip(parameters, gradients):
        parameter.grad = flat[offset : offset + gradient.numel()].view_as(parameter)
        offset += gradient.numel()
    return flat[offset:]
