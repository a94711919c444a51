"""One simulated worker: the engine's real scheduler (engine.scheduler.Scheduler, and the
TPOT governor where one is set) stepping on a virtual clock, each step timed by a cost model.

    kick(now) ──> scheduler.schedule() ──cost model──> the step ends at now + step_s
    end of step ──> scheduler.step_done(out); a token for every chunk that samples; finished
                    sequences go through scheduler.finish; the cluster hears of first tokens,
                    prefills done and finished requests; then the next step starts

Runs of decode steps: when a step holds only decodes, nothing waits to be admitted and the
blocks for k more tokens are free, the scheduler's next k steps are known: every running
sequence computes one token, none finishes before the k-th (k = the fewest tokens any of
them has left). The worker then books the k steps as one event and applies the scheduler's
own bookkeeping (grow, computed count, publish, the tokens) k times over at its end. New
work cuts a run short at the end of the step in flight, where the real engine would see
it. tests/unit/test_sim.py checks a run against k single steps, state and times.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, SchedulingPolicy
from engine.sequence import FinishReason, Sequence
from engine.tpot_governor import TpotGovernor
from sim.cost import CostModel
from sim.noise import NoiseTrack

TOKEN = 2  # every sampled token's id (lengths, not text, are simulated)


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


class State(enum.Enum):
    STARTING = "starting"
    ACTIVE = "active"
    DRAINING = "draining"
    GONE = "gone"


class Event(enum.Enum):
    FIRST = "first"  # a request's first output token (colocated)
    PREFILLED = "prefilled"  # prefill-only: first token sampled, KV held for the hand-off
    FINISHED = "finished"


@lru_cache(maxsize=4096)
def params_for(max_tokens: int) -> SamplingParams:
    """One (immutable) SamplingParams per length: the scheduler only reads them."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@dataclass(slots=True)
class _Run:
    out: SchedulerOutput
    start: float
    steps: int
    first_s: float  # the first step's time
    last_s: float  # the last step's (contexts grow by one a step: linear in between)
    version: int
    need: int = 0  # blocks its later steps will still take (grown at its end)
    prefill: bool = False  # its step holds prompt tokens (cost.host_factor's prefilling)
    ends: list[float] | None = None  # each step's end from the start, where steps scatter

    def end(self, j: int) -> float:
        """Time from the start to the end of step j (1-based)."""
        if self.ends is not None:
            return self.ends[j - 1] if j > 0 else 0.0
        if self.steps <= 1:
            return j * self.first_s
        slope = (self.last_s - self.first_s) / (self.steps - 1)
        return j * self.first_s + slope * j * (j - 1) / 2

    def in_flight(self, now: float) -> int:
        """The step (1-based) running at `now`: the steps before it have ended."""
        return min(self.steps, self.steps_done_by(now - self.start) + 1)

    def steps_done_by(self, elapsed: float) -> int:
        lo, hi = 0, self.steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.end(mid) <= elapsed:
                lo = mid
            else:
                hi = mid - 1
        return lo


Notify = Callable[["SimWorker", list[tuple[Sequence, Event]], float], None]
At = Callable[..., None]


