"""Tokenizer, chat template and incremental detokenization on the tiny byte-level BPE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_model import make_tiny_checkpoint, write_tiny_gguf

from engine.errors import InvalidRequestError, UnsupportedModelError
from engine.gguf_loader import open_gguf
from engine.loader import load_tokenizer
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "line one\nline two\r\n\ttabbed",
    "Numbers 12345 and 3.14159",
    "café naïve 東京 日本語 Привет",
    "emoji 😀🚀👍🏽 and flags 🇫🇷",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi 😀"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tok") / "model")


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> Tokenizer:
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def gguf_path(tiny_dir: Path) -> Path:
    return write_tiny_gguf(tiny_dir.parent / "tiny.gguf", tiny_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_single_ids_and_skippable(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.bos_token_id == 0 and tok.eos_token_id == 2
    assert tok.stop_token_ids == frozenset({0, 2})
    assert tok.vocab_size == 400


def test_bos_only_when_the_checkpoint_asks(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "m")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    tok = load_tokenizer(path)
    assert tok.encode("hi")[0] == 0
    assert tok.encode("hi", add_special_tokens=False)[0] != 0
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[0] == 1  # template, no BOS


def test_matches_transformers(tiny_dir: Path, tok: Tokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_dir))
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"], text
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES) == rendered


def test_gguf_tokenizer_equals_hf_dir_tokenizer(tok: Tokenizer, gguf_path: Path) -> None:
    from_gguf = Tokenizer.from_gguf(open_gguf(gguf_path))
    for text in TEXTS:
        assert from_gguf.encode(text) == tok.encode(text), text
    assert from_gguf.stop_token_ids == tok.stop_token_ids
    assert from_gguf.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt2"])
def test_gguf_pre_tokenizers_round_trip(tiny_dir: Path, tmp_path: Path, pre: str) -> None:
    tok = load_tokenizer(write_tiny_gguf(tmp_path / f"{pre}.gguf", tiny_dir, pre=pre))
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    digits = tok.encode("12345")
    assert (len(digits) == 5) is (pre in ("smollm", "qwen2"))  # one token per digit


def test_sentencepiece_gguf_is_unsupported(tiny_dir: Path, tmp_path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        load_tokenizer(tmp_path / "spm.gguf")


def test_chat_template_renders_chatml(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(MESSAGES)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("t\n")
    assert tok.encode_chat(MESSAGES) == tok.encode(text, add_special_tokens=False)


def test_chat_template_errors_are_invalid_requests(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "m")
    config = json.loads((path / "tokenizer_config.json").read_text())
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": strict}))
    with pytest.raises(InvalidRequestError, match="user first"):
        load_tokenizer(path).apply_chat_template(MESSAGES)
    with pytest.raises(InvalidRequestError, match="content"):
        load_tokenizer(path).apply_chat_template([{"role": "user"}])
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidRequestError, match="no chat template"):
        load_tokenizer(path).apply_chat_template(MESSAGES)


def _stream(tok: Tokenizer, ids: list[int], **kwargs: object) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)  # type: ignore[arg-type]
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", ["emoji 😀🚀👍🏽 ok", "東京と日本語のテキスト", "mixé 🇫🇷 Привет"])
def test_incremental_detokenizer_holds_back_split_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    assert "" in deltas[:-1]  # some character spanned several tokens and was held back


def test_incremental_detokenizer_skips_special_tokens_and_uses_prompt(tok: Tokenizer) -> None:
    prompt = tok.encode("<|im_start|>assistant\n")
    ids = tok.encode("Sure 😀<|im_end|>")
    assert "".join(_stream(tok, ids, prompt_ids=prompt)) == "Sure 😀"
    kept = "".join(_stream(tok, ids, prompt_ids=prompt, skip_special_tokens=False))
    assert kept == "Sure 😀<|im_end|>"


def test_incremental_detokenizer_flushes_an_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("a😀")
    detok = IncrementalDetokenizer(tok)
    pushed = "".join(detok.push(i) for i in ids[:-1])
    assert pushed == "a"
    assert detok.flush() == "\ufffd"


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_incremental_detokenizer_equals_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas[:-1]) or "\ufffd" in text
