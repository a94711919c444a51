"""The simulator runs the project's own scheduler, routing and admission on a virtual clock:
what it reports follows from them, and from its cost model."""

from __future__ import annotations

import dataclasses

import pytest

import router.routing as routing
from engine.scheduler import Scheduler, SchedulerConfig
from router.admission import AdmissionLimits
from sim.cluster import Cluster, ClusterConfig
from sim.cost import FittedCost, Hops
from sim.noise import StepNoise
from sim.simulate import simulate
from sim.worker import Role
from sim.workload import SimRequest, generate, parse_length, poisson_times

COEF = {"fixed": 0.004, "prefill_tokens": 4e-5, "prefill_ctx": 1e-9, "decode_seqs": 5e-4,
        "decode_ctx": 1e-7}  # fmt: skip


def cost(num_blocks: int = 2000, **hops: float) -> FittedCost:
    return FittedCost(dict(COEF), num_blocks, hops=Hops(**hops))


def workload(rate: float = 20.0, seconds: float = 10.0, prompt: str = "64-256",
             output: str = "8-64", seed: int = 0) -> list[SimRequest]:  # fmt: skip
    times = poisson_times([(seconds, rate)], seed)
    return list(generate(times, parse_length(prompt), parse_length(output), seed))


def run(config: ClusterConfig, reqs: list[SimRequest], c: FittedCost | None = None):
    cluster = Cluster(config, c or cost())
    records = cluster.run(reqs)
    return cluster, records


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_every_request_ends_and_every_block_is_freed(mode):
    cluster, records = run(ClusterConfig(mode=mode, prefill=2, decode=2), workload())
    assert len(records) > 100
    assert all(r.error == "" and r.end_s is not None for r in records)
    for r in records:
        assert r.arrival_s < r.first_s <= r.end_s
    _all_returned(cluster)


def _state(w) -> tuple:
    """A worker's scheduler state: each live sequence's tokens, computed count, blocks held
    and published, preemptions; the free blocks."""
    s = w.scheduler
    seqs = sorted((q.seq_id, len(q.token_ids), q.num_computed_tokens, len(q.blocks.block_ids),
                   q.blocks.num_published, q.num_preemptions)
                  for q in [*s.running, *s.waiting, *s.landed])  # fmt: skip
    return w.name, s.allocator.num_free, tuple(seqs)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
@pytest.mark.parametrize("blocks", [2000, 45])  # 45: runs cut short for blocks, preemptions
@pytest.mark.parametrize("scatter", [None, StepNoise(0.0, ((0.1, 0.05), (0.1, 1.0)))])
def test_runs_of_decode_steps_match_single_steps(mode, blocks, scatter):
    """Booking k decode steps as one event gives the same timings as k events, and leaves
    the scheduler as k steps do: the state of a request's worker as it ends is the same.
    So too where the steps scatter over lasting stretches of slowness (sim.noise): each
    worker's slowness is one function of time, however its steps are booked."""
    reqs = workload(rate=15.0, output="20-120")
    sched = SchedulerConfig(num_blocks=blocks, max_num_seqs=16)
    results = []
    for coalesce in (True, False):
        cfg = ClusterConfig(mode=mode, prefill=1, decode=2, scheduler=sched, coalesce=coalesce)
        c = Cluster(cfg, dataclasses.replace(cost(num_blocks=blocks), noise=scatter))
        states: list = []
        c.listeners.append(
            lambda rec, states=states: states.append(rec.decode and _state(rec.decode))
        )
        results.append((c, c.run(reqs), states))
    (fast_c, fast, fast_states), (slow_c, slow, slow_states) = results
    assert [r.error for r in fast] == [r.error for r in slow]
    assert [r.ttft_s for r in fast] == pytest.approx([r.ttft_s for r in slow], abs=1e-9)
    assert [r.end_s for r in fast] == pytest.approx([r.end_s for r in slow], abs=1e-9)
    assert fast_states == slow_states
    steps = lambda c: sum(w.steps for ws in c.workers.values() for w in ws)  # noqa: E731
    assert steps(fast_c) == steps(slow_c)
    events = lambda c: next(c._tie)  # noqa: E731 - events booked, a measure of the work
    assert events(fast_c) < events(slow_c) / (3 if blocks == 2000 else 1.5)
    if blocks == 45:  # the tight case does preempt (and recompute) in both
        assert sum(r.seq.num_preemptions for r in slow if r.seq) > 5
        assert [r.seq.num_preemptions for r in fast if r.seq] == [
            r.seq.num_preemptions for r in slow if r.seq
        ]


def test_ttft_is_the_sum_of_the_hops_at_no_load():
    c = cost(router_s=0.01, rpc_s=0.002, deliver_s=0.003, kv_fixed_s=0.004)
    _, [rec] = run(ClusterConfig(), [SimRequest(1.0, 100, 5)], c)
    prefill = c.step_s(100, 100 * 101 / 2, 0, 0)
    # router, reserve (one try), to the prefill worker, its step, KV tail, back, delivered
    assert rec.ttft_s == pytest.approx(0.01 + 0.002 + 0.002 + prefill + 0.004 + 0.002 + 0.003)
    # 4 decode steps (contexts 101..104) after the first token; the first token went the
    # longer way (back through the router's call to the prefill worker): one rpc_s less
    decode = sum(c.step_s(0, 0, 1, 101 + i) for i in range(4))
    assert rec.tpot_s == pytest.approx((decode - 0.002) / 4)


