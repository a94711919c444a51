"""engine.cpu_kernels: a build lock left by a killed build does not hang later loads."""

from __future__ import annotations

import fcntl

from engine.cpu_kernels import _build_lock


def test_a_leftover_torch_lock_is_removed_under_the_flock(tmp_path):
    (tmp_path / "lock").touch()  # what a build killed halfway leaves behind
    with _build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        # the flock is held: another process (another open file) cannot take it now
        with open(tmp_path / "splitserve.flock", "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
            except BlockingIOError:
                taken = False
    assert not taken
    with open(tmp_path / "splitserve.flock", "a") as other:  # released after the block
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
