"""The drain state as the state file keeps it: what a restart needs, and nothing else.

Invariants: every event that holds the probe down (or whose impact is over while it is listed)
is written with what approval waited for before the crash: its drain start, the boot id it was
first seen in, and whether an approval may be in flight (`"approval": "sent"`); an event a gate
holds back (the VM serving) is written too, with its boot id, so that after the platform reboots
the VM its impact is known to be over and it never drains again; times are wall
clock (the monotonic clock restarts with the process) and are mapped back through one `Now`
reading at start-up, never into the future; a record that does not parse is skipped, not fatal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.events import SCHEDULED
from sidecar.machine import DrainState, Manual, Now, Phase, Tracked

SECTION = "drain"
_RESTORED_PHASES = {
    phase.value: phase for phase in (Phase.APPROVING, Phase.OVER, Phase.STARTED, Phase.HELD)
}
"""Kept across a restart; every other phase comes back as draining until the first poll."""


def drain_section(state: DrainState, now: Now) -> dict[str, Any]:
    """The part of the drain state a restart needs: drains in progress and approvals made."""
    events = {}
    for event_id, tracked in sorted(state.events.items()):
        if tracked.phase is Phase.IGNORED:
            continue
        record: dict[str, Any] = {"type": tracked.event_type, "phase": tracked.phase.value}
        if tracked.drain_started_wall is not None:
            record["drain_started"] = tracked.drain_started_wall
        if tracked.started_seen is not None:
            record["started_seen"] = round(now.wall_of(tracked.started_seen), 3)
        if tracked.boot_seen is not None:
            record["boot_seen"] = tracked.boot_seen
        if tracked.seen_before_start or tracked.status == SCHEDULED:
            record["seen_before_start"] = True
        if tracked.duration_seconds >= 0:
            record["duration"] = tracked.duration_seconds
        if tracked.phase is Phase.APPROVING:
            record["approval"] = "sent"
            record["attempts"] = tracked.attempts
        if tracked.phase is Phase.OVER:
            record["reason"] = tracked.reason
        events[event_id] = record
    section: dict[str, Any] = {
        "draining": events,
        "approved": dict(sorted(state.approved.items())),
    }
    if state.manual is not None:
        section["manual"] = {"reason": state.manual.reason, "since": state.manual.since_wall}
    return section


def restore_drain(sections: Mapping[str, Any], now: Now, boot_id: str | None) -> DrainState:
    """Rebuilds what the last process knew; the first poll then brings it up to date."""
    section = sections.get(SECTION)
    if not isinstance(section, dict):
        return DrainState(boot_id=boot_id)
    events: dict[str, Tracked] = {}
    draining = section.get("draining")
    for event_id, saved in (draining if isinstance(draining, dict) else {}).items():
        if isinstance(saved, dict):
            events[str(event_id)] = _tracked(str(event_id), saved, now)
    approved_section = section.get("approved")
    approved = {
        str(event_id): float(moment)
        for event_id, moment in (
            approved_section if isinstance(approved_section, dict) else {}
        ).items()
        if _number(moment) is not None
    }
    return DrainState(
        events=events, approved=approved, boot_id=boot_id, manual=_manual(section, now)
    )


def _tracked(event_id: str, saved: Mapping[str, Any], now: Now) -> Tracked:
    phase = _RESTORED_PHASES.get(str(saved.get("phase")), Phase.DRAINING)
    attempts = saved.get("attempts")
    duration = saved.get("duration")
    return Tracked(
        event_id=event_id,
        event_type=str(saved.get("type", "")),
        phase=phase,
        reason=str(saved.get("reason") or "restored from the state file"),
        duration_seconds=duration if isinstance(duration, int) else -1,
        drain_started=_moment(saved.get("drain_started"), now),
        drain_started_wall=_number(saved.get("drain_started")),
        started_seen=_moment(saved.get("started_seen"), now),
        boot_seen=saved["boot_seen"] if isinstance(saved.get("boot_seen"), str) else None,
        seen_before_start=saved.get("seen_before_start") is True,
        attempts=attempts if isinstance(attempts, int) else 0,
        outcome_unknown=phase is Phase.APPROVING,
    )


def _manual(section: Mapping[str, Any], now: Now) -> Manual | None:
    saved = section.get("manual")
    if not isinstance(saved, dict):
        return None
    since_wall = _number(saved.get("since"))
    since = _moment(since_wall, now)
    if since_wall is None or since is None:
        return None
    return Manual(str(saved.get("reason") or "restored"), since, since_wall)


def _moment(value: object, now: Now) -> float | None:
    """A saved wall time on this process's monotonic clock, never later than now."""
    wall = _number(value)
    return None if wall is None else min(now.mono, now.mono_of(wall))


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
