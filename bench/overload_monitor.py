"""What the server holds while `bench overload` loads it: RSS and CPU of its processes, and
its workers' queues, sampled on two threads (RSS and CPU every --sample-interval seconds,
/status every --status-interval seconds).

Process groups (psutil):
    router   the `splitserve serve` process itself (HTTP, gRPC, the router's state)
    prefill  Ray worker processes of the prefill pool   (cmdline `ray::PrefillWorker`)
    decode   Ray worker processes of the decode pool    (cmdline `ray::DecodeWorker`)
    ray      every other descendant of the server: raylet, GCS, dashboard, idle Ray workers
    client   this process: the load generator itself
A local `splitserve serve` starts Ray's head node as its own child, so the raylet and the
worker processes it spawns are the server's descendants. Worker pids also come from
/status (each worker reports its pid), which finds them when only --base-url is known
(workers on this host only; the router is then measured only with --server-pid).
RSS counts shared pages (the model's weights, torch's libraries) in every process.

CPU: cores each group used per phase, and the host's busy cores: `other` is what processes
outside this bench used (another job on a shared machine shows up there).

Queues (/status every --status-interval seconds): running / waiting / held per worker and
the prefill worker's queued prompt tokens, so a phase's decode batch size is on record.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections import defaultdict
from typing import Any

import psutil

GROUPS = ("router", "prefill", "decode", "ray", "client")
_CMDLINE_ROLES = {"ray::PrefillWorker": "prefill", "ray::DecodeWorker": "decode"}
_QUEUE_KEYS = ("in_flight", "running", "waiting", "held", "queued_tokens", "kv_blocks_used")
MB = 1024 * 1024
_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")  # guest is in user


def fetch_status(base_url: str, timeout_s: float = 10.0) -> dict[str, Any]:
    with urllib.request.urlopen(base_url.rstrip("/") + "/status", timeout=timeout_s) as r:
        return json.load(r)


class ServerMonitor:
    """Samples on its own threads between `start()` and `stop()`; `mark(phase)` closes the
    current phase with a sample and opens the next."""

    def __init__(
        self,
        base_url: str,
        router_pid: int | None,
        interval_s: float = 0.5,
        status_interval_s: float = 1.0,
    ):
        self.base_url, self.router_pid = base_url, router_pid
        self.interval_s, self.status_interval_s = interval_s, status_interval_s
        self.phase = "idle"
        self.t0 = time.perf_counter()
        self.samples: list[dict[str, Any]] = []  # t, phase, rss_mb {group: MB}
        self.queues: list[dict[str, Any]] = []  # t, phase, workers {name: {role, running...}}
        self.cpu_s: dict[str, dict[str, float]] = defaultdict(
            lambda: dict.fromkeys((*GROUPS, "machine"), 0.0)
        )
        self.load_avg: dict[str, float] = {}  # 1-minute load average as each phase ended
        self._machine_last = 0.0
        self.phase_wall_s: dict[str, float] = defaultdict(float)
        self._procs: dict[int, psutil.Process] = {}
        self._cpu_last: dict[int, float] = {}
        self._worker_roles: dict[int, str] = {}  # pid -> role, from /status
        self._lock = threading.Lock()
        self._sampling = threading.Lock()
        self._stop = threading.Event()
        # two threads: a /status poll waits for the workers' engine steps (seconds for a long
        # prefill on a CPU), and must not hold up the RSS samples
        self._threads = [
            threading.Thread(target=self._rss_loop, name="overload-rss", daemon=True),
            threading.Thread(target=self._status_loop, name="overload-status", daemon=True),
        ]
        self._phase_start = self.t0

    def start(self) -> None:
        self._poll_status()
        self.sample()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self.mark("stopped")

    def mark(self, phase: str) -> None:
        """End the current phase (a last sample of it) and start `phase`."""
        self.sample()
        now = time.perf_counter()
        with self._lock:
            self.phase_wall_s[self.phase] += now - self._phase_start
            self.load_avg[self.phase] = round(os.getloadavg()[0], 2)
            self.phase, self._phase_start = phase, now
        self.sample()  # its first

    def _rss_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _status_loop(self) -> None:
        while not self._stop.wait(self.status_interval_s):
            self._poll_status()

    # ---- sampling ------------------------------------------------------------------------

    def _poll_status(self) -> None:
        try:
            status = fetch_status(self.base_url)
        except (OSError, ValueError):  # a busy server may miss one; the next poll retries
            return
        workers: dict[str, dict[str, Any]] = {}
        roles = dict(self._worker_roles)
        for w in status.get("workers", []):
            role = "prefill" if w.get("role") == "prefill" else "decode"  # colocated: decode
            if isinstance(w.get("pid"), int):
                roles[w["pid"]] = role
            workers[w["name"]] = {"role": w.get("role"), **{k: w.get(k, 0) for k in _QUEUE_KEYS}}
        self._worker_roles = roles  # replaced whole: the sampling thread reads it as it is
        with self._lock:
            t = time.perf_counter() - self.t0
            self.queues.append({"t": round(t, 2), "phase": self.phase, "workers": workers})

    def _group_of(self, proc: psutil.Process, roles: dict[int, str]) -> str:
        if proc.pid in roles:
            return roles[proc.pid]
        try:
            head = (proc.cmdline() or [""])[0]
        except psutil.Error:
            return "ray"
        return next((role for tag, role in _CMDLINE_ROLES.items() if head.startswith(tag)), "ray")

    def _processes(self) -> list[tuple[str, psutil.Process]]:
        roles = self._worker_roles
        found: list[tuple[str, psutil.Process]] = [("client", self._proc(os.getpid()))]
        if self.router_pid is not None:
            try:
                router = self._proc(self.router_pid)
                found.append(("router", router))
                found += [(self._group_of(p, roles), p) for p in router.children(recursive=True)]
            except psutil.Error:  # the server has exited
                pass
        seen = {p.pid for _, p in found}
        for pid, role in roles.items():  # --base-url: workers on this host
            if pid not in seen and psutil.pid_exists(pid):
                found.append((role, self._proc(pid)))
        return found

    def _proc(self, pid: int) -> psutil.Process:
        if pid not in self._procs:  # one object per pid: psutil checks it is the same process
            self._procs[pid] = psutil.Process(pid)
        return self._procs[pid]

    def sample(self) -> None:
        with self._sampling:  # the thread's samples and mark()'s never interleave
            self._sample()

    def _sample(self) -> None:
        rss = dict.fromkeys(GROUPS, 0.0)
        cpu = dict.fromkeys(GROUPS, 0.0)
        for group, proc in self._processes():
            try:
                with proc.oneshot():
                    rss[group] += proc.memory_info().rss / MB
                    times = proc.cpu_times()
            except psutil.Error:  # gone between listing and reading
                continue
            total = times.user + times.system
            cpu[group] += max(0.0, total - self._cpu_last.get(proc.pid, total))
            self._cpu_last[proc.pid] = total
        machine = psutil.cpu_times()
        busy = sum(getattr(machine, f, 0.0) for f in _BUSY_FIELDS)
        cpu["machine"] = max(0.0, busy - self._machine_last) if self._machine_last else 0.0
        self._machine_last = busy
        with self._lock:
            t = time.perf_counter() - self.t0
            row = {"t": round(t, 2), "phase": self.phase, "rss_mb": _rounded(rss)}
            self.samples.append(row)
            for group, seconds in cpu.items():
                self.cpu_s[self.phase][group] += seconds

    # ---- summaries ------------------------------------------------------------------------

    def memory(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per phase and group: start, peak and end RSS (MB)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for phase in self.phase_wall_s:
            rows = [s["rss_mb"] for s in self.samples if s["phase"] == phase]
            if not rows:
                continue
            out[phase] = {
                g: {
                    "start_mb": rows[0][g],
                    "peak_mb": max(r[g] for r in rows),
                    "end_mb": rows[-1][g],
                }
                for g in GROUPS
            }
        return out

    def cpu(self) -> dict[str, dict[str, float]]:
        """Per phase: cores each group used on average; `machine`: all busy cores of the
        host, `other`: the part of them no process of this bench or its server used."""
        out: dict[str, dict[str, float]] = {}
        for phase, wall in self.phase_wall_s.items():
            if wall <= 0:
                continue
            cores = {g: round(v / wall, 2) for g, v in self.cpu_s[phase].items()}
            cores["other"] = round(max(0.0, cores["machine"] - sum(cores[g] for g in GROUPS)), 2)
            out[phase] = {**cores, "load_avg_1m": self.load_avg.get(phase, 0.0)}
        return out

    def queue_stats(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per phase and worker: mean and max of running, waiting, held, queued tokens."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for phase in dict.fromkeys(q["phase"] for q in self.queues):
            polls = [q["workers"] for q in self.queues if q["phase"] == phase]
            names = dict.fromkeys(n for p in polls for n in p)
            out[phase] = {}
            for name in names:
                rows = [p[name] for p in polls if name in p]
                stats: dict[str, float] = {"polls": len(rows)}
                for k in _QUEUE_KEYS:
                    values = [float(r[k] or 0) for r in rows]
                    stats[f"{k}_mean"] = round(sum(values) / len(values), 2)
                    stats[f"{k}_max"] = max(values)
                out[phase][name] = stats
        return out


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}
