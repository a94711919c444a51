"""What one worker can take: a profile measured when it starts, corrected by live metrics.

    prefill: prompt tokens per second (the best of the batch sizes profiled: a busy worker
             batches), divided by a correction factor
    decode:  step time by batch size, fitted as fixed + per_sequence x batch; the most
             sequences one worker may run while a step stays within the TPOT target

Correction factors (as Dynamo's planner keeps them): observed / predicted, smoothed, and
clamped to [1/4, 4]. Prefill: the workers' measured busy fraction against the one the
profile predicts for the load; decode: the observed TPOT against the profile's step time
at the observed batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_CLAMP = (0.25, 4.0)


@dataclass(frozen=True, slots=True)
class PrefillProfile:
    tokens_per_s: dict[int, float]  # batch of N prompt tokens -> prompt tokens per second

    @property
    def capacity(self) -> float:
        return max(self.tokens_per_s.values(), default=0.0)


@dataclass(frozen=True, slots=True)
class DecodeProfile:
    step_s: dict[int, float]  # batch size -> seconds per decode step

    def fit(self) -> tuple[float, float]:
        """(fixed seconds, seconds per sequence): least squares over the profiled batches."""
        pts = sorted(self.step_s.items())
        if len(pts) == 1:
            return pts[0][1], 0.0
        n = len(pts)
        mx, my = sum(b for b, _ in pts) / n, sum(s for _, s in pts) / n
        var = sum((b - mx) ** 2 for b, _ in pts)
        slope = sum((b - mx) * (s - my) for b, s in pts) / var if var else 0.0
        slope = max(slope, 0.0)
        return max(my - slope * mx, 0.0), slope

    def step_at(self, batch: float) -> float:
        fixed, per_seq = self.fit()
        return fixed + per_seq * batch

    def max_batch(self, tpot_s: float) -> int:
        """The most sequences a step may hold and stay within `tpot_s` (0: not even one)."""
        fixed, per_seq = self.fit()
        if fixed + per_seq > tpot_s:
            return 0
        if per_seq == 0:
            return max(self.step_s)  # flat: no more than what was measured
        return int((tpot_s - fixed) / per_seq)


@dataclass(slots=True)
class Capacity:
    prefill: PrefillProfile
    decode: DecodeProfile
    alpha: float = 0.5  # smoothing of the correction factors
    prefill_factor: float = 1.0  # > 1: the workers run slower than the profile says
    decode_factor: float = 1.0
    _seen: set[str] = field(default_factory=set)

    def prefill_tokens_per_s(self) -> float:
        """One prefill worker's corrected capacity, prompt tokens per second."""
        return self.prefill.capacity / self.prefill_factor

    def decode_batch(self, tpot_target_s: float) -> int:
        """The most sequences one decode worker may run within the target, corrected."""
        return self.decode.max_batch(tpot_target_s / self.decode_factor)

    def correct_prefill(self, load_tokens_per_s: float, workers: int, busy: float) -> None:
        """`busy`: the prefill workers' mean fraction of time stepping over the interval."""
        if workers <= 0 or load_tokens_per_s <= 0 or busy <= 0.05:
            return  # idle: nothing to learn
        predicted = load_tokens_per_s / (workers * self.prefill.capacity)
        if predicted >= 1.0 or busy >= 0.95:
            return  # saturated: the queue grows, the busy fraction says nothing of speed
        self.prefill_factor = self._blend("prefill", self.prefill_factor, busy / predicted)

    def correct_decode(self, tpot_s: float | None, batch: float) -> None:
        """`tpot_s`: observed TPOT; `batch`: the mean sequences per decode worker meanwhile."""
        if tpot_s is None or batch < 1:
            return
        self.decode_factor = self._blend(
            "decode", self.decode_factor, tpot_s / self.decode.step_at(batch)
        )

    def _blend(self, key: str, old: float, ratio: float) -> float:
        ratio = min(max(ratio, _CLAMP[0]), _CLAMP[1])
        if key not in self._seen:  # the first live figure replaces the profile's 1.0
            self._seen.add(key)
            return ratio
        return min(max(self.alpha * ratio + (1 - self.alpha) * old, _CLAMP[0]), _CLAMP[1])


NO_COUNT = 1 << 30  # what a load needs when a worker has no capacity at the target


def ceil_div(load: float, per_worker: float) -> int:
    if load <= 0:
        return 0
    if per_worker <= 0:
        return NO_COUNT  # no capacity at all: as many as allowed
    return math.ceil(load / per_worker - 1e-9)
