"""How to run the simulator: the options the CLI flags map to, one to one.

Invariant: options are built once (from flags or by a test) and never change; anything that
may change while running lives in the world's settings instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SUBSCRIPTION = "11111111-2222-4333-8444-555555555555"
"""Obviously fake, but a well-formed GUID like a real subscription id."""


@dataclass(frozen=True)
class ScheduleSpec:
    """``--schedule TYPE[:SECONDS]``: an event at start-up, NotBefore SECONDS from then."""

    event_type: str
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> ScheduleSpec:
        event_type, sep, seconds = text.partition(":")
        if not event_type:
            raise ValueError(f"expected TYPE[:SECONDS], got {text!r}")
        if not sep:
            return cls(event_type)
        try:
            value = float(seconds)
        except ValueError as exc:
            raise ValueError(f"SECONDS must be a number in {text!r}") from exc
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"SECONDS must be a non-negative number in {text!r}")
        return cls(event_type, value)


@dataclass(frozen=True)
class SimulatorOptions:
    """Mirrors the flags of ``sidecar simulate``; see ``main.configure_parser``."""

    host: str = "127.0.0.1"
    port: int = 8169
    vm_name: str = "web-1"
    resource_group: str = "rg-sim"
    subscription_id: str = DEFAULT_SUBSCRIPTION
    location: str = "westeurope"
    arm: bool = True
    arm_port: int = 8443
    ca_file: Path | None = None
    started_seconds: float = 5.0
    arm_retry_after: float = 1.0
    arm_page_size: int = 0
    arm_throttle: bool = False
    ready_file: Path | None = None
    schedule: tuple[ScheduleSpec, ...] = ()
    start_when: str = "any-approval"
    warmup_seconds: float = 0.0
