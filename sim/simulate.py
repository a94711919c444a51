"""One simulation: a cluster, a workload, optionally the SLO autoscaler; the summary out."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from planner import AutoscaleConfig, Decision
from sim.autoscale import PoolSample, SimAutoscaler
from sim.cluster import Cluster, ClusterConfig, Record
from sim.cost import CostModel
from sim.report import row, summarize
from sim.workload import SimRequest


@dataclass(slots=True)
class SimResult:
    summary: dict[str, Any]
    records: list[Record]
    samples: list[PoolSample] = field(default_factory=list)  # autoscaled: pools each second
    decisions: list[Decision] = field(default_factory=list)
    wall_s: float = 0.0
    gpus: int = 0  # the most GPUs the fleet held at once (workers x GPUs per worker)

    def rows(self) -> list[dict[str, Any]]:
        return [row(r) for r in self.records]


def simulate(
    cost: CostModel,
    config: ClusterConfig,
    requests: Iterable[SimRequest],
    ttft_s: float,
    tpot_s: float,
    autoscale: AutoscaleConfig | None = None,
    duration_s: float | None = None,
) -> SimResult:
    """Run `requests` through the cluster; with `autoscale`, decide every interval up to
    `duration_s` (default: until the last request has ended is not known in advance, so
    the autoscaler needs it)."""
    t0 = time.perf_counter()
    cluster = Cluster(config, cost)
    scaler = None
    if autoscale is not None:
        if duration_s is None:
            raise ValueError("an autoscaled simulation needs duration_s")
        scaler = SimAutoscaler(cluster, autoscale)
        scaler.start(duration_s)
    records = cluster.run(requests)
    summary = summarize((row(r) for r in records), ttft_s, tpot_s)
    return SimResult(
        summary,
        records,
        scaler.samples if scaler else [],
        scaler.decisions if scaler else [],
        time.perf_counter() - t0,
        cluster.peak_workers * config.gpus_per_worker,
    )
