"""What a drain waits for besides the clock, behind one small protocol.

A gate (the NIC's pools, the app's health, the app's drain hooks, ...) does its work in a task of
its own and answers the drain loop from memory, at once:
- `approval()`: OPEN; WAIT (approval waits for it, but not past the deadline); or BLOCK (no
  approval now, not even at the deadline: the platform starts the event at NotBefore);
- `probe_hold()`: why the probe must not serve yet, or None;
- `keeps_serving()`: why a new drain must wait, the VM still serving (capacity), or None.

Invariant: the drain loop tells every gate what it wants after each decision (`follow`), and
asks for answers only after that, so a gate is never consulted about a drain it has not heard of
(after a restart too: a restored drain is followed before anything is approved).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from sidecar.machine import DrainState, Manual, Phase, Tracked


class Approval(StrEnum):
    OPEN = "open"
    WAIT = "wait"
    BLOCK = "block"


@dataclass(frozen=True)
class Wanted:
    """What the drain loop wants of the gates right now (times are monotonic)."""

    ready: bool
    """A poll has succeeded since start-up: `draining` is known, not guessed."""
    draining: bool
    since: float | None
    """When the probe went down for this drain."""
    deadline: float | None
    """The earliest approval deadline of the events drained for (NotBefore minus the margin)."""
    events: tuple[Tracked, ...]
    """The events of ours that hold the probe down."""
    manual: Manual | None
    serving: bool = False
    """The probe answers 200 (as of the gates' answers before this decision)."""
    held: tuple[Tracked, ...] = ()
    """Events of ours whose drain a gate holds back (`Phase.HELD`)."""

    @classmethod
    def of(cls, state: DrainState, *, serving: bool) -> Wanted:
        return cls(
            ready=state.ready,
            draining=state.draining,
            since=state.drain_since,
            deadline=state.drain_deadline,
            events=tuple(t for t in state.events.values() if t.holds_probe_down),
            manual=state.manual,
            serving=serving,
            held=tuple(t for t in state.events.values() if t.phase is Phase.HELD),
        )


class Gate(Protocol):
    @property
    def name(self) -> str: ...

    def follow(self, wanted: Wanted) -> None:
        """Called after every decision; the work it starts happens in the gate's own task."""

    def approval(self) -> Approval: ...

    def probe_hold(self) -> str | None: ...

    def failure(self) -> str | None:
        """A failure people should be told of (ARM refusing, a hook failing), or None."""

    def keeps_serving(self) -> str | None:
        """Why a new drain must wait with this VM still in rotation (capacity), or None."""

    def status(self, *, detailed: bool) -> dict[str, Any]:
        """Its part of /status; identifiers and error texts only when `detailed`."""
