"""The HTTP and gRPC front ends on real sockets, in-process: `serve_all` over a LocalBackend
on its own thread and event loop. Shared by the integration tests; every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from bench.server_process import free_port
from engine.engine_config import EngineConfig
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from router.backend import LocalBackend
from router.servers import serve_all

ENGINE_ARGS = {"num_kv_blocks": 256, "block_size": 4, "num_threads": 1}


class ServerThread:
    """`serve_all` on a thread with its own event loop; `stop()` shuts it down gracefully."""

    def __init__(self, backend: LocalBackend):
        self.backend = backend
        self.http_port, self.grpc_port = free_port(), free_port()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))

    @classmethod
    def for_checkpoint(cls, path: Path, model_name: str) -> ServerThread:
        engine = LLMEngine(EngineConfig(model=str(path), **ENGINE_ARGS))
        return cls(LocalBackend(EngineLoop(engine), model_name)).start()

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

    def stop(self) -> None:
        """Stop the servers and the engine loop behind them."""
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "server did not stop"
        self.backend.shutdown()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"
