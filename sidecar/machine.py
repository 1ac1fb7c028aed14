"""The drain decisions as pure functions: `(state, input, now) -> Decision(state, actions)`.

No I/O and no clock reads happen here, so every rule is table-tested. Invariants:
- an event is approved only if it names this VM, is of a type we act on, is not yet `Started`,
  the approval policy allows it, and it was never approved before (`DrainState.approved`
  outlives the event and the process);
- approval is due no sooner than the drain period, measured on the monotonic clock (a wall-clock
  step neither shortens nor stretches a drain; only NotBefore is read through the wall clock);
  it waits for the gates in `waits_for` until the deadline, and never comes while a gate is in
  `blocked_by`;
- an approval whose outcome is unknown (sent, no answer) is sent again only after a poll shows
  the event still `Scheduled`: a `Started` event needs nothing more;
- the probe serves only after a successful poll, while no event for us holds it down and no
  drain by hand is on; an event whose impact is over (`SIDECAR_RETURN_AFTER=impact`) never holds
  it down again, nor is it approved or drained again;
- an event is forgotten only when a complete document no longer lists it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from enum import StrEnum
from typing import Literal

from sidecar import lifecycle
from sidecar.events import SCHEDULED, EventsDocument, ScheduledEvent
from sidecar.settings import LEGACY_2016, EventType, Settings

APPROVAL_MEMORY_SECONDS = 7 * 24 * 3600
"""How long an approved EventId is remembered after it left the document."""


@dataclass(frozen=True)
class Now:
    """One reading of both clocks: durations use `mono`; NotBefore and records kept across
    restarts use `wall`, mapped to `mono` at the moment of this reading."""

    mono: float
    wall: float

    def mono_of(self, wall_time: float) -> float:
        return wall_time - self.wall + self.mono

    def wall_of(self, mono_time: float) -> float:
        return mono_time - self.mono + self.wall


class Phase(StrEnum):
    HELD = "held"
    """Ours, but a gate (the capacity guard) keeps this VM serving a while before draining."""
    DRAINING = "draining"
    """Probe down; approval not due yet."""
    APPROVING = "approving"
    """Approval due: a POST is out, failed and waits for its retry, or its outcome is unknown."""
    APPROVED = "approved"
    """IMDS accepted our approval; the platform starts the event when it is ready."""
    WAITING = "waiting"
    """Probe down, but this sidecar does not approve: the platform starts it at NotBefore."""
    STARTED = "started"
    """The platform started the event; nothing to approve."""
    OVER = "over"
    """Still listed as Started, but its impact on this VM is over: serving again."""
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
    never_reason: str = "SIDECAR_APPROVE=never: the platform starts it at NotBefore"
    return_after: Literal["completed", "impact"] = "completed"
    impact_margin_seconds: float = 5.0
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings, vm_name: str) -> Policy:
        legacy = settings.api_version == LEGACY_2016
        return cls(
            vm_name=vm_name,
            event_types=frozenset(str(kind) for kind in settings.event_types),
            drain_seconds=settings.drain_seconds,
            min_drain_seconds=min(settings.min_drain_seconds, settings.drain_seconds),
            deadline_margin_seconds=settings.deadline_margin_seconds,
            approve="never" if legacy else settings.approve,
            never_reason="the 2016 preview has no approval: the platform starts the maintenance"
            if legacy
            else cls.never_reason,
            return_after=settings.return_after,
            retry_max_seconds=settings.backoff_max,
        )


@dataclass(frozen=True)
class Tracked:
    """What we know and decided about one EventId. Times are monotonic unless named `wall`."""

    event_id: str
    event_type: str
    phase: Phase
    reason: str
    resources: tuple[str, ...] = ()
    status: str = ""
    not_before_wall: float | None = None
    duration_seconds: int = -1
    drain_started: float | None = None
    drain_started_wall: float | None = None
    """The same moment on the wall clock, as first read: what people see and restarts resume."""
    approve_at: float | None = None
    idle_at: float | None = None
    """After the minimum drain: approval may come this early once the app has no connections."""
    deadline: float | None = None
    """NotBefore minus the margin: past it, approval no longer waits for the gates."""
    approved_wall: float | None = None
    attempts: int = 0
    retry_at: float | None = None
    outcome_unknown: bool = False
    """An approval may have reached IMDS unanswered: re-read the document before sending again."""
    last_error: str | None = None
    boot_seen: str | None = None
    """The boot id when we first saw the event: a different one later means the VM rebooted."""
    started_seen: float | None = None
    """When we first saw the event `Started`."""
    seen_before_start: bool = False
    """We saw it `Scheduled`, so a reboot after that is its impact (not an earlier one)."""
    impact_over_at: float | None = None
    """When a Freeze of known duration is over (`SIDECAR_RETURN_AFTER=impact` only)."""
    scheduled_seen: float | None = None
    """The last time we saw it `Scheduled`: a Freeze began after that."""
    hold_until: float | None = None
    """Held: the last moment the drain can start and still last the minimum before NotBefore."""

    @property
    def holds_probe_down(self) -> bool:
        return self.phase not in (Phase.IGNORED, Phase.OVER, Phase.HELD)


@dataclass(frozen=True)
class Manual:
    """A drain an operator asked for (`POST /drain`); it lasts until `POST /undrain`."""

    reason: str
    since: float
    since_wall: float


@dataclass(frozen=True)
class DrainState:
    ready: bool = False
    """False until the first successful poll: after a reboot we know nothing yet."""
    events: Mapping[str, Tracked] = field(default_factory=dict)
    approved: Mapping[str, float] = field(default_factory=dict)
    """EventId -> wall time IMDS accepted our approval; never approve these again."""
    incarnation: int | None = None
    waits_for: frozenset[str] = frozenset()
    """Gates approval waits for until the deadline (e.g. the NIC still leaving its pools)."""
    blocked_by: frozenset[str] = frozenset()
    """Gates that allow no approval now, not even at the deadline (e.g. a failed drain hook)."""
    held_by: frozenset[str] = frozenset()
    """Gates that keep this VM serving before a new drain starts (the capacity guard)."""
    connections: int | None = None
    """Established connections to the app's ports while draining; None when not counted."""
    boot_id: str | None = None
    """This boot's id (constant for the process): compared with `Tracked.boot_seen`."""
    manual: Manual | None = None

    @property
    def draining(self) -> bool:
        """The probe is held down: an event of ours (approved or not), or a drain by hand."""
        return self.manual is not None or _draining(self.events)

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    @property
    def drain_since(self) -> float | None:
        """When the probe went down for the drain in progress (monotonic)."""
        moments = [t.drain_started for t in self.events.values() if t.holds_probe_down]
        if self.manual is not None:
            moments.append(self.manual.since)
        return min((m for m in moments if m is not None), default=None)

    @property
    def drain_deadline(self) -> float | None:
        """The earliest approval deadline of the events we drain for (monotonic)."""
        deadlines = [t.deadline for t in self.events.values() if t.holds_probe_down]
        return min((d for d in deadlines if d is not None), default=None)

    def next_wakeup(self) -> float | None:
        """The next moment `tick` has something to do, if any."""
        moments = [
            moment
            for t in self.events.values()
            for moment in (
                self.first_try_at(t) if t.phase is Phase.DRAINING else None,
                t.retry_at if t.phase is Phase.APPROVING and not t.outcome_unknown else None,
                t.impact_over_at if t.phase is Phase.STARTED else None,
                t.hold_until if t.phase is Phase.HELD else None,
            )
            if moment is not None
        ]
        return min(moments, default=None)

    def first_try_at(self, tracked: Tracked) -> float | None:
        """When a draining event is due: its approve time, sooner once the app is idle, later
        while a gate waits (but not past the deadline), never while a gate blocks."""
        due = tracked.approve_at
        if due is None or self.blocked_by:
            return None
        if self.connections == 0 and tracked.idle_at is not None:
            due = min(due, tracked.idle_at)
        if not self.waits_for:
            return due
        if tracked.deadline is None:
            return None  # waits for the gates to report back
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


