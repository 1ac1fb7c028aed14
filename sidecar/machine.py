"""The drain decisions as pure functions: `(state, input, now) -> Decision(state, actions)`.

No I/O and no clock reads happen here, so every rule is table-tested. Invariants:
- an event is approved only if it names this VM, is of a type we act on, is not yet `Started`, the
  approval policy allows it, and it was never approved before (`DrainState.approved` outlives the
  event and the process);
- the probe serves only after a successful poll and while no event for us is pending;
- an event is forgotten only when a complete document no longer lists it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal

from sidecar.events import EventsDocument, ScheduledEvent
from sidecar.settings import EventType, Settings

APPROVAL_MEMORY_SECONDS = 7 * 24 * 3600
"""How long an approved EventId is remembered after it left the document."""


class Phase(StrEnum):
    DRAINING = "draining"
    """Probe down; approval not due yet."""
    APPROVING = "approving"
    """Approval due: a POST is out, or failed and waits for its retry."""
    APPROVED = "approved"
    """IMDS accepted our approval; the platform starts the event when it is ready."""
    WAITING = "waiting"
    """Probe down, but this sidecar does not approve: the platform starts it at NotBefore."""
    STARTED = "started"
    """The platform started the event; nothing to approve."""
    IGNORED = "ignored"
    """Not ours to act on (other VMs, or a type we do not drain for)."""


@dataclass(frozen=True)
class Policy:
    """The settings the decisions depend on, with the VM's identity resolved."""

    vm_name: str
    event_types: frozenset[str]
    drain_seconds: float
    min_drain_seconds: float
    deadline_margin_seconds: float
    approve: Literal["leader", "always", "never"]
    pool_action: bool = False
    """Whether a drain also takes the NIC out of its pools (approval then waits for it)."""
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings, vm_name: str) -> Policy:
        return cls(
            vm_name=vm_name,
            event_types=frozenset(str(kind) for kind in settings.event_types),
            drain_seconds=settings.drain_seconds,
            min_drain_seconds=min(settings.min_drain_seconds, settings.drain_seconds),
            deadline_margin_seconds=settings.deadline_margin_seconds,
            approve=settings.approve,
            pool_action=settings.arm_enabled,
            retry_max_seconds=settings.backoff_max,
        )


@dataclass(frozen=True)
class Tracked:
    """What we know and decided about one EventId."""

    event_id: str
    event_type: str
    phase: Phase
    reason: str
    resources: tuple[str, ...] = ()
    status: str = ""
    not_before: float | None = None
    drain_started: float | None = None
    approve_at: float | None = None
    idle_at: float | None = None
    """After the minimum drain: approval may come this early once the app has no connections."""
    deadline: float | None = None
    """NotBefore minus the margin: past it, approval no longer waits for the pools."""
    approved_at: float | None = None
    attempts: int = 0
    retry_at: float | None = None
    last_error: str | None = None

    @property
    def holds_probe_down(self) -> bool:
        return self.phase is not Phase.IGNORED


@dataclass(frozen=True)
class DrainState:
    ready: bool = False
    """False until the first successful poll: after a reboot we know nothing yet."""
    events: Mapping[str, Tracked] = field(default_factory=dict)
    approved: Mapping[str, float] = field(default_factory=dict)
    """EventId -> when IMDS accepted our approval; never approve these again."""
    incarnation: int | None = None
    pools_settled: bool = True
    """False while the pool action is still taking the NIC out; approval waits for it."""
    connections: int | None = None
    """Established connections to the app's ports while draining; None when not counted."""

    @property
    def draining(self) -> bool:
        """Some event of ours holds the probe down (whether or not we approve it)."""
        return _draining(self.events)

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    def next_wakeup(self) -> float | None:
        """The next moment `tick` has something to do, if any."""
        moments = [
            moment
            for t in self.events.values()
            for moment in (
                self.first_try_at(t) if t.phase is Phase.DRAINING else None,
                t.retry_at if t.phase is Phase.APPROVING else None,
            )
            if moment is not None
        ]
        return min(moments, default=None)

    def first_try_at(self, tracked: Tracked) -> float | None:
        """When a draining event is due: its approve time, sooner once the app is idle, later
        while the pools lag (but not past the deadline)."""
        due = tracked.approve_at
        if due is None:
            return None
        if self.connections == 0 and tracked.idle_at is not None:
            due = min(due, tracked.idle_at)
        if self.pools_settled:
            return due
        if tracked.deadline is None:
            return None  # waits for the pool action to report back
        return max(due, tracked.deadline)


