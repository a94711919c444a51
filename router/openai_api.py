"""The OpenAI-compatible HTTP API (FastAPI; bodies decoded and encoded with msgspec).

POST /v1/completions, /v1/chat/completions
    body over RequestLimits.max_body_bytes -> 413 (the rest is not read; the connection stays)
    decode + check (router.limits: 400/404 OpenAI error body) -> tokenize -> stream_text(backend)
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

from router import limits as lim
from router.admin_api import add_admin_routes
from router.backend import Backend, validate_prompt
from router.detokenize import TextDelta, primed, stream_text
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
    completion_logprobs,
    decode_request,
)

log = logging.getLogger(__name__)
_JSON = "application/json"
_COMPLETIONS, _CHAT = "/v1/completions", "/v1/chat/completions"


def create_app(backend: Backend, metrics: RouterMetrics | None = None) -> FastAPI:
    metrics = metrics or RouterMetrics(backend.model_name)
    app = FastAPI(title="splitserve", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.backend, app.state.metrics = backend, metrics
    app.state.limits = lim.RequestLimits()
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)  # unknown route, wrong method
    @app.exception_handler(Exception)  # a failure outside the generation routes' own handling
    async def http_error(_: Request, exc: Exception) -> Response:
        return _error_response(api_error(exc))

    @app.post(_COMPLETIONS)
    async def completions(request: Request) -> Response:
        tracker, limits = metrics.track(_COMPLETIONS), app.state.limits
        try:
            req = decode_request(await _body(request, limits), CompletionRequest)
            return await _completions(backend, limits, req, tracker)
        except Exception as exc:  # every failure becomes an OpenAI error body
            return _fail(exc, tracker)

    @app.post(_CHAT)
    async def chat_completions(request: Request) -> Response:
        tracker, limits = metrics.track(_CHAT), app.state.limits
        try:
            req = decode_request(await _body(request, limits), ChatCompletionRequest)
            return await _chat(backend, limits, req, tracker)
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
        try:  # the per-worker series come from the workers' snapshots, read now
            metrics.observe_status(await backend.status())
        except Exception as exc:  # noqa: BLE001 - a scrape still gets the router's series
            log.warning("metrics: no worker snapshot this scrape: %r", exc)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/debug/trace/{request_id}")
    async def trace(request_id: str) -> Response:
        """One finished request's hop-by-hop timeline (router.trace); behind the API key."""
        found = metrics.traces.get(request_id)
        if found is None:
            err = APIError(404, f"no trace for request {request_id!r} (only the last "
                           f"{metrics.traces.capacity} finished requests are kept)",
                           code="trace_not_found")  # fmt: skip
            return _error_response(err)
        return Response(msgspec.json.encode(found.to_json()), media_type=_JSON)

    @app.get("/status")
    async def status() -> Response:
        return Response(msgspec.json.encode(await backend.status()), media_type=_JSON)

    add_admin_routes(app, backend)
    return app


# ---- the two endpoints -------------------------------------------------------------------


async def _body(request: Request, limits: lim.RequestLimits) -> bytes:
    """The request body, or 413 as soon as it is known to pass the limit."""
    limit = limits.max_body_bytes
    too_large = APIError(
        413, f"request body is larger than {limit} bytes", code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _completions(
    backend: Backend, limits: lim.RequestLimits, req: CompletionRequest, tracker: RequestTracker
) -> Response:
    lim.check_request(req, limits)
    lim.check_model(backend, req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    ids = lim.completion_prompt_ids(backend, req.prompt)
    validate_prompt(backend, ids)
    params = lim.completion_sampling_params(req, backend, limits)
    rid, now, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), backend.model_name
    deltas = stream_text(backend, rid, ids, params, tracker, req.deadline_s)
    if req.stream:  # refused or lost before the first token: its own status, not a 200
        deltas = await primed(deltas)
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


async def _chat(
    backend: Backend, limits: lim.RequestLimits, req: ChatCompletionRequest, tracker: RequestTracker
) -> Response:
    lim.check_request(req, limits)
    lim.check_model(backend, req.model)
    ids = lim.chat_prompt_ids(backend, req.messages)
    validate_prompt(backend, ids)
    params = lim.chat_sampling_params(req, backend, limits, len(ids))
    rid, now, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), backend.model_name
    deltas = stream_text(backend, rid, ids, params, tracker, req.deadline_s)
    if req.stream:
        deltas = await primed(deltas)
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
    return req.stream_options is not None and bool(req.stream_options.include_usage)


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
    tracker.finish("200", whole.num_prompt_tokens, whole.num_output_tokens, whole.finish_reason)
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
            tracker.finish(status, n_in, n_out, last.finish_reason if last else None)
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
