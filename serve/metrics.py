"""Serving metrics: through `ray.util.metrics`, so they appear on Ray's Prometheus endpoint and
dashboard (names get Ray's `ray_` prefix there), and, for `/metrics` on the serving port, the same
request-level figures in a `prometheus_client` registry of each ingress replica (vLLM's set: time
to first token, time per output token, queue time, waiting and running requests, tokens per
forward, requests by status).

Create these objects inside replicas only: a metric belongs to the process that records it.
"""

from __future__ import annotations

import logging
from functools import cache

import prometheus_client
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


class ServingMetrics:
    """What `/metrics` shows, in Prometheus text: one registry per ingress replica."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        registry = self.registry
        self.requests = prometheus_client.Counter(
            "cllm_http_requests", "HTTP requests by route and status code.", ("route", "status"), registry=registry
        )
        self.latency = prometheus_client.Histogram(
            "cllm_http_request_latency_seconds", "HTTP request latency to the last byte.", ("route",),
            buckets=LATENCY_BOUNDARIES_S, registry=registry,
        )
        self.time_to_first_token = prometheus_client.Histogram(
            "cllm_time_to_first_token_seconds", "From the request's arrival to its first generated text.",
            buckets=LATENCY_BOUNDARIES_S, registry=registry,
        )
        self.time_per_output_token = prometheus_client.Histogram(
            "cllm_time_per_output_token_seconds", "Time per generated token after the first.",
            buckets=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1], registry=registry,
        )
        self.queue_time = prometheus_client.Histogram(
            "cllm_queue_time_seconds", "Time a row waited for a slot in a decoder's engine.",
            buckets=LATENCY_BOUNDARIES_S, registry=registry,
        )
        self.tokens_per_forward = prometheus_client.Histogram(
            "cllm_tokens_per_forward", "Generated tokens per forward pass, per row.",
            buckets=TOKENS_PER_FORWARD_BOUNDARIES, registry=registry,
        )
        self.waiting = prometheus_client.Gauge(
            "cllm_num_requests_waiting", "Requests sent to the decoders that have no text yet.", registry=registry
        )
        self.running = prometheus_client.Gauge(
            "cllm_num_requests_running", "Requests whose text is being generated.", registry=registry
        )
        self.generated_tokens = prometheus_client.Counter(
            "cllm_generation_tokens", "Generated tokens.", registry=registry
        )
        self.prompt_tokens = prometheus_client.Counter("cllm_prompt_tokens", "Prompt tokens.", registry=registry)
        self.resumptions = prometheus_client.Counter(
            "cllm_resumptions", "Decoder calls resumed on another replica after theirs died.", registry=registry
        )
        self.resumption_failures = prometheus_client.Counter(
            "cllm_resumption_failures", "Requests ended with 503 because no replica took them over in time.",
            registry=registry,
        )

    def record(self, route: str, status: int, latency_s: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(latency_s)

    def record_row(self, completion_tokens: int, carried_tokens: int, forwards: int, queue_s: float) -> None:
        """One finished choice; `carried_tokens` of its tokens were decoded by a replica that died."""
        self.queue_time.observe(queue_s)
        self.generated_tokens.inc(completion_tokens)
        if forwards:
            self.tokens_per_forward.observe((completion_tokens - carried_tokens) / forwards)

    def text(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


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
        serving_metrics().record(route, status, latency_s)


@cache
def ingress_metrics() -> IngressMetrics:
    """One set per ingress replica process, made on first use (that is, inside the replica)."""
    return IngressMetrics()


@cache
def serving_metrics() -> ServingMetrics:
    """The `/metrics` registry of this ingress replica process."""
    return ServingMetrics()
