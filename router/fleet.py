"""The fleet: the only code that creates, places, health-checks, drains and removes workers.

    spawn(role) ──> STARTING: actor created with the role's placement (node resource, GPU)
        info() answered (model loaded) and status() answered (health) ──> ACTIVE: routable
    scale down ──> DRAINING: no new prompts or reservations; what it holds finishes
        in_flight reaches 0 (or drain_timeout_s) ──> shutdown, actor killed ──> removed
    a call to it fails (actor or node died) ──> DEAD: removed from routing, and a new
        worker is spawned for its pool (STARTING, routable only after its health check)

Names are never reused (prefill-0, prefill-1, ...), so a ticket always means one actor.
The router's counters (in_flight, queued_tokens) live on `Worker`; `enter`/`leave`
keep them, and `leave` is what tells a draining worker that it is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from typing import Any

import ray

from decode_worker.worker import DecodeWorker
from engine.errors import InvalidRequestError, OverloadedError, SplitServeError
from prefill_worker.worker import PrefillWorker
from router.placement import Role
from router.routing import leaving_order
from router.workers import (
    FleetConfig,
    Worker,
    WorkerState,
    last_error_line,
    start_timeout_message,
)

log = logging.getLogger(__name__)


class Fleet:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.workers: dict[str, Worker] = {}
        self._next = dict.fromkeys(Role, 0)
        threads = max(1, math.floor(config.placement.cpus_per_worker))
        self._engine = (
            config.engine
            if config.engine.num_threads
            else dataclasses.replace(config.engine, num_threads=threads)
        )
        self._scaling: asyncio.Lock | None = None
        self.targets: dict[Role, int] = {}  # pool sizes to hold (start, scale); lost -> refill
        self.replaced = 0  # workers started in place of lost ones
        self._tasks: set[asyncio.Task] = set()  # replacements and probes in the background
        self._closing = False
        self.max_model_len = config.engine.max_model_len or 1 << 30  # set from the workers

    # ---- membership ---------------------------------------------------------------
    def members(self, role: Role | None = None) -> list[Worker]:
        return [w for w in self.workers.values() if role is None or w.role is role]

    def routable(self, role: Role) -> list[Worker]:
        return [w for w in self.members(role) if w.state is WorkerState.ACTIVE]

    def is_active(self, worker: Worker) -> bool:
        return worker.state is WorkerState.ACTIVE and self.workers.get(worker.name) is worker

    def counts(self) -> dict[Role, int]:
        """Workers per pool that count toward its size (starting, active)."""
        live = (WorkerState.STARTING, WorkerState.ACTIVE)
        return {r: sum(w.state in live for w in self.members(r)) for r in self.config.roles}

    def enter(self, worker: Worker, tokens: int = 0) -> None:
        worker.in_flight += 1
        worker.queued_tokens += tokens

    def leave(self, worker: Worker, tokens: int = 0) -> None:
        worker.in_flight -= 1
        worker.queued_tokens -= tokens
        if worker.in_flight == 0 and worker.drained is not None:
            worker.drained.set()

    # ---- start ------------------------------------------------------------------------
    def spawn(self, role: Role) -> Worker:
        """Create a worker actor (STARTING); it is routable only after `_activate`."""
        index, self._next[role] = self._next[role], self._next[role] + 1
        name = f"{role.value}-{index}"
        cfg = self.config
        options = dict(
            name=name,
            namespace=cfg.transport.namespace,
            max_concurrency=1000,
            **cfg.placement.options(role),
        )
        try:
            actor = self._create(role, name, options)
        except ray.exceptions.ActorAlreadyExistsError:
            raise SplitServeError(
                f"actor {name} already exists in Ray namespace {cfg.transport.namespace!r}: "
                f"another splitserve server runs on this cluster; give this one --namespace"
            ) from None
        worker = Worker(name, role, actor)
        self.workers[name] = worker
        return worker

    def _create(self, role: Role, name: str, options: dict[str, Any]) -> Any:
        cfg = self.config
        if role is Role.PREFILL:
            cls = ray.remote(PrefillWorker).options(**options)
            return cls.remote(name, self._engine, cfg.transport, cfg.layerwise)
        return ray.remote(DecodeWorker).options(**options).remote(name, self._engine, cfg.transport)

    def _adopt(self, worker: Worker, info: dict[str, Any], snapshot: dict[str, int]) -> None:
        worker.node = info.get("node", "")
        worker.endpoint = info.get("endpoint", "")
        worker.pid = info.get("pid", 0)
        worker.observe(snapshot)
        worker.state = WorkerState.ACTIVE

    def start(self, counts: dict[Role, int]) -> list[dict[str, Any]]:
        """Blocking start-up of the first pools (before any event loop); their info()."""
        self.targets = dict(counts)
        spawned = [self.spawn(role) for role, n in counts.items() for _ in range(n)]
        try:
            timeout = self.config.start_timeout_s
            infos = ray.get([w.actor.info.remote() for w in spawned], timeout=timeout)
            snaps = ray.get([w.actor.status.remote() for w in spawned], timeout=60)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise OverloadedError(start_timeout_message(self.config)) from None
        except ray.exceptions.RayError as exc:  # a worker's constructor raised (bad config)
            self.shutdown()
            raise SplitServeError(f"a worker failed to start: {last_error_line(exc)}") from None
        for worker, info, snap in zip(spawned, infos, snaps, strict=True):
            self._adopt(worker, info, snap)
        self.max_model_len = min(i["max_model_len"] for i in infos)
        return infos

    async def activate(self, worker: Worker) -> dict[str, Any]:
        """Wait for the model to load and a health check to pass, then make it routable."""
        cfg = self.config
        try:
            info = await asyncio.wait_for(worker.actor.info.remote(), cfg.start_timeout_s)
            snap = await asyncio.wait_for(worker.actor.status.remote(), cfg.health_timeout_s)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            if worker.state is not WorkerState.STARTING:  # removed meanwhile (scaled down)
                return {}
            self._remove(worker)
            if isinstance(exc, TimeoutError):
                raise OverloadedError(start_timeout_message(cfg)) from None
            raise SplitServeError(
                f"{worker.name} failed to start: {last_error_line(exc)}"
            ) from None
        if worker.state is WorkerState.STARTING:  # not scaled away while it loaded
            self._adopt(worker, info, snap)
        return info

    # ---- scale ------------------------------------------------------------------------
    def check_targets(self, targets: dict[Role, int]) -> None:
        cfg = self.config
        for role, n in targets.items():
            if role not in cfg.roles:
                mode = "colocated" if cfg.colocated else "disaggregated"
                raise InvalidRequestError(f"a {mode} server has no {role.value} pool")
            if n < cfg.min_workers:
                raise InvalidRequestError(
                    f"the {role.value} pool needs at least {cfg.min_workers} worker(s); got {n}"
                )
            if n > cfg.max_workers:
                raise InvalidRequestError(
                    f"the {role.value} pool holds at most {cfg.max_workers} workers; got {n}"
                )

    async def scale(self, targets: dict[Role, int]) -> dict[Role, int]:
        """Grow or drain each pool to its target; returns when the fleet is there."""
        self.check_targets(targets)
        if self._scaling is None:
            self._scaling = asyncio.Lock()
        async with self._scaling:
            self.targets.update(targets)
            have = self.counts()
            new = [self.spawn(r) for r, n in targets.items() for _ in range(n - have[r])]
            leaving = [w for r, n in targets.items() for w in self._pick_leaving(r, have[r] - n)]
            for w in leaving:
                self._begin_drain(w)
            results = await asyncio.gather(
                *(self.activate(w) for w in new),
                *(self.drain(w) for w in leaving),
                return_exceptions=True,
            )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return self.counts()

    def _pick_leaving(self, role: Role, n: int) -> list[Worker]:
        """n workers to remove: starting ones first (no load yet), then the active ones with
        the least in flight (newest first on ties)."""
        if n <= 0:
            return []
        members = [w for w in self.members(role)  # members keep their spawn order
                   if w.state in (WorkerState.STARTING, WorkerState.ACTIVE)]  # fmt: skip
        by_name = {w.name: w for w in members}
        order = leaving_order(
            [(w.name, w.state is WorkerState.STARTING, w.in_flight) for w in members]
        )
        return [by_name[name] for name in order[:n]]

    def _begin_drain(self, worker: Worker) -> None:
        worker.state = WorkerState.DRAINING
        worker.drained = asyncio.Event()
        if worker.in_flight == 0:
            worker.drained.set()

    async def drain(self, worker: Worker) -> None:
        """Let what the worker holds finish (bounded), then stop it and free its KV."""
        assert worker.drained is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.drained.wait(), self.config.drain_timeout_s)
        if worker.in_flight:
            log.warning("%s: drain timed out with %d in flight", worker.name, worker.in_flight)
        with contextlib.suppress(Exception):  # it may already be gone; the kill is what counts
            await asyncio.wait_for(worker.actor.shutdown.remote(), 10)
        self._remove(worker)

    def _remove(self, worker: Worker) -> None:
        worker.state = WorkerState.DEAD
        self.workers.pop(worker.name, None)
        with contextlib.suppress(Exception):
            ray.kill(worker.actor)

    # ---- losses ------------------------------------------------------------------------
    def lost(self, worker: Worker) -> None:
        """A call found the worker's actor dead: out of the pools now, and a new one started
        for its pool (idempotent: many requests may report the same death)."""
        if self.workers.get(worker.name) is not worker:
            return
        log.warning("%s is lost; starting a replacement", worker.name)
        self._remove(worker)
        self._refill()

    def suspect(self, worker: Worker) -> None:
        """A request failed on the worker for a reason that may be its death: check it."""
        self._background(self._probe(worker))

    async def _probe(self, worker: Worker) -> None:
        try:
            await asyncio.wait_for(worker.actor.status.remote(), self.config.health_timeout_s)
        except ray.exceptions.ActorDiedError:
            self.lost(worker)
        except Exception as exc:  # slow or unreachable for now: the next refresh decides
            log.warning("%s did not answer a probe: %r", worker.name, exc)

    def _refill(self) -> None:
        """Start workers for every pool below its target (not while a scale is under way)."""
        if self._closing or (self._scaling is not None and self._scaling.locked()):
            return
        have = self.counts()
        for role, n in self.targets.items():
            for _ in range(n - have.get(role, 0)):
                self.replaced += 1
                self._start_in_background(self.spawn(role))

    def _start_in_background(self, worker: Worker) -> None:
        worker.activating = self._background(self._activate_quietly(worker))

    async def _activate_quietly(self, worker: Worker) -> None:
        try:
            await self.activate(worker)
        except SplitServeError as exc:
            log.error("replacement %s did not start: %s", worker.name, exc)

    def _background(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_routable(self, role: Role, timeout_s: float) -> list[Worker]:
        """The pool's active workers; while it has none but one is starting, wait (bounded)."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + timeout_s, 0.05
        while not (workers := self.routable(role)):
            starting = any(w.state is WorkerState.STARTING for w in self.members(role))
            if not starting or loop.time() >= deadline:
                return []
            await asyncio.sleep(delay)  # a replacement is loading its model: seconds, rare
            delay = min(2 * delay, 0.5)
        return workers

    # ---- health and load -------------------------------------------------------------
    async def refresh(self) -> None:
        """Ask every worker for its engine snapshot. One whose actor died is DEAD and leaves
        the pools; one that is only slow to answer (a long prefill step) keeps its place."""
        for w in self.members():  # a replacement whose start-up task was cut off: resume it
            if w.activating is not None and w.activating.done() and w.state is WorkerState.STARTING:
                self._start_in_background(w)
        members = [w for w in self.members() if w.state is not WorkerState.STARTING]
        timeout = self.config.health_timeout_s
        snaps = await asyncio.gather(
            *(asyncio.wait_for(w.actor.status.remote(), timeout) for w in members),
            return_exceptions=True,
        )
        for worker, snap in zip(members, snaps, strict=True):
            if isinstance(snap, ray.exceptions.ActorDiedError):
                self.lost(worker)
            elif isinstance(snap, BaseException):
                log.warning("%s did not answer its health check: %r", worker.name, snap)
            else:
                worker.observe(snap)

    def healthy(self) -> bool:
        return all(self.routable(role) for role in self.config.roles)

    def shutdown(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for worker in list(self.workers.values()):
            with contextlib.suppress(Exception):  # best effort; the kill below is what counts
                ray.get(worker.actor.shutdown.remote(), timeout=10)
            self._remove(worker)
