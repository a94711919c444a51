"""The autoscaler on real Ray pools (tiny model): it profiles a worker of each pool, turns what
the request window shows into decisions, and the fleet carries them out (a decode worker
started, then drained), one at a time. The latencies are fed to the window directly: the
load ramp on the real model is `splitserve bench autoscale` (README)."""

from __future__ import annotations

import asyncio
import time

import pytest
from tiny_model import make_tiny_checkpoint

from engine.engine_config import EngineConfig
from planner import AutoscaleConfig, PoolLimits
from router.autoscaler import Autoscaler
from router.metrics import RouterMetrics
from router.placement import Role
from router.slo_window import Finished

CONFIG = AutoscaleConfig(
    ttft_target_s=1.0, tpot_target_s=0.1, interval_s=1.0, window_s=5.0, cooldown_s=0.0,
    prefill=PoolLimits(1, 2), decode=PoolLimits(1, 2), min_requests=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def backend(ray_session, tmp_path_factory):
    from router.pools import PoolConfig, RayBackend

    tiny = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=4)
    engine = EngineConfig(model=str(tiny), num_kv_blocks=400, block_size=4, num_threads=1)
    backend = RayBackend(PoolConfig(engine=engine, kv_host="127.0.0.1", cpus_per_worker=0.5))
    yield backend
    backend.shutdown()


def _feed(metrics: RouterMetrics, n: int, ttft: float, tpot: float, output_tokens=30) -> None:
    now = time.monotonic()
    for i in range(n):
        metrics.window.arrived(now - 0.01 * i)
        metrics.window.finished(Finished(now, ttft, tpot, 20, output_tokens, 0.001))


async def _settle(scaler: Autoscaler, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while scaler._carrying is not None and not scaler._carrying.done():
        assert time.monotonic() < deadline, "the fleet did not carry the decision out"
        await asyncio.sleep(0.2)


def test_tpot_breach_grows_decode_then_calm_shrinks_it(backend) -> None:
    metrics = RouterMetrics("tiny")
    scaler = Autoscaler(CONFIG, backend, metrics)

    async def run() -> list:
        await scaler.start()  # profiles prefill-0 and decode-0 (idle)
        scaler._task.cancel()  # ticks driven here, not by the timer
        out = []
        _feed(metrics, 10, ttft=0.2, tpot=0.3)  # TPOT p90 300 ms > 100 ms
        out.append(await scaler.tick())
        busy = await scaler.tick()  # the new worker is starting: no second decision
        out.append(busy)
        await _settle(scaler)
        out.append(backend.fleet.counts())
        await asyncio.sleep(1.0)
        # calm: well under both targets, and little decoding (5 tokens a request): one
        # worker takes it even where the tiny model's profile came out flat (step time
        # not growing from batch 1 to 8 within the noise), which caps a worker's batch at 8
        _feed(metrics, 10, ttft=0.05, tpot=0.01, output_tokens=5)
        metrics.window.horizon_s = 1.5  # the breach above leaves the window
        await asyncio.sleep(1.6)
        _feed(metrics, 10, ttft=0.05, tpot=0.01, output_tokens=5)
        out.append(await scaler.tick())
        await _settle(scaler)
        out.append(backend.fleet.counts())
        return out

    grow, busy, after_grow, shrink, after_shrink = asyncio.run(asyncio.wait_for(run(), 300))
    assert (grow.prefill, grow.decode) == (1, 2) and "TPOT p90 300 ms" in grow.reasons["decode"]
    assert not busy.changed and "still being carried out" in busy.reasons["decode"]
    assert after_grow == {Role.PREFILL: 1, Role.DECODE: 2}
    assert shrink.decode == 1 and "can take the load" in shrink.reasons["decode"], (
        shrink,
        scaler.status()["capacity"],
    )
    assert after_shrink == {Role.PREFILL: 1, Role.DECODE: 1}
    assert scaler.planner is not None and scaler.planner.capacity.prefill.capacity > 0
    status = scaler.status()
    assert [d["decode"] for d in status["decisions"] if d["changed"]] == [2, 1]
    text = metrics.render().decode()
    assert (
        'splitserve:autoscaler_decisions_total{direction="up",model_name="tiny",pool="decode"} 1.0'
        in text
    )
