"""Per-worker series for GET /metrics, from the workers' own engine snapshots (the ones
/status shows), read at scrape time: vLLM's gauges and counters labelled by worker
(`engine`) and `role`, and splitserve's pool sizes, migrations and failed transfers.

    /metrics ──await backend.status()──> RouterMetrics.observe_status(report)
             ──generate_latest──> FleetCollector.collect() over report["workers"]

A worker's counters (prefix cache, preemptions, expired transfers) are its engine's since
it started: a replaced worker starts again from 0 under a new name, which Prometheus'
rate() handles as a new series.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.load import load_of

Workers = Callable[[], list[dict[str, Any]]]
Recovery = Callable[[], dict[str, Any]]
_LABELS = ["model_name", "engine", "role"]


class FleetCollector:
    def __init__(self, model_name: str, workers: Workers, recovery: Recovery | None = None):
        self.model_name = model_name
        self.workers = workers
        self.recovery = recovery or dict

    def collect(self) -> Iterator[Metric]:
        workers = self.workers()
        yield from self._worker_series(workers)
        yield self._pools(workers)
        yield from self._recovery(workers)

    def _worker_series(self, workers: list[dict[str, Any]]) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Number of requests in model execution batches.",
            labels=_LABELS,
        )  # fmt: skip
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed (on a "
            "decode worker: also those whose KV is still arriving).", labels=_LABELS,
        )  # fmt: skip
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            labels=_LABELS,
        )  # fmt: skip
        counters = {
            key: CounterMetricFamily(name, doc, labels=_LABELS)
            for key, name, doc in (
                ("prefix_query_tokens", "vllm:prefix_cache_queries",
                 "Prefix cache queries, in terms of number of queried tokens."),
                ("prefix_hit_tokens", "vllm:prefix_cache_hits",
                 "Prefix cache hits, in terms of number of cached tokens."),
                ("preemptions", "vllm:num_preemptions",
                 "Cumulative number of preemption from the engine."),
            )
        }  # fmt: skip
        for w in workers:
            if "running" not in w:  # no snapshot yet (starting)
                continue
            labels = [self.model_name, str(w["name"]), str(w.get("role", ""))]
            load = load_of(w)
            running.add_metric(labels, load.running)
            waiting.add_metric(labels, load.waiting)
            usage.add_metric(labels, load.kv_use)
            for key, family in counters.items():
                family.add_metric(labels, w.get(key, 0))
        yield from (running, waiting, usage, *counters.values())

    def _pools(self, workers: list[dict[str, Any]]) -> Metric:
        pools = GaugeMetricFamily(
            "splitserve:workers", "Workers per pool and state",
            labels=["model_name", "pool", "state"],
        )  # fmt: skip
        tally = Tally((str(w.get("role", "")), str(w.get("state", ""))) for w in workers)
        for (pool, state), n in sorted(tally.items()):
            pools.add_metric([self.model_name, pool, state], n)
        return pools

    def _recovery(self, workers: list[dict[str, Any]]) -> Iterator[Metric]:
        recovery = self.recovery()
        migrations = CounterMetricFamily(
            "splitserve:migrations", "Requests moved off a lost worker after tokens had gone "
            "out", labels=["model_name"],
        )  # fmt: skip
        migrations.add_metric([self.model_name], recovery.get("migrations", 0))
        failures = CounterMetricFamily(
            "splitserve:kv_transfer_failures", "KV transfers that failed (the router saw it) "
            "or expired (their lease ran out before every page landed)",
            labels=["model_name", "reason"],
        )  # fmt: skip
        failures.add_metric([self.model_name, "failed"], recovery.get("transfer_failures", 0))
        expired = sum(w.get("kv_transfers_expired", 0) for w in workers)
        failures.add_metric([self.model_name, "expired"], expired)
        yield from (migrations, failures)
