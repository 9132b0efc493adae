"""What the recipes share beyond the Ray helpers (`cllm_raytools`, which the server uses too):
the test-only fault hook."""

from __future__ import annotations

import os

from cllm_raytools import quiet_libraries  # noqa: F401  (pipelines/evaluate.py imports it from here still)

FAULT_MARKER_ENV = "CLLM_TEST_FAULT_MARKER"


def fault_marker() -> str | None:
    """Tests only: the file that a stage's fault hook creates before it fails once on purpose
    (set through the environment, so it is never a user-facing flag)."""
    return os.environ.get(FAULT_MARKER_ENV) or None
