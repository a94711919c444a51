"""Metrics and traces of the Ray pools: a request's trace carries the prefill and decode
workers' marks across Ray, the router's /metrics series come from the workers' snapshots,
and Ray's own Prometheus export shows every worker's metrics under its name and role."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from conftest import RAY_METRICS_PORT
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import make_tiny_checkpoint

from engine import SamplingParams
from engine.engine_config import EngineConfig
from router.metrics import RouterMetrics

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 14, 33, 70, 12, 8, 90, 41, 3, 77] * 3, [100, 101, 102, 7] * 9]


@pytest.fixture(scope="module")
def backend(ray_session, tmp_path_factory):
    from router.pools import PoolConfig, RayBackend

    tiny = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=4)
    engine = EngineConfig(model=str(tiny), num_kv_blocks=400, block_size=4, num_threads=1)
    pools = PoolConfig(engine=engine, kv_host="127.0.0.1", cpus_per_worker=0.5)
    backend = RayBackend(pools, model_name="tiny")
    yield backend
    backend.shutdown()


async def _served(backend, metrics: RouterMetrics, rid: str, ids: list[int]):
    """One request through the backend, clocked by a tracker as the API front ends do."""
    tracker, n = metrics.track("test"), 0
    async for delta in backend.generate(rid, ids, PARAMS):
        tracker.on_trace(delta.trace)
        tracker.on_tokens(len(delta.token_ids))
        n += len(delta.token_ids)
    tracker.finish("200", len(ids), n, "length")
    return tracker.trace


def test_trace_and_router_metrics_across_workers(backend) -> None:
    metrics = RouterMetrics("tiny")

    async def run() -> list:
        traces = [await _served(backend, metrics, f"m{i}", p) for i, p in enumerate(PROMPTS)]
        metrics.observe_status(await backend.status())
        return traces

    traces = asyncio.run(asyncio.wait_for(run(), 120))
    for trace in traces:
        assert trace.engine == "decode-0" and trace.prefill == "prefill-0"
        hops = trace.ttft_hops()
        assert list(hops) == ["router_queue", "reservation", "prefill_queue", "prefill_compute",
                              "kv_tail", "return", "deliver"]  # fmt: skip
        assert sum(hops.values()) == pytest.approx(trace.ttft_s, abs=1e-6)
        after = trace.spans()
        assert after["kv_transfer"] > 0 and after["decode_queue"] >= 0 and after["decode"] > 0
        assert trace.kv_pages > 0 and trace.kv_bytes > 0
    samples = [
        s for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples
    ]

    def value(name: str, **labels: str) -> float:
        return sum(
            s.value for s in samples if s.name == name and labels.items() <= s.labels.items()
        )

    assert value("splitserve:kv_transfer_seconds_count") == len(PROMPTS)
    assert value("splitserve:kv_transfer_pages_total") == sum(t.kv_pages for t in traces)
    assert value("splitserve:reservation_wait_seconds_count") == len(PROMPTS)
    assert value("vllm:request_prefill_time_seconds_count", engine="decode-0") == len(PROMPTS)
    for engine, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        usage = [s for s in samples if s.name == "vllm:kv_cache_usage_perc"
                 and s.labels["engine"] == engine]  # fmt: skip
        assert len(usage) == 1 and usage[0].labels["role"] == role
        assert value("splitserve:workers", pool=role, state="active") == 1


def test_rays_export_shows_each_worker_by_name_and_role(backend) -> None:
    """Ray's Prometheus export on the node (what the dashboard's Metrics view and a Prometheus
    scraping Ray read): the workers publish through ray.util.metrics."""
    url = f"http://127.0.0.1:{RAY_METRICS_PORT[0]}/metrics"
    want = {("prefill-0", "prefill"), ("decode-0", "decode")}
    deadline, seen = time.monotonic() + 60, set()
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "ray_vllm_kv_cache_usage_perc":
                seen |= {(s.labels.get("engine"), s.labels.get("role")) for s in family.samples}
        if want <= seen:
            break
        time.sleep(1)
    assert want <= seen, f"Ray exported {seen or 'no'} worker KV gauges"
