"""bench.sim_floor times the real scheduler and routing policy (the README's floor for an
hour of a 1,000-GPU fleet comes from it): it runs against their current interfaces."""

from __future__ import annotations

from bench import sim_floor


def test_the_floor_is_timed_on_the_real_scheduler_and_routing(capsys):
    assert (
        sim_floor.main(["--seconds", "1", "--batch", "8", "--decode", "3", "--prefill", "3"]) == 0
    )
    out = capsys.readouterr().out
    assert "1,200 requests" in out and "at batch 8" in out and "floor" in out
