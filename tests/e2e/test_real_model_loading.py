"""The default model (SmolLM2-135M-Instruct GGUF): our loader and tokenizer equal transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import ModelNotFoundError
from engine.loader import load_config, load_state_dict, load_tokenizer, resolve_model
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.e2e

TEXTS = [
    "Hello, world!",
    "What is the capital of France?",
    "  two leading spaces, trailing space ",
    "Numbers: 12345, 3.14159, 1e-9 and 2024-05-01.",
    "def add(a, b):\n    return a + b\n",
    "café naïve résumé Ünïcödé",
    "東京は日本の首都です。中文测试。",
    "Привет, мир! Γειά σου κόσμε",
    "emoji 😀🚀👍🏽 🇫🇷 and ZWJ 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi in Japanese 😀"},
        {"role": "assistant", "content": "こんにちは"},
        {"role": "user", "content": "Thanks!"},
    ],
]


@pytest.fixture(scope="module")
def model_path() -> Path:
    try:
        return resolve_model("smollm2-135m")
    except ModelNotFoundError as e:
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="module")
def ours(model_path: Path) -> Tokenizer:
    return load_tokenizer(model_path)


@pytest.fixture(scope="module")
def hf_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_equals_transformers(ours: Tokenizer, hf_tokenizer, text: str) -> None:
    ids = ours.encode(text)
    assert ids == hf_tokenizer(text)["input_ids"]
    assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    kept = hf_tokenizer.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == kept == text


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_equals_transformers(ours: Tokenizer, hf_tokenizer, messages) -> None:
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == want
    assert ours.encode_chat(messages) == hf_tokenizer(want, add_special_tokens=False)["input_ids"]


def test_special_ids_and_streaming(ours: Tokenizer) -> None:
    assert (ours.bos_token_id, ours.eos_token_id, ours.vocab_size) == (1, 2, 49152)
    assert {0, 2} <= ours.stop_token_ids  # <|endoftext|>, <|im_end|>
    ids = ours.encode(TEXTS[8] + TEXTS[6])
    detok = IncrementalDetokenizer(ours)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXTS[8] + TEXTS[6]


def test_config_matches(model_path: Path) -> None:
    config = load_config(model_path)
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads) == (
        "llama", 30, 9, 3
    )  # fmt: skip
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (49152, 576, 1536)
    assert (config.head_dim, config.rope_theta, config.max_position_embeddings) == (64, 1e5, 8192)
    assert config.tie_word_embeddings and not config.attention_bias
    assert config.rope_scaling is None and config.rms_norm_eps == pytest.approx(1e-5)


def test_state_dict_equals_transformers(model_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = load_config(model_path)
    ours = load_state_dict(model_path, config, torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    hf_config = hf.config
    assert hf_config.rms_norm_eps == config.rms_norm_eps
    assert hf_config.num_hidden_layers == config.num_layers
    theirs = hf.state_dict()
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: lm_head is the embedding
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, theirs[name]), name
    del hf, theirs
    bf16 = load_state_dict(model_path, config, torch.bfloat16)
    assert torch.equal(bf16["model.norm.weight"], ours["model.norm.weight"].bfloat16())