def observe(state: DrainState, document: EventsDocument, now: Now, policy: Policy) -> Decision:
    """Folds one successful poll into the state. Approvals are `tick`'s: the drain loop first
    tells its gates what the new state wants, then asks what is due."""
    events: dict[str, Tracked] = {}
    changes: list[Change] = []
    for event in document.events:
        before = state.events.get(event.event_id)
        tracked = _classify(event, before, now, policy, state)
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
        if event_id in events or now.wall - moment < APPROVAL_MEMORY_SECONDS
    }
    observed = replace(
        state, ready=True, events=events, approved=approved, incarnation=document.incarnation
    )
    return Decision(observed, changes=tuple(changes))


def tick(state: DrainState, now: Now, policy: Policy) -> Decision:
    """Time passed: start approvals whose moment came, retries whose back-off ran out, and
    return from impacts that are over."""
    actions: list[Approve] = []
    changes: list[Change] = []
    events = dict(state.events)
    for event_id, held in state.events.items():
        tracked = held
        if held.phase is Phase.HELD and (not state.held_by or _reached(held.hold_until, now)):
            released = replace(state, held_by=frozenset())
            tracked = _classify(_as_event(held), held, now, policy, released)
            events[event_id] = tracked
            changes.append(_change(held, tracked))
        over = (
            _impact_over(tracked, now, policy, state.boot_id)
            if tracked.phase is Phase.STARTED
            else None
        )
        if over is not None:
            events[event_id] = replace(tracked, phase=Phase.OVER, reason=over)
            changes.append(_change(tracked, events[event_id]))
            continue
        first_try = tracked.phase is Phase.DRAINING and _reached(state.first_try_at(tracked), now)
        retry = (
            tracked.phase is Phase.APPROVING
            and not tracked.outcome_unknown
            and not state.blocked_by
            and _reached(tracked.retry_at, now)
        )
        if not (first_try or retry) or event_id in state.approved:
            continue
        reason = _why_now(tracked, state, now) if first_try else f"retry {tracked.attempts + 1}"
        events[event_id] = replace(tracked, phase=Phase.APPROVING, reason=reason, retry_at=None)
        actions.append(Approve(event_id))
        if first_try:
            changes.append(_change(tracked, events[event_id]))
    return Decision(replace(state, events=events), tuple(actions), tuple(changes))


