"""What every request's life shares: the fleet, the prefix index, the policies and limits,
the lease keeper, and the counters of what went wrong and was recovered; and the states
and failures of a life (router.request_life draws the automaton)."""

from __future__ import annotations

import asyncio
import enum
import random
from dataclasses import dataclass, field

import ray

from router.admission import AdmissionLimits, PoolLoad, check_decode, check_prefill
from router.fleet import Fleet, Worker
from router.leases import LeaseKeeper
from router.placement import Role
from router.routing import DecodeLoad, PrefillPolicy, PrefixIndex, decode_order


class Phase(enum.Enum):
    ROUTED = "routed"
    RESERVED = "reserved"
    PREFILLING = "prefilling"
    STREAMING = "streaming"
    MIGRATING = "migrating"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


class WorkerLost(Exception):
    """An attempt failed on `worker`: `dead` when its actor is gone, `transfer` when the
    KV transfer to it failed (the prefill side reported it)."""

    def __init__(self, worker: Worker, reason: str, dead: bool = False, transfer: bool = False):
        super().__init__(f"{worker.name}: {reason}")
        self.worker, self.dead, self.transfer = worker, dead, transfer

    @classmethod
    def of(cls, worker: Worker, reason: str, error: ray.exceptions.RayActorError) -> WorkerLost:
        """A Ray actor error: dead if the actor died, else only unavailable for now."""
        return cls(worker, reason, dead=isinstance(error, ray.exceptions.ActorDiedError))


@dataclass(slots=True)
class RecoveryStats:
    """Counters of recovered failures (/status, metrics)."""

    migrations: int = 0  # streams moved to a new pair after tokens had gone out
    retries: int = 0  # attempts restarted before the first token
    transfer_failures: int = 0  # KV transfers that failed (retried once each)
    workers_lost: int = 0  # lost-worker reports by requests (one death may count several)

    def record(self, lost: WorkerLost, resumed_tokens: int) -> None:
        if resumed_tokens:
            self.migrations += 1
        else:
            self.retries += 1
        self.transfer_failures += lost.transfer
        self.workers_lost += lost.dead


@dataclass(slots=True)
class Router:
    fleet: Fleet
    prefix_index: PrefixIndex
    policy: PrefillPolicy = PrefillPolicy.PREFIX
    reserve_timeout_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    max_migrations: int = 3  # attempts after the first, per request
    transfer_retries: int = 1  # a failed KV transfer is retried this often, then 503
    leases: LeaseKeeper = field(default_factory=LeaseKeeper)
    stats: RecoveryStats = field(default_factory=RecoveryStats)
    reserving: int = 0  # requests waiting for KV room right now
    held: int = 0  # requests admitted and not ended
    prefill_tokens: int = 0  # prompt tokens admitted whose prefill has not returned
    _line: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def reserve_line(self) -> asyncio.Lock:
        """The line of requests waiting for KV room, first come first served (asyncio.Lock
        wakes its waiters in order); one per event loop."""
        loop = asyncio.get_running_loop()
        if self._line is None or self._line[0] is not loop:
            self._line = (loop, asyncio.Lock())
        return self._line[1]

    def decode_order(self, workers: list[Worker], avoid: set[str]) -> list[Worker]:
        """Decode workers to try, most room first; the ones this request failed on last."""
        by_name = {w.name: w for w in workers}
        loads = [DecodeLoad(w.name, w.free_blocks, w.in_flight) for w in workers]
        order = [by_name[n] for n in decode_order(loads, self.rng)]
        return [w for w in order if w.name not in avoid] + [w for w in order if w.name in avoid]

    def admit(self, prompt_tokens: int) -> int:
        """Bounded admission per pool (router.admission): OverloadedError past the bound.
        Counted here, with no await between check and count, so a burst cannot overshoot;
        returns the prompt tokens counted against the prefill bound, which the request
        gives back with `leave_prefill` (and itself with `leave`)."""
        fleet = self.fleet
        if fleet.config.colocated:
            n = len(fleet.routable(Role.COLOCATED))
            check_decode(self.admission, PoolLoad(max(1, n), self.held))
            self.held += 1
            return 0
        n_prefill, n_decode = len(fleet.routable(Role.PREFILL)), len(fleet.routable(Role.DECODE))
        load = PoolLoad(max(1, n_prefill), queued_tokens=self.prefill_tokens)
        check_prefill(self.admission, load, prompt_tokens)
        load = PoolLoad(max(1, n_decode), self.held, waiting=self.reserving)
        check_decode(self.admission, load)
        self.prefill_tokens += prompt_tokens
        self.held += 1
        return prompt_tokens

    def leave_prefill(self, prompt_tokens: int) -> None:
        self.prefill_tokens -= prompt_tokens

    def leave(self) -> None:
        self.held -= 1
