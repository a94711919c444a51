"""`splitserve top --once` against a real server (HTTP on a socket, a LocalBackend on the tiny
seeded model, in-process): after 3 requests its frame counts them and shows their TTFT."""

from __future__ import annotations

import httpx
import pytest
from local_server import ServerThread
from tiny_model import make_tiny_checkpoint

from splitserve.cli import main

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerThread.for_checkpoint(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), MODEL)
    yield srv
    srv.stop()


def _row(frame: str, first: str) -> list[str]:
    return next(line.split() for line in frame.splitlines() if line.startswith(first))


def test_once_shows_the_requests_served(
    server: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPLITSERVE_API_KEY", raising=False)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(3):
            body = {
                "model": MODEL,
                "prompt": f"request {i} says",
                "max_tokens": 4,
                "ignore_eos": True,
            }
            assert http.post("/v1/completions", json=body).status_code == 200

    assert main(["top", "--once", "--url", server.url]) == 0
    frame = capsys.readouterr().out
    assert f"model {MODEL}" in frame and "mode local" in frame
    assert "requests 3 " in frame and "output tokens 12 " in frame
    worker = _row(frame, "local-0")
    assert worker[1] == "colocated" and worker[-2].endswith("%")  # KV used
    ttft = _row(frame, "TTFT")
    p50, p90, p99, count = (float(v) for v in ttft[1:5])
    assert 0 < p50 <= p90 <= p99 and count == 3
    assert float(_row(frame, "E2E")[4]) == 3
