"""What people are told about a maintenance, derived purely from the drain state's changes.

Phases: `detected` (an event of ours appeared), `out-of-rotation` (the probe went down for a
drain), `approved` (IMDS accepted our approval), `back-in-rotation` (serving again: completed,
cancelled, impact over, or by hand) and `failure` (ARM, a hook, the capacity guard waiting).

Invariant: every notice has a key that is the same whoever derives it, before or after a
restart (event id + phase, or the drain's first event + phase), so a receiver, and our own
record of what was sent, can tell a repeat from a new fact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sidecar.events import format_time
from sidecar.machine import Change, DrainState, Phase, Tracked

DETECTED = "detected"
OUT = "out-of-rotation"
APPROVED = "approved"
BACK = "back-in-rotation"
FAILURE = "failure"


@dataclass(frozen=True)
class Notice:
    key: str
    phase: str
    text: str
    at: float
    """Wall time."""
    vm: str | None
    event: dict[str, Any] | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "text": ("[dry run] " if self.dry_run else "") + self.text,
            "phase": self.phase,
            "key": self.key,
            "vm": self.vm,
            "at": format_time(self.at),
            "event": self.event,
            "detail": self.detail,
            "dry_run": self.dry_run,
        }

    def to_record(self) -> dict[str, Any]:
        """As the state file keeps it until delivered."""
        return {
            "key": self.key,
            "phase": self.phase,
            "text": self.text,
            "at": self.at,
            "vm": self.vm,
            "event": self.event,
            "detail": self.detail,
            "dry_run": self.dry_run,
        }

    @classmethod
    def from_record(cls, data: object) -> Notice | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                key=str(data["key"]),
                phase=str(data["phase"]),
                text=str(data["text"]),
                at=float(data["at"]),
                vm=None if data.get("vm") is None else str(data["vm"]),
                event=data.get("event") if isinstance(data.get("event"), dict) else None,
                detail=dict(data.get("detail") or {}),
                dry_run=data.get("dry_run") is True,
            )
        except (KeyError, TypeError, ValueError):
            return None


def drain_key(state: DrainState) -> str | None:
    """The drain's name: its first event (by drain start), or the drain by hand."""
    holding = [t for t in state.events.values() if t.holds_probe_down]
    if holding:
        first = min(holding, key=lambda t: (t.drain_started_wall or 0.0, t.event_id))
        return first.event_id
    if state.manual is not None:
        return f"manual-{state.manual.since_wall:.3f}"
    return None


def event_facts(tracked: Tracked) -> dict[str, Any]:
    return {
        "id": tracked.event_id,
        "type": tracked.event_type,
        "status": tracked.status,
        "not_before": format_time(tracked.not_before_wall),
        "resources": list(tracked.resources),
    }


def from_changes(
    before: DrainState, after: DrainState, changes: Iterable[Change], *, vm: str | None, now: float
) -> list[Notice]:
    """`detected`, `approved` and `out-of-rotation` from one decision."""
    notices = []
    for change in changes:
        tracked = after.events.get(change.event_id)
        if tracked is None:
            continue
        if change.before is None and change.after not in (Phase.IGNORED, Phase.OVER, None):
            when = format_time(tracked.not_before_wall) or "unknown"
            notices.append(
                Notice(
                    f"{change.event_id}:{DETECTED}",
                    DETECTED,
                    f"{vm}: {tracked.event_type} {change.event_id} scheduled "
                    f"(NotBefore {when}); {change.reason}",
                    now,
                    vm,
                    event_facts(tracked),
                )
            )
        if change.after is Phase.APPROVED and change.before is Phase.APPROVING:
            notices.append(
                Notice(
                    f"{change.event_id}:{APPROVED}",
                    APPROVED,
                    f"{vm}: approved {tracked.event_type} {change.event_id}; the platform "
                    "may start it now",
                    now,
                    vm,
                    event_facts(tracked),
                )
            )
    key = drain_key(after)
    if after.ready and after.draining and not before.draining and key is not None:
        main = after.events.get(key)
        why = "by hand: " + after.manual.reason if main is None and after.manual else "maintenance"
        notices.append(
            Notice(
                f"{key}:{OUT}",
                OUT,
                f"{vm}: out of rotation for {main.event_type + ' ' + key if main else why}",
                now,
                vm,
                event_facts(main) if main else None,
            )
        )
    return notices


def how_it_ended(before: DrainState, after: DrainState) -> str:
    """completed, cancelled, impact over, or by hand: why the drain is over."""
    hows = []
    for event_id, tracked in before.events.items():
        if not tracked.holds_probe_down:
            continue
        now = after.events.get(event_id)
        if now is not None and now.phase is Phase.OVER:
            hows.append("impact over")
        elif now is None:
            started = (
                tracked.phase in (Phase.STARTED, Phase.APPROVED) or tracked.status == "Started"
            )
            hows.append("completed" if started else "cancelled")
    if before.manual is not None and after.manual is None:
        hows.append("by hand")
    return ", ".join(dict.fromkeys(hows)) or "completed"


def back_in_rotation(
    key: str, how: str, event: dict[str, Any] | None, *, vm: str | None, now: float
) -> Notice:
    return Notice(
        f"{key}:{BACK}", BACK, f"{vm}: back in rotation ({how})", now, vm, event, {"how": how}
    )


def failure(key: str | None, gate: str, text: str, *, vm: str | None, now: float) -> Notice:
    """One per drain and gate: a retried failure is not news every second."""
    return Notice(
        f"{key or 'idle'}:{FAILURE}:{gate}",
        FAILURE,
        f"{vm}: {gate}: {text}",
        now,
        vm,
        detail={"gate": gate, "error": text},
    )
