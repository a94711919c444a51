"""`splitserve serve` as a user runs it: a subprocess with real Ray, real servers, the real
model; driven with the `openai` client and the generated gRPC stubs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from bench.server_process import ServerProcess
from engine import LLM, SamplingParams

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Water boils at"]
CHAT = [{"role": "user", "content": "Name three colors."}]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def offline() -> dict:
    llm = LLM(model="smollm2-135m", dtype="float32", num_kv_blocks=512)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    texts = {p: o.text for p, o in zip(PROMPTS, llm.generate(PROMPTS, greedy), strict=True)}
    texts["chat"] = llm.chat([CHAT], greedy)[0].text
    return texts


CONFIGS = [("disaggregated", "grpc"), ("disaggregated", "collective"), ("colocated", "grpc")]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}")
def server(request):
    mode, transport = request.param
    args = ["--mode", mode, "--kv-transport", transport, "--max-num-seqs", "64"]
    # float32: greedy equality with the offline engine is exact there
    with ServerProcess(*args, "--kv-cache-gb", "0.5", "--dtype", "float32") as srv:
        yield srv


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    yield openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=120)
    server.wait_no_kv_held()


def test_completions_equal_offline(server, client, offline):
    for prompt in PROMPTS:
        r = client.completions.create(
            model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert r.choices[0].text == offline[prompt]
        assert r.usage.completion_tokens <= MAX_TOKENS
        chunks = client.completions.create(
            model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == offline[prompt]


def test_chat_equals_offline(server, client, offline):
    r = client.chat.completions.create(
        model="smollm2-135m", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.choices[0].message.content == offline["chat"]
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            parts.append(c.choices[0].delta.content)
        usage = c.usage or usage
    assert "".join(parts) == offline["chat"]
    assert usage is not None and usage.completion_tokens >= 1


def test_grpc_generate_equals_offline(server, offline):
    import grpc

    from splitserve_proto import generation_pb2, generation_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        req = generation_pb2.GenerateRequest(
            model="smollm2-135m",
            text=PROMPTS[0],
            sampling=generation_pb2.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0.0),
        )
        text = "".join(r.text for r in stub.Generate(req, timeout=120))
    assert text == offline[PROMPTS[0]]
    server.wait_no_kv_held()


def test_concurrent_streams_complete_and_cut_ones_free_their_kv(server):
    openai = pytest.importorskip("openai")

    async def one(client, i: int, cut: bool) -> int:
        stream = await client.completions.create(
            model="smollm2-135m",
            prompt=f"Story number {i}: once upon a time",
            max_tokens=24,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        n, tokens = 0, 0
        async for chunk in stream:
            n += 1
            if cut and n == 3:
                await stream.close()  # the client goes away mid-stream
                return -1
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return tokens

    async def run(n: int, n_cut: int) -> list[int]:
        async with openai.AsyncOpenAI(
            base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=300
        ) as client:
            return await asyncio.gather(*(one(client, i, i < n_cut) for i in range(n)))

    assert asyncio.run(run(32, 0)) == [24] * 32
    assert asyncio.run(run(64, 16)) == [-1] * 16 + [24] * 48
    server.wait_no_kv_held()


def test_ray_state_api_lists_the_named_workers(server):
    """What an operator runs: `ray list actors` (the state API, token auth as Ray set it up)."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    r = subprocess.run(
        [
            ray_cli,
            "list",
            "actors",
            "--filter",
            "state=ALIVE",
            "--format",
            "json",
            "--address",
            server.dashboard,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert r.returncode == 0, r.stderr
    names = {a["name"] for a in json.loads(r.stdout)}
    assert {"colocated-0", "colocated-1"} <= names or {"prefill-0", "decode-0"} <= names


def test_bad_input_is_rejected_and_server_keeps_serving(server, client):
    import grpc
    import httpx

    from splitserve_proto import generation_pb2, generation_pb2_grpc

    url = server.base + "/v1/completions"
    cases = [
        ({"model": "smollm2-135m", "prompt": "hi " * 9000, "max_tokens": 4}, 400),
        ({"model": "smollm2-135m", "prompt": "hi", "max_tokens": 0}, 400),
        ({"model": "smollm2-135m", "prompt": "hi", "max_tokens": "many"}, 400),
        ({"model": "smollm2-135m", "prompt": "hi", "temperature": -1}, 400),
        ({"model": "no-such-model", "prompt": "hi"}, 404),
    ]
    for body, code in cases:
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == code, (body, r.text)
        assert set(r.json()["error"]) >= {"message", "type", "code"}
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for model, sampling, code in [
            ("no-such-model", {}, grpc.StatusCode.NOT_FOUND),
            ("smollm2-135m", {"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            req = generation_pb2.GenerateRequest(
                model=model, text="hi", sampling=generation_pb2.SamplingOptions(**sampling)
            )
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(req, timeout=60))
            assert err.value.code() == code
    r = client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=4)
    assert r.choices[0].text


def test_status_cli_prints_the_pools(server):
    r = subprocess.run(
        [sys.executable, "-m", "splitserve", "status", "--url", server.base, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    workers = json.loads(r.stdout)["workers"]
    assert {w["role"] for w in workers} <= {"prefill", "decode", "colocated"}
    assert all(w["kv_blocks_total"] > 0 for w in workers)
    r = subprocess.run(
        [sys.executable, "-m", "splitserve", "status", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: cannot reach splitserve")
    assert len(r.stderr.strip().splitlines()) == 1
