"""bench.cpu_hogs: the busy processes run (they take CPU) while the block runs, and are gone
after it, also when the block raises."""

from __future__ import annotations

import time

import psutil
import pytest

from bench.cpu_hogs import cpu_hogs


def _children() -> list[psutil.Process]:
    return psutil.Process().children()


def test_hogs_take_cpu_while_the_block_runs_and_are_gone_after():
    before = {p.pid for p in _children()}
    with cpu_hogs(2):
        time.sleep(0.5)
        hogs = [p for p in _children() if p.pid not in before]
        assert len(hogs) == 2
        assert all(p.cpu_times().user > 0.02 for p in hogs)  # busy ~1 ms in every 7
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in hogs)


def test_hogs_stop_when_the_block_raises():
    before = {p.pid for p in _children()}
    with pytest.raises(RuntimeError), cpu_hogs(1):
        hogs = [p for p in _children() if p.pid not in before]
        raise RuntimeError("boom")
    assert len(hogs) == 1 and not hogs[0].is_running()
