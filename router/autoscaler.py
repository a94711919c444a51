"""The SLO autoscaler at run time: it observes, the planner decides, the fleet carries out.

    every interval_s:
      observe   arrivals and finished requests (router.metrics' RequestWindow), each pool's
                workers (fleet: active / starting / draining, busy fraction from the
                engines' step_busy_ms, running sequences, KV use)
      decide    planner.Planner (pure; the same code the simulator runs)
      carry out fleet.scale(targets) in the background: scale-up asks Ray for the new
                workers' resources (Ray's autoscaler adds nodes where none are free),
                scale-down drains; no decision while one is being carried out
      report    a log line with the reason, splitserve:autoscaler_* metrics, /status

The workers' capacity profile is measured once, on the first worker of each pool, before
the loop starts (engine.profile), then corrected by live figures (planner.capacity).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from engine.load import load_of
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
from router.metrics import RouterMetrics
from router.placement import Role
from router.slo_window import RequestWindow
from router.workers import Worker, WorkerState

log = logging.getLogger(__name__)
_POOLS = {"prefill": Role.PREFILL, "decode": Role.DECODE}


class Autoscaler:
    def __init__(self, config: AutoscaleConfig, backend: Any, metrics: RouterMetrics):
        self.config, self.backend, self.metrics = config, backend, metrics
        self.window: RequestWindow = metrics.window
        self.window.horizon_s = max(config.window_s, config.interval_s)
        self.planner: Planner | None = None
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=50)
        self._carrying: asyncio.Task | None = None
        self._busy_ms: dict[str, tuple[float, int]] = {}  # worker -> (time, step_busy_ms)
        self._task: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Profile one worker of each pool (idle, before traffic), then run the loop."""
        fleet = self.backend.fleet
        profiles = {}
        for pool, role in _POOLS.items():
            worker = fleet.routable(role)[0]
            profiles[pool] = await worker.actor.profile.remote()
            log.info("autoscaler: %s profile: %s", pool, profiles[pool])
        capacity = Capacity(
            PrefillProfile(profiles["prefill"]["prefill_tokens_per_s"]),
            DecodeProfile(profiles["decode"]["decode_step_s"]),
        )
        self.planner = Planner(self.config, capacity)
        self._task = asyncio.create_task(self._loop())

    def stop(self) -> None:
        for task in (self._task, self._carrying):
            if task is not None:
                task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - a bad tick must not end the autoscaler
                log.warning("autoscaler: tick failed: %r", exc)

    # ---- one interval ------------------------------------------------------------------------
    async def tick(self) -> Decision:
        assert self.planner is not None, "start() first"
        await self.backend.fleet.refresh()  # fresh engine snapshots
        decision = self.planner.decide(self.observe(time.monotonic()))
        self.decisions.append(decision)
        self.metrics.observe_decision(decision)
        if decision.changed:
            why = f"{decision.reasons['prefill']}; {decision.reasons['decode']}"
            log.info("autoscaler: prefill %d, decode %d (%s)", decision.prefill,
                     decision.decode, why)  # fmt: skip
            targets = {Role.PREFILL: decision.prefill, Role.DECODE: decision.decode}
            self._carrying = asyncio.create_task(self._carry_out(targets))
        return decision

    async def _carry_out(self, targets: dict[Role, int]) -> None:
        try:
            await self.backend.scale(prefill=targets[Role.PREFILL], decode=targets[Role.DECODE])
        except Exception as exc:  # noqa: BLE001 - e.g. no room in the cluster: next tick retries
            log.warning("autoscaler: scaling to %s failed: %s", targets, exc)

    def observe(self, now: float) -> Observation:
        cfg, window = self.config, self.window
        scaling = self._carrying is not None and not self._carrying.done()
        load = window.load(now, cfg.interval_s)
        ttft, tpot, wait = window.percentiles(now, cfg.window_s, cfg.percentile, cfg.min_requests)
        fleet = self.backend.fleet
        pools = {pool: self._pool_state(fleet.members(role), now) for pool, role in _POOLS.items()}
        return Observation(
            now, load, ttft, tpot, pools["prefill"], pools["decode"], scaling, reservation_s=wait
        )

    def _pool_state(self, workers: list[Worker], now: float) -> PoolState:
        active = [w for w in workers if w.state is WorkerState.ACTIVE and w.engine]
        busy, running, kv = [], [], []
        for w in active:
            e = w.engine
            ms = e.get("step_busy_ms", 0)
            last = self._busy_ms.get(w.name)
            self._busy_ms[w.name] = (now, ms)
            if last is not None and now > last[0]:
                busy.append(min(1.0, (ms - last[1]) / 1000 / (now - last[0])))
            load = load_of(e)
            running.append(load.running)
            kv.append(load.kv_use)
        return PoolState(
            active=sum(w.state is WorkerState.ACTIVE for w in workers),
            busy=_mean(busy),
            running=_mean(running),
            kv_use=_mean(kv),
        )

    def status(self) -> dict[str, Any]:
        cap = self.planner.capacity if self.planner else None
        return {
            "config": asdict(self.config),
            "scaling": self._carrying is not None and not self._carrying.done(),
            "capacity": None if cap is None else {
                "prefill_tokens_per_s": cap.prefill_tokens_per_s(),
                "decode_batch_within_tpot": cap.decode_batch(self.config.tpot_target_s),
                "prefill_factor": cap.prefill_factor,
                "decode_factor": cap.decode_factor,
            },
            "decisions": [_decision_json(d) for d in list(self.decisions)[-10:]],
        }  # fmt: skip


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _decision_json(d: Decision) -> dict[str, Any]:
    return {"t": d.now_s, "prefill": d.prefill, "decode": d.decode, "changed": d.changed,
            "needed": d.needed, "reasons": d.reasons}  # fmt: skip


__all__ = ["Autoscaler", "with_autoscaler"]


async def with_autoscaler(serving: Any, backend: Any, metrics: RouterMetrics,
                          config: AutoscaleConfig | None) -> None:  # fmt: skip
    """Run `serving` (router.servers.serve_all) with the autoscaler beside it, when on: the
    workers are profiled before the servers take traffic."""
    scaler = None
    if config is not None:
        scaler = Autoscaler(config, backend, metrics)
        await scaler.start()
        backend.autoscaler = scaler
    try:
        await serving
    finally:
        if scaler is not None:
            scaler.stop()
