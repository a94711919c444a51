"""How much a worker's real steps scatter about the cost model, and for how long a slow
stretch lasts: a step takes the model's time x exp(x - var/2), x a sum of independent
components of the worker's own (log) slowness:

    (sd, tau) each  a stretch that lasts: an Ornstein-Uhlenbeck process of that standard
                    deviation whose correlation falls as exp(-lag / tau); a step takes its
                    mean over the step's span (a long prefill step averages out the short
                    stretches)
    white           drawn afresh for each decode step (sd `white`)
    prefill_white   the same for a step holding prompt tokens (what the lasting parts do
                    not explain of those steps' scatter)

var is the variance of x for that step, so the mean factor is 1 and the model's mean time
is kept. What changes is the spread, and a request that lives through a slow stretch is
slow on every one of its steps (its TPOT), where independent draws would average out over
its steps. On the CPU machine here the decode steps' real / modelled time kept an
autocorrelation of 0.2 one second on (two calibrations, 2026-12-07):
bench.sim_steps.fit_noise reads the components off a calibration's logged steps.

`NoiseTrack` realises one worker's lasting parts on a grid of GRID_S, lazily and from its
own seed: a fixed function of time, so a run of decode steps cut short and booked again
sees the same slowness at the same instants.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

GRID_S = 0.01  # the lasting parts are held this long (the shortest tau fitted is 0.05 s)


def averaged(tau: float, span: float) -> float:
    """The variance of an Ornstein-Uhlenbeck process's mean over `span`, as a fraction of
    its own: 2 (r - 1 + e^-r) / r^2, r = span / tau."""
    r = span / tau
    return 1.0 if r < 1e-6 else 2 * (r - 1 + math.exp(-r)) / (r * r)


@dataclass(frozen=True, slots=True)
class StepNoise:
    white: float = 0.0  # sd of the log factor drawn per decode step
    components: tuple[tuple[float, float], ...] = ()  # (sd, tau seconds) of lasting parts
    prefill_white: float | None = None  # per step holding prompt tokens (None: white)

    def lasting_variance(self, span: float) -> float:
        """The variance of the lasting parts' mean over a step of `span` seconds."""
        return sum(sd * sd * averaged(tau, span) for sd, tau in self.components)

    def to_json(self) -> dict[str, Any]:
        return {"white": self.white, "components": [list(c) for c in self.components],
                "prefill_white": self.prefill_white}  # fmt: skip

    @staticmethod
    def from_json(data: dict[str, Any] | None) -> StepNoise | None:
        if data is None:
            return None
        comps = tuple((float(sd), float(tau)) for sd, tau in data.get("components", []))
        white, pw = float(data.get("white", 0.0)), data.get("prefill_white")
        if any(sd < 0 or tau <= 0 for sd, tau in comps) or white < 0 or (pw or 0) < 0:
            raise ValueError(f"bad step noise {data}: sd >= 0 and tau > 0")
        return StepNoise(white, comps, None if pw is None else float(pw))


class NoiseTrack:
    """One worker's slowness over virtual time (see the module's docstring)."""

    def __init__(self, noise: StepNoise, seed: int):
        self.noise = noise
        self._rng = random.Random(seed)  # the grid's draws
        self._white = random.Random(seed + 1)  # each step's: the grid stays one function of t
        self._decay = [math.exp(-GRID_S / tau) for _, tau in noise.components]
        self._kick = [sd * math.sqrt(1 - d * d) for (sd, _), d in
                      zip(noise.components, self._decay, strict=True)]  # fmt: skip
        self._state = [self._rng.gauss(0.0, sd) for sd, _ in noise.components]
        self._sums = [0.0]  # the lasting parts summed over grid points [0, i)

    def factor(self, t: float, span: float, prefill: bool = False) -> float:
        """The factor on a step starting at `t` that the model times at `span` seconds."""
        n = self.noise
        lo = max(0, int(t / GRID_S))
        hi = max(lo + 1, int((t + span) / GRID_S))
        while len(self._sums) <= hi:
            self._extend()
        x = (self._sums[hi] - self._sums[lo]) / (hi - lo)
        white = n.white if not prefill or n.prefill_white is None else n.prefill_white
        if white:
            x += self._white.gauss(0.0, white)
        return math.exp(x - (white * white + n.lasting_variance(span)) / 2)

    def _extend(self) -> None:
        s, g = self._state, self._rng.gauss
        for j, (d, k) in enumerate(zip(self._decay, self._kick, strict=True)):
            s[j] = s[j] * d + g(0.0, k)
        self._sums.append(self._sums[-1] + sum(s))
