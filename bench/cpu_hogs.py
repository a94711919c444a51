"""Busy processes beside a benchmark, standing in for what shares a serving host's cores
(the router, the HTTP clients, Ray): each is busy `busy_ms`, then sleeps `idle_ms`, over and
over, so the OS preempts the benchmark's threads now and then.

    with cpu_hogs(2):            # two of them, busy 1 ms in every ~7 (~28% of a core in all)
        ... time the steps ...

`python -m bench.step_profile --hogs 2` uses it (the A/B of the fused decode's threads).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

_LOOP = """
import sys, time
busy, idle = float(sys.argv[1]) / 1e3, float(sys.argv[2]) / 1e3
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(idle)
"""


@contextlib.contextmanager
def cpu_hogs(count: int, busy_ms: float = 1.0, idle_ms: float = 6.0) -> Iterator[None]:
    """`count` busy processes while the block runs; stopped (killed) when it ends."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _LOOP, str(busy_ms), str(idle_ms)])
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)
