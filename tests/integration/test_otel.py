"""Request traces as OpenTelemetry spans over OTLP/HTTP, received by a real HTTP endpoint
that decodes OTLP's protobuf (what a collector does)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from local_server import ServerThread
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tiny_model import make_tiny_checkpoint

from bench.server_process import free_port
from router.metrics import RouterMetrics
from router.otel import otlp_exporter

MODEL = "tiny-llama"


class _Collector(BaseHTTPRequestHandler):
    spans: list = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                type(self).spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def collector():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_request_becomes_a_root_span_with_a_child_per_hop(collector, tmp_path) -> None:
    export = otlp_exporter(collector)
    metrics = RouterMetrics(MODEL, exporter=export)
    srv = ServerThread.for_checkpoint(make_tiny_checkpoint(tmp_path), MODEL, metrics=metrics)
    try:
        body = {"model": MODEL, "prompt": "spans of", "max_tokens": 5}
        rid = httpx.post(srv.url + "/v1/completions", json=body, timeout=30).json()["id"]
    finally:
        srv.stop()
    export.provider.force_flush()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while not _Collector.spans and time.monotonic() < deadline:
        time.sleep(0.05)
    roots = [s for s in _Collector.spans if s.name == "splitserve.request"]
    assert len(roots) == 1
    root = roots[0]
    attrs = {a.key: a.value.string_value or a.value.int_value for a in root.attributes}
    assert attrs["splitserve.request_id"] == rid and attrs["splitserve.engine"] == "local-0"
    children = {s.name: s for s in _Collector.spans if s.parent_span_id == root.span_id}
    ttft_hops = ["router_queue", "worker_queue", "prefill_compute", "deliver"]
    assert set(children) == {f"splitserve.{h}" for h in [*ttft_hops, "decode"]}
    assert all(c.trace_id == root.trace_id for c in children.values())
    for child in children.values():  # inside the root, in time
        assert root.start_time_unix_nano <= child.start_time_unix_nano
        assert child.start_time_unix_nano <= child.end_time_unix_nano <= root.end_time_unix_nano
    trace = metrics.traces.get(rid)
    assert trace is not None
    ttft_ns = sum(
        children[f"splitserve.{h}"].end_time_unix_nano
        - children[f"splitserve.{h}"].start_time_unix_nano
        for h in ttft_hops
    )
    assert ttft_ns / 1e9 == pytest.approx(trace.ttft_s, abs=1e-5)  # the hops tile TTFT
