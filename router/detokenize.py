"""Text assembly in the router: token ids from the workers -> text deltas for the client.

    backend.generate ──TokenDelta(ids)──> IncrementalDetokenizer (whole UTF-8 characters)
        ──> stop-string check: text before the first stop string goes out; a tail that could
            still grow into a stop string is held back, so a stop string never leaks
        ──> TextDelta(text, ids, logprobs, finish_reason)
    stop string hit: finish_reason "stop", the backend iterator is closed (request aborted)
    iterator closed early by the front end (client gone): the backend iterator is closed too

Stop strings are the router's job: the workers are sent the params without them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from engine.engine_loop import TokenDelta
from engine.errors import DeadlineExceededError
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from router.backend import Backend
from router.metrics import RequestTracker


class TextAssembler:
    """One request's output text, released as far as no stop string can still start in it."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        include_stop_str: bool = False,
    ):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = tuple(stop)
        self._include_stop = include_stop_str
        self._held = ""  # decoded text not yet released
        self.stopped = False  # a stop string was found; nothing more comes out

    def push(self, token_id: int) -> str:
        """The text `token_id` releases ("" while held back)."""
        if self.stopped:
            return ""
        self._held += self._detok.push(token_id)
        return self._release()

    def finish(self, flush_partial_char: bool) -> str:
        """The held tail at the end of the request (and an incomplete character, as U+FFFD)."""
        if self.stopped:
            return ""
        if flush_partial_char:
            self._held += self._detok.flush()
        text = self._release()
        if not self.stopped:
            text, self._held = text + self._held, ""
        return text

    def _release(self) -> str:
        hits = [(i, s) for s in self._stop if (i := self._held.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            self.stopped = True
            text = self._held[: i + len(s)] if self._include_stop else self._held[:i]
            self._held = ""
            return text
        keep = self._stop_prefix_len(self._held)
        text, self._held = (
            self._held[: len(self._held) - keep],
            self._held[len(self._held) - keep :],
        )
        return text

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


@dataclass(slots=True)
class TextDelta:
    text: str
    token_ids: list[int]
    logprobs: list[SampledToken] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int  # so far, including these


async def stream_text(
    backend: Backend,
    request_id: str,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    tracker: RequestTracker | None = None,
    deadline_s: float | None = None,
) -> AsyncGenerator[TextDelta, None]:
    """Generate on `backend`, yielding text deltas; closing this iterator aborts the request.
    `deadline_s`: seconds the request may take (DeadlineExceededError after)."""
    assembler = TextAssembler(
        backend.tokenizer, prompt_ids, params.stop, params.include_stop_str_in_output
    )
    worker_params = dataclasses.replace(params, stop=(), include_stop_str_in_output=False)
    num_out = 0
    generating = backend.generate(request_id, prompt_ids, worker_params)
    async with _closing(_within(generating, deadline_s)) as deltas:
        async for delta in deltas:
            text, ids = "", []
            for token_id in delta.token_ids:
                ids.append(token_id)
                text += assembler.push(token_id)
                if assembler.stopped:
                    break
            num_out += len(ids)
            reason = "stop" if assembler.stopped else delta.finish_reason
            if reason is not None and not assembler.stopped:
                text += assembler.finish(flush_partial_char=reason == "length")
                reason = "stop" if assembler.stopped else reason
            logprobs = delta.logprobs[: len(ids)] if delta.logprobs is not None else None
            if tracker is not None:
                tracker.on_trace(delta.trace)
                tracker.on_tokens(len(ids))
            yield TextDelta(text, ids, logprobs, reason, len(prompt_ids), num_out)
            if reason is not None:
                return  # leaving the `async with` closes (aborts) a request still running


async def _within(
    deltas: AsyncIterator[TokenDelta], deadline_s: float | None
) -> AsyncGenerator[TokenDelta, None]:
    """The backend's deltas until the request's deadline (if it has one): then the pending
    wait (for KV room, the prefill, the next token) is cancelled, the backend's iterator
    closed (the request aborted on every worker) and DeadlineExceededError raised."""
    try:
        if deadline_s is None:
            async for delta in deltas:
                yield delta
            return
        aio = asyncio.get_running_loop()
        end = aio.time() + deadline_s
        while True:
            try:
                delta = await asyncio.wait_for(anext(deltas), max(0.0, end - aio.time()))
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceededError("the request's deadline passed") from None
            yield delta
    finally:
        aclose = getattr(deltas, "aclose", None)
        if aclose is not None:
            await aclose()


async def primed(deltas: AsyncGenerator[TextDelta, None]) -> AsyncGenerator[TextDelta, None]:
    """Wait for the first delta before anything is sent, so that a request refused or lost
    before its first token (429 overloaded, 503 unavailable, 408 deadline) gets its own
    HTTP status, not a 200 whose stream carries the error."""
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await deltas.aclose()
        raise

    async def chained() -> AsyncGenerator[TextDelta, None]:
        async with _closing(deltas):
            if first is not None:
                yield first
            async for delta in deltas:
                yield delta

    return chained()


@asynccontextmanager
async def _closing(it: AsyncIterator[Any]) -> AsyncGenerator[AsyncIterator[Any], None]:
    """Close the backend's iterator on every exit (closing an unfinished one aborts it)."""
    try:
        yield it
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """How one token reads on its own (logprobs); special tokens keep their text."""
    return tokenizer.decode([token_id], skip_special_tokens=False)
