"""The SLO autoscaler on the virtual clock: router.autoscaler's observe-decide-carry out loop,
with the same planner (planner.Planner) and the same window of requests
(router.slo_window.RequestWindow).

    every interval_s: observe (arrivals, finished requests, each pool's busy fraction,
                      running sequences and KV use) ──> Planner.decide ──> the cluster adds
                      workers (active after the cost model's worker_start_s) or drains
                      (gone when empty); no decision while one is being carried out

The capacity profile is taken as engine.profile takes it on a real worker, at the same
prompt length, batches and context, from the simulated worker's cost model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.profile import CONTEXT, DECODE_BATCHES, PROMPT_LENS
from planner import (
    AutoscaleConfig,
    Capacity,
    Decision,
    DecodeProfile,
    Observation,
    Planner,
    PoolState,
    PrefillProfile,
)
from router.routing import leaving_order
from router.slo_window import Finished, RequestWindow
from sim.cluster import Cluster, Record
from sim.cost import CostModel
from sim.worker import Role, SimWorker, State


def profile(cost: CostModel) -> Capacity:
    """The capacity engine.profile would measure on one worker with this cost model."""
    prefill = {n: n / cost.step_s(n, n * (n + 1) / 2, 0, 0) for n in PROMPT_LENS}
    decode = {b: cost.step_s(0, 0.0, b, b * (CONTEXT + 2)) for b in DECODE_BATCHES}  # median step
    return Capacity(PrefillProfile(prefill), DecodeProfile(decode))


@dataclass(slots=True)
class PoolSample:
    t: float
    active: dict[str, int]
    starting: dict[str, int]
    draining: dict[str, int]


@dataclass(slots=True)
class SimAutoscaler:
    cluster: Cluster
    config: AutoscaleConfig
    planner: Planner = field(init=False)
    window: RequestWindow = field(init=False)
    decisions: list[Decision] = field(default_factory=list)
    samples: list[PoolSample] = field(default_factory=list)
    _busy: dict[str, float] = field(default_factory=dict)
    _last_t: float = 0.0
    until: float = 0.0

    def __post_init__(self) -> None:
        self.planner = Planner(self.config, profile(self.cluster.cost))
        self.window = RequestWindow(max(self.config.window_s, self.config.interval_s))
        self.cluster.on_arrival.append(self.window.arrived)
        self.cluster.listeners.append(self._ended)

    def start(self, until: float) -> None:
        """Decide every interval up to `until`; sample the pools every second."""
        self.until = until
        self.cluster.at(self.config.interval_s, self._tick)
        self.cluster.at(0.0, self._sample)

    def _ended(self, rec: Record) -> None:
        if rec.error or rec.end_s is None:
            return
        self.window.finished(Finished(rec.end_s, rec.ttft_s, rec.tpot_s, rec.prompt_tokens,
                                      rec.output_tokens, rec.reservation_s))  # fmt: skip

    def _sample(self, now: float) -> None:
        pools = {"prefill": Role.PREFILL, "decode": Role.DECODE}
        count = {
            s: {p: sum(w.state is s for w in self.cluster.workers[r]) for p, r in pools.items()}
            for s in (State.ACTIVE, State.STARTING, State.DRAINING)
        }
        self.samples.append(
            PoolSample(now, count[State.ACTIVE], count[State.STARTING], count[State.DRAINING])
        )
        if now + 1.0 <= self.until:
            self.cluster.at(now + 1.0, self._sample)

    def _tick(self, now: float) -> None:
        for w in self.cluster.workers[Role.DECODE]:  # fresh snapshots, as the real one asks
            w.known_free = w.free_at(now)
        decision = self.planner.decide(self.observe(now))
        self.decisions.append(decision)
        if decision.changed:
            self._carry_out(decision)
        if now + self.config.interval_s <= self.until:
            self.cluster.at(now + self.config.interval_s, self._tick)

    def observe(self, now: float) -> Observation:
        cfg, c = self.config, self.cluster
        scaling = any(
            w.state in (State.STARTING, State.DRAINING) for r in (Role.PREFILL, Role.DECODE)
            for w in c.workers[r]
        )  # fmt: skip
        load = self.window.load(now, cfg.interval_s)
        ttft, tpot, wait = self.window.percentiles(now, cfg.window_s, cfg.percentile,
                                                   cfg.min_requests)  # fmt: skip
        span = now - self._last_t
        self._last_t = now
        pools = [self._pool(c.workers[r], span, now) for r in (Role.PREFILL, Role.DECODE)]
        return Observation(now, load, ttft, tpot, pools[0], pools[1], scaling, wait)

    def _pool(self, workers: list[SimWorker], span: float, now: float) -> PoolState:
        active = [w for w in workers if w.state is State.ACTIVE]
        busy = []
        for w in active:
            # busy time so far, the run in flight included (a run of decode steps may span
            # ticks; the real engine's counter moves every step)
            so_far = w.busy_s + (now - w.run.start if w.run is not None else 0.0)
            last = self._busy.get(w.name)
            self._busy[w.name] = so_far
            if last is not None and span > 0:
                busy.append(min(1.0, (so_far - last) / span))
        n = max(1, len(active))
        return PoolState(
            active=len(active),
            busy=sum(busy) / len(busy) if busy else 0.0,
            running=sum(len(w.scheduler.running) for w in active) / n,
            kv_use=sum(w.kv_use() for w in active) / n,
        )

    def _carry_out(self, d: Decision) -> None:
        c = self.cluster
        for role, target in ((Role.PREFILL, d.prefill), (Role.DECODE, d.decode)):
            members = [w for w in c.workers[role] if w.state in (State.ACTIVE, State.STARTING)]
            for _ in range(target - len(members)):
                c.add_worker(role)
            by_name = {w.name: w for w in members}
            order = leaving_order(
                [(w.name, w.state is State.STARTING, w.in_flight) for w in members]
            )
            for name in order[: max(0, len(members) - target)]:  # as router.fleet picks
                c.drain(by_name[name])
