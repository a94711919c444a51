"""`splitserve bench prefix` end to end on the tiny model: two `splitserve serve` subprocesses
(2 prefill workers each), the shared-prefix workload, the table and the JSON."""

from __future__ import annotations

import json

import pytest
from tiny_model import make_tiny_checkpoint

from splitserve.cli import main


@pytest.mark.timeout(300)
def test_prefix_routing_beats_random_on_the_tiny_model(tmp_path, capsys):
    model = make_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "prefix_routing.json"
    # 6 groups of 128-token prompts; each worker's cache holds 4 of them (512 tokens, the
    # tiny model's max_model_len): random routing thrashes, prefix routing partitions.
    # One request at a time, so that no queue pushes a prompt off its cached worker.
    argv = [
        "bench", "prefix", "--model", str(model), "--block-size", "4", "--groups", "6",
        "--prefix-tokens", "120", "--suffix-tokens", "8", "--requests", "36",
        "--concurrency", "1", "--max-tokens", "4", "--rounds", "1",
        "--request-timeout", "60", "--result-json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "TTFT random / prefix: median" in printed
    doc = json.loads(out.read_text())
    assert doc["cache"]["prompts_held"] == 4.0
    assert [r["policy"] for r in doc["runs"]] == ["prefix", "random"]
    policies = doc["policies"]
    assert set(policies) == {"prefix", "random"}
    for s in policies.values():
        assert (s["completed"], s["failed"]) == (36, 0)
        assert 0.0 <= s["hit_rate"] <= 1.0
        assert s["query_tokens"] == 36 * 128  # every prompt looked up once, warm-up excluded
        assert s["ttft_ms"]["median"] > 0
        (split,) = s["query_tokens_per_worker"]
        assert len(split) == 2 and sum(split.values()) == 36 * 128
    # Each group's first request misses under either policy; beyond that prefix routing
    # keeps hitting while random routing cycles 6 prefixes through caches that hold 4.
    assert policies["prefix"]["hit_rate"] >= policies["random"]["hit_rate"]
    assert policies["prefix"]["hit_rate"] > 0.5
    assert doc["ttft_ratio_random_over_prefix"]["median"] > 0
