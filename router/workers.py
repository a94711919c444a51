"""What the fleet knows of each worker, and how it is configured (plain data, no Ray calls).

Worker: name (never reused), role, actor handle, state, node, KV endpoint, pid, and the
router's counters (in_flight, queued_tokens) beside the last engine snapshot
WorkerState: STARTING ──health check──> ACTIVE ──scale down──> DRAINING ──> DEAD
                                           └──────lost──────────────────────> DEAD
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

from engine.engine_config import EngineConfig
from kv_transfer.transport import TransportConfig
from router.placement import Placement, Role


class WorkerState(enum.Enum):
    STARTING = "starting"
    ACTIVE = "active"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass(eq=False, slots=True)
class Worker:
    name: str
    role: Role
    actor: Any
    state: WorkerState = WorkerState.STARTING
    node: str = ""
    endpoint: str = ""
    in_flight: int = 0  # requests routed here and not yet ended
    queued_tokens: int = 0  # prompt tokens sent here whose prefill has not returned
    free_blocks: int = 1 << 30  # decode: last known free KV blocks
    engine: dict[str, int] = field(default_factory=dict)  # last status() snapshot
    pid: int = 0  # the actor's process (for operators, and chaos tests)
    drained: asyncio.Event | None = None
    activating: asyncio.Task | None = None  # a replacement's start-up, in the background
    outputs: Any = None  # router.outputs.WorkerOutputs: its token stream, once it has one

    def observe(self, snapshot: dict[str, int]) -> None:
        """Take in an engine snapshot (status()): load and KV use for /status and routing."""
        self.engine = snapshot
        self.free_blocks = snapshot["kv_blocks_total"] - snapshot["kv_blocks_used"]


@dataclass(frozen=True, slots=True)
class FleetConfig:
    engine: EngineConfig
    placement: Placement
    transport: TransportConfig = TransportConfig()
    colocated: bool = False
    layerwise: bool = True
    min_workers: int = 1  # per pool
    max_workers: int = 64  # per pool
    start_timeout_s: float = 300.0
    drain_timeout_s: float = 60.0
    health_timeout_s: float = 10.0

    @property
    def roles(self) -> tuple[Role, ...]:
        return (Role.COLOCATED,) if self.colocated else (Role.PREFILL, Role.DECODE)


def last_error_line(exc: BaseException) -> str:
    """The error a Ray failure carries, without its remote traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def start_timeout_message(cfg: FleetConfig) -> str:
    p = cfg.placement
    return (
        f"workers did not start within {cfg.start_timeout_s:.0f} s: the cluster has no room "
        f"for a worker of {p.cpus_per_worker} CPU, {p.gpus_per_worker} GPU "
        f"(and its node role resource, if any)"
    )
