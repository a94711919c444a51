"""Holds a decode worker's time per output token to a target by bounding its batch.

    start: START_LANES lanes (slow start: a burst on a worker that has only seen light
           load is let in as fast as the steps show room, not all at once)
    every decode-only step: (batch B, step ms) ──> step over the target: lanes = B - 1
                                                   step under 0.85 x target, B at the cap:
                                                   lanes + 1 (at most max_lanes)
    the scheduler hands out reservations only while a lane is free, so a request that
    would slow everyone waits before its prefill (in the router's line, or a 429), not
    between its first and second tokens.

Pure: plain numbers in, a lane count out. A step's time is its TPOT: a decode step gives
every running sequence one token.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError

GROW_BELOW = 0.85  # grow only with room to spare: step time is noisy on shared cores
START_LANES = 4  # before any step has been seen at a larger batch


@dataclass(slots=True)
class TpotGovernor:
    target_ms: float
    max_lanes: int
    lanes: int = 0  # 0: start at START_LANES (or max_lanes, if smaller)
    smoothed_ms: float = 0.0  # EWMA of recent decode steps

    def __post_init__(self) -> None:
        if not self.target_ms > 0:
            raise InvalidRequestError(f"the TPOT target must be positive, got {self.target_ms}")
        self.lanes = self.lanes or min(START_LANES, self.max_lanes)

    def observe(self, batch: int, step_ms: float) -> int:
        """A decode step of `batch` sequences took `step_ms`: the lanes to allow now."""
        self.smoothed_ms = (
            step_ms if not self.smoothed_ms else 0.7 * self.smoothed_ms + 0.3 * step_ms
        )
        if self.smoothed_ms > self.target_ms and batch > 1:
            self.lanes = max(1, min(self.lanes, batch - 1))
        elif self.smoothed_ms < GROW_BELOW * self.target_ms and batch >= self.lanes:
            self.lanes = min(self.max_lanes, self.lanes + 1)
        return self.lanes
