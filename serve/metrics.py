"""Serving metrics through `ray.util.metrics`, so they appear on Ray's Prometheus endpoint and
dashboard (names get Ray's `ray_` prefix there), and the one-line-per-request log.

Create these objects inside replicas only: a metric belongs to the process that records it.
"""

from __future__ import annotations

import logging
from functools import cache

from ray.util.metrics import Counter, Histogram

from cllm import RowStats

logger = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKENS_PER_FORWARD_BOUNDARIES = [1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


class DecoderMetrics:
    """Work done by a decoder replica, tagged with its decoding mode (jacobi or ar)."""

    def __init__(self, mode: str):
        self._tags = {"mode": mode}
        self.generated_tokens = Counter(
            "cllm_generated_tokens", description="Tokens generated (verified).", tag_keys=("mode",)
        )
        self.forwards = Counter(
            "cllm_forwards", description="Model forward passes, counted per request row.", tag_keys=("mode",)
        )
        self.tokens_per_forward = Histogram(
            "cllm_tokens_per_forward",
            description="Generated tokens per forward pass of each request.",
            boundaries=TOKENS_PER_FORWARD_BOUNDARIES,
            tag_keys=("mode",),
        )
        self.batch_size = Histogram(
            "cllm_batch_size",
            description="Rows decoding in the engine when a request finishes.",
            boundaries=BATCH_SIZE_BOUNDARIES,
            tag_keys=("mode",),
        )

    def record_request(self, stats: RowStats, running_rows: int) -> None:
        self.batch_size.observe(running_rows + 1, tags=self._tags)
        if stats.new_tokens:
            self.generated_tokens.inc(stats.new_tokens, tags=self._tags)
        if stats.forwards:
            self.forwards.inc(stats.forwards, tags=self._tags)
            self.tokens_per_forward.observe(stats.tokens_per_forward, tags=self._tags)


class IngressMetrics:
    """HTTP requests by route and status code, and their latency (to the last byte)."""

    def __init__(self):
        self.requests = Counter(
            "cllm_http_requests",
            description="HTTP requests by route and status code.",
            tag_keys=("route", "status"),
        )
        self.latency = Histogram(
            "cllm_http_request_latency_s",
            description="HTTP request latency to the last byte, in seconds.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("route",),
        )

    def record(self, route: str, status: int, latency_s: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(latency_s, tags={"route": route})


@cache
def ingress_metrics() -> IngressMetrics:
    """One set per ingress replica process, made on first use (that is, inside the replica)."""
    return IngressMetrics()
