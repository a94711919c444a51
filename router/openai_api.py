"""The OpenAI-compatible HTTP API (FastAPI; bodies decoded and encoded with msgspec).

POST /v1/completions, /v1/chat/completions
    decode + validate (400/404 OpenAI error body) -> tokenize -> stream_text(backend)
    stream: SSE `data: {chunk}` ... `data: [DONE]`; client gone -> request aborted
    else:   one JSON body with usage
GET /v1/models, /health, /metrics (Prometheus), /status (the backend's own report)
POST /admin/scale (router.admin_api)
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from router.admin_api import add_admin_routes
from router.backend import Backend, validate_prompt
from router.detokenize import TextDelta, stream_text
from router.metrics import RequestTracker, RouterMetrics
from router.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    api_error,
    chat_logprobs,
    chat_prompt_ids,
    check_model,
    completion_logprobs,
    completion_prompt_ids,
    sampling_params,
)

log = logging.getLogger(__name__)
_JSON = "application/json"
_COMPLETIONS, _CHAT = "/v1/completions", "/v1/chat/completions"


def create_app(backend: Backend, metrics: RouterMetrics | None = None) -> FastAPI:
    metrics = metrics or RouterMetrics()
    app = FastAPI(title="splitserve", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.backend, app.state.metrics = backend, metrics
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)  # unknown route, wrong method
    @app.exception_handler(Exception)  # a failure outside the generation routes' own handling
    async def http_error(_: Request, exc: Exception) -> Response:
        return _error_response(api_error(exc))

    @app.post(_COMPLETIONS)
    async def completions(request: Request) -> Response:
        tracker = metrics.track(_COMPLETIONS)
        try:
            req = msgspec.json.decode(await request.body(), type=CompletionRequest)
            return await _completions(backend, req, tracker)
        except Exception as exc:  # every failure becomes an OpenAI error body
            return _fail(exc, tracker)

    @app.post(_CHAT)
    async def chat_completions(request: Request) -> Response:
        tracker = metrics.track(_CHAT)
        try:
            req = msgspec.json.decode(await request.body(), type=ChatCompletionRequest)
            return await _chat(backend, req, tracker)
        except Exception as exc:
            return _fail(exc, tracker)

    @app.get("/v1/models")
    async def models() -> Response:
        card = ModelCard(backend.model_name, created, max_model_len=backend.max_model_len)
        return _json(ModelList([card]))

    @app.get("/health")
    async def health() -> Response:
        ok = await backend.healthy()
        return Response(
            b'{"status":"ok"}' if ok else b'{"status":"unhealthy"}',
            status_code=200 if ok else 503,
            media_type=_JSON,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/status")
    async def status() -> Response:
        return Response(msgspec.json.encode(await backend.status()), media_type=_JSON)

    add_admin_routes(app, backend)
    return app


# ---- the two endpoints -------------------------------------------------------------------


async def _completions(
    backend: Backend, req: CompletionRequest, tracker: RequestTracker
) -> Response:
    check_model(backend, req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    ids = completion_prompt_ids(backend, req.prompt)
    validate_prompt(backend, ids)
    params = sampling_params(req, 16 if req.max_tokens is None else req.max_tokens, req.logprobs)
    rid, now, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), backend.model_name
    deltas = stream_text(backend, rid, ids, params, tracker)
    tok, offset = backend.tokenizer, [0]

    def choice(d: TextDelta) -> CompletionChoice:
        lp = completion_logprobs(tok, d.logprobs, offset) if d.logprobs is not None else None
        return CompletionChoice(0, d.text, d.finish_reason, lp)

    if req.stream:

        def chunk(d: TextDelta) -> CompletionResponse | None:
            if not (d.text or d.logprobs or d.finish_reason):
                return None
            return CompletionResponse(rid, now, model, [choice(d)])

        def usage_chunk(u: Usage) -> CompletionResponse:
            return CompletionResponse(rid, now, model, [], usage=u)

        return _sse(deltas, [], chunk, usage_chunk if _include_usage(req) else None, tracker)
    whole, usage = await _collect(deltas, tracker)
    return _json(CompletionResponse(rid, now, model, [choice(whole)], usage))


async def _chat(backend: Backend, req: ChatCompletionRequest, tracker: RequestTracker) -> Response:
    check_model(backend, req.model)
    ids = chat_prompt_ids(backend, req.messages)
    validate_prompt(backend, ids)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    max_tokens = next(
        (m for m in (req.max_completion_tokens, req.max_tokens) if m is not None),
        backend.max_model_len - len(ids),  # OpenAI's default: up to the context
    )
    params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    rid, now, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), backend.model_name
    deltas = stream_text(backend, rid, ids, params, tracker)
    tok = backend.tokenizer

    def logprobs(d: TextDelta) -> Any:
        return chat_logprobs(tok, d.logprobs) if d.logprobs is not None else None

    if req.stream:
        head = ChatCompletionChunk(
            rid, now, model, [ChatChunkChoice(0, ChatDelta("assistant", ""))]
        )

        def chunk(d: TextDelta) -> ChatCompletionChunk | None:
            if not (d.text or d.logprobs or d.finish_reason):
                return None
            delta = ChatDelta(content=d.text or None)
            return ChatCompletionChunk(
                rid, now, model, [ChatChunkChoice(0, delta, d.finish_reason, logprobs(d))]
            )

        def usage_chunk(u: Usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(rid, now, model, [], usage=u)

        return _sse(deltas, [head], chunk, usage_chunk if _include_usage(req) else None, tracker)
    whole, usage = await _collect(deltas, tracker)
    choice = ChatChoice(0, AssistantMessage(whole.text), whole.finish_reason, logprobs(whole))
    return _json(ChatCompletionResponse(rid, now, model, [choice], usage))


def _include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


# ---- assembling and streaming -------------------------------------------------------------


def _usage(d: TextDelta) -> Usage:
    return Usage(
        d.num_prompt_tokens, d.num_output_tokens, d.num_prompt_tokens + d.num_output_tokens
    )


async def _collect(
    deltas: AsyncGenerator[TextDelta, None], tracker: RequestTracker
) -> tuple[TextDelta, Usage]:
    """The whole request as one delta."""
    whole = TextDelta("", [], None, None, 0, 0)
    async with aclosing(deltas):
        async for d in deltas:
            whole.text += d.text
            whole.token_ids += d.token_ids
            if d.logprobs is not None:
                whole.logprobs = (whole.logprobs or []) + d.logprobs
            whole.finish_reason = d.finish_reason
            whole.num_prompt_tokens, whole.num_output_tokens = (
                d.num_prompt_tokens,
                d.num_output_tokens,
            )
    if whole.finish_reason == "error":
        raise RuntimeError("generation failed on a worker")
    tracker.finish("200", whole.num_prompt_tokens, whole.num_output_tokens)
    return whole, _usage(whole)


class _SSEResponse(StreamingResponse):
    """Closes its event generator on every exit (done, client gone, cancelled)."""

    def __init__(self, events: AsyncGenerator[bytes, None], tracker: RequestTracker):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events, self._tracker = events, tracker

    async def stream_response(self, send: Any) -> None:
        try:
            async with aclosing(self._events):
                await super().stream_response(send)
        finally:  # a no-op unless the client left before the first event
            self._tracker.finish("499")


def _sse(
    deltas: AsyncGenerator[TextDelta, None],
    head: list[msgspec.Struct],
    chunk: Callable[[TextDelta], msgspec.Struct | None],
    usage_chunk: Callable[[Usage], msgspec.Struct] | None,
    tracker: RequestTracker,
) -> Response:
    async def events() -> AsyncGenerator[bytes, None]:
        status, last = "499", None  # 499: the client went away before the end
        try:
            for h in head:
                yield _event(h)
            async with aclosing(deltas):
                async for last in deltas:
                    if last.finish_reason == "error":
                        raise RuntimeError("generation failed on a worker")
                    if (c := chunk(last)) is not None:
                        yield _event(c)
            if usage_chunk is not None and last is not None:
                yield _event(usage_chunk(_usage(last)))
            status = "200"
        except Exception as exc:  # headers are gone: report in-stream, as OpenAI does
            err = api_error(exc)
            status = str(err.status)
            if err.status >= 500:
                log.error("streaming request failed", exc_info=exc)
            yield _event(ErrorResponse(err.body()))
        finally:
            n_in, n_out = (last.num_prompt_tokens, last.num_output_tokens) if last else (0, 0)
            tracker.finish(status, n_in, n_out)
        yield b"data: [DONE]\n\n"

    return _SSEResponse(events(), tracker)


def _event(body: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


def _json(body: msgspec.Struct, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type=_JSON)


def _error_response(err: APIError) -> Response:
    response = _json(ErrorResponse(err.body()), err.status)
    response.headers.update(err.headers)
    return response


def _fail(exc: Exception, tracker: RequestTracker) -> Response:
    err = api_error(exc)
    if err.status >= 500:
        log.exception("request failed", exc_info=exc)
    tracker.finish(str(err.status))
    return _error_response(err)
