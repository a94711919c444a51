"""A worker's engine snapshot published as Ray metrics, every few seconds.

Ray's dashboard (Metrics view) and Ray's Prometheus export on every node then show each
worker's figures under vLLM's names, tagged with the worker's name (`engine`), its role
and the model. Two changes to the names are Ray's: its OpenTelemetry export drops a metric
whose name holds a ":" (measured: nothing exported), so `vllm:x` is published as `vllm_x`,
and Ray prefixes `ray_`: `ray_vllm_kv_cache_usage_perc{engine="decode-0", role="decode",
...}`. The router's own /metrics carries the same per-worker series under vLLM's exact
names (router.fleet_metrics) for setups that scrape the router.

    worker actor ──start()──> a daemon thread: every period_s, snapshot() (between engine
                              steps, on the engine's thread) ──> Gauge.set / Counter.inc
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from engine.load import load_of

log = logging.getLogger(__name__)

_TAGS = ("model_name", "engine", "role")
_GAUGES = {  # vLLM's names with "_" for ":": Ray's OpenTelemetry export drops names with ":"
    "vllm_num_requests_running": "Number of requests in model execution batches.",
    "vllm_num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm_kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
}
_COUNTERS = {  # snapshot key -> (name, description); published as increments
    "prefix_query_tokens": ("vllm_prefix_cache_queries", "Prefix cache queries, in tokens."),
    "prefix_hit_tokens": ("vllm_prefix_cache_hits", "Prefix cache hits, in tokens."),
    "preemptions": ("vllm_num_preemptions", "Cumulative number of preemption from the engine."),
    "steps": ("splitserve_engine_steps", "Engine steps run."),
}


def role_of(worker_name: str) -> str:
    """`decode-3` -> `decode` (the fleet names workers `<role>-<i>`)."""
    return worker_name.rsplit("-", 1)[0]


def gauge_values(snapshot: dict[str, Any]) -> dict[str, float]:
    """The gauges' values from an engine snapshot (LLMEngine.snapshot)."""
    load = load_of(snapshot)
    return {
        "vllm_num_requests_running": float(load.running),
        "vllm_num_requests_waiting": float(load.waiting),
        "vllm_kv_cache_usage_perc": load.kv_use,
    }


class RayMetricsPublisher:
    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        model_name: str,
        worker_name: str,
        period_s: float = 2.0,
    ):
        from ray.util import metrics

        self._snapshot, self.period_s = snapshot, period_s
        self.tags = {"model_name": model_name, "engine": worker_name, "role": role_of(worker_name)}
        self._gauges = {n: metrics.Gauge(n, d, tag_keys=_TAGS) for n, d in _GAUGES.items()}
        self._counters = {
            key: metrics.Counter(name, doc, tag_keys=_TAGS)
            for key, (name, doc) in _COUNTERS.items()
        }
        self._last: dict[str, float] = dict.fromkeys(_COUNTERS, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"{worker_name}-metrics", daemon=True
        )

    def start(self) -> RayMetricsPublisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def publish(self, snapshot: dict[str, Any]) -> None:
        for name, value in gauge_values(snapshot).items():
            self._gauges[name].set(value, tags=self.tags)
        for key, counter in self._counters.items():
            value = float(snapshot.get(key, 0))
            if value > self._last[key]:
                counter.inc(value - self._last[key], tags=self.tags)
            self._last[key] = value

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.publish(self._snapshot())
            except Exception as exc:  # noqa: BLE001 - a stopped engine: the worker is ending
                log.debug("metrics: no snapshot (%r)", exc)
                if self._stop.is_set():
                    return


def publish_metrics(loop: Any, model_name: str, worker_name: str) -> RayMetricsPublisher | None:
    """Start publishing `loop`'s engine snapshots (engine.engine_loop.EngineLoop) where Ray
    runs this process (a worker actor); None elsewhere (a worker made in-process)."""
    import ray

    if not ray.is_initialized():
        return None

    def snapshot() -> dict[str, Any]:
        return loop.call(lambda engine: engine.snapshot()).result(timeout=10)

    return RayMetricsPublisher(snapshot, model_name, worker_name).start()
