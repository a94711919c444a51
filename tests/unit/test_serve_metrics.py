"""bench/serve_metrics.py on hand-made timelines: every number checked exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import serve_bench, serve_metrics
from bench.serve_datasets import load_samples
from engine.errors import InvalidRequestError


def rec(start, token_times, end, output_tokens, success=True, error=""):
    return {
        "start": start,
        "first_token_time": token_times[0] if token_times else None,
        "token_times": list(token_times),
        "end": end,
        "output_tokens": output_tokens,
        "success": success,
        "error": error,
    }


# Times are multiples of 1/8 s so every value below is exact in binary floating point.
A = rec(0.0, [0.5, 0.75, 1.0, 1.5], 1.5, 4)  # ttft .5, e2e 1.5, tpot 1/3, itl .25 .25 .5
B = rec(1.0, [1.25, 1.5], 2.0, 3)  # ttft .25, e2e 1, tpot .375, itl .25 (2 chunks, 3 tokens)
C = rec(2.0, [3.0], 3.0, 1)  # ttft 1, e2e 1, tpot undefined, no itl
F = rec(0.0, [], 0.125, 0, success=False, error="HTTP 500: boom")
G = rec(0.0, [0.25], 0.5, 0, success=False, error="HTTP 500: boom")
H = rec(0.0, [], 0.25, 0, success=False, error="gRPC UNAVAILABLE: gone")


def test_per_request_metrics():
    assert serve_metrics.ttft(A) == 0.5
    assert serve_metrics.e2e(A) == 1.5
    assert serve_metrics.tpot(A) == pytest.approx(1 / 3)
    assert serve_metrics.itls(A) == [0.25, 0.25, 0.5]
    assert serve_metrics.ttft(B) == 0.25
    assert serve_metrics.tpot(B) == 0.375  # (1.0 - 0.25) / (3 - 1): tokens from usage
    assert serve_metrics.itls(B) == [0.25]
    assert serve_metrics.tpot(C) is None  # one output token: TPOT undefined
    assert serve_metrics.itls(C) == []
    assert serve_metrics.ttft(F) is None and serve_metrics.tpot(F) is None
    # first_token_time missing: taken from token_times
    assert serve_metrics.ttft({**A, "first_token_time": None}) == 0.5


def test_stats_ms():
    s = serve_metrics.stats_ms([0.001, 0.002, 0.003, 0.004, 0.010])
    assert s["mean"] == pytest.approx(4.0)
    assert s["median"] == pytest.approx(3.0)
    # linear interpolation: rank 0.9 * 4 = 3.6 -> 4 + 0.6 * 6; rank 3.96 -> 4 + 0.96 * 6
    assert s["p90"] == pytest.approx(7.6)
    assert s["p99"] == pytest.approx(9.76)
    assert serve_metrics.stats_ms([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_summary_without_slos():
    s = serve_metrics.summarize([A, B, C, F], duration_s=4.0)
    assert (s["num_requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["errors"] == ["HTTP 500: boom"]
    assert s["request_throughput"] == 0.75  # 3 successful / 4 s
    assert s["output_throughput"] == 2.0  # (4 + 3 + 1) tokens / 4 s
    assert s["total_output_tokens"] == 8
    # TTFT over successful requests: 500, 250, 1000 ms
    assert s["ttft_ms"]["mean"] == pytest.approx(1750 / 3)
    assert s["ttft_ms"]["median"] == 500
    assert s["ttft_ms"]["p90"] == pytest.approx(900)  # 500 + 0.8 * 500
    assert s["ttft_ms"]["p99"] == pytest.approx(990)
    # TPOT: A and B only (C has one token): 333.3, 375 ms
    assert s["tpot_ms"]["mean"] == pytest.approx((1000 / 3 + 375) / 2)
    assert s["tpot_ms"]["median"] == pytest.approx((1000 / 3 + 375) / 2)
    # ITL pooled over requests: 250, 250, 500, 250 ms
    assert s["itl_ms"]["mean"] == pytest.approx(312.5)
    assert s["itl_ms"]["median"] == pytest.approx(250)
    assert s["itl_ms"]["p99"] == pytest.approx(np.percentile([250, 250, 500, 250], 99))
    # E2E: 1500, 1000, 1000 ms
    assert s["e2e_ms"]["mean"] == pytest.approx(3500 / 3)
    assert s["e2e_ms"]["median"] == 1000
    assert "goodput" not in s and "slo_attainment" not in s


def test_slo_attainment_counts_failed_requests_as_missing():
    records = [A, B, C, F]
    # TTFT <= 600 ms: A (500) and B (250) meet, C (1000) misses, F failed.
    s = serve_metrics.summarize(records, 4.0, {"ttft": 600})
    assert s["slo_attainment"] == 0.5 and s["goodput"] == 0.5
    # TPOT <= 350 ms: A (333) meets, B (375) misses, C (1 token) meets, F failed.
    s = serve_metrics.summarize(records, 4.0, {"tpot": 350})
    assert s["slo_attainment"] == 0.5 and s["goodput"] == 0.5
    # Both: only A meets both.
    s = serve_metrics.summarize(records, 4.0, {"ttft": 600, "tpot": 350})
    assert s["slo_attainment"] == 0.25 and s["goodput"] == 0.25
    assert s["slos_ms"] == {"ttft": 600, "tpot": 350}
    # Generous SLOs: every successful request meets them; the failed one still misses.
    s = serve_metrics.summarize(records, 2.0, {"ttft": 1e9, "tpot": 1e9})
    assert s["slo_attainment"] == 0.75 and s["goodput"] == 1.5
    # A failed request that did stream a fast first token still misses.
    assert not serve_metrics.meets_slos(G, {"ttft": 1e9})
    # Boundary: exactly at the threshold meets it.
    assert serve_metrics.meets_slos(A, {"ttft": 500})
    assert not serve_metrics.meets_slos(A, {"ttft": 499.999})


def test_all_failed_and_error_list():
    s = serve_metrics.summarize([F, G, H, F], 1.0, {"ttft": 100})
    assert s["completed"] == 0 and s["failed"] == 4
    assert s["errors"] == ["HTTP 500: boom", "gRPC UNAVAILABLE: gone"]  # unique, in order
    assert s["request_throughput"] == 0 and s["output_throughput"] == 0
    assert s["ttft_ms"]["mean"] is None and s["itl_ms"]["p99"] is None
    assert s["slo_attainment"] == 0 and s["goodput"] == 0
    assert serve_metrics.summarize([], 1.0, {"ttft": 1})["slo_attainment"] is None
    with pytest.raises(ValueError):
        serve_metrics.summarize([A], 0.0)


def test_parse_goodput_and_validation():
    assert serve_bench.parse_goodput(["ttft:500", "tpot:50.5"]) == {"ttft": 500, "tpot": 50.5}
    assert serve_bench.parse_goodput(None) == {}
    for bad in (["e2e:5"], ["ttft"], ["ttft:x"], ["tpot:0"]):
        with pytest.raises(InvalidRequestError):
            serve_bench.parse_goodput(bad)
    for kw in ({"request_rate": 0.0}, {"request_rate": -1.0}, {"dataset": "sharegpt"}):
        with pytest.raises(InvalidRequestError):
            serve_bench.benchmark(serve_bench.default_args(no_progress=True, **kw))
    with pytest.raises(InvalidRequestError, match="does not exist"):
        serve_bench.benchmark(
            serve_bench.default_args(dataset="jsonl", dataset_path="/no/such.jsonl")
        )


def test_arrivals():
    assert serve_bench.arrival_delays(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]
    d = serve_bench.arrival_delays(20000, 4.0, 1.0, 0)
    assert np.mean(d) == pytest.approx(0.25, rel=0.03)  # Poisson: mean gap 1/rate
    bursty = serve_bench.arrival_delays(20000, 4.0, 0.25, 0)
    assert np.mean(bursty) == pytest.approx(0.25, rel=0.05)
    assert np.std(bursty) > 1.5 * np.std(d)  # burstier: same mean, more spread


def test_datasets(tmp_path):
    s = load_samples(
        "random", 5, token_ids=True, random_input_len=7, random_output_len=3, vocab_size=400
    )
    assert all(len(x.prompt) == 7 and x.output_len == 3 for x in s)
    assert all(100 <= t < 400 for x in s for t in x.prompt)
    s = load_samples("random", 2, token_ids=False, random_input_len=9)
    assert all(isinstance(x.prompt, str) and len(x.prompt.split()) == 9 for x in s)
    s = load_samples(
        "synthetic-chat", 2000, token_ids=True, mean_input_len=50, mean_output_len=20, sigma=0.5
    )
    assert np.mean([x.output_len for x in s]) == pytest.approx(20, rel=0.05)
    assert np.mean([x.prompt_len for x in s]) == pytest.approx(50, rel=0.05)
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hi", "output_len": 3}\n\n{"prompt": "yo", "output_len": 5}\n')
    s = load_samples("jsonl", 3, token_ids=True, dataset_path=path)
    assert [(x.prompt, x.output_len) for x in s] == [("hi", 3), ("yo", 5), ("hi", 3)]
    path.write_text('{"prompt": "hi"}\n')
    with pytest.raises(InvalidRequestError, match="d.jsonl:1"):
        load_samples("jsonl", 1, token_ids=True, dataset_path=path)
