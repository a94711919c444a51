"""Elastic pools on a real local Ray cluster with the tiny model: while 64 streams run, the
pools grow from 1P+1D to 2P+2D and drain back; every stream completes with the offline
engine's greedy tokens and no KV block is held afterwards. Bad counts change nothing."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from tiny_model import make_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.engine_config import EngineConfig
from engine.errors import InvalidRequestError

PARAMS = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
N = 64


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, 390) for _ in range(24)]  # some share a prefix
    return [
        (shared if i % 3 == 0 else []) + [rng.randrange(3, 390) for _ in range(rng.randint(4, 40))]
        for i in range(N)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def backend(ray_session, tiny):
    from router.pools import PoolConfig, RayBackend

    engine = EngineConfig(model=str(tiny), num_kv_blocks=600, block_size=4, num_threads=1)
    b = RayBackend(
        PoolConfig(engine=engine, kv_host="127.0.0.1", cpus_per_worker=0.5, drain_timeout_s=120)
    )
    yield b
    b.shutdown()


async def _collect(backend, rid, ids):
    tokens = []
    async for delta in backend.generate(rid, ids, PARAMS):
        tokens += delta.token_ids
    return tokens


def _used(status) -> dict[str, int]:
    return {w["name"]: w["kv_blocks_used"] for w in status["workers"]}


async def _wait_free(backend, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        status = await backend.status()
        if not any(_used(status).values()) and not any(w["in_flight"] for w in status["workers"]):
            return status
        assert time.monotonic() < deadline, f"KV still held: {_used(status)}"
        await asyncio.sleep(0.2)


def test_pools_grow_and_drain_while_64_streams_run(backend, tiny):
    import ray

    prompts = _prompts()
    want = [o.token_ids for o in LLM(model=str(tiny), num_kv_blocks=600, block_size=4,
                                      num_threads=1).generate(prompts, PARAMS)]  # fmt: skip

    async def scenario():
        streams: list[asyncio.Task] = []

        async def feed(start: int, stop: int, gap_s: float) -> None:
            for i in range(start, stop):
                streams.append(asyncio.create_task(_collect(backend, f"elastic-{i}", prompts[i])))
                await asyncio.sleep(gap_s)

        async def while_starting() -> dict:
            await asyncio.sleep(0.3)  # the new actors are loading their model
            return await backend.status()

        # streams arrive before, during and after each resize
        _, grew, starting = await asyncio.gather(
            feed(0, 16, 0.1), backend.scale(prefill=2, decode=2), while_starting()
        )
        assert grew == {"prefill": 2, "decode": 2}
        await feed(16, 40, 0.05)  # the new workers take some of these
        grown = await backend.status()
        in_flight = sum(not t.done() for t in streams)
        _, shrank = await asyncio.gather(feed(40, 64, 0.05), backend.scale(prefill=1, decode=1))
        assert shrank == {"prefill": 1, "decode": 1}
        got = await asyncio.wait_for(asyncio.gather(*streams), timeout=300)
        return starting, grown, in_flight, got, await _wait_free(backend)

    starting, grown, in_flight, got, after = asyncio.run(scenario())
    new_names = ("prefill-1", "decode-1")
    loading = [w for w in starting["workers"] if w["name"] in new_names]
    assert [w["state"] for w in loading] == ["starting", "starting"]
    assert all(w["in_flight"] == 0 for w in loading)  # no traffic before model and health
    assert in_flight > 0, "no stream was running when the pools began to shrink"
    states = {w["name"]: w["state"] for w in grown["workers"]}
    assert states == dict.fromkeys(["prefill-0", "prefill-1", "decode-0", "decode-1"], "active")
    new = [w for w in grown["workers"] if w["name"] in new_names]
    assert all(w["steps"] > 0 for w in new), "a new worker never took a request"
    assert got == want  # 64/64 complete, greedy tokens as offline
    assert sorted(w["role"] for w in after["workers"]) == ["decode", "prefill"]
    assert after["pools"] == {"prefill": 1, "decode": 1}
    removed = {"prefill-0", "prefill-1", "decode-0", "decode-1"} - set(_used(after))
    for name in removed:  # drained workers' actors are gone
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace="splitserve")


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"prefill": 0}, "at least 1"),
        ({"decode": -2}, "at least 1"),
        ({"colocated": 2}, "no colocated pool"),
        ({}, "say which pool"),
    ],
)
def test_bad_counts_are_refused_and_change_nothing(backend, counts, message):
    before = asyncio.run(backend.status())
    with pytest.raises(InvalidRequestError, match=message):
        asyncio.run(backend.scale(**counts))
    after = asyncio.run(backend.status())
    assert [w["name"] for w in after["workers"]] == [w["name"] for w in before["workers"]]
    assert all(w["state"] == "active" for w in after["workers"])


def test_a_killed_worker_is_replaced_and_health_stays_ok(backend):
    """One of two decode workers dies: it is dropped from routing, /health stays 200 (the
    pool still has an active worker), new requests are served, and a new worker (a new
    name) takes its place once it passes its health check."""
    import ray

    def decode_names(status, state="active") -> set[str]:
        return {
            w["name"] for w in status["workers"] if w["role"] == "decode" and w["state"] == state
        }

    async def scenario():
        before = decode_names(await backend.status())
        await backend.scale(decode=2)
        (new,) = decode_names(await backend.status()) - before
        ray.kill(ray.get_actor(new, namespace="splitserve"))
        deadline = time.monotonic() + 120
        healthy = True
        while True:  # the next health checks find it dead, drop it and start another
            healthy = healthy and await backend.healthy()
            status = await backend.status()
            names = decode_names(status)
            if new not in names and len(names) == 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        tokens = await _collect(backend, "after-kill", [5, 6, 7, 8, 9])
        await backend.scale(decode=1)
        return before, new, healthy, names, await backend.status(), tokens

    before, new, healthy, names, status, tokens = asyncio.run(
        asyncio.wait_for(scenario(), timeout=300)
    )
    assert healthy
    assert new not in names and len(names - before) == 1  # a replacement, under a new name
    assert status["pools"]["decode"] == 1
    assert status["recovery"]["workers_replaced"] >= 1
    assert len(tokens) == PARAMS.max_tokens
