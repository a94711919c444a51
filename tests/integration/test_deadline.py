"""The per-request deadline: HTTP `deadline_s` (an extension field) and a gRPC call's own
deadline end a request that runs past them (408 / DEADLINE_EXCEEDED), free its KV, and
leave the server serving; a request inside its deadline is untouched."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest
from local_server import ServerThread
from tiny_model import make_tiny_checkpoint

from splitserve_proto import generation_pb2 as pb
from splitserve_proto import generation_pb2_grpc as pb_grpc

MODEL = "tiny-llama"
LONG = {"max_tokens": 250, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_position_embeddings=512)
    srv = ServerThread.for_checkpoint(path, MODEL)
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
        yield c
        deadline = time.monotonic() + 10
        while c.get("/status").json()["workers"][0]["kv_blocks_used"]:
            assert time.monotonic() < deadline, "KV still held after the deadline"
            time.sleep(0.05)


def test_http_request_past_its_deadline_gets_408(http):
    r = http.post("/v1/completions", json={"prompt": "a b c", "deadline_s": 0.01, **LONG})
    assert r.status_code == 408
    assert r.json()["error"]["code"] == "deadline_exceeded"
    ok = http.post("/v1/completions", json={"prompt": "a b c", "deadline_s": 60, **LONG})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 250


def test_a_stream_past_its_deadline_ends_with_an_error_event(http):
    body = {"prompt": "a b c", "deadline_s": 0.05, "stream": True, **LONG}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    if r.status_code == 200:  # the first token came in time: the error comes in the stream
        assert '"deadline_exceeded"' in lines[-2] and lines[-1] == "data: [DONE]"
    else:
        assert r.status_code == 408


@pytest.mark.parametrize("bad", [0, -1, 1e9, "soon"])
def test_a_bad_deadline_is_a_400(http, bad):
    r = http.post("/v1/completions", json={"prompt": "a", "deadline_s": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "deadline_s"


def test_grpc_call_deadline_is_the_request_deadline(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        sampling = pb.SamplingOptions(max_tokens=250, ignore_eos=True, temperature=0)
        request = pb.GenerateRequest(text="a b c", sampling=sampling)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=0.05))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        out = list(stub.Generate(request, timeout=60))
        assert out[-1].usage.completion_tokens == 250
