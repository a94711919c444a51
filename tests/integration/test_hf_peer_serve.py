"""`bench peer`'s peer: HF `transformers serve --continuous-batching` on the tiny model's HF copy,
driven by `bench serve`; it generates what splitserve generates, and stops cleanly."""

from __future__ import annotations

import os

import httpx
import pytest
from local_server import ServerThread
from tiny_model import make_tiny_checkpoint

from bench import hf_peer, serve_bench

pytest.importorskip("transformers")

MODEL = "tiny-llama"
N, MAX_TOKENS = 6, 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=2)


@pytest.fixture(scope="module")
def peer(tiny_dir, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("peer")
    hf_dir = hf_peer.write_hf_copy(str(tiny_dir), root / "hf", "float32")
    with hf_peer.PeerServer(
        hf_dir, "float32", root / "serve.log", kv_cache_gb=0.01, threads=1, start_timeout_s=120
    ) as server:
        yield server


def _args(base_url: str, model: str, **kw):
    options = {
        "base_url": base_url,
        "model": model,
        "num_prompts": N,
        "request_rate": 20.0,
        "random_input_len": 10,
        "random_output_len": MAX_TOKENS,
        "text_prompts": True,
        "no_progress": True,
        "timeout": 60,
    }
    return serve_bench.default_args(**{**options, **kw})


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_serve_drives_the_peer(peer, endpoint):
    result = serve_bench.benchmark(_args(peer.base, peer.model, endpoint=endpoint))
    s, reqs = result["summary"], result["requests"]
    assert (s["completed"], s["failed"]) == (N, 0), s["errors"]
    assert all(0 < r["output_tokens"] <= MAX_TOKENS and r["prompt_tokens"] > 0 for r in reqs)
    assert all(r["first_token_time"] is not None for r in reqs)
    assert s["ttft_ms"]["median"] is not None and s["output_throughput"] > 0
    assert "CB: True" in peer.log() and "CB: False" not in peer.log()  # continuous batching


def _greedy_texts(base_url: str, model: str, prompts: list[str]) -> list[tuple[str, int]]:
    out = []
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0}
        resp = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        out.append((data["choices"][0]["text"], data["usage"]["completion_tokens"]))
    return out


def test_peer_generates_what_splitserve_generates(peer, tiny_dir):
    """Same text prompts, temperature 0: the same text and token counts, so the same work."""
    prompts = ["The quick brown fox", "A paged KV cache stores", "Hello, world! How are"]
    ours = ServerThread.for_checkpoint(tiny_dir, MODEL)
    try:
        expected = _greedy_texts(ours.url, MODEL, prompts)
    finally:
        ours.stop()
    assert _greedy_texts(peer.base, peer.model, prompts) == expected
    assert len({text for text, _ in expected}) > 1


def test_stop_ends_the_process_group(tiny_dir, tmp_path):
    hf_dir = hf_peer.write_hf_copy(str(tiny_dir), tmp_path / "hf", "float32")
    server = hf_peer.PeerServer(hf_dir, "float32", tmp_path / "serve.log", kv_cache_gb=0.01)
    server.stop()
    assert server.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(server.proc.pid, 0)
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.base + "/health", timeout=2)


def test_a_peer_that_cannot_start_reports_its_output(tiny_dir, tmp_path):
    hf_dir = hf_peer.write_hf_copy(str(tiny_dir), tmp_path / "hf", "float32")
    (hf_dir / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError, match="transformers serve exited") as info:
        hf_peer.PeerServer(hf_dir, "float32", tmp_path / "serve.log", kv_cache_gb=0.01)
    assert "safetensors" in str(info.value).lower()
