"""The gRPC API on a real port, driven by the generated stubs (plus health and reflection)."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from local_server import ServerThread
from tiny_model import make_tiny_checkpoint

from splitserve_proto import generation_pb2 as pb
from splitserve_proto import generation_pb2_grpc as pb_grpc

MODEL = "tiny-llama"
PROMPT = "Serving large language models means"
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = ServerThread.for_checkpoint(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), MODEL)
    yield {"http": srv.http_port, "grpc": srv.grpc_port}
    srv.stop()


@pytest.fixture(scope="module")
def channel(server: dict):
    with grpc.insecure_channel(f"127.0.0.1:{server['grpc']}") as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT_S)
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(channel)


def kv_used(server: dict) -> int:
    status = httpx.get(f"http://127.0.0.1:{server['http']}/status", timeout=TIMEOUT_S).json()
    return status["workers"][0]["kv_blocks_used"]


def test_generate_streams_what_http_returns(stub: pb_grpc.GenerationStub, server: dict) -> None:
    sampling = pb.SamplingOptions(max_tokens=12, temperature=0.0, ignore_eos=True)
    responses = list(
        stub.Generate(
            pb.GenerateRequest(model=MODEL, text=PROMPT, sampling=sampling), timeout=TIMEOUT_S
        )
    )
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
    }
    http = httpx.post(
        f"http://127.0.0.1:{server['http']}/v1/completions", json=body, timeout=TIMEOUT_S
    )
    want = http.json()
    assert len(responses) > 1  # streamed, not one message
    assert "".join(r.text for r in responses) == want["choices"][0]["text"]
    assert sum(len(r.token_ids) for r in responses) == 12
    last = responses[-1]
    assert last.finish_reason == "length" and all(not r.finish_reason for r in responses[:-1])
    assert last.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert last.usage.completion_tokens == 12


def test_token_ids_chat_and_logprobs(stub: pb_grpc.GenerationStub) -> None:
    sampling = pb.SamplingOptions(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)
    by_text = list(
        stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=sampling), timeout=TIMEOUT_S)
    )
    ids = [t for r in by_text for t in r.token_ids]
    logprobs = [lp for r in by_text for lp in r.logprobs]
    assert [lp.token_id for lp in logprobs] == ids
    assert all(
        len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token_id == lp.token_id for lp in logprobs
    )
    chat = pb.ChatMessages(messages=[pb.Message(role="user", content="Hello")])
    replies = list(
        stub.Generate(pb.GenerateRequest(chat=chat, sampling=sampling), timeout=TIMEOUT_S)
    )
    assert sum(len(r.token_ids) for r in replies) == 4


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.GenerateRequest(model="nope", text="x"), grpc.StatusCode.NOT_FOUND, "nope"),
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(max_tokens=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
        ),
        (
            pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(temperature=-1.0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (pb.GenerateRequest(text="hello " * 600), grpc.StatusCode.INVALID_ARGUMENT, "context"),
        (
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 99999])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "vocabulary",
        ),
    ],
)
def test_bad_requests_get_status_codes(
    stub: pb_grpc.GenerationStub, request_: pb.GenerateRequest, code: grpc.StatusCode, words: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request_, timeout=TIMEOUT_S))
    assert info.value.code() == code
    assert words in info.value.details()
    ok = list(
        stub.Generate(pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=2)))
    )
    assert ok[-1].finish_reason


def test_cancel_aborts_the_request(stub: pb_grpc.GenerationStub, server: dict) -> None:
    sampling = pb.SamplingOptions(max_tokens=500, ignore_eos=True)
    call = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=sampling), timeout=TIMEOUT_S)
    next(call), next(call)
    assert kv_used(server) > 0
    call.cancel()
    deadline = time.monotonic() + 10
    while kv_used(server) != 0:
        assert time.monotonic() < deadline, "KV blocks still held after cancel"
        time.sleep(0.05)
    metrics = httpx.get(f"http://127.0.0.1:{server['http']}/metrics", timeout=TIMEOUT_S).text
    assert 'splitserve:requests_total{endpoint="grpc:Generate",status="CANCELLED"}' in metrics


def test_health_is_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "splitserve.v1.Generation"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "splitserve.v1.Generation" in services
    assert "grpc.health.v1.Health" in services
