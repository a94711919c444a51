"""The client APIs' access rules enforced: the API key and the drain gate (router.access)
on every HTTP request and gRPC call; TLS credentials for the gRPC API.

HTTP request ── open path (GET/HEAD /health, /metrics)? ──────────────────────> app
    └── `Authorization: Bearer <key>` wrong or missing ──> 401 invalid_api_key
        └── /v1/* or /admin/* while draining ──> 503 shutting_down
            └── admitted: in flight until its whole response (an SSE body too) is sent
gRPC call: metadata `authorization: Bearer <key>`, else UNAUTHENTICATED; grpc.health.v1
    needs no key (NOT_SERVING while draining); splitserve.v1.Generation while draining:
    UNAVAILABLE, else admitted and in flight until its stream ends

"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

import grpc
import msgspec
from grpc_health.v1 import health_pb2
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.errors import SplitServeError
from router.access import Gate, KeyCheck
from router.protocol import APIError, ErrorResponse

OPEN_PATHS = frozenset({"/health", "/metrics"})  # load balancers and Prometheus send no key
GATED_PREFIXES = ("/v1/", "/admin/")
_GRPC_HEALTH = "/grpc.health.v1.Health/"
_GRPC_GENERATION = "/splitserve.v1.Generation/"
_MISSING = "missing API key: send the header `Authorization: Bearer <key>`"
_WRONG = "incorrect API key"
_SHUTTING_DOWN = "the server is shutting down; send the request to another replica"


# ---- HTTP --------------------------------------------------------------------------------


class HTTPAccess:
    """ASGI middleware in front of the OpenAI app: the key check, then the gate."""

    def __init__(self, app: ASGIApp, gate: Gate, api_key: str | None = None):
        self.app, self.gate = app, gate
        self._check = KeyCheck(api_key) if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan (the app serves no websockets)
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in OPEN_PATHS and scope["method"] in ("GET", "HEAD"):
            if path == "/health" and self.gate.draining:
                await _draining_health()(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if self._check is not None and not self._check.accepts(_header(scope, b"authorization")):
            missing = _header(scope, b"authorization") is None
            await _unauthorized(_MISSING if missing else _WRONG)(scope, receive, send)
            return
        if not path.startswith(GATED_PREFIXES):
            await self.app(scope, receive, send)
        elif not self.gate.enter():
            await _shutting_down()(scope, receive, send)
        else:
            try:  # returns once the whole body is sent: a stream counts to its last event
                await self.app(scope, receive, send)
            finally:
                self.gate.leave()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _error(err: APIError) -> Response:
    body = msgspec.json.encode(ErrorResponse(err.body()))
    return Response(body, err.status, err.headers, media_type="application/json")


def _unauthorized(message: str) -> Response:
    headers = {"WWW-Authenticate": "Bearer"}
    return _error(APIError(401, message, code="invalid_api_key", headers=headers))


def _shutting_down() -> Response:
    err = APIError(503, _SHUTTING_DOWN, type="server_error", code="shutting_down")
    err.headers["Connection"] = "close"
    return _error(err)


def _draining_health() -> Response:
    headers = {"Connection": "close"}
    return Response(b'{"status":"draining"}', 503, headers, media_type="application/json")


# ---- gRPC --------------------------------------------------------------------------------


class GRPCAccess(grpc.aio.ServerInterceptor):
    """The same rules for gRPC: the key in metadata, then the gate on Generation calls."""

    def __init__(self, gate: Gate, api_key: str | None = None):
        self.gate = gate
        self._check = KeyCheck(api_key) if api_key else None

    async def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        method: str = details.method
        if method.startswith(_GRPC_HEALTH):
            return _not_serving(handler) if self.gate.draining else handler
        if self._check is not None:
            presented = _metadata(details.invocation_metadata, "authorization")
            if not self._check.accepts(presented):
                status = grpc.StatusCode.UNAUTHENTICATED
                return _refusal(handler, status, _MISSING if presented is None else _WRONG)
        if method.startswith(_GRPC_GENERATION) and handler.unary_stream is not None:
            return self._counted(handler)
        return handler

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner, gate = handler.unary_stream, self.gate

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not gate.enter():
                await context.abort(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)
            try:
                async with aclosing(inner(request, context)) as responses:
                    async for response in responses:
                        yield response
            finally:
                gate.leave()

        return grpc.unary_stream_rpc_method_handler(
            admitted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _metadata(metadata: Sequence[Any] | None, name: str) -> str | None:
    for item in metadata or ():
        if item.key == name:
            return item.value if isinstance(item.value, str) else item.value.decode("latin-1")
    return None


_HANDLER_KINDS = {  # (request streaming, response streaming): its constructor
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `code`."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, response_serializer=handler.response_serializer)


def _not_serving(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Health checks answer NOT_SERVING while the server drains (Watch is refused)."""
    if handler.response_streaming:
        return _refusal(handler, grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN)

    async def check(_request: Any, _context: grpc.aio.ServicerContext) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)

    return grpc.unary_unary_rpc_method_handler(
        check, response_serializer=handler.response_serializer
    )


# ---- TLS ---------------------------------------------------------------------------------


def grpc_tls_credentials(cert: str | None, key: str | None) -> grpc.ServerCredentials | None:
    """Server credentials from a PEM certificate chain and its private key (both or neither);
    a one-line SplitServeError when one is missing, unreadable, or they do not match."""
    import ssl

    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise SplitServeError("--grpc-tls-cert and --grpc-tls-key go together: give both")
    pem = {}
    for flag, path in (("--grpc-tls-cert", cert), ("--grpc-tls-key", key)):
        try:
            with open(path, "rb") as f:
                pem[flag] = f.read()
        except OSError as exc:
            raise SplitServeError(f"cannot read {flag} {path}: {exc.strerror}") from None
    try:  # the stdlib parses both and checks that the key is the certificate's
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise SplitServeError(
            f"--grpc-tls-cert {cert} / --grpc-tls-key {key}: not a PEM certificate and its "
            f"unencrypted private key ({exc.reason or exc})"
        ) from None
    return grpc.ssl_server_credentials([(pem["--grpc-tls-key"], pem["--grpc-tls-cert"])])
