"""`bench overload` end to end on the tiny model: a real `splitserve serve` subprocess (Ray,
1 prefill + 1 decode) with small admission bounds (--max-num-seqs 2: 2 streams + 16 waiting
per decode worker; --max-num-batched-tokens 64: 256 queued prompt tokens per prefill worker),
offered 10x the capacity it measured for 3 s."""

from __future__ import annotations

import argparse
import json

import pytest
from tiny_model import make_tiny_checkpoint
from tokenizers import Tokenizer

from bench import overload_bench
from bench.overload_monitor import GROUPS

INPUT_LEN, OUTPUT_LEN = 16, 8


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("overload")
    model = make_tiny_checkpoint(tmp / "tiny")
    vocab = Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size()
    out = tmp / "overload.json"
    argv = [
        "--model", str(model), "--dtype", "float32", "--vocab-size", str(vocab),
        "--max-num-seqs", "2", "--max-num-batched-tokens", "64",
        "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
        "--capacity-concurrency", "2", "--capacity-requests", "16", "--unloaded-requests", "8",
        "--overload-factor", "10", "--overload-seconds", "3", "--cooldown-seconds", "1",
        "--request-timeout", "60", "--result-json", str(out),
    ]  # fmt: skip
    parser = argparse.ArgumentParser()
    overload_bench.add_args(parser)
    assert overload_bench.run(parser.parse_args(argv)) == 0
    return json.loads(out.read_text())


@pytest.mark.timeout(180)
def test_overload_is_refused_with_429_and_retry_after(result):
    over = result["phases"]["overload"]
    counts = over["counts"]
    assert counts["http_429"] > 0, counts  # 10x capacity passes the admission bound
    assert over["retry_after_share"] == 1.0  # every 429 says when to come back
    assert all(v.isdigit() and int(v) >= 1 for v in over["retry_after_values"])
    assert over["openai_error_body_share"] == 1.0  # rate_limit_error / overloaded
    # nothing else goes wrong: no 5xx, no dropped connection, no stream cut short
    others = ("http_5xx", "connection_error", "overloaded_in_stream", "error_in_stream")
    assert {k: counts[k] for k in (*others, "incomplete", "http_4xx")} == dict.fromkeys(
        (*others, "incomplete", "http_4xx"), 0
    ), over["errors"]
    assert counts["http_429"] + counts["ok"] == over["requests"]


@pytest.mark.timeout(180)
def test_admitted_requests_complete_with_all_their_tokens(result):
    for name in overload_bench.PHASES:
        phase = result["phases"][name]
        assert phase["counts"]["ok"] > 0, (name, phase["errors"])
        assert phase["all_tokens_share"] == 1.0, name
        assert phase["tpot_ms"]["p90"] is not None and phase["ttft_ms"]["p90"] is not None
    calm = result["phases"]["unloaded"]
    assert calm["counts"]["ok"] == calm["requests"] == 8  # below capacity: nobody refused
    assert result["phases"]["capacity"]["completed_rate"] > 0


@pytest.mark.timeout(180)
def test_result_records_memory_queues_and_checks(result):
    checks = result["checks"]
    assert checks["http_429s"] == result["phases"]["overload"]["counts"]["http_429"]
    assert checks["capacity_refused"] == 0  # 2 streams stay under the admission bound
    assert checks["no_5xx"] and checks["no_connection_errors"] and checks["admitted_complete"]
    assert checks["tpot_p90_ratio"] > 0 and isinstance(checks["tpot_p90_within_bound"], bool)
    for phase in ("capacity", "unloaded", "overload", "cooldown"):
        groups = result["memory"][phase]
        assert set(groups) == set(GROUPS)
        for g in ("router", "prefill", "decode", "ray", "client"):  # every process was found
            assert 0 < groups[g]["start_mb"] <= groups[g]["peak_mb"], (phase, g, groups[g])
    assert any(s["phase"] == "overload" for s in result["rss_timeline"])
    # the router holds a bounded number of requests on the decode worker: at most
    # streams + waiting (2 + 16) when admitted, plus the 16 admitted while waiting for KV
    decode = result["queues"]["overload"]["decode-0"]
    assert 0 < decode["in_flight_max"] <= 2 + 16 + 16, decode
    assert result["host"]["cpus"] >= 1
