"""Scheduled Events starting up for each VM: enabled by its first call, off after a silent day.

Microsoft's Scheduled Events pages: the service "is enabled for your service the first time
you make a request for events. You should expect a delayed response in your first call of up
to two minutes", and it "is disabled for your service if it doesn't make a request to the
endpoint for 24 hours". IMDS's error table lists 410 Gone ("Retry after some time for a max of
70 seconds") and 404 Not Found. The simulator answers a VM's Scheduled Events calls with one
of those for ``warmup_seconds`` after the call that enabled its service.

Invariants: a VM's service is enabled by its first Scheduled Events request, or by its first
after ``IDLE_OFF_SECONDS`` without one; the warm-up window is measured from that request with
the ``warmup_seconds`` in force when asked (0, the default, refuses nothing); VM names compare
case-insensitively; the record is scenario state (a reset clears it).
"""

from __future__ import annotations

from sidecar.simulator.errors import ControlError

IDLE_OFF_SECONDS = 24 * 3600.0
WARMUP_STATUSES: tuple[int, ...] = (410, 404)


class Warmup:
    """When each VM's Scheduled Events service was enabled and last called."""

    def __init__(self) -> None:
        self._enabled_at: dict[str, float] = {}
        self._last_call: dict[str, float] = {}

    def warming(self, vm: str, now: float, seconds: float) -> bool:
        """Count a Scheduled Events request of ``vm``; whether it falls in the warm-up."""
        key = vm.casefold()
        last = self._last_call.get(key)
        if last is None or now - last >= IDLE_OFF_SECONDS:
            self._enabled_at[key] = now
        self._last_call[key] = now
        return now < self._enabled_at[key] + seconds

    def disable_all(self) -> None:
        """Every VM's next call enables its service again (and warms up again)."""
        self._enabled_at.clear()
        self._last_call.clear()


def parse_warmup_status(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in WARMUP_STATUSES:
        raise ControlError(400, "'warmup_status' must be 410 or 404")
    return value
