"""What the recipes share beyond the Ray helpers (`cllm_raytools`, which the server uses too):
the flags every Ray recipe takes, validated into `CommonSettings`, and the test-only fault hook."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from cllm.storage import storage_options

FAULT_MARKER_ENV = "CLLM_TEST_FAULT_MARKER"
MODEL_HELP = "hub id, local or s3:// directory, or toy / toy-math / toy-sql / toy-code / toy-chat"


class InputError(ValueError):
    """Bad input found before a stage starts (the recipe exits with status 2)."""


def add_seed_flag(parser: argparse.ArgumentParser, help_text: str = "random seed (default: 0)") -> None:
    parser.add_argument("--seed", type=int, default=0, help=help_text)


def add_s3_endpoint_flag(parser: argparse.ArgumentParser,
                         help_text: str = "endpoint URL of an S3-compatible store (MinIO, moto, ...)") -> None:
    parser.add_argument("--s3-endpoint", default=None, help=help_text)


def add_common_flags(parser: argparse.ArgumentParser, workers_help: str) -> None:
    """--model, --workers, --wait-for-resources, --s3-endpoint and --seed, as every Ray recipe
    takes them (`CommonSettings.from_args` reads them back)."""
    parser.add_argument("--model", default="toy", help=MODEL_HELP)
    parser.add_argument("--workers", type=int, default=2, help=workers_help)
    parser.add_argument("--wait-for-resources", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for an autoscaling cluster to fit the workers (default: fail at once)")
    add_s3_endpoint_flag(parser)
    add_seed_flag(parser)


@dataclass(frozen=True)
class CommonSettings:
    """The flags of `add_common_flags`, checked."""

    model: str
    workers: int
    wait_for_resources_s: float
    s3_endpoint: str | None
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CommonSettings:
        if args.workers < 1:
            raise InputError(f"--workers must be >= 1, got {args.workers}")
        if args.wait_for_resources < 0:
            raise InputError(f"--wait-for-resources must be >= 0, got {args.wait_for_resources}")
        return cls(args.model, args.workers, args.wait_for_resources, args.s3_endpoint, args.seed)

    @property
    def storage_options(self) -> dict[str, Any]:
        return storage_options(self.s3_endpoint)


def absolute_output(output: str) -> str:
    """A local output as an absolute path (a job runs elsewhere, so say exactly where it lands);
    a URI as given."""
    return output if "://" in output else os.path.abspath(os.path.expanduser(output))


def fault_marker() -> str | None:
    """Tests only: the file that a stage's fault hook creates before it fails once on purpose
    (set through the environment, so it is never a user-facing flag)."""
    return os.environ.get(FAULT_MARKER_ENV) or None
