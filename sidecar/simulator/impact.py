"""An event's impact (the reboot, the freeze, the eviction), kept apart from its start.

In Azure a ``Started`` event stays in the document for minutes after its impact is over, so
"Started" does not say whether the VM is down right now. The simulator models the impact as a
window: it begins ``after`` seconds after the event starts and lasts ``seconds`` (``None``: the
VM does not come back, as after Preempt or Terminate). The simulator never reboots anything
itself; a test harness reads the window through the control API and acts on its VM.

Invariants: the window is derived from the event's start time and the clock on every read
(nothing is stored that could go stale); an explicit begin or end (from the control API)
overrides the derived time; the state is ``None`` before the event starts, then ``pending``,
``in-progress`` and ``over``, in that order, and ``over`` is only reached by a window that
ends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.simulator.errors import ControlError
from sidecar.simulator.times import iso8601

PENDING = "pending"
IN_PROGRESS = "in-progress"
OVER = "over"

DEFAULT_IMPACT_SECONDS: Mapping[str, float | None] = {
    "Reboot": 7.0,  # Microsoft's rough timeline: impact about 7 s
    "Redeploy": 60.0,
    "Preempt": None,  # the VM is gone
    "Terminate": None,
}
OTHER_IMPACT_SECONDS = 7.0
FREEZE_UNKNOWN_SECONDS = 5.0
"""A Freeze with DurationInSeconds -1 (unknown) freezes this long (Microsoft's example: 5)."""


def default_impact_seconds(event_type: str, duration: int) -> float | None:
    """How long the impact lasts unless the event says: Freeze takes its DurationInSeconds."""
    if event_type == "Freeze":
        return float(duration) if duration >= 0 else FREEZE_UNKNOWN_SECONDS
    return DEFAULT_IMPACT_SECONDS.get(event_type, OTHER_IMPACT_SECONDS)


@dataclass
class Impact:
    """The impact window of one event; times are POSIX seconds."""

    after: float = 0.0
    seconds: float | None = OTHER_IMPACT_SECONDS
    began: float | None = None
    """Set by the control API (``/impact``): the impact began then, whatever ``after`` says."""
    ended: float | None = None
    """Set by the control API (``/impact/end``): the impact ended then."""

    def start(self, started_at: float | None) -> float | None:
        if self.began is not None:
            return self.began
        return None if started_at is None else started_at + self.after

    def end(self, started_at: float | None) -> float | None:
        if self.ended is not None:
            return self.ended
        start = self.start(started_at)
        if start is None or self.seconds is None:
            return None
        return start + self.seconds

    def state(self, started_at: float | None, now: float) -> str | None:
        start = self.start(started_at)
        if start is None:
            return None
        if now < start:
            return PENDING
        end = self.end(started_at)
        if end is None or now < end:
            return IN_PROGRESS
        return OVER

    def begin_now(self, started_at: float | None, now: float) -> None:
        """The impact begins now; one in progress goes on, one that is over happens again."""
        if self.state(started_at, now) == IN_PROGRESS:
            return
        self.began = now
        self.ended = None

    def end_now(self, started_at: float | None, now: float) -> None:
        """The impact is over now; one still pending begins and ends at once."""
        state = self.state(started_at, now)
        if state == OVER:
            return
        if state == PENDING:
            self.began = now
        self.ended = now

    def describe(self, started_at: float | None, now: float) -> dict[str, Any]:
        """Times appear once they have happened, so a harness can act on them as they are."""
        state = self.state(started_at, now)
        start = self.start(started_at)
        end = self.end(started_at)
        return {
            "impact_after": self.after,
            "impact_seconds": self.seconds,
            "impact": state,
            "impact_started_at": (
                iso8601(start) if start is not None and state in (IN_PROGRESS, OVER) else None
            ),
            "impact_ended_at": iso8601(end) if end is not None and state == OVER else None,
        }


def parse_impact(body: Mapping[str, Any], *, event_type: str, duration: int) -> Impact:
    """``impact_after`` (default 0) and ``impact_seconds`` (default by type; null: no return)."""
    after = seconds_field(body, "impact_after", 0.0, nullable=False)
    if "impact_seconds" in body:
        seconds = seconds_field(body, "impact_seconds", None, nullable=True)
    else:
        seconds = default_impact_seconds(event_type, duration)
    return Impact(after=after if after is not None else 0.0, seconds=seconds)


def seconds_field(
    body: Mapping[str, Any], key: str, default: float | None, *, nullable: bool
) -> float | None:
    """A non-negative, finite number of seconds (or null, where allowed)."""
    value = body.get(key, default)
    if value is None:
        if nullable:
            return None
        raise ControlError(400, f"'{key}' must be a non-negative number of seconds")
    valid = isinstance(value, int | float) and not isinstance(value, bool)
    if not valid or value < 0 or not math.isfinite(value):
        nothing = " or null" if nullable else ""
        raise ControlError(400, f"'{key}' must be a non-negative number of seconds{nothing}")
    return float(value)
