"""The router's Prometheus metrics under vLLM's names (and `splitserve:` ones where vLLM has
none), in a registry of its own (several apps can live in one process).

    tracker = metrics.track("/v1/completions")   # in-flight +1, the clock starts
    tracker.on_trace(trace)                       # the request's hop marks (router.trace)
    tracker.on_tokens(n)                          # TTFT on the first, ITL between later ones
    tracker.finish("200", prompt_tokens, completion_tokens, "stop")

Names, types, buckets and labels follow vLLM 0.32's v1 metrics (vllm/v1/metrics/loggers.py
and buckets.py): `model_name` and `engine` on every series; `engine` is the worker that
served the request (vLLM's engine index). The per-worker gauges (running, waiting, KV use)
come from the workers' own snapshots: router.fleet_metrics. README's metrics table maps
each name to vLLM's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from router.fleet_metrics import FleetCollector
from router.slo_window import Finished, RequestWindow
from router.trace import Trace, TraceStore

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                     60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
HOP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0)  # fmt: skip
FINISHED_REASONS = ("stop", "length", "abort", "error")
NO_ENGINE = "router"  # the engine label of a request no worker served
log = logging.getLogger(__name__)

_REQ = ("model_name", "engine")


def _histogram(name: str, doc: str, buckets: tuple[float, ...], r: CollectorRegistry, labels=_REQ):
    return Histogram(name, doc, list(labels), buckets=buckets, registry=r)


class RouterMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        model_name: str = "",
        registry: CollectorRegistry | None = None,
        exporter: Callable[[Trace], None] | None = None,  # router.otel: spans over OTLP
    ):
        self.model_name = model_name
        self.exporter = exporter
        self.registry = r = registry or CollectorRegistry()
        self.traces = TraceStore()
        self.requests = Counter(
            "splitserve:requests", "Finished requests by endpoint and status (HTTP code or "
            "gRPC status name)", ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "splitserve:requests_in_flight", "Requests being served", ["endpoint"], registry=r
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", list(_REQ), registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", list(_REQ),
            registry=r,
        )  # fmt: skip
        self.success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            [*_REQ, "finished_reason"], registry=r,
        )  # fmt: skip
        self.ttft_s = _histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            TTFT_BUCKETS_S, r,
        )  # fmt: skip
        self.itl_s = _histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS_S, r,
        )  # fmt: skip
        self.tpot_s = _histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS_S, r,
        )  # fmt: skip
        self.e2e_s = _histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            REQUEST_BUCKETS_S, r,
        )  # fmt: skip
        self.phase_s = {
            phase: _histogram(f"vllm:request_{phase}_time_seconds", doc, REQUEST_BUCKETS_S, r)
            for phase, doc in (
                ("queue", "Histogram of time from arrival to first scheduled on a worker."),
                ("prefill", "Histogram of time spent in PREFILL phase for request."),
                ("decode", "Histogram of time spent in DECODE phase for request."),
                ("inference", "Histogram of time spent in RUNNING phase for request."),
            )
        }
        self._add_kv_metrics(r)
        self._status: dict = {}
        r.register(FleetCollector(model_name, self._workers, self._recovery))
        self.window = RequestWindow()  # what the autoscaler reads (router.autoscaler)
        self.decisions = Counter(
            "splitserve:autoscaler_decisions", "Autoscaler decisions that changed a pool, by "
            "direction", ["model_name", "pool", "direction"], registry=r,
        )  # fmt: skip
        self.target_workers = Gauge(
            "splitserve:autoscaler_target_workers", "Workers the autoscaler last asked for",
            ["model_name", "pool"], registry=r,
        )  # fmt: skip

    def observe_decision(self, decision) -> None:
        """An autoscaler decision (planner.Decision): its targets, and a count if it moved."""
        for pool in ("prefill", "decode"):
            self.target_workers.labels(self.model_name, pool).set(getattr(decision, pool))
        for pool, before in decision.before.items():
            after = getattr(decision, pool)
            if after != before:
                way = "up" if after > before else "down"
                self.decisions.labels(self.model_name, pool, way).inc()

    def observe_status(self, report: dict) -> None:
        """The backend's /status report: the per-worker series come from its snapshots."""
        self._status = report

    def _workers(self) -> list[dict]:
        return list(self._status.get("workers", []))

    def _recovery(self) -> dict:
        return dict(self._status.get("recovery", {}))

    def _add_kv_metrics(self, r: CollectorRegistry) -> None:
        model = ("model_name",)
        self.kv_transfer_s = _histogram(
            "splitserve:kv_transfer_seconds", "KV transfer per request: first page sent to "
            "last page landed on the decode worker.", HOP_BUCKETS_S, r, model,
        )  # fmt: skip
        self.kv_bytes = Counter(
            "splitserve:kv_transfer_bytes", "KV bytes moved prefill -> decode", model, registry=r
        )
        self.kv_pages = Counter(
            "splitserve:kv_transfer_pages", "KV pages (block x layer) moved", model, registry=r
        )
        self.reservation_s = _histogram(
            "splitserve:reservation_wait_seconds", "Waiting for KV room on a decode worker",
            HOP_BUCKETS_S, r, model,
        )  # fmt: skip
        self.landed_to_admit_s = _histogram(
            "splitserve:kv_landed_to_admit_seconds", "All pages landed to admitted to a "
            "decode step", HOP_BUCKETS_S, r, model,
        )  # fmt: skip

    def track(self, endpoint: str) -> RequestTracker:
        return RequestTracker(self, endpoint)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class RequestTracker:
    """One request's clock; `finish` is idempotent so every exit path may call it."""

    def __init__(self, metrics: RouterMetrics, endpoint: str):
        self._m, self._endpoint = metrics, endpoint
        self._arrival_s = time.time()
        self._first_s: float | None = None
        self._last_s: float | None = None
        self._num_tokens = 0
        self._done = False
        self.trace: Trace | None = None
        metrics.in_flight.labels(endpoint).inc()
        metrics.window.arrived(time.monotonic())

    def on_trace(self, trace: Trace | None) -> None:
        """The backend's hop marks for this request (router.trace), once it has them."""
        if trace is not None and self.trace is None:
            self.trace = trace
            trace.mark("arrival", self._arrival_s)

    def _labels(self) -> tuple[str, str]:
        engine = self.trace.engine if self.trace is not None and self.trace.engine else NO_ENGINE
        return self._m.model_name, engine

    def on_tokens(self, n: int) -> None:
        if n <= 0:
            return
        now, labels = time.time(), self._labels()
        itl = self._m.itl_s.labels(*labels)
        if self._last_s is None:
            self._first_s = now
            self._m.ttft_s.labels(*labels).observe(now - self._arrival_s)
            if self.trace is not None:
                self.trace.mark("first_token", now)
        else:
            itl.observe(now - self._last_s)
        for _ in range(n - 1):  # tokens that arrived together
            itl.observe(0.0)
        self._last_s = now
        self._num_tokens += n

    def finish(
        self,
        status: str,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        finish_reason: str | None = None,
    ) -> None:
        if self._done:
            return
        self._done = True
        m, now = self._m, time.time()
        labels = self._labels()
        m.in_flight.labels(self._endpoint).dec()
        m.requests.labels(self._endpoint, status).inc()
        ok = status in ("200", "OK")
        reason = (finish_reason or "stop") if ok else _reason_of(status)
        if reason not in FINISHED_REASONS:  # refused (4xx): not a processed request
            return
        m.success.labels(*labels, reason).inc()
        m.e2e_s.labels(*labels).observe(now - self._arrival_s)
        m.prompt_tokens.labels(*labels).inc(prompt_tokens)
        m.generation_tokens.labels(*labels).inc(completion_tokens)
        tpot = None
        if self._first_s is not None and self._last_s is not None and self._num_tokens > 1:
            tpot = (self._last_s - self._first_s) / (self._num_tokens - 1)
            m.tpot_s.labels(*labels).observe(tpot)
        spans: dict[str, float] = {}
        if self.trace is not None:
            self.trace.mark("finished", now)
            spans = self.trace.spans()
        if ok:
            ttft = None if self._first_s is None else self._first_s - self._arrival_s
            m.window.finished(Finished(time.monotonic(), ttft, tpot, prompt_tokens,
                                       completion_tokens, spans.get("reservation")))  # fmt: skip
        if self.trace is not None:
            self._observe_trace(self.trace, labels, spans)
            m.traces.put(self.trace)
            if m.exporter is not None:
                try:
                    m.exporter(self.trace)
                except Exception as exc:  # noqa: BLE001 - tracing never fails a request
                    log.warning("trace export failed: %r", exc)

    def _observe_trace(
        self, trace: Trace, labels: tuple[str, str], spans: dict[str, float]
    ) -> None:
        m = self._m
        for phase, seconds in trace.phases().items():
            m.phase_s[phase].labels(*labels).observe(seconds)
        model = m.model_name
        if "reservation" in spans:
            m.reservation_s.labels(model).observe(spans["reservation"])
        if "kv_transfer" in spans:
            m.kv_transfer_s.labels(model).observe(spans["kv_transfer"])
            m.kv_bytes.labels(model).inc(trace.kv_bytes)
            m.kv_pages.labels(model).inc(trace.kv_pages)
        if "decode_queue" in spans:
            m.landed_to_admit_s.labels(model).observe(spans["decode_queue"])


def _reason_of(status: str) -> str | None:
    """vLLM's finished_reason of a request that did not end with 200 / OK."""
    if status in ("499", "CANCELLED", "408", "DEADLINE_EXCEEDED"):
        return "abort"
    if status.startswith("5") or status in ("INTERNAL", "UNAVAILABLE"):
        return "error"
    return None  # refused before it started (4xx): not a processed request
