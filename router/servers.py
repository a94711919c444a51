"""HTTP (uvicorn) and gRPC servers in one asyncio loop, stopped together.

bind HTTP socket, start gRPC ──> ready.set() ──> serve ...
SIGINT / SIGTERM / `stop` set / HTTP server died ──> both stop taking new requests;
    in-flight ones get GRACE_S to finish; a second SIGINT forces the HTTP side at once
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn

from router.backend import Backend
from router.grpc_api import create_grpc_server
from router.metrics import RouterMetrics
from router.openai_api import create_app

log = logging.getLogger(__name__)
GRACE_S = 10.0


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
) -> None:
    """Serve the OpenAI HTTP API and the gRPC API until a signal, `stop`, or cancellation."""
    metrics = metrics or RouterMetrics()
    stop = stop or asyncio.Event()
    sock = socket.create_server((host, http_port), backlog=2048)  # listening before `ready`
    config = uvicorn.Config(
        create_app(backend, metrics),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(GRACE_S),
    )
    http = _HTTPServer(config)
    grpc_server = create_grpc_server(backend, grpc_port, host, metrics)
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve(sockets=[sock]), name="http-server")
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    if ready is not None:
        ready.set()
    with _signals_set(stop, http):
        try:
            await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            log.info("splitserve: shutting down (grace %.0f s)", GRACE_S)
            http.should_exit = True
            stop_task.cancel()
            await asyncio.gather(grpc_server.stop(GRACE_S), http_task, return_exceptions=True)
            sock.close()
    if not http_task.cancelled() and http_task.exception() is not None:
        raise http_task.exception()  # type: ignore[misc]


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event, http: uvicorn.Server) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop`; a second SIGINT forces exit. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() and sig == signal.SIGINT:
            http.force_exit = True
        stop.set()

    sigs = (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
