"""The simulated cluster: the router's request path over simulated workers, on a virtual clock.

disaggregated (router.request_life, router.reserve):
    arrive ──router_s (router_busy_s with others in flight)──> admission (router.admission)
    ──> reserve KV on a decode worker in routing.decode_order (scheduler.reserve_remote,
    answered when that worker's step in flight ends: its engine thread takes commands
    between steps); none has room: the line, first come first served, its head retrying
    with the router's back-off after each refusal comes back, until reserve_timeout_s
    (then 429)
    ──> prefill worker by routing.pick_prefill ──rpc_s──> its scheduler (prefill-only)
    ──last chunk──> KV tail ──> decode worker: first token appended, scheduler.kv_landed;
    the first token reaches the client rpc_s + deliver_s later (TTFT)
    ──decode steps──> finished ──deliver_s──> the client has the last token
colocated: arrive ──router_s──> admission ──> routing.pick_colocated ──rpc_s──> its
    scheduler does both phases

The workers are sim.worker.SimWorker: the engine's scheduler, timed by a cost model.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from engine.errors import OverloadedError
from engine.scheduler import SchedulerConfig
from engine.sequence import FinishReason, Sequence
from router.admission import (
    AdmissionLimits,
    PoolLoad,
    check_decode,
    check_prefill,
    default_queued_tokens,
)
from router.routing import (
    DecodeLoad,
    PrefillLoad,
    decode_order,
    pick_colocated,
    pick_prefill,
)
from sim.clock import Clock
from sim.cost import CostModel
from sim.noise import NoiseTrack
from sim.request import ClusterConfig, Record  # re-exported: callers import them here
from sim.worker import Event, Role, SimWorker, State, new_sequence
from sim.workload import SimRequest

__all__ = ["Cluster", "ClusterConfig", "Record"]


class Cluster(Clock):
    def __init__(self, config: ClusterConfig, cost: CostModel):
        super().__init__()
        self.config, self.cost, self.hops = config, cost, cost.hops  # type: ignore[attr-defined]
        self.rng = random.Random(config.seed)
        self.sched = config.scheduler or SchedulerConfig(
            num_blocks=cost.num_blocks, block_size=cost.block_size
        )
        self.admission = config.admission or AdmissionLimits(  # as router.pools makes them
            queued_tokens_per_prefill=default_queued_tokens(self.sched.max_num_batched_tokens,
                                                            None),
            streams_per_decode=self.sched.max_num_seqs,
        )  # fmt: skip
        self.workers: dict[Role, list[SimWorker]] = {r: [] for r in Role}
        self._names = itertools.count()
        self.peak_workers = 0  # the most workers held at once (starting and draining count)
        self._host: list[SimWorker] = []  # shared_host: every worker, the gone ones removed
        self.records: list[Record] = []
        self.line: deque[Record] = deque()  # waiting for KV room, first come first served
        self._line_turns = False  # the line's head has a try or an answer to come
        self.held = 0  # admitted, not ended
        self.prefill_tokens = 0  # admitted prompt tokens whose prefill has not returned
        self.listeners: list[Callable[[Record], None]] = []  # told of each ended request
        self.on_arrival: list[Callable[[float], None]] = []
        self._arrivals: Iterator[SimRequest] = iter(())
        colocated = config.mode == "colocated"
        for role, n in ((Role.COLOCATED, config.prefill + config.decode),) if colocated else (
            (Role.PREFILL, config.prefill), (Role.DECODE, config.decode)):  # fmt: skip
            for _ in range(n):
                self.add_worker(role, start_s=0.0)

    def run(self, requests: Iterable[SimRequest], until: float | None = None) -> list[Record]:
        """Offer `requests` (in arrival order) and run until every one has ended."""
        self._arrivals = iter(requests)
        self._next_arrival()
        self.run_events(until)
        return self.records

    def _next_arrival(self) -> None:
        req = next(self._arrivals, None)
        if req is not None:
            self.at(req.arrival_s, self._arrive, req)

    # ---- the fleet ---------------------------------------------------------------------
    def add_worker(self, role: Role, start_s: float | None = None) -> SimWorker:
        n = next(self._names)
        w = SimWorker(f"{role.value}-{n}", role, self.sched, self.cost,
                      self.at, self._on_events,
                      self.config.max_tpot_ms if role is Role.DECODE else None,
                      self.config.coalesce)  # fmt: skip
        noise = getattr(self.cost, "noise", None)
        if noise is not None:  # each worker its own slowness, from the run's seed
            cfg = self.config
            w.noise = NoiseTrack(noise, (cfg.seed * 1009 + cfg.noise_seed) * 2003 + 2 * n)
        self.workers[role].append(w)
        self.peak_workers = max(self.peak_workers, sum(len(ws) for ws in self.workers.values()))
        if self.config.shared_host:
            w.host = self._host
            self._host.append(w)
        delay = self.hops.worker_start_s if start_s is None else start_s
        if delay > 0:
            w.state = State.STARTING
            self.at(self.now + delay, self._activate, w)
            if w.host is not None:  # its start-up loads the host (SimWorker._start)
                w.host_changed(self.now)
        return w

    def _activate(self, now: float, w: SimWorker) -> None:
        if w.state is State.STARTING:
            w.state = State.ACTIVE  # the line's head finds it at its next try
            if w.host is not None:
                w.host_changed(now)

    def drain(self, w: SimWorker) -> None:
        """No new requests; gone when the last one in flight ends (a starting one: at once)."""
        w.state = State.DRAINING if w.state is State.ACTIVE else State.GONE
        self._maybe_gone(w)

    def _maybe_gone(self, w: SimWorker) -> None:
        if w.state is State.DRAINING and w.in_flight == 0:
            w.state = State.GONE
        if w.state is State.GONE and w in self.workers[w.role]:
            self.workers[w.role].remove(w)
            if w in self._host:
                self._host.remove(w)

    def active(self, role: Role) -> list[SimWorker]:
        return [w for w in self.workers[role] if w.state is State.ACTIVE]

    # ---- a request ---------------------------------------------------------------------
    def _arrive(self, now: float, req: SimRequest) -> None:
        self._next_arrival()
        rec = Record(len(self.records), now, req.prompt_tokens, req.output_tokens)
        self.records.append(rec)
        for fn in self.on_arrival:
            fn(now)
        rec.busy = self.held > 0
        self.at(now + self.hops.routing_s(rec.busy), self._admit, rec)

    def _admit(self, now: float, rec: Record) -> None:
        colocated = self.config.mode == "colocated"
        try:
            if colocated:
                n = len(self.active(Role.COLOCATED))
                check_decode(self.admission, PoolLoad(max(1, n), self.held))
            else:
                n_p, n_d = len(self.active(Role.PREFILL)), len(self.active(Role.DECODE))
                load = PoolLoad(max(1, n_p), queued_tokens=self.prefill_tokens)
                check_prefill(self.admission, load, rec.prompt_tokens)
                check_decode(
                    self.admission, PoolLoad(max(1, n_d), self.held, waiting=len(self.line))
                )
        except OverloadedError:
            return self._end(now, rec, "429", admitted=False)
        self.held += 1
        if colocated:
            return self._colocated(now, rec)
        self.prefill_tokens += rec.prompt_tokens
        rec.routed_s = now
        if self.line:
            return self._join_line(now, rec)
        ok, answered = self._reserve(now, rec)  # nobody waiting: a try at once
        if not ok:
            self.at(answered, self._join_line, rec)

    def _colocated(self, now: float, rec: Record) -> None:
        workers = self.active(Role.COLOCATED)
        if not workers:
            return self._end(now, rec, "503")
        name = pick_colocated([(w.name, w.in_flight) for w in workers], self.rng)
        w = next(w for w in workers if w.name == name)
        w.in_flight += 1
        rec.decode = w
        rec.seq = new_sequence(f"r{rec.uid}", rec.uid, rec.prompt_tokens, rec.output_tokens)
        self.at(now + self.hops.rpc_s, self._submit, w, rec.seq)

    def _submit(self, now: float, w: SimWorker, seq: Sequence) -> None:
        w.scheduler.add(seq)
        w.interrupt(now)
        w.kick(now)

    # ---- disaggregated: reserve, prefill, hand-off ---------------------------------------
    def _reserve(self, now: float, rec: Record) -> tuple[bool, float]:
        """One round of router.reserve: the decode workers in routing order, each call
        answered when that worker's step in flight ends (its engine thread takes commands
        between steps). Whether one had room, and when the round's last answer came."""
        workers = self.active(Role.DECODE)
        by_name = {w.name: w for w in workers}
        loads = [DecodeLoad(w.name, w.known_free, w.in_flight) for w in workers]
        seq = new_sequence(f"r{rec.uid}", rec.uid, rec.prompt_tokens, rec.output_tokens)
        t = now
        for name in decode_order(loads, self.rng):
            w = by_name[name]
            t = max(t, w.step_end(now)) + self.hops.rpc_s  # its step in flight now
            if not w.room_for(-(-rec.prompt_tokens // w.config.block_size)):
                w.interrupt(now)  # its run's started steps take their blocks first
            if w.scheduler.reserve_remote(seq, rec.prompt_tokens) is None:
                w.known_free = 0  # as router.reserve notes a refusal
                continue
            w.known_free = w.free_at(now)  # the ticket's free blocks
            w.in_flight += 1
            rec.decode, rec.seq = w, seq
            rec.reservation_s = t - (now if rec.routed_s is None else rec.routed_s)
            self.at(t, self._to_prefill, rec)
            return True, t
        return False, t

    def _join_line(self, now: float, rec: Record) -> None:
        self.line.append(rec)
        if not self._line_turns:
            self._line_turns = True
            self.at(now, self._line_try)

    def _line_try(self, now: float) -> None:
        """The head of the line tries (router.reserve holds the line while it awaits the
        answers): at once when it gets there, then 10 ms after each refusal comes back,
        doubling to 250 ms."""
        if not self.line:
            self._line_turns = False
            return
        rec = self.line[0]
        if rec.head_since is None:
            rec.head_since = now
        ok, answered = self._reserve(now, rec)
        self.at(answered, self._line_answered, rec, ok)

    def _line_answered(self, now: float, rec: Record, ok: bool) -> None:
        """The head's deadline (reserve_timeout_s) runs from reaching the head and is
        checked as each refusal comes back (then 429)."""
        if ok or now > rec.head_since + self.config.reserve_timeout_s:  # type: ignore[operator]
            self.line.popleft()
            if not ok:
                self.prefill_tokens -= rec.prompt_tokens
                self._end(now, rec, "429")
            return self._line_try(now)
        self.at(now + rec.backoff, self._line_try)
        rec.backoff = min(2 * rec.backoff, 0.25)

    def _to_prefill(self, now: float, rec: Record) -> None:
        workers = self.active(Role.PREFILL)
        if not workers or rec.seq is None:
            if rec.decode is not None and rec.seq is not None:
                rec.decode.scheduler.abort(rec.seq.seq_id)
            self.prefill_tokens -= rec.prompt_tokens
            return self._end(now, rec, "503")
        by_name = {w.name: w for w in workers}
        loads = [PrefillLoad(w.name, w.queued_tokens) for w in workers]
        p = by_name[pick_prefill(loads, rec.prompt_tokens, self.config.policy, self.rng)]
        p.queued_tokens += rec.prompt_tokens
        p.in_flight += 1
        rec.prefill = p
        seq = new_sequence(f"p{rec.uid}", rec.uid, rec.prompt_tokens, rec.output_tokens)
        seq.prefill_only = True
        self.at(now + self.hops.rpc_s, self._submit, p, seq)

    def _on_events(self, w: SimWorker, events: list[tuple[Sequence, Event]], now: float) -> None:
        for seq, ev in events:
            rec = self.records[int(seq.seq_id[1:])]
            if ev is Event.PREFILLED:
                kv = self.hops.kv_tail_s(rec.prompt_tokens, self.cost.layers)  # type: ignore[attr-defined]
                self.at(now + kv, self._landed, rec, seq)
            elif ev is Event.FIRST:
                rec.first_s = now + self.hops.deliver_s
            else:
                self._finished(now, rec)

    def _landed(self, now: float, rec: Record, pseq: Sequence) -> None:
        p, d, seq = rec.prefill, rec.decode, rec.seq
        assert p is not None and d is not None and seq is not None
        p.scheduler.release(pseq)
        p.queued_tokens -= rec.prompt_tokens
        p.in_flight -= 1
        self.prefill_tokens -= rec.prompt_tokens
        self._maybe_gone(p)
        p.kick(now)  # its KV is free: a prompt waiting for blocks may go now
        rec.first_s = now + self.hops.rpc_s + self.hops.deliver_s
        seq.token_ids.append(2)
        if seq.num_output_tokens >= seq.params.max_tokens:  # one token: it was the last
            d.scheduler.finish(seq, FinishReason.LENGTH)
            return self._end(rec.first_s, rec, "")
        d.scheduler.kv_landed(seq.seq_id, rec.prompt_tokens)
        d.interrupt(now)
        d.kick(now)

    # ---- endings -------------------------------------------------------------------------
    def _finished(self, now: float, rec: Record) -> None:
        t = now + self.hops.deliver_s
        if rec.first_s is None:
            rec.first_s = t
        self._end(t, rec, "")

    def _end(self, t: float, rec: Record, error: str, admitted: bool = True) -> None:
        """Every ending: what the request held is given back; listeners hear of it."""
        rec.end_s, rec.error = t, error
        self.held -= admitted
        w = rec.decode
        if w is not None:
            w.in_flight -= 1
            self._maybe_gone(w)
        for fn in self.listeners:
            fn(rec)
