"""`splitserve top`: Prometheus' histogram_quantile, window deltas between scrapes, the frame,
and the command against a stub server (one frame, one-line errors, quiet Ctrl-C)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from bench.server_process import free_port
from splitserve.cli import main
from splitserve.top import (
    CLEAR,
    Scrape,
    histogram_quantile,
    parse_metrics,
    rate,
    render_frame,
    window,
)

INF = float("inf")
TTFT = "vllm:time_to_first_token_seconds"
# 10 observations: 2 in (0, 0.1], 4 in (0.1, 0.5], 3 in (0.5, 1], 1 above 1
TEN = ((0.1, 2.0), (0.5, 6.0), (1.0, 9.0), (INF, 10.0))


# ---- percentiles -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "want"),
    [
        (0.1, 0.05),  # rank 1 of 2 in the first bucket, which starts at 0
        (0.5, 0.4),  # rank 5: 3rd of 4 in (0.1, 0.5] -> 0.1 + 0.4 * 3/4
        (0.8, 0.5 + 0.5 * 2 / 3),  # rank 8: 2nd of 3 in (0.5, 1]
        (0.9, 1.0),  # rank 9: the top of (0.5, 1]
        (0.99, 1.0),  # rank 9.9 lies in +Inf: the highest finite bound
    ],
)
def test_quantile_hand_computed(q: float, want: float) -> None:
    assert histogram_quantile(q, TEN) == pytest.approx(want)


@pytest.mark.parametrize(
    "buckets",
    [
        (),  # no series
        ((0.1, 0.0), (1.0, 0.0), (INF, 0.0)),  # no observations
        ((0.1, 2.0), (1.0, 3.0)),  # no +Inf bucket
        ((INF, 3.0),),  # only +Inf
    ],
)
def test_quantile_undefined_is_none(buckets) -> None:
    assert histogram_quantile(0.5, buckets) is None


def _inverse_cdf(rank: float, buckets) -> float:
    """Prometheus' definition restated: the observations spread evenly inside each bucket
    makes the CDF piecewise linear through (0, 0) and every (bound, cumulative count); the
    quantile is the least x where that CDF reaches the rank (found by bisection)."""
    points = [(0.0, 0.0), *[(le, c) for le, c in buckets if le != INF]]
    if rank > points[-1][1]:
        return points[-1][0]

    def cdf(x: float) -> float:
        for (x0, c0), (x1, c1) in zip(points, points[1:], strict=False):
            if x <= x1:
                return c0 + (c1 - c0) * (x - x0) / (x1 - x0)
        return points[-1][1]

    lo, hi = 0.0, points[-1][0]
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cdf(mid) >= rank else (mid, hi)
    return hi


def test_quantile_agrees_with_piecewise_linear_cdf() -> None:
    rng = random.Random(12)
    bounds = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    for _ in range(200):
        counts = [rng.choice((0, 0, 1, 3, 10)) for _ in range(len(bounds) + 1)]
        if not sum(counts):
            continue
        cumulative = [float(sum(counts[: i + 1])) for i in range(len(counts))]
        buckets = tuple(zip((*bounds, INF), cumulative, strict=True))
        for q in (0.01, 0.25, 0.5, 0.9, 0.99, 1.0):
            want = _inverse_cdf(q * cumulative[-1], buckets)
            assert histogram_quantile(q, buckets) == pytest.approx(want, abs=1e-9), (q, buckets)


# ---- parsing and windows -----------------------------------------------------------------


def _registry() -> tuple[CollectorRegistry, Histogram, Counter, Counter]:
    r = CollectorRegistry()
    ttft = Histogram(TTFT, "ttft", ["model_name", "engine"], buckets=(0.1, 0.5, 1.0), registry=r)
    done = Counter(
        "vllm:request_success", "done", ["model_name", "engine", "finished_reason"], registry=r
    )
    tokens = Counter("vllm:generation_tokens", "tokens", ["model_name", "engine"], registry=r)
    return r, ttft, done, tokens


def test_parse_sums_label_sets() -> None:
    r, ttft, done, tokens = _registry()
    for engine, seconds in (("decode-0", 0.05), ("decode-1", 0.3), ("decode-1", 0.7)):
        ttft.labels("m", engine).observe(seconds)
    done.labels("m", "decode-0", "stop").inc(2)
    done.labels("m", "decode-1", "length").inc(1)
    tokens.labels("m", "decode-0").inc(40)
    histograms, counters = parse_metrics(generate_latest(r).decode())
    assert histograms[TTFT] == ((0.1, 1.0), (0.5, 2.0), (1.0, 3.0), (INF, 3.0))
    assert counters["vllm:request_success_total"] == 3
    assert counters["vllm:generation_tokens_total"] == 40
    assert not any(name.endswith("_created") for name in counters)


def test_window_is_the_delta_between_scrapes() -> None:
    before = ((0.1, 2.0), (0.5, 6.0), (1.0, 9.0), (INF, 10.0))
    after = ((0.1, 2.0), (0.5, 6.0), (1.0, 11.0), (INF, 13.0))  # 2 in (0.5, 1], 1 above
    delta, in_window = window(after, before)
    assert in_window and delta == ((0.1, 0.0), (0.5, 0.0), (1.0, 2.0), (INF, 3.0))
    # the window's median: rank 1.5 of 3, 1.5th of 2 in (0.5, 1]
    assert histogram_quantile(0.5, delta) == pytest.approx(0.5 + 0.5 * 1.5 / 2)
    # all-time's: rank 6.5 of 13, 0.5th of 5 in (0.5, 1]
    assert histogram_quantile(0.5, after) == pytest.approx(0.5 + 0.5 * 0.5 / 5)


@pytest.mark.parametrize(
    ("prev", "why"),
    [
        (TEN, "nothing new"),
        (None, "no previous scrape"),
        (((0.1, 5.0), (0.5, 9.0), (1.0, 20.0), (INF, 30.0)), "counts went down: a restart"),
    ],
)
def test_window_falls_back_to_all_time(prev, why) -> None:
    assert window(TEN, prev) == (TEN, False), why


def test_window_for_a_series_new_since_the_last_scrape() -> None:
    assert window(TEN, ()) == (TEN, True)


def test_rate_from_counter_deltas() -> None:
    a = Scrape(10.0, {}, {}, {"vllm:request_success_total": 4.0})
    b = Scrape(12.0, {}, {}, {"vllm:request_success_total": 10.0})
    assert rate("vllm:request_success_total", b, a) == pytest.approx(3.0)
    assert rate("vllm:request_success_total", b, None) is None
    assert rate("vllm:request_success_total", a, b) is None  # a reset reads as no rate


# ---- the frame ---------------------------------------------------------------------------

STATUS = {
    "model": "smollm2-135m",
    "mode": "disaggregated",
    "pools": {"prefill": 1, "decode": 1},
    "workers": [
        {"name": "prefill-0", "role": "prefill", "state": "active", "in_flight": 2,
         "queued_tokens": 300, "running": 1, "waiting": 0, "kv_blocks_used": 5,
         "kv_blocks_total": 100, "step_busy_ms": 1000},
        {"name": "decode-0", "role": "decode", "state": "active", "in_flight": 2,
         "queued_tokens": 0, "running": 2, "waiting": 1, "kv_blocks_used": 73,
         "kv_blocks_total": 100, "step_busy_ms": 500},
    ],
}  # fmt: skip


def _metrics_text() -> str:
    r, ttft, done, tokens = _registry()
    for seconds in (0.05, 0.3, 0.7):
        ttft.labels("smollm2-135m", "decode-0").observe(seconds)
    done.labels("smollm2-135m", "decode-0", "stop").inc(3)
    tokens.labels("smollm2-135m", "decode-0").inc(24)
    return generate_latest(r).decode()


def _scrape(at_s: float, status: dict, text: str) -> Scrape:
    return Scrape(at_s, status, *parse_metrics(text))


def _row(frame: str, first: str) -> list[str]:
    return next(line.split() for line in frame.splitlines() if line.startswith(first))


def test_frame_shows_workers_kv_and_percentiles() -> None:
    frame = render_frame(_scrape(0.0, STATUS, _metrics_text()))
    assert "smollm2-135m" in frame and "prefill 1, decode 1" in frame
    assert "requests 3" in frame and "output tokens 24" in frame
    prefill, decode = _row(frame, "prefill-0"), _row(frame, "decode-0")
    assert "5%" in prefill and "73%" in decode and "[#######...]" in decode
    assert decode[3:6] == ["2", "1", "2"]  # running, waiting, in flight
    # TTFT over 0.05, 0.3, 0.7 s in buckets 0.1/0.5/1: p50 300 ms, p90 850 ms, p99 985 ms
    assert _row(frame, "TTFT")[1:5] == ["300.0", "850.0", "985.0", "3"]
    assert _row(frame, "E2E")[1:5] == ["-", "-", "-", "0"]  # no such series: "-"


def test_frame_over_a_window_has_rates_and_busy() -> None:
    first = _scrape(0.0, STATUS, _metrics_text())
    later = {**STATUS, "workers": [{**w, "step_busy_ms": w["step_busy_ms"] + 900}
                                   for w in STATUS["workers"]]}  # fmt: skip
    frame = render_frame(_scrape(2.0, later, _metrics_text()), first)
    assert "(0.00 req/s)" in frame and "(0.0 tok/s)" in frame
    assert _row(frame, "decode-0")[-1] == "45%"  # 900 ms busy of 2 s
    assert _row(frame, "TTFT")[-2:] == ["all", "time"]  # nothing new: all-time


def test_frame_of_a_local_backend() -> None:
    """LocalBackend's /status has no pools, state, in_flight or queued_tokens."""
    status = {"model": "tiny", "mode": "local", "workers": [
        {"name": "local-0", "role": "colocated", "running": 0, "waiting": 0,
         "kv_blocks_used": 0, "kv_blocks_total": 256}]}  # fmt: skip
    frame = render_frame(_scrape(0.0, status, ""))
    assert "pools: -" in frame and "requests 0" in frame
    assert _row(frame, "local-0")[2] == "-" and "0%" in _row(frame, "local-0")


