"""Access control on real sockets: the API key over HTTP (httpx, the `openai` client) and gRPC
metadata, TLS on the gRPC API, and `splitserve status` against a keyed server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from local_server import ServerThread
from tiny_model import make_tiny_checkpoint
from tls_certs import self_signed

from engine.errors import SplitServeError
from router.auth import grpc_tls_credentials
from splitserve_proto import generation_pb2 as pb
from splitserve_proto import generation_pb2_grpc as pb_grpc

MODEL = "tiny-llama"
KEY = "sk-test-0123456789"
TIMEOUT_S = 30
BODY = {"model": MODEL, "prompt": "Serving large language models means", "max_tokens": 6}
GENERATE = pb.GenerateRequest(text="Hello there", sampling=pb.SamplingOptions(max_tokens=5))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    srv = ServerThread.for_checkpoint(checkpoint, MODEL, api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(checkpoint: Path, tls: tuple[Path, Path]):
    credentials = grpc_tls_credentials(str(tls[0]), str(tls[1]))
    srv = ServerThread.for_checkpoint(checkpoint, MODEL, api_key=KEY, grpc_credentials=credentials)
    yield srv
    srv.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- HTTP --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        (bearer("sk-wrong"), "incorrect API key"),
        (bearer(KEY[:-1]), "incorrect API key"),  # a prefix of the key is not the key
        ({"Authorization": KEY}, "incorrect API key"),  # no scheme
        ({"Authorization": f"Basic {KEY}"}, "incorrect API key"),
    ],
)
def test_http_without_the_key_is_refused(server: ServerThread, headers: dict, message: str):
    calls = [
        ("POST", "/v1/completions", BODY),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}),
        ("GET", "/v1/models", None),
        ("GET", "/status", None),
        ("POST", "/admin/scale", {"decode": 2}),
        ("GET", "/no-such-route", None),  # 401, not 404: routes are not probed without a key
        ("POST", "/health", None),  # only GET/HEAD of the open paths is open
    ]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S, headers=headers) as http:
        for method, path, body in calls:
            r = http.request(method, path, json=body)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert error["code"] == "invalid_api_key", error
            assert error["type"] == "invalid_request_error" and error["param"] is None
            assert error["message"].startswith(message) and KEY not in error["message"]


def test_health_and_metrics_stay_open(server: ServerThread) -> None:
    for headers in ({}, bearer("sk-wrong")):
        health = httpx.get(server.url + "/health", headers=headers, timeout=TIMEOUT_S)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        metrics = httpx.get(server.url + "/metrics", headers=headers, timeout=TIMEOUT_S)
        assert metrics.status_code == 200 and "splitserve:requests_total" in metrics.text


def test_http_with_the_key_works_as_before(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S, headers=bearer(KEY)) as http:
        assert http.get("/status").json()["workers"][0]["name"] == "local-0"
        assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
        assert http.get("/no-such-route").status_code == 404
        # the scheme is case-insensitive (RFC 7235)
        lower = http.get("/v1/models", headers={"Authorization": f"bearer {KEY}"})
        assert lower.status_code == 200
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=30, max_retries=0)
    whole = client.completions.create(**BODY, temperature=0, extra_body={"ignore_eos": True})
    assert whole.usage.completion_tokens == 6 and whole.choices[0].text
    chunks = list(
        client.completions.create(
            **BODY, temperature=0, extra_body={"ignore_eos": True}, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_openai_client_with_a_wrong_key_gets_authentication_error(server: ServerThread) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.completions.create(**BODY)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# ---- gRPC --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(server: ServerThread):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT_S)
        yield ch


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, "missing API key"),
        ((("authorization", "Bearer sk-wrong"),), "incorrect API key"),
        ((("authorization", KEY),), "incorrect API key"),
    ],
)
def test_grpc_without_the_key_is_unauthenticated(
    channel: grpc.Channel, metadata: tuple | None, message: str
) -> None:
    stub = pb_grpc.GenerationStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(GENERATE, metadata=metadata, timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details().startswith(message)
    with pytest.raises(grpc.RpcError) as info:  # reflection too (a stream-stream call)
        list(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_health_stays_open(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="splitserve.v1.Generation"), timeout=TIMEOUT_S
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_with_the_key_streams_text(channel: grpc.Channel, server: ServerThread) -> None:
    stub = pb_grpc.GenerationStub(channel)
    metadata = (("authorization", f"Bearer {KEY}"),)
    sampling = pb.SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True)
    request = pb.GenerateRequest(text=BODY["prompt"], sampling=sampling)
    responses = list(stub.Generate(request, metadata=metadata, timeout=TIMEOUT_S))
    assert responses[-1].finish_reason == "length" and responses[-1].usage.completion_tokens == 6
    http = httpx.post(
        server.url + "/v1/completions",
        json={**BODY, "temperature": 0, "ignore_eos": True},
        headers=bearer(KEY),
        timeout=TIMEOUT_S,
    )
    assert "".join(r.text for r in responses) == http.json()["choices"][0]["text"]


# ---- TLS ---------------------------------------------------------------------------------


def test_tls_client_with_the_ca_and_key_gets_text(
    tls_server: ServerThread, tls: tuple[Path, Path]
) -> None:
    ca = grpc.ssl_channel_credentials(root_certificates=tls[0].read_bytes())
    # the key as call credentials: `authorization: Bearer KEY` on every call
    creds = grpc.composite_channel_credentials(ca, grpc.access_token_call_credentials(KEY))
    with grpc.secure_channel(f"localhost:{tls_server.grpc_port}", creds) as ch:
        responses = list(pb_grpc.GenerationStub(ch).Generate(GENERATE, timeout=TIMEOUT_S))
    assert responses[-1].finish_reason and responses[-1].usage.completion_tokens > 0
    no_key = grpc.secure_channel(f"localhost:{tls_server.grpc_port}", ca)  # TLS, no key
    with no_key, pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.GenerationStub(no_key).Generate(GENERATE, timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_or_untrusting_clients_fail_on_tls(
    tls_server: ServerThread, tmp_path: Path
) -> None:
    metadata = (("authorization", f"Bearer {KEY}"),)
    other_ca, _ = self_signed(tmp_path, "other")
    wrong_ca = grpc.ssl_channel_credentials(root_certificates=other_ca.read_bytes())
    target = f"localhost:{tls_server.grpc_port}"
    for ch in (grpc.insecure_channel(target), grpc.secure_channel(target, wrong_ca)):
        with ch, pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.GenerationStub(ch).Generate(GENERATE, metadata=metadata, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_files_checked_with_one_line_errors(tls: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = map(str, tls)
    _, other_key = self_signed(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ((cert, None), "go together"),
        ((None, key), "go together"),
        ((str(tmp_path / "missing.crt"), key), "cannot read --grpc-tls-cert"),
        ((cert, str(tmp_path)), "cannot read --grpc-tls-key"),  # a directory
        ((str(garbage), key), "not a PEM certificate"),
        ((cert, str(other_key)), "not a PEM certificate and its"),  # the key of another
    ]
    for (c, k), needle in cases:
        with pytest.raises(SplitServeError, match=needle) as info:
            grpc_tls_credentials(c, k)
        assert "\n" not in str(info.value)
    assert grpc_tls_credentials(None, None) is None


# ---- the CLI -----------------------------------------------------------------------------


def splitserve(*args: str, key_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPLITSERVE_API_KEY"}
    if key_env is not None:
        env["SPLITSERVE_API_KEY"] = key_env
    cmd = [sys.executable, "-m", "splitserve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_status_cli_needs_the_key(server: ServerThread) -> None:
    refused = splitserve("status", "--url", server.url)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
    assert "401" in lines[0] and "--api-key" in lines[0] and "SPLITSERVE_API_KEY" in lines[0]
    wrong = splitserve("status", "--url", server.url, "--api-key", "sk-wrong")
    assert wrong.returncode == 2 and "incorrect API key" in wrong.stderr
    for r in (
        splitserve("status", "--url", server.url, "--api-key", KEY),
        splitserve("status", "--url", server.url, key_env=KEY),
    ):
        assert r.returncode == 0, r.stderr
        assert f"model {MODEL}" in r.stdout and "local-0" in r.stdout


def test_serve_with_unreadable_tls_files_is_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    r = splitserve("serve", "--grpc-tls-cert", missing, "--grpc-tls-key", missing)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: cannot read --grpc-tls-cert {missing}: No such file or directory"]
