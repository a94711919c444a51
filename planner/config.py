"""The autoscaler's configuration: SLO targets at a percentile, pool bounds, pacing.

Every bad value is refused here with a one-line error (engine.errors.InvalidRequestError),
before anything starts: `splitserve serve` prints it and exits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

PERCENTILES = (50.0, 90.0, 95.0, 99.0)
PREDICTORS = ("constant", "ewma")


@dataclass(frozen=True, slots=True)
class PoolLimits:
    min_workers: int = 1
    max_workers: int = 8

    def check(self, pool: str) -> None:
        if self.min_workers < 1:
            raise InvalidRequestError(
                f"{pool}: min workers must be at least 1, got {self.min_workers}"
            )
        if self.max_workers < self.min_workers:
            raise InvalidRequestError(
                f"{pool}: min workers ({self.min_workers}) above max ({self.max_workers})"
            )

    def clamp(self, n: int) -> int:
        return max(self.min_workers, min(self.max_workers, n))


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    ttft_target_s: float = 1.0  # prefill pool's SLO
    tpot_target_s: float = 0.1  # decode pool's SLO
    percentile: float = 90.0  # the SLO holds at this percentile of requests, not the mean
    prefill: PoolLimits = field(default_factory=PoolLimits)
    decode: PoolLimits = field(default_factory=PoolLimits)
    interval_s: float = 10.0  # one decision per interval
    window_s: float = 30.0  # latency percentiles over the requests finished in this window
    cooldown_s: float = 30.0  # a pool that just changed is left alone this long
    max_step: int = 1  # workers added or removed per pool per decision
    scale_down_below: float = 0.6  # shrink only while the percentile is under this x target
    headroom: float = 0.8  # plan each worker at most this fraction of its capacity
    predictor: str = "ewma"  # next interval's load: "constant" (last) or "ewma"
    ewma_alpha: float = 0.5
    min_requests: int = 5  # fewer finished in the window: latency is not judged

    def __post_init__(self) -> None:
        for name in ("ttft_target_s", "tpot_target_s", "interval_s", "window_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise InvalidRequestError(f"{_flag(name)} must be a number above 0, got {value}")
        if self.percentile not in PERCENTILES:
            allowed = ", ".join(f"{p:g}" for p in PERCENTILES)
            raise InvalidRequestError(
                f"SLO percentile must be one of {allowed}; got {self.percentile:g}"
            )
        self.prefill.check("prefill")
        self.decode.check("decode")
        if self.cooldown_s < 0 or self.max_step < 1:
            raise InvalidRequestError("cooldown must be >= 0 s and the step at least 1 worker")
        if not (0 < self.scale_down_below < 1 and 0 < self.headroom <= 1):
            raise InvalidRequestError("scale_down_below must be in (0, 1), headroom in (0, 1]")
        if self.predictor not in PREDICTORS:
            raise InvalidRequestError(
                f"unknown load predictor {self.predictor!r} (one of {', '.join(PREDICTORS)})"
            )
        if not 0 < self.ewma_alpha <= 1:
            raise InvalidRequestError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha}")


def _flag(name: str) -> str:
    return {
        "ttft_target_s": "the TTFT target",
        "tpot_target_s": "the TPOT target",
        "interval_s": "the adjustment interval",
        "window_s": "the latency window",
    }[name]
