"""Faults on a real local Ray cluster with the tiny model (disaggregated, KV over gRPC).

- chaos: 200 streaming requests; one decode and one prefill worker process are killed
  (SIGKILL) mid-run. Every request completes with the greedy tokens of a clean run, the
  pools are refilled with new workers, and afterwards no worker holds a KV block, a
  transfer or an open KV stream.
- aborts: 1,000 requests abandoned at random points (queued, mid-prefill, mid-transfer,
  mid-decode): then nothing is held anywhere, and the next 50 requests all complete.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
from tiny_model import make_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.engine_config import EngineConfig
from engine.errors import OverloadedError

PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
RNG = random.Random(7)
# short prompts and long ones (their KV crosses in many pages: aborts land mid-transfer)
PROMPTS = [[RNG.randrange(3, 390) for _ in range(RNG.choice([8, 40, 300, 900]))] for _ in range(20)]
HELD_KEYS = ("kv_blocks_used", "kv_transfers", "kv_streams_open", "held")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny"), seed=11, max_position_embeddings=2048
    )


@pytest.fixture(scope="module")
def expected(tiny):
    llm = LLM(model=str(tiny), num_kv_blocks=2000, block_size=4, num_threads=1)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def backend(ray_session, tiny):
    from router.admission import AdmissionLimits
    from router.pools import PoolConfig, RayBackend

    engine = EngineConfig(
        model=str(tiny),
        num_kv_blocks=2000,
        block_size=4,
        num_threads=1,
        max_num_batched_tokens=512,
    )
    config = PoolConfig(
        engine=engine,
        num_prefill=2,
        num_decode=2,
        kv_host="127.0.0.1",
        cpus_per_worker=0.25,
        start_timeout_s=120,
        # these tests are about faults, not load: admit every one of their requests
        admission=AdmissionLimits(queued_tokens_per_prefill=50_000, waiting_per_decode=64),
    )
    backend = RayBackend(config)
    yield backend
    backend.shutdown()


def _held(status) -> dict[str, dict[str, int]]:
    return {
        w["name"]: {k: w.get(k, 0) for k in HELD_KEYS if w.get(k, 0)} for w in status["workers"]
    }


async def _wait_nothing_held(backend, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        status = await backend.status()
        held = {name: h for name, h in _held(status).items() if h}
        if not held and not status["recovery"]["leases_held"]:
            return status
        assert time.monotonic() < deadline, f"still held: {held}"
        await asyncio.sleep(0.3)


async def _wait_pools(backend, prefill, decode, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        status = await backend.status()
        active = [w["role"] for w in status["workers"] if w["state"] == "active"]
        if active.count("prefill") == prefill and active.count("decode") == decode:
            return status
        assert time.monotonic() < deadline, f"pools not back: {status['workers']}"
        await asyncio.sleep(0.5)


async def _collect(backend, rid, ids, params, progress=None, streams_on=None):
    tokens = []
    async for delta in backend.generate(rid, ids, params):
        tokens += delta.token_ids
        if progress is not None:
            progress[rid] = len(tokens)
        if streams_on is not None and delta.trace is not None:
            streams_on[rid] = delta.trace.engine  # the decode worker streaming it now
    return tokens


def test_killed_decode_and_prefill_lose_no_request(backend, expected):
    pids = {w.name: w.pid for w in backend.fleet.members()}
    assert all(pids.values())
    progress: dict[str, int] = {}
    streams_on: dict[str, str] = {}
    finished: set[str] = set()

    async def run():
        sem = asyncio.Semaphore(40)

        async def one(i):
            async with sem:
                p, rid = i % len(PROMPTS), f"chaos-{i}"
                tokens = await _collect(backend, rid, PROMPTS[p], PARAMS, progress, streams_on)
                finished.add(rid)
                return p, tokens

        def live() -> list[str]:  # streams well under way (finished ones do not count)
            return [rid for rid, n in progress.items() if n >= 3 and rid not in finished]

        def streaming() -> int:
            return len(live())

        tasks = [asyncio.create_task(one(i)) for i in range(200)]
        deadline = time.monotonic() + 120
        while streaming() < 10:
            assert time.monotonic() < deadline, "no stream got going"
            await asyncio.sleep(0.01)
        # the decode worker with the most live streams (requests in flight also count
        # those still in prefill, whose loss is a retry, not a migration)
        on = [streams_on[rid] for rid in live()]
        victim = max(set(on), key=on.count)
        print(f"killing {victim} ({on.count(victim)} of {len(on)} live streams) and prefill-0")
        os.kill(pids[victim], signal.SIGKILL)
        os.kill(pids["prefill-0"], signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=600)
        # the replacements start in the background of this loop: wait for them here
        return victim, results, await _wait_pools(backend, prefill=2, decode=2)

    victim, results, status = asyncio.run(run())
    assert len(results) == 200
    wrong = [i for i, (p, tokens) in enumerate(results) if tokens != expected[p]]
    assert wrong == [], f"{len(wrong)} requests differ from a clean run, e.g. {wrong[:5]}"
    names = {w["name"] for w in status["workers"]}
    assert victim not in names and "prefill-0" not in names  # replaced, names not reused
    recovery = status["recovery"]
    assert recovery["migrations"] >= 1, recovery  # streams moved after tokens had gone out
    assert recovery["workers_replaced"] >= 2, recovery
    asyncio.run(_wait_nothing_held(backend))


def test_a_thousand_aborts_leave_nothing_held(backend, expected):
    asyncio.run(_wait_pools(backend, prefill=2, decode=2))
    rng = random.Random(3)
    outcomes = {"abandoned": 0, "refused": 0}

    async def abandon(i):
        p = rng.randrange(len(PROMPTS))
        gen = backend.generate(f"abort-{i}", PROMPTS[p], PARAMS)
        stop_after = rng.choice([0, 0, 1, 2, 5])  # 0: before the first token
        delay = rng.choice([0.0, 0.001, 0.01, 0.05, 0.2])

        async def consume():
            n = 0
            async for _ in gen:
                n += 1
                if stop_after and n >= stop_after:
                    return

        task = asyncio.create_task(consume())
        if stop_after == 0:
            await asyncio.sleep(delay)  # queued, mid-reserve, mid-prefill or mid-transfer
            task.cancel()
        try:
            await asyncio.wait_for(task, timeout=120)
            outcomes["abandoned"] += 1
        except asyncio.CancelledError:
            outcomes["abandoned"] += 1
        except OverloadedError:  # refused for load (429): also a fine outcome
            outcomes["refused"] += 1
        await gen.aclose()

    async def run():
        sem = asyncio.Semaphore(50)

        async def one(i):
            async with sem:
                await abandon(i)

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1000))), timeout=600)

    t0 = time.monotonic()
    asyncio.run(run())
    print(f"1000 abandoned requests: {outcomes} in {time.monotonic() - t0:.1f} s")
    assert outcomes["abandoned"] >= 900, outcomes
    asyncio.run(_wait_nothing_held(backend))

    async def after():
        return await asyncio.wait_for(
            asyncio.gather(
                *(
                    _collect(backend, f"after-{i}", PROMPTS[i % len(PROMPTS)], PARAMS)
                    for i in range(50)
                )
            ),
            timeout=300,
        )

    results = asyncio.run(after())
    assert results == [expected[i % len(PROMPTS)] for i in range(50)]
    asyncio.run(_wait_nothing_held(backend))
