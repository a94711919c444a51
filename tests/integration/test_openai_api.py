"""The OpenAI HTTP API on real sockets, driven by the `openai` client and httpx.

One server (HTTP + gRPC via `serve_all`, a LocalBackend on the tiny seeded model) runs on
its own thread and event loop for the module; every wait is bounded.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from local_server import ENGINE_ARGS, ServerThread
from tiny_model import make_tiny_checkpoint

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from router.backend import LocalBackend
from router.openai_api import create_app

MODEL = "tiny-llama"
PROMPT = "Serving large language models means"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    srv = ServerThread.for_checkpoint(checkpoint, MODEL)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(checkpoint: Path) -> LLM:
    return LLM(model=str(checkpoint), **ENGINE_ARGS)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30, max_retries=0)


@pytest.fixture(scope="module")
def http(server: ServerThread):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def wait_kv_free(http: httpx.Client, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        worker = http.get("/status").json()["workers"][0]
        if worker["kv_blocks_used"] == 0 and worker["running"] == 0:
            return worker
        assert time.monotonic() < deadline, f"KV blocks still held: {worker}"
        time.sleep(0.05)


# ---- generation -------------------------------------------------------------------------


def test_completion_greedy_equals_offline_llm(client: openai.OpenAI, offline: LLM) -> None:
    want = offline.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0))[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.object == "text_completion" and got.id.startswith("cmpl-")
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_stream_equals_whole_and_reports_usage(client: openai.OpenAI) -> None:
    args = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 20,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(**args)
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_greedy_equals_offline_chat(client: openai.OpenAI, offline: LLM) -> None:
    messages = [{"role": "user", "content": "How are you today?"}]
    want = offline.chat(messages, SamplingParams(max_tokens=10, temperature=0.0))[0]
    got = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_completion_logprobs_are_greedy_tops(client: openai.OpenAI) -> None:
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3
    )
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and chosen <= 0.0
        assert chosen == pytest.approx(max(top.values()))  # greedy takes the most likely
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs(client: openai.OpenAI) -> None:
    got = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def test_stop_string_truncates_and_frees_kv(client: openai.OpenAI, http: httpx.Client) -> None:
    args = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 30,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    full = client.completions.create(**args).choices[0].text
    stop = full[10:13]
    want = full[: full.find(stop)]
    got = client.completions.create(**args, stop=[stop, "never-generated"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 30
    streamed = [
        c.choices[0].text for c in client.completions.create(**args, stop=stop, stream=True)
    ]
    assert "".join(streamed) == want
    assert stop not in "".join(streamed)
    wait_kv_free(http)


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    a = client.completions.create(**args, seed=1234).choices[0].text
    b = client.completions.create(**args, seed=1234).choices[0].text
    assert a == b


def test_client_disconnect_aborts_the_request(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()  # held: dropping it early would close the connection already
        events = [line for line in itertools.islice(lines, 6) if line.startswith("data: ")]
        assert events
        assert http.get("/status").json()["workers"][0]["kv_blocks_used"] > 0  # still running
    worker = wait_kv_free(http)
    assert worker["waiting"] == 0
    metrics = http.get("/metrics").text
    assert 'splitserve:requests_total{endpoint="/v1/completions",status="499"}' in metrics


# ---- errors ----------------------------------------------------------------------------

ERROR_CASES = [
    (b'{"prompt": "x", ', 400, None, None),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", None),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", None),
    ({"prompt": "x", "n": 2}, 400, "n", None),
    ({"prompt": ["a", "b"]}, 400, "prompt", None),
    ({"max_tokens": 3}, 400, "prompt", None),
    ({"prompt": "hello " * 600}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": [1, 2, 100000]}, 400, None, None),
    ({"prompt": "x", "model": "no-such-model"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), ERROR_CASES)
def test_bad_requests_get_openai_errors_and_server_keeps_serving(
    http: httpx.Client, body: dict | bytes, status: int, param: str | None, code: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = http.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param and error["code"] == code
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_wrong_type_message_names_the_field(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json={"messages": "hi"})
    assert resp.status_code == 400 and "$.messages" in resp.json()["error"]["message"]


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x " * 600}]
        )
    assert info.value.code == "context_length_exceeded"


class _BrokenBackend(LocalBackend):
    def generate(self, *args, **kwargs):  # type: ignore[override]
        raise RuntimeError("secret internal detail")


def test_unexpected_failure_is_500_without_internals(server: ServerThread) -> None:
    broken = _BrokenBackend(server.backend.loop, MODEL)
    with TestClient(create_app(broken)) as tc:
        resp = tc.post("/v1/completions", json={"prompt": "hi"})
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"]


# ---- the other routes ---------------------------------------------------------------------


def test_models_health_status_metrics(http: httpx.Client, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert http.get("/health").status_code == 200
    assert http.get("/status").json()["workers"][0]["kv_blocks_total"] == 256
    assert http.get("/no-such-route").json()["error"]["message"]
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    metrics = http.get("/metrics").text
    assert 'splitserve:requests_total{endpoint="/v1/completions",status="200"}' in metrics
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "request_time_per_output_token_seconds",
        "e2e_request_latency_seconds",
    ):
        count = next(line for line in metrics.splitlines() if line.startswith(f"vllm:{name}_count"))
        assert float(count.split()[-1]) > 0
    assert 'splitserve:requests_in_flight{endpoint="/v1/completions"} 0.0' in metrics