# ---- the command, against a stub server --------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    key: str | None = None

    def do_GET(self) -> None:  # noqa: N802
        if (
            self.key
            and self.path == "/status"
            and (self.headers.get("Authorization") != f"Bearer {self.key}")
        ):
            body = {"error": {"message": "invalid API key", "code": "invalid_api_key"}}
            self._send(401, "application/json", json.dumps(body))
        elif self.path == "/status":
            self._send(200, "application/json", json.dumps(STATUS))
        elif self.path == "/metrics":
            self._send(200, "text/plain; version=0.0.4", _metrics_text())
        else:
            self._send(404, "text/plain", "")

    def _send(self, code: int, content_type: str, body: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


def _serve(key: str | None) -> Iterator[str]:
    handler = type("Handler", (_Stub,), {"key": key})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def stub() -> Iterator[str]:
    yield from _serve(None)


@pytest.fixture
def keyed_stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("SPLITSERVE_API_KEY", raising=False)
    yield from _serve("sk-top")


def test_once_prints_one_frame(stub: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--once", "--url", stub]) == 0
    out = capsys.readouterr().out
    assert CLEAR not in out and out.count("splitserve top") == 1
    assert "decode-0" in out and "73%" in out and "requests 3" in out


def test_key_from_flag_or_environment(
    keyed_stub: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["top", "--once", "--url", keyed_stub, "--api-key", "sk-top"]) == 0
    monkeypatch.setenv("SPLITSERVE_API_KEY", "sk-top")
    assert main(["top", "--once", "--url", keyed_stub]) == 0
    assert capsys.readouterr().out.count("decode-0") == 2


def test_no_key_is_one_line_and_exit_1(keyed_stub: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--once", "--url", keyed_stub]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "401" in lines[0]
    assert "--api-key" in lines[0] and captured.out == ""


def test_unreachable_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["top", "--url", url]) == 1  # live mode too: no frame, no traceback
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach splitserve")


def test_ctrl_c_exits_quietly(stub: str, tmp_path: Path) -> None:
    out_path = tmp_path / "out"
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitserve", "top", "--url", stub, "--interval", "0.2"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            deadline = time.monotonic() + 60
            while out_path.read_text().count("splitserve top") < 2:  # two frames drawn
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "no frames within 60 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0 and err == ""
    assert out_path.read_text().startswith(CLEAR)


@pytest.mark.parametrize("interval", ["0", "-1", "nan"])
def test_interval_must_be_positive(interval: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["top", "--interval", interval])
    assert exited.value.code == 2 and "--interval" in capsys.readouterr().err
