"""Next interval's load from the intervals seen so far: the last value (constant) or an
exponentially weighted moving average, per quantity (arrival rate, prompt and output
lengths)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Load:
    rate: float  # requests per second
    prompt_tokens: float  # mean per request
    output_tokens: float


@dataclass(slots=True)
class Predictor:
    kind: str = "ewma"  # | "constant"
    alpha: float = 0.5
    _state: Load | None = field(default=None, repr=False)

    def observe(self, load: Load) -> None:
        if self._state is None or self.kind == "constant":
            self._state = Load(load.rate, load.prompt_tokens, load.output_tokens)
            return
        a, s = self.alpha, self._state
        s.rate = a * load.rate + (1 - a) * s.rate
        if load.rate > 0:  # lengths of an idle interval are unknown, not zero
            s.prompt_tokens = a * load.prompt_tokens + (1 - a) * s.prompt_tokens
            s.output_tokens = a * load.output_tokens + (1 - a) * s.output_tokens

    def predict(self) -> Load:
        """The next interval's load; an upward jump counts at once (a ramp must not wait
        for the average to catch up), a fall only as the average follows it."""
        s = self._state or Load(0.0, 0.0, 0.0)
        return Load(s.rate, s.prompt_tokens, s.output_tokens)

    def predict_with(self, latest: Load) -> Load:
        p = self.predict()
        return Load(max(p.rate, latest.rate), max(p.prompt_tokens, latest.prompt_tokens),
                    max(p.output_tokens, latest.output_tokens))  # fmt: skip