def _why_now(tracked: Tracked, state: DrainState, now: Now) -> str:
    """Why a first approval goes now, for the log and /status."""
    deadline = tracked.deadline
    at_deadline = deadline is not None and _reached(deadline, now)
    if state.waits_for and at_deadline:
        waiting = ", ".join(sorted(state.waits_for))
        return f"NotBefore is near: approving without waiting longer for {waiting}"
    if not _reached(tracked.approve_at, now):
        return "no connections left to the app"
    approve_at = tracked.approve_at
    if at_deadline and approve_at is not None and deadline is not None and approve_at >= deadline:
        return "NotBefore is near"
    return "drain period over"


def approval_succeeded(state: DrainState, event_id: str, now: Now) -> Decision:
    approved = {**state.approved, event_id: now.wall}
    tracked = state.events.get(event_id)
    if tracked is None:
        return Decision(replace(state, approved=approved))
    after = replace(
        tracked,
        phase=Phase.APPROVED,
        reason="IMDS accepted the approval",
        approved_wall=now.wall,
        attempts=tracked.attempts + 1,
        outcome_unknown=False,
        last_error=None,
    )
    events = {**state.events, event_id: after}
    return Decision(
        replace(state, events=events, approved=approved), changes=(_change(tracked, after),)
    )


def approval_failed(
    state: DrainState, event_id: str, error: str, now: Now, policy: Policy, *, unknown: bool
) -> Decision:
    """Schedules a retry with exponential back-off. `unknown`: the POST may have reached IMDS,
    so the retry also waits for a poll that shows the event still `Scheduled`."""
    tracked = state.events.get(event_id)
    if tracked is None or tracked.phase is not Phase.APPROVING:
        return Decision(state)
    attempts = tracked.attempts + 1
    delay = min(policy.retry_max_seconds, policy.retry_base_seconds * 2 ** (attempts - 1))
    after = replace(
        tracked,
        attempts=attempts,
        retry_at=now.mono + delay,
        outcome_unknown=unknown,
        last_error=error,
    )
    return Decision(replace(state, events={**state.events, event_id: after}))


