"""The simulator's virtual clock: callbacks booked at a time run in time order, ties in the
order they were booked."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._tie = itertools.count()  # also a count of the events booked

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._tie), fn, args))

    def run_events(self, until: float | None = None) -> None:
        """Run the booked callbacks (and those they book) until none is left or the next
        is past `until`."""
        heap = self._heap
        while heap:
            t, _, fn, args = heapq.heappop(heap)
            if until is not None and t > until:
                break
            self.now = t
            fn(t, *args)
