"""What an engine snapshot (LLMEngine.snapshot) says of its load: the figures the router's
per-worker metrics, the workers' Ray metrics and the autoscaler all read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: int
    waiting: int  # not yet scheduled; on a decode worker also those whose KV is arriving
    kv_use: float  # 0..1


def load_of(snapshot: dict[str, Any]) -> EngineLoad:
    total = snapshot.get("kv_blocks_total", 0)
    waiting = (
        snapshot.get("waiting", 0) + snapshot.get("awaiting_kv", 0) + snapshot.get("landed", 0)
    )
    return EngineLoad(
        running=snapshot.get("running", 0),
        waiting=waiting,
        kv_use=snapshot.get("kv_blocks_used", 0) / total if total else 0.0,
    )
