"""`splitserve bench serve` against the real HTTP + gRPC servers (LocalBackend, tiny model).

The server runs `serve_all` on its own thread and event loop for the module, as in
test_openai_api.py / test_grpc_api.py; the bench's core function drives it.
"""

from __future__ import annotations

import itertools
import json

import pytest
from local_server import ServerThread
from tiny_model import make_tiny_checkpoint

from bench import serve_bench, serve_metrics
from bench.server_process import free_port
from engine.errors import InvalidRequestError

MODEL = "tiny-llama"
TIMEOUT_S = 30
N, MAX_TOKENS = 8, 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerThread.for_checkpoint(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), MODEL)
    yield {"http": srv.http_port, "grpc": srv.grpc_port, "vocab": srv.backend.vocab_size}
    srv.stop()


def _args(server: dict, **kw):
    base = {
        "base_url": f"http://127.0.0.1:{server['http']}",
        "grpc_target": f"127.0.0.1:{server['grpc']}",
        "model": MODEL,
        "num_prompts": N,
        "random_input_len": 12,
        "random_output_len": MAX_TOKENS,
        "vocab_size": server["vocab"],
        "ignore_eos": True,
        "no_progress": True,
        "timeout": TIMEOUT_S,
    }
    return serve_bench.default_args(**{**base, **kw})


def _check_consistent(result: dict, n: int = N, max_tokens: int = MAX_TOKENS) -> None:
    s, reqs = result["summary"], result["requests"]
    assert len(reqs) == n
    assert all(r["success"] for r in reqs), [r["error"] for r in reqs]
    assert s["completed"] == n and s["failed"] == 0 and s["errors"] == []
    assert all(r["output_tokens"] == max_tokens for r in reqs)
    assert s["total_output_tokens"] == n * max_tokens
    assert all(0 <= r["start"] <= r["first_token_time"] <= r["end"] for r in reqs)
    assert all(r["token_times"] == sorted(r["token_times"]) for r in reqs)
    assert s["duration_s"] >= max(r["end"] for r in reqs)
    assert s["request_throughput"] == pytest.approx(n / s["duration_s"])
    assert s["output_throughput"] == pytest.approx(n * max_tokens / s["duration_s"])
    # The summary is the metrics module applied to the written per-request records.
    again = serve_metrics.summarize(reqs, s["duration_s"], s.get("slos_ms"))
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(s))
    ttfts = sorted((r["first_token_time"] - r["start"]) * 1000 for r in reqs)
    assert s["ttft_ms"]["mean"] == pytest.approx(sum(ttfts) / n)
    assert min(ttfts) <= s["ttft_ms"]["median"] <= s["ttft_ms"]["p99"] <= max(ttfts)
    e2es = [(r["end"] - r["start"]) * 1000 for r in reqs]
    assert s["e2e_ms"]["mean"] == pytest.approx(sum(e2es) / n)
    assert s["tpot_ms"]["mean"] == pytest.approx(
        sum((r["end"] - r["first_token_time"]) * 1000 / (max_tokens - 1) for r in reqs) / n
    )
    gaps = [b - a for r in reqs for a, b in itertools.pairwise(r["token_times"])]
    assert s["itl_ms"]["mean"] == pytest.approx(sum(gaps) * 1000 / len(gaps))


