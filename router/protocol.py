"""The OpenAI HTTP bodies as msgspec Structs, and the translation between them and the engine.

Unknown request fields are ignored (clients send extras); a field of the wrong type fails
decoding with msgspec's message, which names the field (`... - at `$.max_tokens``).
Extensions beyond OpenAI's fields: `top_k`, `ignore_eos`, `stop_token_ids`,
`include_stop_str_in_output` (vLLM's names).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import msgspec
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    PromptTooLongError,
    UnavailableError,
)
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from router.backend import Backend
from router.detokenize import token_text

# ---- requests --------------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    # a string, token ids, or a batch of one string / one token-id list
    prompt: str | list[str | int | list[int]]
    logprobs: int | None = None
    echo: bool = False


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


# ---- responses -------------------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob]


class AssistantMessage(msgspec.Struct):
    content: str
    role: str = "assistant"


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    object: str = "chat.completion"


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "splitserve"
    max_model_len: int | None = None
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


# ---- request -> engine, engine -> response, exception -> error body -----------------------


class APIError(Exception):
    """An OpenAI error body and its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return ErrorBody(self.message, self.type, self.param, self.code)


_FIELD_AT = re.compile(r"at `\$\.([A-Za-z_]+)|field `([A-Za-z_]+)`")


def api_error(exc: BaseException) -> APIError:
    """The OpenAI error for any exception (a 500 with no internals for the unexpected)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, msgspec.ValidationError):
        m = _FIELD_AT.search(str(exc))
        param = (m.group(1) or m.group(2)) if m else None
        return APIError(400, f"invalid request body: {exc}", param=param)
    if isinstance(exc, msgspec.DecodeError):
        return APIError(400, f"request body is not valid JSON: {exc}")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        first = str(exc).split(" ", 1)[0]
        return APIError(400, str(exc), param=first if first in _PARAM_NAMES else None)
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, OverloadedError):  # load is not the server failing: 429, retry later
        retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return APIError(429, str(exc), type="rate_limit_error", code="overloaded", headers=retry)
    if isinstance(exc, UnavailableError):
        return APIError(503, str(exc), type="server_error", code="unavailable")
    if isinstance(exc, DeadlineExceededError):
        return APIError(408, str(exc), type="timeout_error", code="deadline_exceeded")
    if isinstance(exc, StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind)
    return APIError(500, f"internal server error ({type(exc).__name__})", type="server_error")


_PARAM_NAMES = frozenset(
    f.name for t in (CompletionRequest, ChatCompletionRequest) for f in msgspec.structs.fields(t)
)


def check_model(backend: Backend, model: str | None) -> None:
    names = {backend.model_name, Path(backend.model_name).name, Path(backend.model_name).stem}
    if model and model not in names:
        message = f"model {model!r} does not exist; this server serves {backend.model_name!r}"
        raise APIError(404, message, param="model", code="model_not_found")


def completion_prompt_ids(backend: Backend, prompt: str | list[str | int | list[int]]) -> list[int]:
    if isinstance(prompt, str):
        return backend.tokenizer.encode(prompt)
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if len(prompt) > 1:
        raise APIError(
            400, "batched prompts are not supported: send one prompt per request", param="prompt"
        )
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    one = prompt[0]
    if isinstance(one, str):
        return backend.tokenizer.encode(one)
    if isinstance(one, list):
        return one
    raise APIError(
        400,
        "prompt must be a string, a list of token ids, or a list of one of those",
        param="prompt",
    )


def chat_prompt_ids(backend: Backend, messages: list[ChatMessage]) -> list[int]:
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    turns = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "".join(p.text or "" for p in content)
        turns.append({"role": m.role, "content": content or ""})
    return backend.tokenizer.encode_chat(turns)


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None
) -> SamplingParams:
    """Engine params; raises InvalidRequestError (400) on bad values."""
    if req.n != 1:
        raise APIError(400, f"n must be 1, got {req.n}", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        seed=req.seed,
        stop=tuple(stop),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


def completion_logprobs(
    tok: Tokenizer, logprobs: list[SampledToken], offset: list[int]
) -> CompletionLogprobs:
    """The legacy completions logprobs; `offset` is the running text offset, advanced here."""
    tokens = [token_text(tok, lp.token_id) for lp in logprobs]
    offsets = []
    for t in tokens:
        offsets.append(offset[0])
        offset[0] += len(t)
    tops: list[dict[str, float] | None] = []
    for lp in logprobs:
        top: dict[str, float] = {}
        for i, v in lp.top_logprobs or []:  # most likely first; tokens that read alike: keep it
            top.setdefault(token_text(tok, i), v)
        tops.append(top)
    return CompletionLogprobs(tokens, [lp.logprob for lp in logprobs], tops, offsets)


def chat_logprobs(tok: Tokenizer, logprobs: list[SampledToken]) -> ChatLogprobs:
    content = []
    for lp in logprobs:
        top = [_top(tok, i, v) for i, v in lp.top_logprobs or []]
        t = token_text(tok, lp.token_id)
        logprob = lp.logprob if lp.logprob is not None else float("nan")
        content.append(TokenLogprob(t, logprob, list(t.encode()), top))
    return ChatLogprobs(content)


def _top(tok: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    t = token_text(tok, token_id)
    return TopLogprob(t, logprob, list(t.encode()))
