"""The gRPC API: `splitserve.v1.Generation/Generate`, plus grpc.health.v1 and server reflection.

GenerateRequest ──check (router.limits)──> INVALID_ARGUMENT / NOT_FOUND (one-line details)
    └──> stream_text(backend) ──> GenerateResponse per delta (text, token ids, logprobs)
         last message: finish_reason + usage
client cancels: the handler task is cancelled, which closes the stream: request aborted

The request id the engine sees is always the server's own (`grpc-<uuid>`): a client's
`request_id` could collide with another client's. A client's id is only echoed back in its
own responses' `request_id` (the server's id when it sends none).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.sampling_params import SamplingParams
from router import limits as lim
from router.backend import Backend, validate_prompt
from router.detokenize import TextDelta, stream_text, token_text
from router.metrics import RouterMetrics
from router.protocol import api_error
from splitserve_proto import generation_pb2 as pb
from splitserve_proto import generation_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # splitserve.v1.Generation
_ENDPOINT = "grpc:Generate"
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(
        self, backend: Backend, metrics: RouterMetrics, limits: lim.RequestLimits | None = None
    ):
        self._backend, self._metrics = backend, metrics
        self._limits = limits or lim.RequestLimits()

    async def Generate(  # noqa: N802 - the RPC's name
        self, request: pb.GenerateRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        tracker = self._metrics.track(_ENDPOINT)
        try:
            if isinstance(request, MalformedRequest):
                raise lim.LimitError("request", request.reason)
            ids, params = self._check(request)
        except Exception as exc:  # bad input: a status code and a one-line reason
            code, details = _status(exc)
            tracker.finish(code.name)
            await context.abort(code, details)  # raises
            return
        rid = f"grpc-{uuid.uuid4().hex}"
        echo_id = request.request_id or rid
        status, last = "CANCELLED", None
        try:
            # the call's own deadline is the request's (DEADLINE_EXCEEDED after it)
            deadline = context.time_remaining()
            deltas = stream_text(self._backend, rid, ids, params, tracker, deadline)
            async with aclosing(deltas):
                async for last in deltas:
                    if last.finish_reason == "error":
                        status = grpc.StatusCode.INTERNAL.name
                        await context.abort(grpc.StatusCode.INTERNAL, "a worker failed")
                    yield self._response(echo_id, last)
            status = grpc.StatusCode.OK.name
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # e.g. overloaded: the mapped status, not UNKNOWN
            code, details = _status(exc)
            status = code.name
            await context.abort(code, details)
        finally:
            n_in, n_out = (last.num_prompt_tokens, last.num_output_tokens) if last else (0, 0)
            tracker.finish(status, n_in, n_out, last.finish_reason if last else None)

    def _check(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the engine params; raises on anything out of bounds."""
        lim.check_model(self._backend, request.model)
        lim.check_text("request_id", request.request_id, self._limits.max_request_id_chars)
        ids = self._prompt_ids(request)
        validate_prompt(self._backend, ids)
        return ids, self._sampling_params(request.sampling)

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        tok = self._backend.tokenizer
        if kind == "text":
            return tok.encode(request.text)
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "chat":
            if not request.chat.messages:
                raise lim.LimitError("chat", "chat has no messages")
            for i, m in enumerate(request.chat.messages):
                lim.check_role(i, m.role)
            return tok.encode_chat(
                [{"role": m.role, "content": m.content} for m in request.chat.messages]
            )
        raise lim.LimitError("prompt", "prompt is missing: set one of text, token_ids, chat")

    def _sampling_params(self, s: pb.SamplingOptions) -> SamplingParams:
        values: dict[str, Any] = {
            "max_tokens": s.max_tokens if s.HasField("max_tokens") else 16,
            "temperature": s.temperature if s.HasField("temperature") else 1.0,
            "top_p": s.top_p if s.HasField("top_p") else 1.0,
            "top_k": s.top_k if s.HasField("top_k") else -1,
            "seed": s.seed if s.HasField("seed") else None,
            "stop": tuple(s.stop),
            "logprobs": s.logprobs if s.HasField("logprobs") else None,
        }
        backend = self._backend
        lim.check_sampling(self._limits, backend.max_model_len, backend.vocab_size, **values)
        return SamplingParams(**values, ignore_eos=s.ignore_eos)

    def _response(self, rid: str, d: TextDelta) -> pb.GenerateResponse:
        out = pb.GenerateResponse(
            request_id=rid, text=d.text, token_ids=d.token_ids, finish_reason=d.finish_reason or ""
        )
        if d.finish_reason is not None:
            out.usage.prompt_tokens = d.num_prompt_tokens
            out.usage.completion_tokens = d.num_output_tokens
        tok = self._backend.tokenizer
        for lp in d.logprobs or []:
            entry = out.logprobs.add(
                token_id=lp.token_id, token=token_text(tok, lp.token_id), logprob=lp.logprob or 0.0
            )
            for token_id, logprob in lp.top_logprobs or []:
                entry.top_logprobs.add(
                    token_id=token_id, token=token_text(tok, token_id), logprob=logprob
                )
        return out


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code `exc` maps to and a one-line reason."""
    err = api_error(exc)
    return _CODES.get(err.status, grpc.StatusCode.INTERNAL), lim.clip(err.message, 500)


class BackendHealth(health.aio.HealthServicer):
    """grpc.health.v1: SERVING while the backend says it is healthy, checked on every Check."""

    def __init__(self, backend: Backend):
        super().__init__()
        self._backend = backend

    async def Check(  # noqa: N802 - the RPC's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        ok = await self._backend.healthy()
        serving = health_pb2.HealthCheckResponse
        status = serving.SERVING if ok else serving.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.set(service, status)
        return await super().Check(request, context)


class MalformedRequest:
    """Bytes that are not a GenerateRequest (bad wire format, invalid UTF-8 in a string)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parse_request(raw: bytes) -> pb.GenerateRequest | MalformedRequest:
    """Parse in the servicer's hands, so a message that does not parse is INVALID_ARGUMENT
    (grpc answers UNKNOWN when its deserializer raises)."""
    try:
        return pb.GenerateRequest.FromString(raw)
    except DecodeError as exc:
        return MalformedRequest(f"the request is not a GenerateRequest: {str(exc)[:200]}")


def _add_generation(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_parse_request,
            response_serializer=pb.GenerateResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def create_grpc_server(
    backend: Backend,
    port: int,
    host: str = "127.0.0.1",
    metrics: RouterMetrics | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> grpc.aio.Server:
    """A bound, not yet started server (`await server.start()`); call inside the serving loop.
    `interceptors` run before every call (access control); `credentials`: TLS."""
    server = grpc.aio.server(interceptors=list(interceptors))
    metrics = metrics or RouterMetrics(backend.model_name)
    _add_generation(GenerationServicer(backend, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(BackendHealth(backend), server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)
    return server
