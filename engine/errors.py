"""Typed errors the engine raises for bad input.

Every error carries a one-line message that names the problem; the CLI prints
`error: <message>` and exits 2, HTTP maps them to 4xx OpenAI error bodies.
"""

from __future__ import annotations

from collections.abc import Sequence


class SplitServeError(Exception):
    """Base of every error splitserve raises on purpose."""


class ModelNotFoundError(SplitServeError):
    """An unknown model name, or a path that does not exist."""


class UnsupportedModelError(SplitServeError):
    """A checkpoint we cannot load: unknown architecture or quantization type."""


class OverloadedError(SplitServeError):
    """No capacity for the request right now: a pool's admission bound is reached, or no
    decode worker has free KV blocks. HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(SplitServeError):
    """The request could not be served by any worker (workers lost, KV transfers failed past
    the retry limit, the server is shutting down). HTTP 503, gRPC UNAVAILABLE."""


class DeadlineExceededError(SplitServeError):
    """The request's own deadline passed before it finished. HTTP 408, gRPC DEADLINE_EXCEEDED."""


class InvalidRequestError(SplitServeError):
    """A request whose parameters or prompt are not acceptable."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus at least one generated token) exceeds the context."""


def check_prompt(prompt_token_ids: Sequence[int], max_model_len: int, vocab_size: int) -> None:
    """The one prompt check: the engine runs it, and so does the router before any worker."""
    if not prompt_token_ids:
        raise InvalidRequestError("prompt is empty")
    if len(prompt_token_ids) + 1 > max_model_len:
        raise PromptTooLongError(
            f"prompt has {len(prompt_token_ids)} tokens; the context holds "
            f"{max_model_len} (prompt + at least 1 generated token)"
        )
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