@dataclass(frozen=True)
class Approve:
    """Send `{"StartRequests":[{"EventId": event_id}]}`."""

    event_id: str


@dataclass(frozen=True)
class Change:
    """A phase change worth a log line; `after` None means the event left the document."""

    event_id: str
    event_type: str
    before: Phase | None
    after: Phase | None
    reason: str


@dataclass(frozen=True)
class Decision:
    state: DrainState
    actions: tuple[Approve, ...] = ()
    changes: tuple[Change, ...] = ()


def observe(state: DrainState, document: EventsDocument, now: float, policy: Policy) -> Decision:
    """Folds one successful poll into the state, then approves whatever is due."""
    events: dict[str, Tracked] = {}
    changes: list[Change] = []
    for event in document.events:
        before = state.events.get(event.event_id)
        tracked = _classify(event, before, now, policy, state.approved)
        events[event.event_id] = tracked
        if before is None or before.phase is not tracked.phase:
            changes.append(_change(before, tracked))
    for event_id, before in state.events.items():
        if event_id in events:
            continue
        if document.complete or not before.holds_probe_down:
            changes.append(
                Change(event_id, before.event_type, before.phase, None, "left the document")
            )
        else:  # an unreadable entry may be this very event: keep draining for it
            events[event_id] = before
    approved = {
        event_id: moment
        for event_id, moment in state.approved.items()
        if event_id in events or now - moment < APPROVAL_MEMORY_SECONDS
    }
    drain_begins = not _draining(state.events) and _draining(events)
    observed = replace(
        state,
        ready=True,
        events=events,
        approved=approved,
        incarnation=document.incarnation,
        pools_settled=state.pools_settled and not (drain_begins and policy.pool_action),
    )
    due = tick(observed, now, policy)
    return Decision(due.state, due.actions, (*changes, *due.changes))


def tick(state: DrainState, now: float, policy: Policy) -> Decision:
    """Time passed: start approvals whose moment came, and retries whose back-off ran out."""
    actions: list[Approve] = []
    changes: list[Change] = []
    events = dict(state.events)
    for event_id, tracked in state.events.items():
        first_try = tracked.phase is Phase.DRAINING and _reached(state.first_try_at(tracked), now)
        retry = tracked.phase is Phase.APPROVING and _reached(tracked.retry_at, now)
        if not (first_try or retry) or event_id in state.approved:
            continue
        if not first_try:
            reason = f"retry {tracked.attempts + 1}"
        elif _reached(tracked.approve_at, now):
            reason = "drain period over"
        else:
            reason = "no connections left to the app"
        events[event_id] = replace(tracked, phase=Phase.APPROVING, reason=reason, retry_at=None)
        actions.append(Approve(event_id))
        if first_try:
            changes.append(_change(tracked, events[event_id]))
    return Decision(replace(state, events=events), tuple(actions), tuple(changes))


def approval_succeeded(state: DrainState, event_id: str, now: float) -> Decision:
    approved = {**state.approved, event_id: now}
    tracked = state.events.get(event_id)
    if tracked is None:
        return Decision(replace(state, approved=approved))
    after = replace(
        tracked,
        phase=Phase.APPROVED,
        reason="IMDS accepted the approval",
        approved_at=now,
        attempts=tracked.attempts + 1,
        last_error=None,
    )
    events = {**state.events, event_id: after}
    return Decision(
        replace(state, events=events, approved=approved), changes=(_change(tracked, after),)
    )