@dataclass(slots=True, eq=False)
class SimWorker:
    name: str
    role: Role
    config: SchedulerConfig
    cost: CostModel
    at: At  # at(time, fn, *args): the cluster's clock
    notify: Notify  # the cluster hears of first tokens, prefills done, finishes
    max_tpot_ms: float | None = None
    coalesce: bool = True
    state: State = State.ACTIVE
    scheduler: Scheduler = field(init=False)
    governor: TpotGovernor | None = field(init=False)
    busy_s: float = 0.0  # time spent stepping (the autoscaler's busy fraction)
    steps: int = 0
    queued_tokens: int = 0  # the router's view: prompt tokens sent here, not yet prefilled
    in_flight: int = 0  # the router's view: requests here, not yet ended
    run: _Run | None = None
    host: list[SimWorker] | None = None  # the workers sharing this one's host (CPU)
    known_free: int = 0  # the router's view of its free blocks (router.workers.Worker)
    noise: NoiseTrack | None = None  # its steps' scatter about the cost model (sim.noise)
    _version: int = 0

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.config)
        self.known_free = self.config.num_blocks
        self.governor = (
            TpotGovernor(self.max_tpot_ms, self.config.max_num_seqs) if self.max_tpot_ms else None
        )

    @property
    def free_blocks(self) -> int:
        return self.scheduler.allocator.num_free

    def kv_use(self) -> float:
        a = self.scheduler.allocator
        return a.num_used / a.num_blocks

    # ---- stepping ----------------------------------------------------------------------
    def kick(self, now: float) -> None:
        """Something changed: start a step unless one is in flight (or nothing to do)."""
        if self.run is None and self.state is not State.GONE:
            self._start(now)

    def interrupt(self, now: float) -> None:
        """New work: a run of decode steps ends with the step in flight."""
        run = self.run
        if run is None or run.steps == 1:
            return
        j = run.in_flight(now)
        if j < run.steps:
            self._version += 1
            slope = (run.last_s - run.first_s) / (run.steps - 1)
            run.steps, run.version = j, self._version
            run.last_s = run.first_s + slope * (j - 1)
            self.at(run.start + run.end(j), self._done, run.version)
        # steps 1..j have started by now: their blocks are taken, as the real engine's
        # schedule() takes them at the start of each step (a reservation made now sees it)
        for c in run.out.chunks:
            self.scheduler.kv.grow(c.seq.blocks, c.seq.num_computed_tokens + j)
        run.need = 0

    def _start(self, now: float) -> None:
        out = self.scheduler.schedule()
        if out.is_empty:
            return
        pt, pc, ds, dc = out.features()
        slow = 1.0
        if self.host is not None:
            busy = [w.run for w in self.host if w.run is not None]
            # a worker starting up (loading the model, profiling its steps) takes the host's
            # cores as a worker on prompt tokens does: the 5 req/s ramp's steps ran 1.2-1.5x
            # the host factor while one started, and ~1.0x otherwise (bench.sim_host)
            starting = sum(w.state is State.STARTING for w in self.host)
            slow = self.cost.host_factor(1 + len(busy) + starting,
                                         sum(r.prefill for r in busy) + starting)  # fmt: skip
            self.host_changed(now)
        first = slow * self.cost.step_s(pt, pc, ds, dc)
        k = self._run_length(out) if pt == 0 else 1
        last = slow * self.cost.step_s(0, 0.0, ds, dc + (k - 1) * ds) if k > 1 else first
        self._version += 1
        ends = None if self.noise is None else self._scattered(now, k, first, last, pt > 0)
        self.run = _Run(out, now, k, first, last, self._version, prefill=pt > 0, ends=ends)
        if k > 1:
            self.run.need = self._blocks_for(out, k)
        self.at(now + self.run.end(k), self._done, self._version)

    def _scattered(self, now: float, k: int, first: float, last: float,
                   prefill: bool) -> list[float]:  # fmt: skip
        """The ends of k steps timed first .. last by the model, each scaled by the
        worker's slowness over its span (sim.noise)."""
        assert self.noise is not None
        t, ends, slope = 0.0, [], (last - first) / (k - 1) if k > 1 else 0.0
        for j in range(k):
            span = first + slope * j
            t += span * self.noise.factor(now + t, span, prefill)
            ends.append(t)
        return ends

    def _run_length(self, out: SchedulerOutput) -> int:
        s, cfg = self.scheduler, self.config
        if not self.coalesce or cfg.policy is SchedulingPolicy.STATIC or out.preempted:
            return 1
        if s.waiting or (s.landed and len(s.running) < cfg.max_num_seqs):
            return 1
        if len(out.chunks) != len(s.running):
            return 1
        if any(c.num_tokens != 1 or not c.samples for c in out.chunks):
            return 1  # a chunk of a recomputed sequence: not a plain decode
        seqs = [c.seq for c in out.chunks]
        k = min(
            min(q.params.max_tokens - q.num_output_tokens, cfg.max_model_len - q.num_tokens)
            for q in seqs
        )
        free = s.allocator.num_free
        while k > 1 and self._blocks_for(out, k) > free:
            k //= 2
        return max(1, k)

    def _blocks_for(self, out: SchedulerOutput, k: int) -> int:
        """Blocks k steps of these decodes take beyond what the sequences hold now."""
        bs = self.config.block_size
        return sum(
            -(-(c.seq.num_computed_tokens + k) // bs) - len(c.seq.blocks.block_ids)
            for c in out.chunks
        )

    def free_at(self, now: float) -> int:
        """Free blocks as the real engine has them at `now`: a run's started steps have
        taken theirs (the simulator grows them at the run's end)."""
        run = self.run
        if run is None or not run.need:
            return self.free_blocks
        j = run.in_flight(now)
        return self.free_blocks - self._blocks_for(run.out, j)

    def step_end(self, now: float) -> float:
        """When the step in flight ends (`now` when idle): a command to the engine thread,
        such as a KV reservation, runs between two steps."""
        run = self.run
        if run is None:
            return now
        return run.start + run.end(run.in_flight(now))

    def room_for(self, blocks: int) -> bool:
        """Whether `blocks` more can be taken now without the run in flight running short
        (else: cut the run to the step in flight first, as `interrupt`)."""
        run = self.run
        return run is None or self.free_blocks - blocks >= run.need

    def _done(self, now: float, version: int) -> None:
        run = self.run
        if run is None or version != run.version:
            return  # a run cut short: its later end was booked anew
        self.run = None
        self.busy_s += now - run.start
        self.steps += run.steps
        self.scheduler.step_done(run.out)
        if run.steps > 1:
            self._advance([c.seq for c in run.out.chunks], run)
        self._govern(run)
        events = self._sample(run.out)
        if events:
            self.notify(self, events, now)
        self._start(now)
        if self.run is None and self.host is not None:
            self.host_changed(now)  # idle now: the others' steps speed up

    def host_changed(self, now: float) -> None:
        """This worker started or stopped stepping (or starting up): the others of its
        host end their runs with the step in flight, so their next steps are timed with the
        host as it is."""
        for w in self.host or ():
            if w is not self and w.run is not None and w.run.steps > 1:
                w.interrupt(now)

    def _advance(self, seqs: list[Sequence], run: _Run) -> None:
        """The scheduler's bookkeeping for steps 2..k of a run: each sequence gets its last
        token computed and a new one sampled per step (the k-th token is sampled after)."""
        extra, kv = run.steps - 1, self.scheduler.kv
        for q in seqs:
            q.token_ids.append(TOKEN)  # step 1's token
            target = q.num_computed_tokens + extra
            kv.grow(q.blocks, target)
            q.num_computed_tokens = target
            q.token_ids.extend([TOKEN] * (extra - 1))
            kv.publish_full_blocks(q.blocks, q.token_ids, target)

    def _govern(self, run: _Run) -> None:
        if self.governor is None or any(c.num_tokens != 1 for c in run.out.chunks):
            return
        batch = len(run.out.chunks)
        for j in range(1, run.steps + 1):
            self.scheduler.lanes = self.governor.observe(
                batch, 1000 * (run.end(j) - run.end(j - 1))
            )

    def _sample(self, out: SchedulerOutput) -> list[tuple[Sequence, Event]]:
        events: list[tuple[Sequence, Event]] = []
        max_len = self.config.max_model_len
        for c in out.chunks:
            if not c.samples:
                continue
            q = c.seq
            q.token_ids.append(TOKEN)
            if q.prefill_only:
                self.scheduler.finish(q, FinishReason.PREFILLED)
                events.append((q, Event.PREFILLED))
            elif q.num_output_tokens >= q.params.max_tokens or q.num_tokens >= max_len:
                self.scheduler.finish(q, FinishReason.LENGTH)
                events.append((q, Event.FINISHED))
            elif q.num_output_tokens == 1:
                events.append((q, Event.FIRST))
        return events


def new_sequence(seq_id: str, uid: int, prompt_tokens: int, output_tokens: int) -> Sequence:
    """A prompt of `prompt_tokens` ids that shares no block with another request's (its first
    id is the request's own number): the simulated workloads have no shared prefixes, so the
    prefix cache never hits across requests, and the router's prefix index (which the
    simulator does not keep) would add nothing to the prefill choice."""
    ids = [TOKEN] * prompt_tokens
    ids[0] = 100 + uid
    return Sequence(seq_id, ids, params_for(output_tokens))