def test_a_reservation_waits_for_the_decode_workers_step_in_flight():
    """decode_worker's reserve runs on its engine thread between two steps: a prompt that
    arrives while its decode worker steps starts its prefill when that step ends."""
    c = cost()
    _, [_, busy] = run(ClusterConfig(), [SimRequest(0.0, 16, 2000), SimRequest(1.0, 64, 4)], c)
    _, [alone] = run(ClusterConfig(), [SimRequest(1.0, 64, 4)], c)
    assert alone.reservation_s == pytest.approx(c.hops.rpc_s)  # idle: one try, at once
    step = c.step_s(0, 0, 1, 16 + 2000)  # the longest decode step the first request takes
    assert c.hops.rpc_s < busy.reservation_s <= c.hops.rpc_s + step
    # the prefill worker is idle in both: the wait is all the difference in TTFT
    assert busy.ttft_s - alone.ttft_s == pytest.approx(busy.reservation_s - alone.reservation_s)


def test_a_request_arriving_with_others_in_flight_takes_router_busy_s():
    c = cost(router_s=0.001, router_busy_s=0.030)
    _, [first, second] = run(ClusterConfig(), [SimRequest(0.0, 16, 500), SimRequest(1.0, 16, 4)], c)
    assert first.routed_s == pytest.approx(0.001)  # nothing in flight
    assert second.routed_s == pytest.approx(1.030)  # the first still decoding
    _, [alone] = run(ClusterConfig(), [SimRequest(1.0, 16, 4)], cost(router_s=0.001))
    assert alone.routed_s == pytest.approx(1.001)  # router_busy_s unset: router_s either way


