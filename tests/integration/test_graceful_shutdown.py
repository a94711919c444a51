"""Graceful shutdown: a stop (SIGTERM) refuses new requests while the admitted ones finish,
then the servers exit; in-process over a LocalBackend, and as a real `splitserve serve`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from local_server import ENGINE_ARGS, ServerThread
from tiny_model import make_tiny_checkpoint

from bench.server_process import ServerProcess
from engine.engine_config import EngineConfig
from engine.engine_loop import EngineLoop, TokenDelta
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from router.backend import LocalBackend
from splitserve_proto import generation_pb2 as pb
from splitserve_proto import generation_pb2_grpc as pb_grpc

MODEL = "tiny-llama"
TIMEOUT_S = 30
LONG = 300  # tokens of a stream that is still running when the server is told to stop


class PacedBackend(LocalBackend):
    """A LocalBackend that hands out at most one token delta per `pace_s`: a stream that lasts
    long enough (LONG * pace_s) to be in flight while a test stops the server."""

    pace_s = 0.01

    async def generate(  # type: ignore[override]
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        async with aclosing(super().generate(request_id, prompt_token_ids, params)) as deltas:
            async for delta in deltas:
                await asyncio.sleep(self.pace_s)
                yield delta


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def paced_server(checkpoint: Path, pace_s: float, grace_s: float) -> ServerThread:
    engine = LLMEngine(EngineConfig(model=str(checkpoint), **ENGINE_ARGS))
    backend = PacedBackend(EngineLoop(engine), MODEL)
    backend.pace_s = pace_s
    return ServerThread(backend, grace_s=grace_s).start()


def stream_completion(
    url: str, max_tokens: int, out: dict, started: threading.Event, key: str | None = None
) -> None:
    """Read an SSE completion to its end into `out` (text, finish reason, usage, [DONE])."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {
        "model": httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"],
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out.update(text="", done=False, usage=None, finish=None)
    try:
        post = {"json": body, "headers": headers, "timeout": 60}
        with httpx.stream("POST", url + "/v1/completions", **post) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices", []):
                        out["text"] += c["text"]
                        out["finish"] = c["finish_reason"] or out["finish"]
                        started.set()
                    out["usage"] = chunk.get("usage") or out["usage"]
    except httpx.HTTPError as exc:  # the connection cut mid-stream
        out["error"] = exc
    finally:
        started.set()


def start_stream(
    url: str, max_tokens: int, key: str | None = None, wait_s: float = TIMEOUT_S
) -> tuple[threading.Thread, dict]:
    """A streaming completion on a thread, once its first text has arrived."""
    out: dict = {}
    started = threading.Event()
    args = (url, max_tokens, out, started, key)
    thread = threading.Thread(target=stream_completion, args=args)
    thread.start()
    assert started.wait(wait_s) and "error" not in out, out
    return thread, out


def test_stop_refuses_new_requests_and_finishes_streams_in_flight(checkpoint: Path) -> None:
    srv = paced_server(checkpoint, pace_s=0.01, grace_s=20)  # each stream: ~3 s
    try:
        grpc_target = f"127.0.0.1:{srv.grpc_port}"
        with grpc.insecure_channel(grpc_target) as ch:
            sampling = pb.SamplingOptions(max_tokens=LONG, ignore_eos=True)
            in_flight = pb_grpc.GenerationStub(ch).Generate(
                pb.GenerateRequest(text="Hello", sampling=sampling), timeout=60
            )
            first = next(in_flight)  # the gRPC stream has begun
            http_thread, http_out = start_stream(srv.url, LONG)
            srv.begin_stop()
            t_stop = time.monotonic()
            _check_refusing(srv)
            assert not http_out["done"]  # the refusals came while the stream was in flight
            rest = list(in_flight)  # the admitted gRPC stream runs to its end
        http_thread.join(TIMEOUT_S)
        assert http_out["finish"] == "length" and http_out["done"], http_out
        assert http_out["usage"]["completion_tokens"] == LONG
        responses = [first, *rest]
        assert sum(len(r.token_ids) for r in responses) == LONG
        assert responses[-1].finish_reason == "length"
        assert srv.join(10), "the servers did not stop once the streams were done"
        assert time.monotonic() - t_stop < 20  # well within the grace
    finally:
        srv.stop()


