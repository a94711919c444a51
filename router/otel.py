"""Request traces as OpenTelemetry spans, exported over OTLP (HTTP/protobuf) when asked for
(`splitserve serve --otlp-endpoint http://collector:4318`); off by default.

One finished request becomes one trace: a root span `splitserve.request` from its arrival to
its last token, with a child span per hop (router.trace: router_queue, reservation,
prefill_queue, prefill_compute, kv_tail, return, deliver, kv_transfer, decode_queue,
decode), each at the times its marks were taken, on whichever process took them. Spans are
built after the request ends (from its marks), so a request pays nothing for tracing
while it runs; the SDK's batch processor sends them off the event loop.
"""

from __future__ import annotations

from collections.abc import Callable

from router.trace import Trace, hop_bounds

SERVICE = "splitserve"


def otlp_exporter(endpoint: str, service: str = SERVICE) -> Callable[[Trace], None]:
    """A function that exports a finished Trace to the OTLP/HTTP collector at `endpoint`
    (its base URL: spans go to `<endpoint>/v1/traces`)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    url = endpoint.rstrip("/") + "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    tracer = provider.get_tracer("splitserve.router")

    def export(trace: Trace) -> None:
        emit(tracer, trace)

    export.provider = provider  # type: ignore[attr-defined]  # flush/shutdown for callers
    return export


def emit(tracer, trace: Trace) -> None:
    """The request's spans on `tracer`: a root and one child per measured hop."""
    from opentelemetry import trace as api

    marks = trace.marks
    if "arrival" not in marks or "finished" not in marks:
        return
    attrs = {
        "splitserve.request_id": trace.request_id,
        "splitserve.mode": trace.mode,
        "splitserve.engine": trace.engine,
        "splitserve.prefill": trace.prefill,
        "splitserve.attempts": trace.attempts,
        "splitserve.kv_bytes": trace.kv_bytes,
        "splitserve.kv_pages": trace.kv_pages,
    }
    root = tracer.start_span("splitserve.request", start_time=_ns(marks["arrival"]),
                             attributes=attrs)  # fmt: skip
    context = api.set_span_in_context(root)
    for hop, (start, end) in hop_bounds(trace).items():
        span = tracer.start_span(f"splitserve.{hop}", context=context, start_time=_ns(start))
        span.end(end_time=_ns(end))
    root.end(end_time=_ns(marks["finished"]))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
