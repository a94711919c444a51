"""GET /metrics under vLLM's names and GET /debug/trace/ID, on a real HTTP server over the
in-process backend (the Ray pools' series: tests/integration/test_ray_metrics.py)."""

from __future__ import annotations

import time

import httpx
import pytest
from local_server import ServerThread
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import make_tiny_checkpoint

from router.backend import LOCAL_WORKER
from router.metrics import ITL_BUCKETS_S, TTFT_BUCKETS_S

MODEL = "tiny-llama"
KEY = "sk-metrics-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerThread.for_checkpoint(make_tiny_checkpoint(tmp_path_factory.mktemp("t")), MODEL,
                                      api_key=KEY)  # fmt: skip
    yield srv
    srv.stop()


def _samples(text: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(
        s.value for s in samples if s.name == name and labels.items() <= s.labels.items()
    )  # fmt: skip


def _complete(http: httpx.Client, max_tokens: int, stream: bool = False) -> tuple[str, float]:
    """(response id, TTFT seen by this client)."""
    body = {"model": MODEL, "prompt": "metrics are", "max_tokens": max_tokens, "stream": stream}
    t0 = time.time()
    if not stream:
        resp = http.post("/v1/completions", json=body)
        resp.raise_for_status()
        return resp.json()["id"], time.time() - t0
    with http.stream("POST", "/v1/completions", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                import json

                return json.loads(line[6:])["id"], time.time() - t0
    raise AssertionError("no event")


def test_vllm_names_labels_and_buckets(server: ServerThread) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as http:
        before = _samples(httpx.get(server.url + "/metrics").text)  # open: no key
        for _ in range(3):
            _complete(http, max_tokens=4)
        bad = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400  # refused: not a processed request in vLLM's series
        after = _samples(httpx.get(server.url + "/metrics").text)
    labels = {"model_name": MODEL, "engine": LOCAL_WORKER}
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:request_prefill_time_seconds_count",
                 "vllm:request_decode_time_seconds_count"):  # fmt: skip
        assert _value(after, name, **labels) - _value(before, name, **labels) == 3, name
    success = "vllm:request_success_total"
    assert (
        _value(after, success, finished_reason="length")
        - _value(before, success, finished_reason="length")
        == 3
    )
    gen = "vllm:generation_tokens_total"
    assert _value(after, gen, **labels) - _value(before, gen, **labels) == 12
    # vLLM's bucket bounds, exactly
    ttft_le = {s.labels["le"] for s in after if s.name == "vllm:time_to_first_token_seconds_bucket"}
    assert ttft_le == {str(float(b)) for b in TTFT_BUCKETS_S} | {"+Inf"}
    itl_le = {s.labels["le"] for s in after if s.name == "vllm:inter_token_latency_seconds_bucket"}
    assert itl_le == {str(float(b)) for b in ITL_BUCKETS_S} | {"+Inf"}
    # the worker's own series, read from its snapshot at scrape time
    worker = {**labels, "role": "colocated"}
    usage = [s for s in after if s.name == "vllm:kv_cache_usage_perc" and s.labels == worker]
    assert len(usage) == 1 and 0.0 <= usage[0].value <= 1.0
    assert _value(after, "vllm:num_requests_running", **worker) == 0
    assert _value(after, "splitserve:workers", pool="colocated", state="active") == 1


def test_trace_of_a_request_sums_to_its_ttft(server: ServerThread) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as http:
        rid, client_ttft = _complete(http, max_tokens=6, stream=True)
        deadline = time.monotonic() + 10
        while (resp := http.get(f"/debug/trace/{rid}")).status_code == 404:
            assert time.monotonic() < deadline, "the trace never appeared"
            time.sleep(0.05)
        assert httpx.get(f"{server.url}/debug/trace/{rid}").status_code == 401  # needs the key
        missing = http.get("/debug/trace/no-such-request")
    assert missing.status_code == 404 and "no trace" in missing.json()["error"]["message"]
    trace = resp.json()
    assert trace["request_id"] == rid and trace["engine"] == LOCAL_WORKER
    hops = trace["hops_s"]
    assert trace["ttft_hops"] == ["router_queue", "worker_queue", "prefill_compute", "deliver"]
    assert all(hops[h] >= 0 for h in trace["ttft_hops"]) and hops["decode"] > 0
    ttft = sum(hops[h] for h in trace["ttft_hops"])
    assert ttft == pytest.approx(trace["ttft_s"], abs=1e-6)  # the hops leave no gap
    assert ttft <= client_ttft  # the client's TTFT adds the loopback and the HTTP client
    marks = list(trace["marks_s"].values())
    assert marks == sorted(marks) and marks[0] == 0.0
