"""HTTP (uvicorn) and gRPC servers in one asyncio loop, stopped together.

bind HTTP socket, start gRPC ──> ready.set() ──> serve (router.auth checks every call) ...
SIGINT / SIGTERM / `stop` set ──> drain: the gate refuses new requests (HTTP 503, gRPC
    UNAVAILABLE, /health 503) while admitted ones run on, for at most `grace_s`
    ──> both servers stop (what still runs after the grace is cancelled) ──> return
a second SIGINT ends the drain at once; the HTTP server dying, or cancellation: no drain
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator

import grpc
import uvicorn

from router.access import GRACE_S, Gate
from router.auth import GRPCAccess, HTTPAccess
from router.backend import Backend
from router.grpc_api import create_grpc_server
from router.metrics import RouterMetrics
from router.openai_api import create_app

log = logging.getLogger(__name__)
_STOP_S = 1  # after the drain: time for the servers to close their connections
# An idle keep-alive connection is closed by the client before the server: clients (httpx,
# aiohttp, requests' pools) drop idle connections after 5-15 s, and a server that closed
# first at uvicorn's 5 s races a client sending its next request on that connection: the
# request is lost with a connection reset. 75 s, as nginx's default.
KEEP_ALIVE_S = 75


class _HTTPServer(uvicorn.Server):
    """uvicorn without its own signal handling: `serve_all` owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_all(
    backend: Backend,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics: RouterMetrics | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    api_key: str | None = None,
    grpc_credentials: grpc.ServerCredentials | None = None,
    grace_s: float = GRACE_S,
) -> None:
    """Serve the OpenAI HTTP API and the gRPC API until a signal, `stop`, or cancellation.
    `api_key`: every call but health checks (and /metrics) must carry it; `grpc_credentials`:
    TLS for the gRPC API; `grace_s`: how long a stop waits for in-flight requests."""
    metrics = metrics or RouterMetrics(backend.model_name)
    stop = stop or asyncio.Event()
    gate = Gate()
    sock = _listen(host, http_port)  # listening before `ready`
    app = HTTPAccess(create_app(backend, metrics), gate, api_key)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_keep_alive=KEEP_ALIVE_S
    )
    http = _HTTPServer(config)
    grpc_server = create_grpc_server(
        backend, grpc_port, host, metrics, [GRPCAccess(gate, api_key)], grpc_credentials
    )
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve(sockets=[sock]), name="http-server")
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    if ready is not None:
        ready.set()
    with _signals_set(stop, http, gate):
        try:
            await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set() and not http_task.done():
                await _drain(gate, grace_s)
        finally:
            gate.close()
            config.timeout_graceful_shutdown = _STOP_S
            http.should_exit = True
            stop_task.cancel()
            await asyncio.gather(grpc_server.stop(_STOP_S), http_task, return_exceptions=True)
            sock.close()
    if not http_task.cancelled() and http_task.exception() is not None:
        raise http_task.exception()  # type: ignore[misc]


async def _drain(gate: Gate, grace_s: float) -> None:
    gate.close()
    log.warning(
        "splitserve: draining: %d request(s) in flight, up to %.0f s", gate.in_flight, grace_s
    )
    if not await gate.drained(grace_s):
        log.warning("splitserve: drain cut short; cancelling %d request(s)", gate.in_flight)


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event, http: uvicorn.Server, gate: Gate) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop`; a second SIGINT ends the drain and forces exit. Main
    thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() and sig == signal.SIGINT:
            http.force_exit = True
            gate.stop_waiting()
        stop.set()

    sigs = (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)


def _listen(host: str, port: int) -> socket.socket:
    """The HTTP listening socket. Made with proto=IPPROTO_TCP, because asyncio turns on
    TCP_NODELAY for accepted connections only when the socket says it is TCP (`create_server`
    leaves proto 0): without it Nagle and delayed ACKs add ~40 ms to every response."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock
