"""router.outputs over real Ray: a worker's output stream opened again from a new event loop
(the first one closed with its stream still open on the worker: Ray does not end it) loses
none of the deltas of the requests that come after, however soon the worker makes them
(before, the worker's old listener took them into a stream no one read)."""

from __future__ import annotations

import asyncio
import threading
import time

import ray

from decode_worker.outbox import Outbox
from engine.engine_loop import TokenDelta
from router.outputs import outputs_of
from router.placement import Role
from router.workers import Worker


@ray.remote(num_cpus=0.1)
class Emitter:
    """The decode worker's outbox, alone: deltas are made on request."""

    def __init__(self) -> None:
        self.outbox = Outbox()

    async def outputs(self):
        async for batch in self.outbox.batches():
            yield batch

    async def emit(self, request_id: str, n: int) -> None:
        """Like the engine thread: a delta every 2 ms, from the moment the call arrives."""
        self.outbox.bind(asyncio.get_running_loop())

        def engine() -> None:
            for i in range(n):
                reason = "length" if i == n - 1 else None
                self.outbox.put(TokenDelta(request_id, [i], finish_reason=reason))
                time.sleep(0.002)

        threading.Thread(target=engine, daemon=True).start()


async def _request(worker: Worker, rid: str, n: int) -> list[int]:
    outputs = outputs_of(worker)
    queue = await outputs.attach(rid, 30)
    emitted = worker.actor.emit.remote(rid, n)
    time.sleep(0.1)  # the router's loop busy: the worker is making deltas before it reads
    await emitted
    tokens: list[int] = []
    while True:
        delta = await asyncio.wait_for(queue.get(), 10)
        assert isinstance(delta, TokenDelta), delta
        tokens += delta.token_ids
        if delta.finish_reason is not None:
            outputs.unregister(rid)
            return tokens


def test_a_stream_reopened_from_a_new_loop_loses_no_delta(ray_session):
    worker = Worker("decode-x", Role.DECODE, Emitter.remote())
    try:
        for loop in range(3):  # each asyncio.run is a new loop, and a new stream
            got = asyncio.run(_request(worker, f"r{loop}", 20))
            assert got == list(range(20)), f"loop {loop}: {got}"
    finally:
        ray.kill(worker.actor)
