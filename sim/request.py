"""What the simulated cluster is given (ClusterConfig) and what it reports of each request
(Record: as its client saw it)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.scheduler import SchedulerConfig
from engine.sequence import Sequence
from router.admission import AdmissionLimits
from router.routing import PrefillPolicy
from sim.worker import SimWorker


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    mode: str = "disaggregated"  # | "colocated"
    prefill: int = 1  # workers at the start (colocated: prefill + decode, as serve counts)
    decode: int = 1
    scheduler: SchedulerConfig | None = None  # None: the engine's defaults, cost's KV size
    policy: PrefillPolicy = PrefillPolicy.PREFIX
    reserve_timeout_s: float = 30.0
    admission: AdmissionLimits | None = None  # None: from the engine's limits, as serve does
    max_tpot_ms: float | None = None  # decode workers' TPOT governor
    gpus_per_worker: int = 1
    coalesce: bool = True  # runs of decode steps booked as one event (sim.worker)
    shared_host: bool = False  # every worker on one host (this CPU machine): cost.host_factor
    seed: int = 0
    noise_seed: int = 0  # the workers' step scatter (cost.noise), apart from the workload's


@dataclass(slots=True, eq=False)
class Record:
    """One request as its client saw it."""

    uid: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_s: float | None = None
    end_s: float | None = None
    error: str = ""
    reservation_s: float | None = None  # waiting for KV room on a decode worker
    decode: SimWorker | None = None
    prefill: SimWorker | None = None
    seq: Sequence | None = None  # on the decode (or colocated) worker
    routed_s: float | None = None  # first tried for KV room
    head_since: float | None = None  # at the head of the line (its deadline runs from here)
    backoff: float = 0.01
    busy: bool = False  # others were in flight as it arrived (router_busy_s)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_s is None else self.first_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_s) / (self.output_tokens - 1)
