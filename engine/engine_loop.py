"""Runs an `LLMEngine` step loop on its own thread; other threads submit, abort and call in.

    submit(request, sink) ──> [commands] ──loop thread──> engine.add_request
    loop thread: engine.step() ──> TokenDelta per request ──> sink(delta)
    abort(id) ──> engine.abort: blocks freed, sink gets a final delta (finish_reason="abort")
    idle: the thread waits on a condition; any command wakes it (no sleep-polling)

`stream()` adapts a request to an asyncio async iterator; closing it early (a
client that went away) aborts the request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class TokenDelta:
    request_id: str
    token_ids: list[int] = field(default_factory=list)  # new since the previous delta
    logprobs: list[SampledToken] | None = None
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # so far, including these
    marks: dict[str, float] | None = None  # a sink's first delta: the worker's timing marks
    trace: Any = None  # in the router: the request's router.trace.Trace (never sent)


Sink = Callable[[TokenDelta], object]


class EngineLoop:
    """`engine` may be an LLMEngine or a function that makes one: then it is made on the loop
    thread (the constructor waits, and raises what it raised). Workers pass a function: an
    engine loaded on one thread and stepped on another ran its steps 1.6x slower here (bf16,
    2 threads: 71 vs 44 ms), as the two threads' OpenMP teams outnumber the cores and
    libgomp then puts its threads to sleep between parallel regions instead of spinning."""

    def __init__(
        self,
        engine: LLMEngine | Callable[[], LLMEngine],
        name: str = "engine-loop",
        layer_hook=None,
        prefill_only: bool = False,
    ):
        self.layer_hook = layer_hook  # see LLMEngine.step
        self.prefill_only = prefill_only  # a prefill worker's loop: stop at the first token
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._sinks: dict[str, Sink] = {}
        self._sent: dict[str, int] = {}
        self._unmarked: set[str] = set()  # sinks that have not had a delta yet
        self._stopped = False
        self.error: BaseException | None = None
        made: Future[None] | None = None
        if isinstance(engine, LLMEngine):
            self.engine = engine
        else:
            made = Future()
        self._thread = threading.Thread(
            target=self._run, args=(engine, made), name=name, daemon=True
        )
        self._thread.start()
        if made is not None:
            made.result()  # the engine is made (self.engine); raises what making it raised

    # ---- called from any thread ---------------------------------------------
    def submit(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, sink: Sink
    ) -> None:
        self.engine.validate_prompt(prompt_token_ids)  # bad input fails in the caller
        ids = list(prompt_token_ids)

        def add() -> None:
            self._sinks[request_id] = sink
            self._sent[request_id] = 0
            self._unmarked.add(request_id)
            self.engine.add_request(request_id, ids, params, prefill_only=self.prefill_only)

        self._post(add)

    def abort(self, request_id: str, before: Callable[[], object] | None = None) -> None:
        """End a request on the loop thread; `before()` runs first, in the same command (a
        decode worker drops its transfer there, so no block is freed while a transfer owns it)."""

        def do_abort() -> None:
            if before is not None:
                before()
            out = self.engine.abort(request_id)
            if out is not None:
                self._deliver(out)

        self._post(do_abort)

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run `fn(engine)` on the loop thread between steps; its result comes in a Future."""
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn(self.engine))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

        self._post(run)
        return fut

    def register_sink(self, request_id: str, sink: Sink, num_sent: int = 0) -> None:
        """For requests added by `call` (KV computed elsewhere): where their tokens go."""
        self._sinks[request_id] = sink
        self._sent[request_id] = num_sent
        self._unmarked.add(request_id)

    def land_remote(self, request_id: str, first: SampledToken) -> None:
        """A remote prefill's pages are all in: admit the request (decode worker)."""

        def land() -> None:
            out = self.engine.remote_kv_landed(request_id, first)
            if out is not None and out.finished:
                self._deliver(out)

        self._post(land)

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _post(self, command: Callable[[], None]) -> None:
        with self._cond:
            if self._stopped:
                raise RuntimeError("engine loop is stopped")
            self._commands.append(command)
            self._cond.notify()

    # ---- the loop thread ---------------------------------------------------------
    def _run(self, make: LLMEngine | Callable[[], LLMEngine], made: Future[None] | None) -> None:
        if made is not None:  # make the engine here, on the thread that steps it
            try:
                self.engine = make()  # type: ignore[operator]
            except BaseException as exc:  # noqa: BLE001 - raised in the constructor
                made.set_exception(exc)
                return
            made.set_result(None)
        try:
            while True:
                with self._cond:
                    while not self._stopped and not self._commands and not self._has_work():
                        self._cond.wait()
                    if self._stopped:
                        return
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                for out in self.engine.step(self.layer_hook):
                    self._deliver(out)
        except BaseException as exc:  # the loop must not die silently
            self.error = exc
            for rid in list(self._sinks):
                self._sinks.pop(rid)(TokenDelta(rid, finish_reason="error"))
            raise

    def _has_work(self) -> bool:
        return self.engine.scheduler.has_work()

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        sent = self._sent[out.request_id]
        delta = TokenDelta(
            out.request_id,
            out.token_ids[sent:],
            out.logprobs[sent:] if out.logprobs is not None else None,
            out.finish_reason,
            len(out.prompt_token_ids),
            len(out.token_ids),
        )
        if out.request_id in self._unmarked:  # its first delta: the worker's timing marks
            self._unmarked.discard(out.request_id)
            delta.marks = out.timings.wall_marks()
        self._sent[out.request_id] = len(out.token_ids)
        if out.finished:
            self._unmarked.discard(out.request_id)
            del self._sinks[out.request_id], self._sent[out.request_id]
        sink(delta)


async def stream(
    loop: EngineLoop, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
) -> AsyncGenerator[TokenDelta, None]:
    """Yield a request's deltas; leaving the iteration early aborts the request."""
    aio = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
    loop.submit(
        request_id,
        prompt_token_ids,
        params,
        lambda d: aio.call_soon_threadsafe(queue.put_nowait, d),
    )
    finished = False
    try:
        while not finished:
            delta = await queue.get()
            finished = delta.finish_reason is not None
            yield delta
    finally:
        if not finished:
            loop.abort(request_id)
