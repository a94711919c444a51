"""The SLO autoscaler in the simulator: the planner's own decisions, carried out on the
virtual clock; a change in the planner changes what the simulated fleet does."""

from __future__ import annotations

from planner import AutoscaleConfig, PoolLimits
from planner.capacity import Capacity
from sim.cluster import ClusterConfig
from sim.cost import FittedCost, Hops
from sim.simulate import simulate
from sim.workload import SimRequest, parse_phases, poisson_times

# about this machine's engine at one thread: a 37 ms step, +0.6 ms a sequence
CPU = {"fixed": 0.037, "prefill_tokens": 4.5e-4, "prefill_ctx": 2.5e-7, "decode_seqs": 6e-4,
       "decode_ctx": 3.6e-6}  # fmt: skip
PHASES = "60:0.3,150:3,120:0.3"


def ramp():
    cost = FittedCost(dict(CPU), num_blocks=7000, hops=Hops(router_s=0.01, worker_start_s=12))
    reqs = [SimRequest(t, 64, 128) for t in poisson_times(parse_phases(PHASES), 0)]
    limits = PoolLimits(1, 2)
    auto = AutoscaleConfig(ttft_target_s=2.0, tpot_target_s=0.07, prefill=limits, decode=limits,
                           interval_s=5, window_s=15, cooldown_s=15)  # fmt: skip
    return simulate(cost, ClusterConfig(), reqs, 2.0, 0.07, autoscale=auto, duration_s=330)


def decode_timeline(res) -> list[tuple[float, int]]:
    return [(s.t, s.active["decode"]) for s in res.samples]


def test_the_decode_pool_grows_under_load_and_shrinks_after():
    res = ramp()
    tl = decode_timeline(res)
    assert res.summary["failed"] == 0
    assert max(n for t, n in tl if t < 60) == 1
    grown = [t for t, n in tl if n == 2]
    assert grown and 60 < grown[0] < 150  # during the busy phase, after its start
    assert tl[-1][1] == 1  # back to one once the load is gone
    assert all(s.active["prefill"] == 1 for s in res.samples)  # prefill was never short


def test_a_change_in_the_planner_changes_the_simulated_fleet(monkeypatch):
    """Let the planner believe one decode worker can run any batch within the target: it
    no longer adds a worker for the predicted load, only when TPOT breaks, later."""
    before = ramp()
    monkeypatch.setattr(Capacity, "decode_batch", lambda self, tpot: 10**6)
    after = ramp()
    first = lambda res: next((t for t, n in decode_timeline(res) if n == 2), 1e9)  # noqa: E731
    assert [d.decode for d in before.decisions] != [d.decode for d in after.decisions]
    assert first(before) < 150 and first(after) > first(before)
