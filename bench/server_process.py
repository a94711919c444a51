"""Start `splitserve serve` as a subprocess and wait for it, as a user would (benches, e2e)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, health_url: str, timeout_s: float) -> bool:
    """Poll `health_url` until it answers 200: True; False if `proc` exits first. On timeout,
    stop the process group and raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(health_url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(1)
    stop_group(proc, grace_s=10)
    raise TimeoutError(f"server did not become healthy in {timeout_s:.0f} s")


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGINT the process group `proc` leads (started with start_new_session); SIGKILL it after
    `grace_s`."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class ServerProcess:
    """`splitserve serve` on free ports (HTTP, gRPC, Ray dashboard); its output goes to a
    temporary log file (a pipe nobody reads would stall a chatty server), `log()` reads it.
    `api_key`: the server asks for it (given in its environment, out of the process list),
    and `status()` sends it; `headers` is what a client of this server sends."""

    def __init__(
        self,
        *serve_args: str,
        start_timeout_s: float = 240.0,
        env: dict[str, str] | None = None,
        api_key: str | None = None,
    ):
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        keyed = {"SPLITSERVE_API_KEY": api_key} if api_key else {}
        self.port, self.grpc_port, self.dashboard_port = free_port(), free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop)
            mode="w+", prefix="splitserve-serve-", suffix=".log"
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "splitserve",
                "serve",
                "--port",
                str(self.port),
                "--grpc-port",
                str(self.grpc_port),
                "--dashboard-port",
                str(self.dashboard_port),
                *serve_args,
            ],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env={**(os.environ if env is None else env), "RAY_DEDUP_LOGS": "0", **keyed},
            start_new_session=True,
        )
        try:
            healthy = wait_healthy(self.proc, self.base + "/health", start_timeout_s)
        except TimeoutError:
            self.log_file.close()
            raise
        if not healthy:
            output = self.log()
            self.log_file.close()
            raise RuntimeError(f"server exited:\n{output[-8000:]}")

    def log(self) -> str:
        with open(self.log_file.name, errors="replace") as f:
            return f.read()

    def status(self) -> dict:
        req = urllib.request.Request(self.base + "/status", headers=self.headers)
        with urllib.request.urlopen(req, timeout=10) as r:
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
        stop_group(self.proc, grace_s=60)
        self.log_file.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