def drain_by_hand(state: DrainState, reason: str, now: Now) -> DrainState:
    """An operator takes the VM out of rotation; a second request keeps the first's start."""
    if state.manual is not None:
        return replace(state, manual=replace(state.manual, reason=reason))
    return replace(state, manual=Manual(reason, now.mono, now.wall))


def undrain_by_hand(state: DrainState) -> DrainState:
    return replace(state, manual=None)


def _classify(
    event: ScheduledEvent, before: Tracked | None, now: Now, policy: Policy, state: DrainState
) -> Tracked:
    not_before = event.not_before
    seen = Tracked(
        event_id=event.event_id,
        event_type=event.event_type,
        phase=Phase.IGNORED,
        reason="",
        resources=event.resources,
        status=event.status,
        not_before_wall=not_before,
        duration_seconds=event.duration_seconds,
    )
    if not event.names(policy.vm_name):
        return replace(seen, reason="names other VMs, not us")
    if event.event_type not in policy.event_types:
        known = event.event_type in set(EventType)
        why = "not in SIDECAR_EVENT_TYPES" if known else "an unknown event type"
        return replace(seen, reason=f"{event.event_type} is {why}")

    manual = state.manual
    ours = replace(
        seen,
        # out of rotation by hand already: the balancer stopped sending flows back then
        drain_started=_kept(before, "drain_started", manual.since if manual else now.mono),
        drain_started_wall=_kept(
            before, "drain_started_wall", manual.since_wall if manual else now.wall
        ),
        approved_wall=state.approved.get(event.event_id),
        boot_seen=before.boot_seen if before is not None else state.boot_id,
        attempts=before.attempts if before is not None else 0,
    )
    if before is not None and before.phase is Phase.OVER:
        return replace(
            ours, phase=Phase.OVER, reason=before.reason, started_seen=before.started_seen
        )
    if event.started:
        return _started(ours, before, now, policy, state.boot_id)
    ours = replace(ours, scheduled_seen=now.mono)
    if ours.approved_wall is not None:
        return replace(ours, phase=Phase.APPROVED, reason="approved earlier")
    held = _held(event, before, now, policy, state)
    if held is not None:
        return replace(
            ours,
            phase=Phase.HELD,
            drain_started=None,
            drain_started_wall=None,
            hold_until=held,
            reason=f"kept serving by {', '.join(sorted(state.held_by))} until others are back; "
            "drains by NotBefore minus the minimum drain at the latest",
        )
    approve_at, reason = _approval_time(event, ours.drain_started or now.mono, now, policy)
    if approve_at is None:
        return replace(ours, phase=Phase.WAITING, reason=reason)
    ours = replace(
        ours,
        approve_at=approve_at,
        idle_at=(ours.drain_started or now.mono) + policy.min_drain_seconds,
        deadline=None if not_before is None else _deadline(not_before, now, policy),
    )
    if before is not None and before.phase is Phase.APPROVING:
        # the outcome is known once the document shows the event still Scheduled
        return replace(
            ours,
            phase=Phase.APPROVING,
            reason=before.reason,
            retry_at=before.retry_at if before.retry_at is not None else now.mono,
            outcome_unknown=False,
            last_error=before.last_error,
        )
    return replace(ours, phase=Phase.DRAINING, reason=reason)


def _held(
    event: ScheduledEvent, before: Tracked | None, now: Now, policy: Policy, state: DrainState
) -> float | None:
    """Until when a drain may wait for a gate, or None when it starts now: once started, a
    drain never goes back; without NotBefore, or with no time left, nothing waits."""
    if not state.held_by or state.manual is not None:
        return None
    if before is not None and before.phase is not Phase.HELD:
        return None
    not_before = event.not_before
    if not_before is None:
        return None
    latest = _deadline(not_before, now, policy) - policy.min_drain_seconds
    return latest if now.mono < latest else None


