"""Client access, stdlib only (the CLI imports it): where the API key comes from, how a
presented one is checked, and the gate that drains the servers on shutdown.

key: --api-key, else $SPLITSERVE_API_KEY, else none (no key asked)
Gate: open ── enter() admits, leave() ──> close(): enter() refuses from now on
    └── await drained(grace_s): True once every admitted request has left, False when the
        grace ran out first (or stop_waiting() cut it short)
router.auth enforces both on HTTP and gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os

from engine.errors import SplitServeError

API_KEY_ENV = "SPLITSERVE_API_KEY"
GRACE_S = 30.0  # how long a drain waits for in-flight requests, by default


def resolve_api_key(flag: str | None) -> str | None:
    """The key from `--api-key`, else from $SPLITSERVE_API_KEY (empty: none); the one place
    the variable is read."""
    if flag is not None:
        if not flag.strip():
            raise SplitServeError("--api-key is empty")
        return flag.strip()
    return os.environ.get(API_KEY_ENV, "").strip() or None


class KeyCheck:
    """Compares a presented bearer token with the key in constant time (both sides hashed
    first, so neither content nor length leaks through timing)."""

    def __init__(self, key: str):
        self._digest = hashlib.sha256(key.encode()).digest()

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").strip().partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        return hmac.compare_digest(presented, self._digest) and scheme.lower() == "bearer"


class Gate:
    """Admits requests until `close()`; counts the admitted ones still running so shutdown
    waits for exactly them. Used from the serving loop only."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> bool:
        if self.draining:
            return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def close(self) -> None:
        self.draining = True

    def stop_waiting(self) -> None:
        """Release `drained` now (a forced exit); nothing is admitted after `close()`."""
        self._idle.set()

    async def drained(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
        return self.in_flight == 0
