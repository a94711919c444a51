"""The OpenAI HTTP bodies as msgspec Structs, exceptions as OpenAI error bodies, and the
engine's logprobs as response fields (router.limits checks a request and makes engine inputs).

Request bodies are checked the way OpenAI checks them: an unknown top-level field is a 400
("Unrecognized request argument supplied: foo"); OpenAI's parameters this server does not
implement are accepted at their "off" value only (router.limits.OFF_VALUES), and the ones
that only label a request on OpenAI's side (`metadata`, `store`, `service_tier`, ...) are
accepted and ignored. A field of the wrong type fails decoding with msgspec's message, which
names the field (`... - at `$.max_tokens``); `null` is accepted for every optional field.
Extensions beyond OpenAI's fields: `top_k`, `ignore_eos`, `stop_token_ids`,
`include_stop_str_in_output` (vLLM's names).
"""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar

import msgspec
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    PromptTooLongError,
    UnavailableError,
)
from engine.sampler import SampledToken
from engine.tokenizer import Tokenizer
from router import limits as lim
from router.detokenize import token_text

# ---- requests --------------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = False


class _SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    ignore_eos: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    user: str | None = None
    deadline_s: float | None = None  # extension: seconds the request may take in all (408 after)
    # OpenAI's, not implemented: accepted at their off value (limits.check_unsupported)
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None


class CompletionRequest(_SamplingFields, kw_only=True):
    # a string, token ids, or a batch of one string / one token-id list
    prompt: str | list[str | int | list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: Any = None
    suffix: Any = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    """Unknown keys are ignored here: clients send back the assistant messages they got,
    with OpenAI's response-only keys (`refusal`, `annotations`, `audio`, ...) in them."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    # OpenAI's, ignored: they label or route a request, they do not change its output
    parallel_tool_calls: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None


_Request = TypeVar("_Request", CompletionRequest, ChatCompletionRequest)


def decode_request(body: bytes, kind: type[_Request]) -> _Request:
    """The request in `body`; APIError 400 for anything that is not one."""
    try:
        return msgspec.json.decode(body, type=kind)
    except RecursionError:  # msgspec's own depth limit
        raise APIError(400, "request body is not valid JSON: nested too deeply") from None


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


# ---- exception -> error body, engine -> response ------------------------------------------


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


_FIELD_AT = re.compile(r"at `\$\.([A-Za-z_]+)|required field `([A-Za-z_]+)`")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(.*)`$", re.DOTALL)


def api_error(exc: BaseException) -> APIError:
    """The OpenAI error for any exception (a 500 with no internals for the unexpected)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, msgspec.ValidationError):
        return _validation_error(exc)
    if isinstance(exc, msgspec.DecodeError):
        return APIError(400, f"request body is not valid JSON: {exc}")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, lim.LimitError):
        return APIError(400, str(exc), param=exc.param)
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
    if isinstance(exc, ClientDisconnect):  # gone while sending its body: nobody reads this
        return APIError(499, "client closed the connection before sending the whole body")
    if isinstance(exc, StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind)
    return APIError(500, f"internal server error ({type(exc).__name__})", type="server_error")


def _validation_error(exc: msgspec.ValidationError) -> APIError:
    if m := _UNKNOWN_FIELD.match(str(exc)):  # OpenAI's words for it
        return APIError(400, f"Unrecognized request argument supplied: {lim.clip(m.group(1))}")
    m = _FIELD_AT.search(str(exc))
    param = (m.group(1) or m.group(2)) if m else None
    return APIError(400, f"invalid request body: {exc}", param=param)


_PARAM_NAMES = frozenset(
    f.name for t in (CompletionRequest, ChatCompletionRequest) for f in msgspec.structs.fields(t)
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