def _as_event(tracked: Tracked) -> ScheduledEvent:
    """An event as the document last showed it, to classify it again without a poll."""
    not_before = tracked.not_before_wall
    return ScheduledEvent(
        event_id=tracked.event_id,
        event_type=tracked.event_type,
        resources=tracked.resources,
        status=tracked.status or SCHEDULED,
        not_before_text="" if not_before is None else formatdate(not_before, usegmt=True),
        duration_seconds=tracked.duration_seconds,
    )


def _kept(before: Tracked | None, name: str, default: float) -> float:
    """A moment recorded at first sight keeps its value for the life of the event."""
    value = getattr(before, name, None) if before is not None else None
    return default if value is None else float(value)


def _started(
    ours: Tracked, before: Tracked | None, now: Now, policy: Policy, boot_id: str | None
) -> Tracked:
    started_seen = _kept(before, "started_seen", now.mono)
    seen_before_start = before is not None and (
        before.seen_before_start or before.status == SCHEDULED
    )
    impact_mode = policy.return_after == "impact"
    tracked = replace(
        ours,
        started_seen=started_seen,
        seen_before_start=seen_before_start,
        scheduled_seen=before.scheduled_seen if before is not None else None,
        impact_over_at=lifecycle.freeze_over_at(
            ours.event_type,
            ours.duration_seconds,
            started_seen,
            policy.impact_margin_seconds,
            before.scheduled_seen if before is not None else None,
        )
        if impact_mode
        else None,
    )
    over = _impact_over(tracked, now, policy, boot_id)
    if over is not None:
        return replace(tracked, phase=Phase.OVER, reason=over)
    if not impact_mode:
        reason = "the platform started it; serving again once it leaves the document"
    else:
        reason = lifecycle.started_reason(
            tracked.event_type, tracked.duration_seconds, seen_before_start=seen_before_start
        )
    return replace(tracked, phase=Phase.STARTED, reason=reason)


def _impact_over(tracked: Tracked, now: Now, policy: Policy, boot_id: str | None) -> str | None:
    if policy.return_after != "impact":
        return None
    return lifecycle.impact_over(
        tracked.event_type,
        duration_seconds=tracked.duration_seconds,
        boot_seen=tracked.boot_seen,
        boot_now=boot_id,
        over_at=tracked.impact_over_at,
        now=now.mono,
    )


def _deadline(not_before_wall: float, now: Now, policy: Policy) -> float:
    return now.mono_of(not_before_wall) - policy.deadline_margin_seconds


def _approval_time(
    event: ScheduledEvent, drain_started: float, now: Now, policy: Policy
) -> tuple[float | None, str]:
    """When to approve (monotonic), or None and why we leave the start to the platform."""
    if policy.approve == "never":
        return None, policy.never_reason
    if policy.approve == "leader" and not event.led_by(policy.vm_name):
        return None, "the first VM in Resources is the leader and approves it"
    drain_until = drain_started + policy.drain_seconds
    not_before = event.not_before
    if not_before is None:
        return drain_until, "approves after the drain period"
    deadline = _deadline(not_before, now, policy)
    if deadline < drain_started + policy.min_drain_seconds:
        return None, "NotBefore leaves less than the minimum drain: the platform starts it"
    if deadline < drain_until:
        return deadline, "approves just before NotBefore"
    return drain_until, "approves after the drain period"


def _draining(events: Mapping[str, Tracked]) -> bool:
    return any(t.holds_probe_down for t in events.values())


def _reached(moment: float | None, now: Now) -> bool:
    return moment is not None and now.mono >= moment


def _change(before: Tracked | None, after: Tracked) -> Change:
    return Change(
        after.event_id,
        after.event_type,
        before.phase if before else None,
        after.phase,
        after.reason,
    )
