"""The router's Prometheus metrics, in a registry of its own (several apps can live in one process).

tracker = metrics.track("/v1/completions")   # in-flight +1, clock starts
tracker.on_tokens(n)                          # TTFT on the first, ITL between later ones
tracker.finish("200", prompt_tokens, completion_tokens)   # E2E, TPOT, counters, in-flight -1
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class RouterMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "splitserve_requests",
            "Finished requests by endpoint and status (HTTP code or gRPC status name)",
            ["endpoint", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "splitserve_requests_in_flight", "Requests being served", ["endpoint"], registry=r
        )
        self.prompt_tokens = Counter(
            "splitserve_prompt_tokens", "Prompt tokens of served requests", registry=r
        )
        self.generation_tokens = Counter(
            "splitserve_generation_tokens", "Tokens generated for clients", registry=r
        )
        self.ttft_s = Histogram(
            "splitserve_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl_s = Histogram(
            "splitserve_inter_token_latency_seconds",
            "Time between consecutive token deliveries (a delivery of k tokens counts k-1 zeros)",
            buckets=_TOKEN_BUCKETS_S,
            registry=r,
        )
        self.tpot_s = Histogram(
            "splitserve_time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1)",
            buckets=_TOKEN_BUCKETS_S,
            registry=r,
        )
        self.e2e_s = Histogram(
            "splitserve_e2e_request_latency_seconds",
            "Arrival to the last byte",
            buckets=_E2E_BUCKETS_S,
            registry=r,
        )

    def track(self, endpoint: str) -> RequestTracker:
        return RequestTracker(self, endpoint)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class RequestTracker:
    """One request's clock; `finish` is idempotent so every exit path may call it."""

    def __init__(self, metrics: RouterMetrics, endpoint: str):
        self._m, self._endpoint = metrics, endpoint
        self._arrival_s = time.perf_counter()
        self._first_s: float | None = None
        self._last_s: float | None = None
        self._num_tokens = 0
        self._done = False
        metrics.in_flight.labels(endpoint).inc()

    def on_tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self._last_s is None:
            self._first_s = now
            self._m.ttft_s.observe(now - self._arrival_s)
            n -= 1
        else:
            self._m.itl_s.observe(now - self._last_s)
            n -= 1
        for _ in range(n):  # tokens that arrived together
            self._m.itl_s.observe(0.0)
        self._last_s = now
        self._num_tokens += n + 1

    def finish(self, status: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if self._done:
            return
        self._done = True
        m = self._m
        m.in_flight.labels(self._endpoint).dec()
        m.requests.labels(self._endpoint, status).inc()
        m.e2e_s.observe(time.perf_counter() - self._arrival_s)
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(completion_tokens)
        if self._first_s is not None and self._last_s is not None and self._num_tokens > 1:
            m.tpot_s.observe((self._last_s - self._first_s) / (self._num_tokens - 1))
