"""decode_worker.outbox: deltas put from the engine thread reach the one listener, in order,
a batch per wake-up; a listener's first batch is empty (it is in place); a new listener takes
over from an old one."""

from __future__ import annotations

import asyncio
import threading

from decode_worker.outbox import Outbox
from engine.engine_loop import TokenDelta


def test_deltas_from_another_thread_arrive_in_order_and_batched():
    outbox = Outbox()

    async def run() -> list[list[TokenDelta]]:
        outbox.bind(asyncio.get_running_loop())
        outbox.put(TokenDelta("early", [0]))  # before anyone listens: kept

        def engine_thread() -> None:
            for step in range(1, 51):
                for rid in ("a", "b"):
                    outbox.put(
                        TokenDelta(rid, [step], finish_reason="stop" if step == 50 else None)
                    )

        threading.Thread(target=engine_thread).start()
        got: list[list[TokenDelta]] = []
        async for batch in outbox.batches():
            got.append(batch)
            if sum(d.finish_reason is not None for b in got for d in b) == 2:
                return got
        raise AssertionError("the stream ended")

    batches = asyncio.run(asyncio.wait_for(run(), 10))
    assert batches[0] == []  # the listener is in place
    flat = [d for b in batches for d in b]
    assert flat[0].request_id == "early"
    for rid in ("a", "b"):
        assert [d.token_ids[0] for d in flat if d.request_id == rid] == list(range(1, 51))
    assert len(batches) < len(flat)  # several deltas went out per wake-up


def test_a_new_listener_takes_over_and_a_closed_loop_does_not_break_put():
    outbox = Outbox()

    async def first() -> None:
        agen = outbox.batches()
        assert await anext(agen) == []
        outbox.put(TokenDelta("x", [1]))
        assert [d.token_ids for d in await anext(agen)] == [[1]]

    asyncio.run(first())  # that loop is gone now
    outbox.put(TokenDelta("y", [2]))  # waits for the next listener

    async def second() -> None:
        old = outbox.batches()
        assert await anext(old) == []
        assert [d.request_id for d in await anext(old)] == ["y"]  # what waited for it
        old_next = asyncio.ensure_future(anext(old))
        await asyncio.sleep(0.05)  # the old listener waits for more
        new = outbox.batches()
        assert await anext(new) == []  # in place: the old one can take nothing more
        new_next = asyncio.ensure_future(anext(new))
        await asyncio.sleep(0.05)
        outbox.put(TokenDelta("z", [3]))
        assert [d.request_id for d in await asyncio.wait_for(new_next, 5)] == ["z"]
        try:  # woken too, the old one sees it was replaced and ends
            await asyncio.wait_for(old_next, 5)
            raise AssertionError("the old listener got a batch")
        except StopAsyncIteration:
            pass

    asyncio.run(asyncio.wait_for(second(), 10))
