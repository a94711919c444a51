"""Request limits, from plain values: what a body decodes to, which field a 400 names, and
the engine's own backstop in SamplingParams. No model, no server."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from starlette.requests import ClientDisconnect

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from router import limits as lim
from router.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    api_error,
)
from router.protocol import decode_request as decode

LIMITS = lim.RequestLimits()
BACKEND = SimpleNamespace(
    model_name="tiny", max_model_len=512, vocab_size=400, tokenizer=SimpleNamespace()
)


def error_of(body: bytes, kind: type = CompletionRequest):
    """The OpenAI error a body gets, from decoding through the field checks."""
    try:
        req = decode(body, kind)
        lim.check_request(req, LIMITS)
        if kind is CompletionRequest:
            lim.completion_sampling_params(req, BACKEND, LIMITS)
        else:
            lim.chat_sampling_params(req, BACKEND, LIMITS, num_prompt=5)
    except Exception as exc:
        return api_error(exc)
    return None


BAD_BODIES = [
    (b"", None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    (b'{"prompt": "caf\xe9"}', None, "UTF-8"),
    (b"[]", None, "Expected `object`"),
    (b"null", None, "Expected `object`"),
    (b"3", None, "Expected `object`"),
    (b'{"prompt": "x", "temperature": NaN}', None, "not valid JSON"),
    (b'{"prompt": "x", "temperature": Infinity}', None, "not valid JSON"),
    (b'{"prompt": "x", "temperature": 1e999}', "temperature", "out of range"),
    (b'{"prompt": "x", "top_p": -1e999}', "top_p", "out of range"),
    (b'{"prompt": "x", "max_tokens": true}', "max_tokens", "got `bool`"),
    (b'{"prompt": "x", "max_tokens": 2.0}', "max_tokens", "got `float`"),
    (b'{"prompt": "x", "max_tokens": 513}', "max_tokens", "[1, 512]"),
    (b'{"prompt": "x", "seed": 18446744073709551616}', "seed", "seed must be in"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "seed", "out of range"),
    (b'{"prompt": "x", "n": 2}', "n", "n must be 1"),
    (b'{"prompt": "x", "logprobs": 21}', "logprobs", "[0, 20]"),
    (b'{"prompt": "x", "top_k": 0}', "top_k", "-1 (off)"),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop", "at most 4"),
    (b'{"prompt": "x", "stop": [""]}', "stop", "non-empty"),
    (b'{"prompt": "x", "stop": "' + b"s" * 257 + b'"}', "stop", "longer than 256"),
    (b'{"prompt": "x", "stop_token_ids": [400]}', "stop_token_ids", "[0, 399]"),
    (b'{"prompt": "x", "user": "' + b"u" * 257 + b'"}', "user", "longer than 256"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', "stream_options", "stream"),
    (b'{"prompt": "x", "frequency_penalty": 0.5}', "frequency_penalty", "not supported"),
    (b'{"prompt": "x", "frequency_penalty": false}', "frequency_penalty", "not supported"),
    (b'{"prompt": "x", "best_of": 3}', "best_of", "not supported"),
    (b'{"prompt": "x", "foo": 1}', None, "Unrecognized request argument supplied: foo"),
    (b'{"prompt": "x", "foo": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "Unrecognized"),
    (b'{"prompt": "x", "logit_bias": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "deep"),
    (b'{"max_tokens": 1}', "prompt", "required field `prompt`"),
]


@pytest.mark.parametrize(("body", "param", "words"), BAD_BODIES)
def test_bad_completion_bodies_get_400_naming_the_field(
    body: bytes, param: str | None, words: str
) -> None:
    err = error_of(body)
    assert err is not None and err.status == 400
    assert err.param == param and words in err.message
    assert err.type == "invalid_request_error" and len(err.message) < 400


def test_chat_names_the_field_the_client_used() -> None:
    msg = b'"messages": [{"role": "user", "content": "hi"}]'
    err = error_of(b"{" + msg + b', "max_completion_tokens": 0}', ChatCompletionRequest)
    assert err is not None and err.param == "max_completion_tokens"
    err = error_of(b"{" + msg + b', "logprobs": true, "top_logprobs": 21}', ChatCompletionRequest)
    assert err is not None and err.param == "top_logprobs"
    err = error_of(b"{" + msg + b', "top_logprobs": 2}', ChatCompletionRequest)
    assert err is not None and "needs logprobs" in err.message
    err = error_of(b"{" + msg + b', "tools": [{"type": "function"}]}', ChatCompletionRequest)
    assert err is not None and err.param == "tools"


def test_what_clients_send_by_default_is_accepted() -> None:
    """OpenAI's own fields at their defaults, `null` for optional ones, ignored labels."""
    chat = (
        b'{"messages": [{"role": "assistant", "content": null, "refusal": null}], '
        b'"max_tokens": 3, "n": 1, "frequency_penalty": 0, "presence_penalty": 0.0, '
        b'"logit_bias": {}, "tools": [], "tool_choice": "none", "metadata": {"k": "v"}, '
        b'"store": false, "response_format": {"type": "text"}, "stream": null, "seed": null, '
        b'"logprobs": null, "ignore_eos": null, "parallel_tool_calls": true}'
    )
    assert error_of(chat, ChatCompletionRequest) is None
    completion = b'{"prompt": [1, 2], "best_of": 1, "suffix": null, "echo": false, "top_k": -1}'
    assert error_of(completion) is None


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (ChatMessage("robot", "hi"), "role must be one of"),
        (ChatMessage("user", None), "content is missing"),
        (ChatMessage("user", [ContentPart("image_url")]), "only text content parts"),
        (ChatMessage("user", [ContentPart("text")]), "needs `text`"),
    ],
)
def test_chat_roles_and_content_are_checked(message: ChatMessage, words: str) -> None:
    backend = SimpleNamespace(tokenizer=SimpleNamespace(encode_chat=lambda turns: [1]))
    with pytest.raises(lim.LimitError, match=words) as info:
        lim.chat_prompt_ids(backend, [message])
    assert info.value.param == "messages"
    ok = [ChatMessage("developer", [ContentPart("text", "a")]), ChatMessage("assistant", None)]
    assert lim.chat_prompt_ids(backend, ok) == [1]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2**31}, "top_k"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": ("x",) * 5}, "stop"),
        ({"logprobs": -1}, "logprobs"),
    ],
)
def test_check_sampling_names_each_field(kwargs: dict, param: str) -> None:
    with pytest.raises(lim.LimitError) as info:
        lim.check_sampling(LIMITS, 512, 400, max_tokens=1, **kwargs)
    assert info.value.param == param and api_error(info.value).param == param


