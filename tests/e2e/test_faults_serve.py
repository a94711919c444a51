"""Faults as a user meets them: `splitserve serve --prefill 1 --decode 2` with the real
model, real HTTP clients on loopback.

- fifty streams cut by their clients at random points (a dozen during the prefill of
  long prompts): afterwards no worker holds a KV block, a transfer or an open KV stream,
  and the next request is served;
- a decode worker's process killed (SIGKILL) while it streams: /health stays 200, every
  stream completes with the text of an undisturbed run, and the pool gets a new worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import pytest

from bench.server_process import ServerProcess
from engine import LLM, SamplingParams

pytestmark = pytest.mark.e2e
httpx = pytest.importorskip("httpx")

MODEL = "smollm2-135m"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "A short story about a lighthouse keeper:",
    "List the planets of the solar system:",
]
LONG = " ".join(f"word{i}" for i in range(700))  # ~1,400 tokens: a long prefill
MAX_TOKENS = 40
HELD = ("kv_blocks_used", "kv_transfers", "kv_streams_open", "held")


@pytest.fixture(scope="module")
def offline() -> dict[str, str]:
    llm = LLM(model=MODEL, dtype="float32", num_kv_blocks=512)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return {p: o.text for p, o in zip(PROMPTS, llm.generate(PROMPTS, greedy), strict=True)}


@pytest.fixture(scope="module")
def server():
    with ServerProcess(
        "--prefill", "1", "--decode", "2", "--kv-cache-gb", "0.5", "--dtype", "float32"
    ) as srv:
        yield srv


def _held(server) -> dict[str, dict[str, int]]:
    status = server.status()
    return {
        w["name"]: held for w in status["workers"] if (held := {k: w[k] for k in HELD if w.get(k)})
    }


def _wait_nothing_held(server, timeout_s=30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while held := _held(server):
        assert time.monotonic() < deadline, f"still held: {held}"
        time.sleep(0.5)


class Refused(Exception):
    """The server refused a request for load (429); `retry_after_s` is when to come back."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"429, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


async def _stream(client, prompt, progress=None, cut_after=None) -> str:
    """The streamed text; raises Refused when the server refused the request for load."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    text, chunks = "", 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code == 429 and cut_after is not None:  # a burst past admission: fine
            error = json.loads(await r.aread())["error"]
            assert error["type"] == "rate_limit_error", error
            raise Refused(float(r.headers["retry-after"]))
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text += event["choices"][0]["text"]
            chunks += 1
            if progress is not None:
                progress[prompt] = chunks
            if cut_after is not None and chunks >= cut_after:
                return text  # leaving the block closes the connection: the client is gone
    return text


def test_streams_cut_by_clients_leave_nothing_held(server):
    """Fifty clients that each get their stream in (a 429 is honoured: the client waits its
    Retry-After and tries again, as OpenAI's clients do), then cut it."""
    rng = random.Random(5)
    outcomes = {"cut": 0, "refused": 0}

    async def cut(client, i):
        long = i % 4 == 0  # a dozen long prompts, some cut during their prefill
        prompt = LONG if long else PROMPTS[i % len(PROMPTS)]
        while True:
            task = asyncio.create_task(_stream(client, prompt, cut_after=rng.choice([1, 2, 5])))
            if long or i % 3 == 0:
                await asyncio.sleep(rng.uniform(0.0, 0.5))  # before the first token, often
                task.cancel()
            try:
                await task
            except Refused as refused:
                outcomes["refused"] += 1
                await asyncio.sleep(refused.retry_after_s)
                continue
            except asyncio.CancelledError:
                pass
            outcomes["cut"] += 1
            return

    async def run():
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as client:
            await asyncio.gather(*(cut(client, i) for i in range(50)))

    asyncio.run(asyncio.wait_for(run(), timeout=300))
    assert outcomes["cut"] == 50, outcomes
    _wait_nothing_held(server)

    async def one():
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as client:
            return await _stream(client, PROMPTS[0])

    assert asyncio.run(one())


def test_a_killed_decode_worker_loses_no_stream(server, offline):
    progress: dict[str, int] = {}

    async def run():
        async with httpx.AsyncClient(base_url=server.base, timeout=180) as client:
            tasks = [asyncio.create_task(_stream(client, p, progress)) for p in PROMPTS * 2]
            deadline = time.monotonic() + 120
            while len(progress) < len(PROMPTS) or min(progress.values()) < 3:
                assert time.monotonic() < deadline, f"streams did not get going: {progress}"
                await asyncio.sleep(0.05)
            decodes = [w for w in server.status()["workers"] if w["role"] == "decode"]
            victim = max(decodes, key=lambda w: w["in_flight"])
            os.kill(victim["pid"], signal.SIGKILL)
            health = await client.get("/health")
            return victim["name"], health.status_code, await asyncio.gather(*tasks)

    victim, health, texts = asyncio.run(asyncio.wait_for(run(), timeout=300))
    assert health == 200  # the other decode worker is alive
    assert texts == [offline[p] for p in PROMPTS * 2]
    deadline = time.monotonic() + 180
    while True:  # the pool is refilled under a new name, after its health check
        status = server.status()
        active = [w["name"] for w in status["workers"] if w["role"] == "decode"]
        states = {w["name"]: w["state"] for w in status["workers"]}
        if victim not in active and len(active) == 2 and set(states.values()) == {"active"}:
            break
        assert time.monotonic() < deadline, f"decode pool not refilled: {states}"
        time.sleep(1)
    assert status["recovery"]["migrations"] >= 1, status["recovery"]
    _wait_nothing_held(server)