def _check_refusing(srv: ServerThread) -> None:
    """While draining: new HTTP generation 503 shutting_down, /health 503, gRPC UNAVAILABLE."""
    deadline = time.monotonic() + 5
    while httpx.get(srv.url + "/health", timeout=TIMEOUT_S).status_code == 200:
        assert time.monotonic() < deadline, "the stop never reached the server"
        time.sleep(0.02)
    health = httpx.get(srv.url + "/health", timeout=TIMEOUT_S)
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for path in ("/v1/completions", "/v1/models"):
        r = httpx.request(
            "POST" if path.endswith("completions") else "GET",
            srv.url + path,
            json=body,
            timeout=TIMEOUT_S,
        )
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "shutting_down"
        assert r.json()["error"]["type"] == "server_error"
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            request = pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=2))
            list(pb_grpc.GenerationStub(ch).Generate(request, timeout=TIMEOUT_S))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_grace_over_cuts_what_still_runs_and_exits(checkpoint: Path) -> None:
    srv = paced_server(checkpoint, pace_s=0.1, grace_s=1.0)  # a stream of ~30 s
    try:
        thread, out = start_stream(srv.url, LONG)
        t_stop = time.monotonic()
        srv.begin_stop()
        assert srv.join(1.0 + 5), "the servers outlived the grace"
        exited_s = time.monotonic() - t_stop
        assert exited_s >= 1.0  # the grace was given
        thread.join(TIMEOUT_S)
        assert not out["done"] and out["finish"] is None  # cut, not finished
        assert "error" in out or out["usage"] is None
        assert srv.backend.loop.call(LLMEngine.snapshot).result(10)["running"] == 0
    finally:
        srv.stop()


def test_sigterm_drains_a_real_server(checkpoint: Path) -> None:
    """`splitserve serve` with an API key from the environment: SIGTERM to the main process
    -> new requests 503, the running stream completes, exit 0, no Ray process left."""
    key = "sk-drain-test"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--model", str(checkpoint), "--mode", "colocated", "--prefill", "0", "--decode", "1"]
    args += ["--block-size", "4", "--kv-cache-gb", "0.05", "--shutdown-grace", "60"]
    server = ServerProcess(*args, env=env, start_timeout_s=240, api_key=key)
    try:
        children = psutil.Process(server.proc.pid).children(recursive=True)
        auth = server.headers
        assert httpx.get(server.base + "/v1/models", timeout=TIMEOUT_S).status_code == 401
        assert httpx.get(server.base + "/v1/models", headers=auth).status_code == 200
        assert server.status()["mode"] == "colocated"
        thread, out = start_stream(server.base, 480, key, wait_s=60)
        t_term = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        refused = _next_request_after_term(server.base, auth)
        still_streaming = not out["done"]
        thread.join(120)
        code = server.proc.wait(timeout=60 + 30)
        assert refused == 503 and still_streaming, (refused, out)
        assert out["finish"] == "length" and out["done"], out
        assert out["usage"]["completion_tokens"] == 480
        assert code == 0, server.log()[-4000:]
        assert "draining: 1 request(s) in flight" in server.log()
        print(f"exit {time.monotonic() - t_term:.1f} s after SIGTERM")
        assert time.monotonic() - t_term < 60 + 10
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"still running after exit: {[p.pid for p in alive]}"
    finally:
        server.stop()


def _next_request_after_term(base: str, auth: dict) -> int | str:
    """The status of the first generation request the server answers after SIGTERM."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = {"prompt": "hi", "max_tokens": 1}  # no model: a 503 comes before that check
        try:
            r = httpx.post(base + "/v1/completions", json=body, headers=auth, timeout=10)
        except httpx.HTTPError as exc:
            return repr(exc)
        if r.status_code == 503:
            return 503
        time.sleep(0.01)  # the signal has not been handled yet
    return "never refused"