def test_the_routing_policy_decides_where_requests_go(monkeypatch):
    """router.routing's decode order, as the router runs it: most free KV first, a stream in
    flight counting against a worker. Make it prefer busy workers and the simulated TPOT
    grows, as every request piles onto one decode worker."""
    reqs = workload(rate=30.0, output="60-100")
    _, spread = run(ClusterConfig(prefill=2, decode=2), reqs)
    monkeypatch.setattr(routing, "IN_FLIGHT_BLOCKS", -(10**6))
    cluster, piled = run(ClusterConfig(prefill=2, decode=2), reqs)
    tpot = lambda recs: sorted(r.tpot_s for r in recs)[len(recs) // 2]  # noqa: E731
    assert tpot(piled) > 1.3 * tpot(spread)
    names = [r.decode.name for r in piled]
    assert max(names.count(n) for n in set(names)) > 0.75 * len(names)


def test_the_scheduler_decides_what_a_step_holds(monkeypatch):
    """engine.scheduler's admission: change it (admit nothing while anything runs) and the
    simulated colocated TTFT grows."""
    reqs = workload(rate=20.0, output="40-80")
    cfg = ClusterConfig(mode="colocated", prefill=1, decode=0)
    _, before = run(cfg, reqs)
    original = Scheduler._admit_waiting

    def one_batch_at_a_time(self, out, budget, ignore_budget):
        if not self.running:
            original(self, out, budget, ignore_budget)

    monkeypatch.setattr(Scheduler, "_admit_waiting", one_batch_at_a_time)
    _, after = run(cfg, reqs)
    p90 = lambda recs: sorted(r.ttft_s for r in recs)[int(0.9 * len(recs))]  # noqa: E731
    assert p90(after) > 2 * p90(before)


def test_admission_refuses_past_the_bound_as_the_router_does():
    """A burst past router.admission's bound is refused (429) at once, nothing else lost."""
    burst = [SimRequest(0.001 * i, 200, 50) for i in range(200)]
    limits = AdmissionLimits(queued_tokens_per_prefill=2000, streams_per_decode=8,
                             waiting_per_decode=2)  # fmt: skip
    cluster, records = run(ClusterConfig(admission=limits), burst)
    refused = [r for r in records if r.error == "429"]
    assert 0 < len(refused) < len(records)
    assert all(r.error in ("", "429") for r in records)
    _all_returned(cluster)


def _all_returned(cluster: Cluster) -> None:
    """Nothing held anywhere once every request has ended: blocks, counts, the line."""
    for ws in cluster.workers.values():
        for w in ws:
            assert w.free_blocks == w.scheduler.allocator.num_blocks, w.name
            assert w.in_flight == 0 and w.queued_tokens == 0 and not w.scheduler.has_work()
            assert not w.scheduler.awaiting_kv and not w.scheduler.held
    assert cluster.held == 0 and cluster.prefill_tokens == 0 and not cluster.line


def test_no_kv_room_waits_in_line_then_times_out():
    """Decode KV for 2 requests only: the rest wait in the router's line and are served as
    room frees; past reserve_timeout_s they end with 429 instead."""
    c = cost(num_blocks=20)
    sched = SchedulerConfig(num_blocks=20, max_num_seqs=8)
    reqs = [SimRequest(0.01 * i, 120, 40) for i in range(6)]
    cluster, patient = run(ClusterConfig(scheduler=sched, reserve_timeout_s=30.0), reqs, c)
    assert [r.error for r in patient] == [""] * 6
    assert all(r.reservation_s > 0.1 for r in patient[2:])
    assert all(r.reservation_s < 0.01 for r in patient[:2])
    _all_returned(cluster)
    cluster, hasty = run(ClusterConfig(scheduler=sched, reserve_timeout_s=0.05), reqs, c)
    assert [r.error for r in hasty[:3]] == ["", "", "429"]  # the head's deadline ran out
    assert {r.error for r in hasty} == {"", "429"}
    _all_returned(cluster)


def test_a_refused_reservation_comes_back_when_the_decode_step_ends(monkeypatch):
    """router.reserve's calls to a decode worker are answered between its steps: while one
    request holds all of its KV and steps every 0.5 s, the line's head is refused once a
    step (each refusal back at a step's end, then the back-off), not every 10-250 ms."""
    slow = FittedCost(dict(COEF, fixed=0.5), 20)
    sched = SchedulerConfig(num_blocks=20, max_num_seqs=8)
    tries: list[float] = []
    real = Scheduler.reserve_remote

    def counted(self, seq, *args, **kw):
        tries.append(cluster.now)
        return real(self, seq, *args, **kw)

    monkeypatch.setattr(Scheduler, "reserve_remote", counted)
    cluster = Cluster(ClusterConfig(scheduler=sched), slow)
    first, second = cluster.run([SimRequest(0.0, 300, 20), SimRequest(1.0, 40, 4)])
    assert first.error == second.error == ""
    waited = first.end_s - 1.0  # the second gets KV when the first ends
    assert second.routed_s + second.reservation_s > first.end_s - 0.6
    assert len(tries) - 1 <= waited / 0.5 + 2  # one try a step at most (and the first's)
    _all_returned(cluster)


def test_one_output_token_ends_with_the_first():
    """max_tokens 1: the prefill's token is the whole answer; it ends as it arrives."""
    cluster, records = run(ClusterConfig(), [SimRequest(0.5, 300, 1), SimRequest(0.6, 50, 1)])
    for r in records:
        assert r.error == "" and r.first_s == r.end_s and r.tpot_s is None
    _all_returned(cluster)


def test_the_summary_counts_goodput_against_the_slo():
    res = simulate(cost(), ClusterConfig(), workload(rate=5.0), ttft_s=10.0, tpot_s=10.0)
    s = res.summary
    assert s["attainment"] == 1.0 and s["failed"] == 0
    assert s["goodput_rps"] == pytest.approx(s["throughput_rps"])
    strict = simulate(cost(), ClusterConfig(), workload(rate=5.0), ttft_s=0.001, tpot_s=10.0)
    assert strict.summary["goodput_rps"] == 0.0


def test_a_step_beside_a_prefilling_worker_of_its_host_takes_host_share_prefill():
    """One host (this CPU machine): while the prefill worker computes a long prompt, the
    decode worker's steps are slowed by host_share_prefill, not host_share."""
    reqs = [SimRequest(0.0, 16, 400), SimRequest(0.5, 3000, 2)]
    ends = {}
    for on_prefill in (None, 1.3, 1.0):
        c = cost()
        c.host_share, c.host_share_prefill = 1.3, on_prefill
        _, records = run(ClusterConfig(shared_host=True), reqs, c)
        ends[on_prefill] = records[0].end_s
    assert ends[None] == ends[1.3]  # unset: the one share either way
    assert ends[1.0] < ends[1.3]
    # two others stepping on two cores' worth of threads: their shares averaged, and 3/2
    assert c.host_factor(3, 1) == pytest.approx((1.3 + 1.0) / 2 * 1.5)
    assert c.host_factor(2, 0) == pytest.approx(1.3) and c.host_factor(1) == 1.0


def test_a_worker_starting_up_slows_its_hosts_steps_until_it_is_active():
    """A new worker loads the model and profiles on the host's cores: from its start to its
    activation, 2 s later, the decoding worker's steps take host_share_prefill (1.5); the
    request ends 2 - 2 / 1.5 s later than on a host nobody joins. On separate hosts
    (shared_host off) the start-up costs it nothing."""
    reqs = [SimRequest(0.0, 16, 2000)]
    ends = {}
    for shared, joins in ((True, False), (True, True), (False, True)):
        c = cost()
        c.host_share, c.host_share_prefill = 1.2, 1.5
        cluster = Cluster(ClusterConfig(mode="colocated", prefill=1, decode=0,
                                        shared_host=shared), c)  # fmt: skip
        if joins:
            cluster.at(1.0, lambda now, cl=cluster: cl.add_worker(Role.COLOCATED, start_s=2.0))
        ends[shared, joins] = cluster.run(reqs)[0].end_s
    assert ends[True, True] - ends[True, False] == pytest.approx(2 - 2 / 1.5, abs=0.02)
    assert ends[False, True] == pytest.approx(ends[True, False])
