"""`splitserve bench kv`: the three paths move the same bytes intact, and the report adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _bench_kv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitserve", "bench", "kv", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_bench_kv_reports_all_three_paths(tmp_path):
    out = tmp_path / "kv.json"
    r = _bench_kv("--mib", "16", "--result-json", str(out))
    assert r.returncode == 0, r.stderr
    # each path checks the destination's crc32 against the source's after every round
    result = json.loads(out.read_text())
    for key in ("grpc_gbps", "socket_gbps", "bare_grpc_gbps"):
        assert result[key] > 0
    assert result["bytes"] == 16 << 20
    assert result["ratio"] == pytest.approx(result["grpc_gbps"] / result["socket_gbps"])
    assert result["bare_ratio"] == pytest.approx(result["bare_grpc_gbps"] / result["socket_gbps"])
    assert f"ratio {result['ratio']:.2f}" in r.stdout


def test_bench_kv_rejects_a_bad_size():
    r = _bench_kv("--mib", "0")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--mib must be positive" in lines[0]