def approval_failed(
    state: DrainState, event_id: str, error: str, now: float, policy: Policy
) -> Decision:
    """Schedules a retry with exponential back-off; the loop keeps polling meanwhile."""
    tracked = state.events.get(event_id)
    if tracked is None or tracked.phase is not Phase.APPROVING:
        return Decision(state)
    attempts = tracked.attempts + 1
    delay = min(policy.retry_max_seconds, policy.retry_base_seconds * 2 ** (attempts - 1))
    after = replace(tracked, attempts=attempts, retry_at=now + delay, last_error=error)
    return Decision(replace(state, events={**state.events, event_id: after}))


def _classify(
    event: ScheduledEvent,
    before: Tracked | None,
    now: float,
    policy: Policy,
    approved: Mapping[str, float],
) -> Tracked:
    seen = Tracked(
        event_id=event.event_id,
        event_type=event.event_type,
        phase=Phase.IGNORED,
        reason="",
        resources=event.resources,
        status=event.status,
        not_before=event.not_before,
    )
    if not event.names(policy.vm_name):
        return replace(seen, reason=f"names {', '.join(event.resources) or 'no VM'}, not us")
    if event.event_type not in policy.event_types:
        known = event.event_type in set(EventType)
        why = "not in SIDECAR_EVENT_TYPES" if known else "an unknown event type"
        return replace(seen, reason=f"{event.event_type} is {why}")

    kept = before.drain_started if before is not None else None
    drain_started = now if kept is None else kept
    approved_at = approved.get(event.event_id)
    ours = replace(seen, drain_started=drain_started, approved_at=approved_at)
    if event.started:
        return replace(ours, phase=Phase.STARTED, reason="the platform started it")
    if approved_at is not None:
        return replace(ours, phase=Phase.APPROVED, reason="approved earlier")
    approve_at, reason = _approval_time(event, drain_started, policy)
    if approve_at is None:
        return replace(ours, phase=Phase.WAITING, reason=reason)
    ours = replace(ours, idle_at=drain_started + policy.min_drain_seconds)
    not_before = event.not_before
    if not_before is not None:
        ours = replace(ours, deadline=not_before - policy.deadline_margin_seconds)
    if before is not None and before.phase is Phase.APPROVING:
        return replace(
            ours,
            phase=Phase.APPROVING,
            reason=before.reason,
            approve_at=approve_at,
            attempts=before.attempts,
            retry_at=before.retry_at,
            last_error=before.last_error,
        )
    return replace(ours, phase=Phase.DRAINING, reason=reason, approve_at=approve_at)


def _approval_time(
    event: ScheduledEvent, drain_started: float, policy: Policy
) -> tuple[float | None, str]:
    """When to approve, or None and why we leave the start to the platform."""
    if policy.approve == "never":
        return None, "SIDECAR_APPROVE=never: the platform starts it at NotBefore"
    if policy.approve == "leader" and not event.led_by(policy.vm_name):
        leader = event.resources[0] if event.resources else "nobody"
        return None, f"{leader} is the leader (first in Resources) and approves it"
    drain_until = drain_started + policy.drain_seconds
    not_before = event.not_before
    if not_before is None:
        return drain_until, "approves after the drain period"
    deadline = not_before - policy.deadline_margin_seconds
    if deadline < drain_started + policy.min_drain_seconds:
        return None, "NotBefore leaves less than the minimum drain: the platform starts it"
    if deadline < drain_until:
        return deadline, "approves just before NotBefore"
    return drain_until, "approves after the drain period"


def _draining(events: Mapping[str, Tracked]) -> bool:
    return any(t.holds_probe_down for t in events.values())


def _reached(moment: float | None, now: float) -> bool:
    return moment is not None and now >= moment


def _change(before: Tracked | None, after: Tracked) -> Change:
    return Change(
        after.event_id,
        after.event_type,
        before.phase if before else None,
        after.phase,
        after.reason,
    )
