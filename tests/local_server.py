"""The HTTP and gRPC front ends on real sockets, in-process: `serve_all` over a LocalBackend
on its own thread and event loop. Shared by the integration tests; every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from bench.server_process import free_port
from engine.engine_config import EngineConfig
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from router.backend import LocalBackend
from router.servers import serve_all

ENGINE_ARGS = {"num_kv_blocks": 256, "block_size": 4, "num_threads": 1}


class ServerThread:
    """`serve_all` on a thread with its own event loop; `stop()` shuts it down gracefully."""

    def __init__(
        self,
        backend: LocalBackend,
        api_key: str | None = None,
        grpc_credentials: Any = None,
        grace_s: float = 10.0,
        metrics: Any = None,
    ):
        self.backend, self.metrics = backend, metrics
        self.api_key, self.grpc_credentials, self.grace_s = api_key, grpc_credentials, grace_s
        self.http_port, self.grpc_port = free_port(), free_port()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))

    @classmethod
    def for_checkpoint(cls, path: Path, model_name: str, **serve_kw: Any) -> ServerThread:
        """`serve_kw`: api_key, grpc_credentials, grace_s, metrics."""
        engine = LLMEngine(EngineConfig(model=str(path), **ENGINE_ARGS))
        return cls(LocalBackend(EngineLoop(engine), model_name), **serve_kw).start()

    async def _main(self) -> None:
        self._stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            serve_all(
                self.backend,
                "127.0.0.1",
                self.http_port,
                self.grpc_port,
                ready=ready,
                stop=self._stop,
                api_key=self.api_key,
                grpc_credentials=self.grpc_credentials,
                grace_s=self.grace_s,
                metrics=self.metrics,
            )
        )
        ready_task = asyncio.create_task(ready.wait())
        await asyncio.wait({task, ready_task}, return_when=asyncio.FIRST_COMPLETED)
        self._started.set()
        await task

    def start(self) -> ServerThread:
        self._thread.start()
        assert self._started.wait(30), "server did not start"
        assert self._thread.is_alive(), "server died on start"
        return self

    def begin_stop(self) -> None:
        """As SIGTERM does: the servers drain (refuse new requests, finish admitted ones)."""
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)

    def join(self, timeout_s: float) -> bool:
        """Wait for the servers to have stopped: True if they did within `timeout_s`."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop the servers and the engine loop behind them."""
        self.begin_stop()
        assert self.join(self.grace_s + 20), "server did not stop"
        self.backend.shutdown()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"
