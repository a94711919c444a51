"""A real multi-node Ray cluster on this machine: one `ray start` per node, each on its own
loopback address, with token auth, in a temp dir of its own (so no other Ray user here
finds it), and a teardown that stops only its own processes (never `ray stop`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.server_process import free_port

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class RayNodes:
    temp_dir: Path
    head_ip: str = "127.0.0.2"
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        token = self.temp_dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def _ray_start(self, *args: str) -> None:
        out = subprocess.run(
            [RAY, "start", "--disable-usage-stats", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")

    def start_head(self, num_cpus: float = 1) -> None:
        self._ray_start(
            "--head",
            f"--node-ip-address={self.head_ip}",
            f"--port={self.port}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        )

    def add_node(self, ip: str, num_cpus: float = 1, resources: str = "{}") -> None:
        self._ray_start(
            f"--address={self.address}",
            f"--node-ip-address={ip}",
            f"--num-cpus={num_cpus}",
            f"--resources={resources}",
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process of this cluster and their children."""
        mine = str(self.temp_dir)
        procs: set[psutil.Process] = set()
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if mine in cmd or self.address in cmd:
                procs.add(p)
        for p in list(procs):
            with contextlib.suppress(psutil.Error):
                procs.update(p.children(recursive=True))
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(list(procs), timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