def test_http_completions_with_token_ids(server, tmp_path):
    args = _args(
        server,
        request_rate=50.0,
        max_concurrency=4,
        goodput=["ttft:60000", "tpot:60000"],
        result_json=tmp_path / "r.json",
        plot=tmp_path / "cdf.png",
    )
    assert serve_bench.run(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    _check_consistent(result)
    assert all(r["prompt_tokens"] == 12 for r in result["requests"])  # exact prompt lengths
    assert result["summary"]["slo_attainment"] == 1.0
    assert result["summary"]["goodput"] == pytest.approx(N / result["summary"]["duration_s"])
    assert (tmp_path / "cdf.png").stat().st_size > 0


def test_http_chat_synthetic(server):
    args = _args(
        server,
        endpoint="chat",
        dataset="synthetic-chat",
        mean_input_len=10,
        mean_output_len=4,
        sigma=0.0,  # every output length is exactly 4
        goodput=["ttft:0.001"],  # nobody meets a 1 us TTFT
    )
    result = serve_bench.benchmark(args)
    _check_consistent(result, max_tokens=4)
    assert result["summary"]["slo_attainment"] == 0.0 and result["summary"]["goodput"] == 0.0


def test_grpc(server):
    result = serve_bench.benchmark(_args(server, backend="grpc"))
    _check_consistent(result)
    assert all(r["prompt_tokens"] == 12 for r in result["requests"])


def test_failed_requests_are_recorded(server):
    result = serve_bench.benchmark(_args(server, model="no-such-model", num_prompts=3))
    s = result["summary"]
    assert s["completed"] == 0 and s["failed"] == 3
    assert len(s["errors"]) == 1 and "does not exist" in s["errors"][0]
    assert s["ttft_ms"]["mean"] is None


def test_unreachable_server():
    args = serve_bench.default_args(base_url=f"http://127.0.0.1:{free_port()}", no_progress=True)
    with pytest.raises(InvalidRequestError, match="cannot reach"):
        serve_bench.benchmark(args)
    args = serve_bench.default_args(
        backend="grpc", grpc_target=f"127.0.0.1:{free_port()}", no_progress=True
    )
    serve_bench.HEALTH_TIMEOUT_S, saved = 0.5, serve_bench.HEALTH_TIMEOUT_S
    try:
        with pytest.raises(InvalidRequestError, match="cannot reach"):
            serve_bench.benchmark(args)
    finally:
        serve_bench.HEALTH_TIMEOUT_S = saved


def test_some_requests_fail(server, tmp_path):
    """A server that rejects some requests: they are counted, the rest are measured."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "hello there", "output_len": 3}, {"prompt": "x " * 2000, "output_len": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = serve_bench.benchmark(
        _args(server, dataset="jsonl", dataset_path=path, num_prompts=4, goodput=["ttft:60000"])
    )
    s = result["summary"]
    assert (s["completed"], s["failed"]) == (2, 2)
    assert len(s["errors"]) == 1 and "HTTP 400" in s["errors"][0]
    assert s["slo_attainment"] == 0.5  # failed requests miss the SLO
    assert s["total_output_tokens"] == 6


def _server_metrics(server: dict) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{server['http']}/metrics", timeout=10) as r:
        text = r.read().decode()
    totals: dict[str, float] = {}  # each sample name summed over its label sets (workers)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_tool_agrees_with_the_servers_own_timings(server):
    """The tool's per-request TTFT/E2E and token counts against the server's Prometheus metrics.

    The server clocks a request from its arrival, the tool from just before sending it, so
    each of the tool's latencies is the server's plus the loopback and HTTP overhead.
    """
    names = (
        "vllm:time_to_first_token_seconds_sum",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
        "vllm:generation_tokens_total",
    )
    before = _server_metrics(server)
    result = serve_bench.benchmark(_args(server, request_rate=20.0))
    after = _server_metrics(server)
    ttft_sum, ttft_count, e2e_sum, tokens = (after[k] - before.get(k, 0.0) for k in names)
    _check_consistent(result)
    reqs = result["requests"]
    assert ttft_count == N
    assert tokens == result["summary"]["total_output_tokens"]
    tool_ttft = sum(r["first_token_time"] - r["start"] for r in reqs)
    tool_e2e = sum(r["end"] - r["start"] for r in reqs)
    overhead_s = 0.25 * N  # generous per-request loopback + HTTP bound on a loaded 2-core box
    assert ttft_sum <= tool_ttft <= ttft_sum + overhead_s
    assert e2e_sum <= tool_e2e <= e2e_sum + overhead_s


def test_hops_join_each_request_to_its_server_trace(server):
    """`bench serve --hops`: each request's TTFT hops (from GET /debug/trace/ID, by the
    response id the client saw) cover its client-measured TTFT, less the client's overhead."""
    from bench import hops

    args = _args(server, request_rate=20.0)
    result = serve_bench.benchmark(args)
    hops.attach_hops(result["requests"], args.base_url, None)
    summary = hops.summarize(result["requests"])
    assert summary["requests"] == N
    assert list(summary["median_ms"]) == ["router_queue", "worker_queue", "prefill_compute",
                                          "deliver"]  # fmt: skip
    for rec in result["requests"]:
        client_ms = 1000 * (rec["first_token_time"] - rec["start"])
        hop_ms = sum(rec["hops_ms"].values())
        assert hop_ms == pytest.approx(rec["server_ttft_ms"], abs=1e-3)
        assert hop_ms <= client_ms <= hop_ms + 250  # loopback + HTTP client, on a loaded box
        assert rec["after_ms"]["decode"] > 0
    text = hops.format_summary(summary)
    assert "prefill_compute" in text and "hops / client TTFT" in text
