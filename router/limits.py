"""What a client request may ask for: the bounds both APIs check before any worker sees it,
and a checked request as engine inputs (prompt token ids, SamplingParams).

HTTP body ──> size (413) ──> JSON decode, types (400) ──> fields in range (400) ──> engine
gRPC message ──────────────────> the same field ranges (INVALID_ARGUMENT) ─────────> engine
Every check raises an engine error (LimitError, which names the field, ModelNotFoundError,
PromptTooLongError); each API maps it to its status (router.protocol.api_error).
The prompt (non-empty, in the vocabulary, prompt + 1 token within the context) is checked by
`engine.errors.check_prompt` on both paths; `SamplingParams` re-checks the engine's own
invariants as a backstop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequestError, ModelNotFoundError
from engine.sampling_params import MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams

if TYPE_CHECKING:  # router.protocol imports this module
    from router.backend import Backend
    from router.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
TOP_K_MAX = 2**31 - 1

# OpenAI parameters this server does not implement, with the values that mean "off" (what
# clients send by default): accepted at those, 400 otherwise. A value is only "off" with the
# same JSON type (`false` is not `0`).
OFF_VALUES: Mapping[str, tuple[object, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
}


MAX_DEADLINE_S = 3600.0  # the longest per-request deadline a client may ask for


class LimitError(InvalidRequestError):
    """A request field outside its limits; `param` names the field as the client sent it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_body_bytes: int = 1 << 20  # HTTP body: larger -> 413 before it is decoded
    max_stop: int = 4  # OpenAI's limit on `stop`
    max_stop_chars: int = 256  # each stop string
    max_stop_token_ids: int = 256
    max_logprobs: int = MAX_LOGPROBS  # completions `logprobs`, chat `top_logprobs`
    max_temperature: float = 2.0  # OpenAI's range: [0, 2]
    max_user_chars: int = 256
    max_request_id_chars: int = 256  # gRPC `request_id`, echoed in every response

    def __post_init__(self) -> None:
        if not 1 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [1, {MAX_LOGPROBS}]")
        for name in ("max_body_bytes", "max_stop", "max_stop_chars", "max_user_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 < self.max_temperature < math.inf:
            raise ValueError("max_temperature must be positive and finite")


def clip(text: str, n: int = 64) -> str:
    """`text` for an error message: at most `n` characters of it, on one line."""
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= n else one_line[: n - 3] + "..."


def check_int(param: str, value: int | None, lo: int, hi: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise LimitError(param, f"{param} must be an integer, got {clip(repr(value))}")
    if not lo <= value <= hi:
        raise LimitError(param, f"{param} must be in [{lo}, {hi}], got {clip(str(value))}")


def check_float(
    param: str, value: float | None, lo: float, hi: float, lo_open: bool = False
) -> None:
    """A finite number in [lo, hi] ((lo, hi] when `lo_open`); NaN and infinities are not."""
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise LimitError(param, f"{param} must be a finite number, got {clip(repr(value))}")
    if value < lo or value > hi or (lo_open and value == lo):
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise LimitError(param, f"{param} must be in {span}, got {value}")


def check_text(param: str, value: str | None, max_chars: int) -> None:
    if value is not None and len(value) > max_chars:
        raise LimitError(param, f"{param} is longer than {max_chars} characters")


def check_stop(limits: RequestLimits, stop: Sequence[str]) -> None:
    if len(stop) > limits.max_stop:
        raise LimitError("stop", f"stop has {len(stop)} entries; at most {limits.max_stop}")
    for s in stop:
        if not s:
            raise LimitError("stop", "stop strings must be non-empty")
        check_text("stop", s, limits.max_stop_chars)


def check_stop_token_ids(limits: RequestLimits, ids: Sequence[int], vocab_size: int) -> None:
    if len(ids) > limits.max_stop_token_ids:
        raise LimitError("stop_token_ids", f"at most {limits.max_stop_token_ids} stop_token_ids")
    for t in ids:
        check_int("stop_token_ids", t, 0, vocab_size - 1)


def check_sampling(
    limits: RequestLimits, max_model_len: int, vocab_size: int, *,
    max_tokens: int, temperature: float | None = None, top_p: float | None = None,
    top_k: int | None = None, seed: int | None = None, stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (), logprobs: int | None = None,
    max_tokens_param: str = "max_tokens", logprobs_param: str = "logprobs",
) -> None:  # fmt: skip
    """The sampling fields both APIs share, each against its limit; `*_param`: the name the
    client used for the field (chat: `max_completion_tokens`, `top_logprobs`)."""
    check_int(max_tokens_param, max_tokens, 1, max_model_len)
    check_float("temperature", temperature, 0.0, limits.max_temperature)
    check_float("top_p", top_p, 0.0, 1.0, lo_open=True)
    if top_k is not None and top_k != -1:
        try:
            check_int("top_k", top_k, 1, TOP_K_MAX)
        except LimitError:
            raise LimitError("top_k", f"top_k must be -1 (off) or in [1, {TOP_K_MAX}]") from None
    check_int("seed", seed, SEED_MIN, SEED_MAX)
    check_stop(limits, stop)
    check_stop_token_ids(limits, stop_token_ids, vocab_size)
    check_int(logprobs_param, logprobs, 0, min(limits.max_logprobs, vocab_size))


def check_role(index: int, role: str) -> None:
    if role not in CHAT_ROLES:
        raise LimitError(
            "messages",
            f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}; "
            f"got {clip(repr(role))}",
        )


def check_unsupported(values: Mapping[str, object]) -> None:
    """OpenAI parameters this server does not implement: 400 unless absent (None) or off."""
    for name, value in values.items():
        if value is None or name not in OFF_VALUES:
            continue
        offs = OFF_VALUES[name]
        if not any(type(value) is type(off) and value == off for off in offs):
            hint = f" (only {', '.join(repr(o) for o in offs)})" if offs else ""
            raise LimitError(name, f"{name} is not supported by this server{hint}")


# ---- an OpenAI request -> engine inputs ---------------------------------------------------


def check_model(backend: Backend, model: str | None) -> None:
    names = {backend.model_name, Path(backend.model_name).name, Path(backend.model_name).stem}
    if model and model not in names:
        raise ModelNotFoundError(
            f"model {clip(repr(model))} does not exist; this server serves {backend.model_name!r}"
        )


def check_request(req: CompletionRequest | ChatCompletionRequest, limits: RequestLimits) -> None:
    """What is wrong with `req` apart from its prompt and sampling fields."""
    check_unsupported({name: getattr(req, name, None) for name in OFF_VALUES})
    if req.n is not None and req.n != 1:
        raise LimitError("n", f"n must be 1 (one choice per request), got {clip(str(req.n))}")
    if req.stream_options is not None and not req.stream:
        raise LimitError("stream_options", "stream_options is only allowed when stream is true")
    check_text("user", req.user, limits.max_user_chars)
    check_float("deadline_s", req.deadline_s, 0.0, MAX_DEADLINE_S, lo_open=True)


def completion_prompt_ids(backend: Backend, prompt: str | list[str | int | list[int]]) -> list[int]:
    if isinstance(prompt, str):
        return backend.tokenizer.encode(prompt)
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if len(prompt) > 1:
        raise LimitError("prompt", "batched prompts are not supported: send one per request")
    if not prompt:
        raise LimitError("prompt", "prompt is empty")
    one = prompt[0]
    if isinstance(one, str):
        return backend.tokenizer.encode(one)
    if isinstance(one, list):
        return one
    raise LimitError(
        "prompt", "prompt must be a string, a list of token ids, or a list of one of those"
    )


def chat_prompt_ids(backend: Backend, messages: list[ChatMessage]) -> list[int]:
    if not messages:
        raise LimitError("messages", "messages must not be empty")
    turns = [{"role": m.role, "content": _message_text(i, m)} for i, m in enumerate(messages)]
    return backend.tokenizer.encode_chat(turns)


def _message_text(index: int, m: ChatMessage) -> str:
    check_role(index, m.role)
    if m.content is None:
        if m.role != "assistant":  # an assistant turn may be content-less (it made tool calls)
            raise LimitError("messages", f"messages[{index}].content is missing")
        return ""
    if isinstance(m.content, str):
        return m.content
    if any(p.type != "text" for p in m.content):
        raise LimitError("messages", "only text content parts are supported")
    if any(p.text is None for p in m.content):
        raise LimitError("messages", f"messages[{index}]: a text content part needs `text`")
    return "".join(p.text or "" for p in m.content)


def completion_sampling_params(
    req: CompletionRequest, backend: Backend, limits: RequestLimits
) -> SamplingParams:
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
    return _sampling_params(
        req, backend, limits, ("max_tokens", max_tokens), ("logprobs", req.logprobs)
    )


def chat_sampling_params(
    req: ChatCompletionRequest, backend: Backend, limits: RequestLimits, num_prompt: int
) -> SamplingParams:
    """`max_completion_tokens` over `max_tokens` (both checked), by default up to the end of
    the context (OpenAI's default); `top_logprobs` only with `logprobs`."""
    if req.top_logprobs is not None and not req.logprobs:
        raise LimitError("top_logprobs", "top_logprobs needs logprobs=true")
    check_int("max_tokens", req.max_tokens, 1, backend.max_model_len)
    max_tokens = ("max_tokens", backend.max_model_len - num_prompt)
    if req.max_completion_tokens is not None:
        max_tokens = ("max_completion_tokens", req.max_completion_tokens)
    elif req.max_tokens is not None:
        max_tokens = ("max_tokens", req.max_tokens)
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return _sampling_params(req, backend, limits, max_tokens, ("top_logprobs", top_logprobs))


def _sampling_params(
    req: CompletionRequest | ChatCompletionRequest,
    backend: Backend,
    limits: RequestLimits,
    max_tokens: tuple[str, int],
    logprobs: tuple[str, int | None],
) -> SamplingParams:
    """Engine params from `req`, checked; `max_tokens`, `logprobs`: (the field the value came
    from, the value)."""
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    values: dict[str, Any] = {
        "max_tokens": max_tokens[1],
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": -1 if req.top_k is None else req.top_k,
        "seed": req.seed,
        "stop": tuple(stop),
        "stop_token_ids": tuple(req.stop_token_ids or ()),
        "logprobs": logprobs[1],
    }
    check_sampling(
        limits, backend.max_model_len, backend.vocab_size, **values,
        max_tokens_param=max_tokens[0], logprobs_param=logprobs[0],
    )  # fmt: skip
    return SamplingParams(
        **values,
        ignore_eos=bool(req.ignore_eos),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
    )
