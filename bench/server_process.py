"""Start `splitserve serve` as a subprocess and wait for it, as a user would (benches, e2e)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *serve_args: str, start_timeout_s: float = 240.0):
        self.port, self.grpc_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "router.cli",
                "serve",
                "--port",
                str(self.port),
                "--grpc-port",
                str(self.grpc_port),
                *serve_args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "RAY_DEDUP_LOGS": "0"},
            start_new_session=True,
        )
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.proc.stdout.read() if self.proc.stdout else ""
                raise RuntimeError(f"server exited:\n{output}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"server did not become healthy in {start_timeout_s:.0f} s")

    def status(self) -> dict:
        with urllib.request.urlopen(self.base + "/status", timeout=10) as r:
            return json.load(r)

    def wait_no_kv_held(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            used = {w["name"]: w["kv_blocks_used"] for w in self.status()["workers"]}
            if not any(used.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"KV blocks still held: {used}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
