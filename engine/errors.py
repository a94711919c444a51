"""Typed errors the engine raises for bad input.

Every error carries a one-line message that names the problem; the CLI prints
`error: <message>` and exits 2, HTTP maps them to 4xx OpenAI error bodies.
"""

from __future__ import annotations


class SplitServeError(Exception):
    """Base of every error splitserve raises on purpose."""


class ModelNotFoundError(SplitServeError):
    """An unknown model name, or a path that does not exist."""


class UnsupportedModelError(SplitServeError):
    """A checkpoint we cannot load: unknown architecture or quantization type."""


class InvalidRequestError(SplitServeError):
    """A request whose parameters or prompt are not acceptable."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus at least one generated token) exceeds the context."""
