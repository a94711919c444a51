"""The pools on a real local Ray cluster with the tiny model: disaggregated (both KV
transports) and colocated give the offline engine's greedy tokens, and free every block."""

from __future__ import annotations

import asyncio
import time

import pytest
from tiny_model import make_tiny_checkpoint

from engine import LLM, SamplingParams
from engine.engine_config import EngineConfig

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
# The last one is a 2,000-token prompt: its KV crosses in many chunks and pages.
PROMPTS = [
    [5, 9, 14, 33, 70, 12, 8, 90, 41, 3, 77] * 3,
    [100, 101, 102, 7],
    [60] * 40,
    [(i * 37) % 390 + 3 for i in range(2000)],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny"), seed=4, max_position_embeddings=4096
    )


@pytest.fixture(scope="module")
def expected(tiny):
    llm = LLM(model=str(tiny), num_kv_blocks=1200, block_size=4, num_threads=1)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


async def _collect(backend, rid, ids, params):
    tokens = []
    async for delta in backend.generate(rid, ids, params):
        tokens += delta.token_ids
    return tokens


def _wait_free(backend, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        status = asyncio.run(backend.status())
        used = {w["name"]: w["kv_blocks_used"] for w in status["workers"]}
        if not any(used.values()):
            return status
        assert time.monotonic() < deadline, f"KV still held: {used}"
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("mode", "transport"),
    [("disaggregated", "grpc"), ("disaggregated", "collective"), ("colocated", "grpc")],
)
def test_pools_generate_like_offline_and_free_kv(ray_session, tiny, expected, mode, transport):
    import ray

    from router.pools import PoolConfig, RayBackend

    engine = EngineConfig(
        model=str(tiny),
        num_kv_blocks=1200,
        block_size=4,
        num_threads=1,
        max_num_batched_tokens=256,
    )
    backend = RayBackend(
        PoolConfig(
            engine=engine,
            mode=mode,
            kv_transport=transport,
            kv_host="127.0.0.1",
            cpus_per_worker=0.5,
        )
    )
    try:
        disaggregated = mode == "disaggregated"
        want = ["decode-0", "prefill-0"] if disaggregated else ["colocated-0", "colocated-1"]
        for name in want:  # named actors, found the way an operator would
            assert ray.get_actor(name, namespace="splitserve") is not None

        async def run_all():
            return await asyncio.wait_for(
                asyncio.gather(
                    *(
                        _collect(backend, f"{mode}-{transport}-{i}", p, PARAMS)
                        for i, p in enumerate(PROMPTS)
                    )
                ),
                timeout=120,
            )

        assert asyncio.run(run_all()) == expected
        _wait_free(backend)

        async def cut_early():
            gen = backend.generate("cut", PROMPTS[0], PARAMS)
            async for _ in gen:
                break
            await gen.aclose()

        asyncio.run(asyncio.wait_for(cut_early(), timeout=60))
        _wait_free(backend)
    finally:
        backend.shutdown()
