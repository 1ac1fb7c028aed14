"""ARM request throttling as Azure documents it since 2024: token buckets per subscription.

Invariants: every ARM request whose bearer token the simulator issued takes one token of its
operation type (reads: GET and HEAD; deletes: DELETE; writes: every other method, POST actions
included) from two buckets: the caller's own (per subscription and principal) and the
subscription's global one (``global_factor`` times the size and refill); a bucket refills
continuously at its rate up to its size, on the world's clock. With throttling on, a request
that finds either bucket empty takes nothing and is refused with 429 and the whole seconds
until a token is back; off (the default) nothing is refused but the buckets still count, so the
``x-ms-ratelimit-remaining-subscription-*`` headers say what Azure would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from sidecar.simulator.errors import ControlError
from sidecar.simulator.times import Clock

READS = "reads"
WRITES = "writes"
DELETES = "deletes"


def operation_of(method: str) -> str:
    if method in ("GET", "HEAD"):
        return READS
    return DELETES if method == "DELETE" else WRITES


@dataclass
class ThrottleSettings:
    """Bucket sizes and refill rates (tokens per second), Azure's documented defaults."""

    enabled: bool = False
    read_bucket: float = 250.0
    read_refill: float = 25.0
    write_bucket: float = 200.0
    write_refill: float = 10.0
    delete_bucket: float = 200.0
    delete_refill: float = 10.0
    global_factor: float = 15.0
    """The subscription's global bucket, for all principals together, is this many times
    one principal's (size and refill)."""

    def limits(self, operation: str) -> tuple[float, float]:
        if operation == READS:
            return self.read_bucket, self.read_refill
        if operation == DELETES:
            return self.delete_bucket, self.delete_refill
        return self.write_bucket, self.write_refill

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def update(self, body: object) -> None:
        """``true``/``false``, or an object of the fields to change."""
        if isinstance(body, bool):
            self.enabled = body
            return
        if not isinstance(body, dict):
            raise ControlError(400, "'arm_throttle' must be true, false or an object")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ControlError(400, f"unknown arm_throttle settings: {', '.join(unknown)}")
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key == "enabled":
                if not isinstance(value, bool):
                    raise ControlError(400, "'arm_throttle.enabled' must be true or false")
            elif (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ControlError(400, f"'arm_throttle.{key}' must be a positive number")
            changes[key] = value if key == "enabled" else float(value)
        for key, value in changes.items():
            setattr(self, key, value)


@dataclass
class _Bucket:
    tokens: float
    updated: float

    def refill(self, size: float, rate: float, now: float) -> None:
        self.tokens = min(size, self.tokens + max(0.0, now - self.updated) * rate)
        self.updated = now


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    operation: str
    remaining: int
    retry_after: int

    @property
    def header(self) -> str:
        return f"x-ms-ratelimit-remaining-subscription-{self.operation}"


class Throttle:
    """The buckets; they belong to the platform and survive a world reset."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str, str], _Bucket] = {}

    def take(
        self, settings: ThrottleSettings, subscription: str, principal: str, method: str
    ) -> Verdict:
        operation = operation_of(method)
        size, rate = settings.limits(operation)
        factor = settings.global_factor
        now = self._clock()
        own = self._bucket((subscription.casefold(), principal.casefold(), operation), size, now)
        shared = self._bucket((subscription.casefold(), "", operation), size * factor, now)
        own.refill(size, rate, now)
        shared.refill(size * factor, rate * factor, now)
        empty = own.tokens < 1 or shared.tokens < 1
        if empty and settings.enabled:
            wait = max((1 - own.tokens) / rate, (1 - shared.tokens) / (rate * factor))
            remaining = int(min(own.tokens, shared.tokens))
            return Verdict(False, operation, remaining, max(1, math.ceil(wait)))
        own.tokens = max(0.0, own.tokens - 1)
        shared.tokens = max(0.0, shared.tokens - 1)
        return Verdict(True, operation, int(min(own.tokens, shared.tokens)), 0)

    def _bucket(self, key: tuple[str, str, str], size: float, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(size, now)
        return bucket

    def clear(self) -> None:
        self._buckets.clear()
