"""Exponential back-off with jitter, so that a fleet failing together does not retry together."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = max(cap, base)
        self.failures = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def next_delay(self, at_least: float = 0.0) -> float:
        """The pause before the next try; `at_least` honours Retry-After, up to the cap."""
        self.failures += 1
        ceiling = min(self.cap, self.base * 2**self.failures)
        return max(min(at_least, self.cap), self._rng.uniform(self.base, ceiling))

    def reset(self) -> None:
        self.failures = 0