def test_logprobs_are_bounded_by_a_small_vocabulary() -> None:
    lim.check_sampling(LIMITS, 512, 400, max_tokens=1, logprobs=20)
    lim.check_sampling(LIMITS, 512, 9, max_tokens=1, logprobs=9)  # top-9 of 9 tokens
    with pytest.raises(lim.LimitError, match=r"\[0, 9\]"):
        lim.check_sampling(LIMITS, 512, 9, max_tokens=1, logprobs=10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": True},
        {"max_tokens": 2.0},
        {"temperature": math.nan},
        {"temperature": -math.inf},
        {"temperature": True},
        {"top_p": math.nan},
        {"top_k": 1.5},
        {"seed": 2**64},
        {"seed": True},
        {"logprobs": 21},
        {"stop_token_ids": (-1,)},
        {"stop": ("ok", 3)},
        {"ignore_eos": 1},
    ],
)
def test_sampling_params_refuses_what_the_sampler_cannot_run(kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_sampling_params_takes_the_edges() -> None:
    p = SamplingParams(temperature=0, top_p=1, seed=2**64 - 1, logprobs=20, top_k=2**40)
    assert p.greedy and p.seed == 2**64 - 1


def test_limits_config_is_validated() -> None:
    assert LIMITS.max_body_bytes == 1 << 20 and LIMITS.max_stop == 4
    with pytest.raises(ValueError, match="max_logprobs"):
        lim.RequestLimits(max_logprobs=21)
    with pytest.raises(ValueError, match="max_body_bytes"):
        lim.RequestLimits(max_body_bytes=0)
    with pytest.raises(ValueError, match="max_temperature"):
        lim.RequestLimits(max_temperature=math.inf)


def test_error_messages_echo_little_of_the_input() -> None:
    assert lim.clip("a\nb" + "c" * 100) == "a b" + "c" * 58 + "..."
    with pytest.raises(Exception) as info:
        lim.check_model(BACKEND, "m" * 10_000)
    err = api_error(info.value)
    assert err.status == 404 and err.code == "model_not_found" and len(err.message) < 200


def test_a_client_gone_mid_body_is_not_a_server_error() -> None:
    assert api_error(ClientDisconnect()).status == 499
