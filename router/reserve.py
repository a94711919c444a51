"""A request's KV reservation on a decode worker: the most room first, then a line.

try at once (nobody waiting) ──room──> Ticket
no room ──> the line (first come, first served) ──retry with back-off as decodes
    free blocks──> Ticket | reserve_timeout_s: OverloadedError (429)
a decode worker found dead on the way: the fleet is told; the next one is tried
a worker that began draining meanwhile: its reservation is given back
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import ray

from engine.errors import OverloadedError, UnavailableError
from engine.sampling_params import SamplingParams
from kv_transfer.ticket import Ticket
from router.placement import Role
from router.router_state import Phase
from router.workers import Worker

if TYPE_CHECKING:
    from router.request_life import RequestLife


async def reserve(
    life: RequestLife, ids: list[int], params: SamplingParams, avoid: set[str]
) -> tuple[Worker, Ticket]:
    """KV on the decode worker with the most room. While none has room, wait in line
    (first come, first served; bounded by reserve_timeout_s) as decodes free blocks."""
    router = life.router
    line = router.reserve_line()
    # nobody is waiting: try at once
    got = None if line.locked() else await _reserve_round(life, ids, params, avoid)
    if got is not None:
        return got
    router.reserving += 1  # what admission bounds: requests in the line
    try:
        async with line:  # the longest waiter tries first
            return await _reserve_waiting(life, ids, params, avoid)
    finally:
        router.reserving -= 1


async def _reserve_waiting(
    life: RequestLife, ids: list[int], params: SamplingParams, avoid: set[str]
) -> tuple[Worker, Ticket]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + life.router.reserve_timeout_s
    delay = 0.01
    while (got := await _reserve_round(life, ids, params, avoid)) is None:
        if loop.time() > deadline:
            raise OverloadedError("no decode worker has free KV blocks; try again later")
        await asyncio.sleep(delay)  # back-off while decodes finish and free blocks
        delay = min(delay * 2, 0.25)
    return got


async def _reserve_round(
    life: RequestLife, ids: list[int], params: SamplingParams, avoid: set[str]
) -> tuple[Worker, Ticket] | None:
    router = life.router
    workers = await router.fleet.wait_routable(Role.DECODE, router.reserve_timeout_s)
    if not workers:
        raise UnavailableError("no decode worker is active; try again later")
    for worker in router.decode_order(workers, avoid):
        ticket = await _try_reserve(life, worker, ids, params)
        if ticket is not None:
            return worker, ticket
    return None


async def _try_reserve(
    life: RequestLife, worker: Worker, ids: list[int], params: SamplingParams
) -> Ticket | None:
    fleet = life.router.fleet
    if not fleet.is_active(worker):  # began draining, or was lost, while we awaited
        return None
    try:
        ticket = await worker.actor.reserve.remote(life.attempt_rid, ids, params)
    except ray.exceptions.ActorDiedError:
        fleet.lost(worker)
        return None
    except ray.exceptions.RayActorError:  # unavailable for now: try the next one
        return None
    if ticket is None:
        worker.free_blocks = 0
        return None
    worker.free_blocks = ticket.free_blocks
    if not fleet.is_active(worker):  # draining now: give the KV back
        worker.actor.abort.remote(life.attempt_rid)
        return None
    life.decode, life.ticket, life.phase = worker, ticket, Phase.RESERVED
    fleet.enter(worker)
    return ticket
