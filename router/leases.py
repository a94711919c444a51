"""The router keeps its KV reservations alive while their prompts wait for a prefill.

    RequestLife: reserved on D ──> hold(D, id) ... prefill returned / attempt ended ──> drop
    every period_s: D.renew([ids held on D]) ──> D pushes those leases out (LEASE_S)

A reservation is owned by the request that made it, and its lease lasts while the
owner is alive: a prompt can wait in a long prefill queue without losing its KV,
and a router that stops renewing (gone, hung) gets its blocks reclaimed by the
decode worker's reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from router.workers import Worker

log = logging.getLogger(__name__)
RENEW_PERIOD_S = 5.0  # a third of the decode worker's LEASE_S or less


class LeaseKeeper:
    def __init__(self, period_s: float = RENEW_PERIOD_S, call_timeout_s: float = 5.0) -> None:
        self.period_s, self.call_timeout_s = period_s, call_timeout_s
        self._held: dict[str, tuple[Worker, set[str]]] = {}  # worker name -> (it, ids)
        self._task: asyncio.Task | None = None

    def hold(self, worker: Worker, request_id: str) -> None:
        self._held.setdefault(worker.name, (worker, set()))[1].add(request_id)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._renew_forever())

    def drop(self, worker: Worker, request_id: str) -> None:
        entry = self._held.get(worker.name)
        if entry is not None:
            entry[1].discard(request_id)
            if not entry[1]:
                del self._held[worker.name]

    def held(self) -> int:
        return sum(len(ids) for _, ids in self._held.values())

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.period_s)  # a lease timer, not a state poll
            await asyncio.gather(*(self._renew(w, set(ids)) for w, ids in self._held.values()))

    async def _renew(self, worker: Worker, request_ids: set[str]) -> None:
        with contextlib.suppress(Exception):  # a dead worker: its requests find out themselves
            call = worker.actor.renew.remote(sorted(request_ids))
            gone = await asyncio.wait_for(call, self.call_timeout_s)
            if gone:
                log.warning("%s: reservations %s are gone", worker.name, gone[:4])

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
