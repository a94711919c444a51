"""Router-side text assembly: whole UTF-8 characters, stop strings never leak, abort on stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from tiny_model import make_tiny_checkpoint

from engine.engine_loop import TokenDelta
from engine.loader import load_tokenizer
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.detokenize import TextAssembler, stream_text

TEXTS = [
    "Ünïcödé text: café, naïve, 東京, 日本語, Привет мир, 😀 🚀 emoji.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def forward(self, x):\n    return self.proj(x) + x\n",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    return load_tokenizer(Path(path))


def run(tok: Tokenizer, ids: Sequence[int], stop: Sequence[str] = (), include: bool = False):
    """Feed `ids` one at a time; returns (pieces released, final text, stopped)."""
    asm = TextAssembler(tok, [], stop, include)
    pieces = []
    for i in ids:
        pieces.append(asm.push(i))
        if asm.stopped:
            break
    pieces.append(asm.finish(flush_partial_char=True))
    return pieces, "".join(pieces), asm.stopped


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_come_out_whole(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, out, stopped = run(tokenizer, ids)
    assert out == text and not stopped
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(text.encode()) // 4  # byte-level pieces: characters do get split


@pytest.mark.parametrize("text", TEXTS)
def test_stop_string_truncates_and_never_leaks(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    for start in range(1, len(text) - 3, 3):
        for length in (1, 2, 4):
            stop = text[start : start + length]
            want = text[: text.find(stop)]
            pieces, out, stopped = run(tokenizer, ids, [stop])
            assert stopped and out == want, (stop, out)
            released = ""
            for p in pieces:  # what a streaming client saw at every moment
                released += p
                assert want.startswith(released) and stop not in released
            _, with_stop, _ = run(tokenizer, ids, [stop], include=True)
            assert with_stop == want + stop


def test_earliest_of_several_stop_strings_wins(tokenizer: Tokenizer) -> None:
    text = TEXTS[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    _, out, _ = run(tokenizer, ids, ["thank", "world", "How"])
    assert out == "Hello, "


def test_held_back_prefix_is_released_at_the_end(tokenizer: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, out, stopped = run(tokenizer, ids, ["dog.!"])  # the text ends with its prefix
    assert out == text and not stopped
    assert pieces[-1].endswith("dog.")  # held back until the request ended


class _ChunkyBackend:
    """Sends several tokens per delta (as a remote decode worker may) and records closing."""

    def __init__(self, tok: Tokenizer, ids: list[int]):
        self.tokenizer, self.ids = tok, ids
        self.closed = False
        self.params: SamplingParams | None = None

    async def generate(
        self, rid: str, prompt: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        self.params = params
        try:
            for k in range(0, len(self.ids), 3):
                chunk = self.ids[k : k + 3]
                lps = [SampledToken(t, -0.5) for t in chunk]
                yield TokenDelta(rid, chunk, lps, None, len(prompt), k + len(chunk))
                await asyncio.sleep(0)
            yield TokenDelta(rid, [], None, "length", len(prompt), len(self.ids))
        finally:
            self.closed = True


def test_stream_text_stops_mid_delta_and_closes_the_backend(tokenizer: Tokenizer) -> None:
    text = TEXTS[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    backend = _ChunkyBackend(tokenizer, ids)
    params = SamplingParams(max_tokens=100, stop=("are",))

    async def collect() -> list:
        return [d async for d in stream_text(backend, "r1", [5, 6], params)]  # type: ignore[arg-type]

    deltas = asyncio.run(asyncio.wait_for(collect(), 10))
    assert "".join(d.text for d in deltas) == text[: text.find("are")]
    assert deltas[-1].finish_reason == "stop" and backend.closed
    assert backend.params is not None and backend.params.stop == ()  # stop strings stay here
    n_out = sum(len(d.token_ids) for d in deltas)
    assert n_out == deltas[-1].num_output_tokens < len(ids)
    assert all(len(d.logprobs or []) == len(d.token_ids) for d in deltas)
    assert tokenizer.decode(ids[:n_out]).find("are") >= 0  # the token that completed the stop
    assert tokenizer.decode(ids[: n_out - 1]).find("are") < 0
