"""The last minutes of traffic as the autoscaler reads it: arrivals (for the rate) and
finished requests (lengths, TTFT and TPOT), on the monotonic clock, trimmed to a horizon."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from planner.predict import Load


@dataclass(frozen=True, slots=True)
class Finished:
    t: float
    ttft_s: float | None
    tpot_s: float | None
    prompt_tokens: int
    output_tokens: int
    reservation_s: float | None = None  # waiting for KV room on a decode worker (its trace)


class RequestWindow:
    def __init__(self, horizon_s: float = 120.0):
        self.horizon_s = horizon_s
        self._arrivals: collections.deque[float] = collections.deque()
        self._finished: collections.deque[Finished] = collections.deque()

    def arrived(self, t: float) -> None:
        self._arrivals.append(t)
        self._trim(t)

    def finished(self, item: Finished) -> None:
        self._finished.append(item)
        self._trim(item.t)

    def _trim(self, now: float) -> None:
        edge = now - self.horizon_s
        while self._arrivals and self._arrivals[0] < edge:
            self._arrivals.popleft()
        while self._finished and self._finished[0].t < edge:
            self._finished.popleft()

    def load(self, now: float, interval_s: float) -> Load:
        """Arrivals per second over the last `interval_s`; mean lengths of the requests that
        finished in it (or, none having finished, over the whole horizon)."""
        rate = sum(t > now - interval_s for t in self._arrivals) / interval_s
        recent = [f for f in self._finished if f.t > now - interval_s] or list(self._finished)
        if not recent:
            return Load(rate, 0.0, 0.0)
        n = len(recent)
        return Load(rate, sum(f.prompt_tokens for f in recent) / n,
                    sum(f.output_tokens for f in recent) / n)  # fmt: skip

    def percentiles(
        self, now: float, window_s: float, pct: float, min_requests: int
    ) -> tuple[float | None, float | None, float | None]:
        """(TTFT, TPOT, reservation wait) at the `pct` percentile of the requests finished in
        the last `window_s`; None where fewer than `min_requests` carry that figure."""
        recent = [f for f in self._finished if f.t > now - window_s]
        return tuple(  # type: ignore[return-value]
            _pct([v for f in recent if (v := getattr(f, key)) is not None], pct, min_requests)
            for key in ("ttft_s", "tpot_s", "reservation_s")
        )


def _pct(values: list[float], pct: float, min_count: int) -> float | None:
    """Nearest-rank percentile (the value `pct`% of requests are at or under)."""
    if len(values) < max(1, min_count):
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]
