"""The Scheduled Events document and the simulated platform that moves it along.

Invariants:
- the document only ever holds ``Scheduled`` or ``Started`` events; a finished or cancelled
  event simply disappears (as in IMDS);
- every visible change (add, start, approval, cancel, removal, NotBefore or Resources change)
  bumps ``DocumentIncarnation``, which never goes down;
- the platform's own moves (start once NotBefore has passed, removal ``started_for`` seconds
  after start, or ``linger`` seconds after the impact ended) are applied lazily, dated when
  they were due, before anything reads or changes the book, so the document is consistent
  whatever the polling rate;
- the impact (see ``impact``) is invisible in IMDS: it never bumps ``DocumentIncarnation``;
- an approval always starts an ``any-approval`` event; an ``all-approvals`` event starts once
  every VM its ``Resources`` name has approved through its own view (or at NotBefore).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.simulator.errors import ControlError
from sidecar.simulator.impact import Impact, parse_impact, seconds_field
from sidecar.simulator.times import Clock, iso8601, parse_time, rfc1123
from sidecar.simulator.versions import event_type_known

SCHEDULED = "Scheduled"
STARTED = "Started"

ANY_APPROVAL = "any-approval"
ALL_APPROVALS = "all-approvals"
START_WHEN: tuple[str, ...] = (ANY_APPROVAL, ALL_APPROVALS)
"""When approvals start an event: at the first one, or once every VM named has approved (on
shared hardware Microsoft's platform may wait for all of them, or for NotBefore)."""

DEFAULT_NOTICE: Mapping[str, float] = {
    "Freeze": 900.0,
    "Reboot": 900.0,
    "Redeploy": 600.0,
    "Preempt": 30.0,
    "Terminate": 300.0,
}
OTHER_NOTICE = 900.0

DEFAULT_DESCRIPTIONS: Mapping[str, str] = {
    "Freeze": "Virtual machine is being paused because of a memory-preserving Live Migration "
    "operation.",
    "Reboot": "Virtual machine is going to be restarted as requested by authorized user.",
    "Redeploy": "Virtual machine is going to be redeployed as requested by authorized user.",
    "Preempt": "Virtual machine is being evicted because Spot capacity is needed elsewhere.",
    "Terminate": "Virtual machine is being deleted as requested by authorized user.",
}
OTHER_DESCRIPTION = "Host server is undergoing maintenance."
SCHEDULED_EVENTS_NEWEST = "2020-07-01"


@dataclass
class ScheduledEvent:
    """One event as the platform knows it (more than IMDS shows)."""

    event_id: str
    event_type: str
    resources: list[str]
    resource_type: str
    status: str
    not_before: float | None
    started_at: float | None
    started_for: float | None
    duration: int
    description: str
    source: str
    extra: dict[str, Any]
    created_at: float
    impact: Impact = field(default_factory=Impact)
    linger: float | None = None
    """Seconds listed after the impact ended; when set it decides removal, not started_for."""
    start_when: str = ANY_APPROVAL

    def removal_due(self) -> float | None:
        if self.linger is not None:
            end = self.impact.end(self.started_at)
            return None if end is None else end + self.linger
        if self.started_at is None or self.started_for is None:
            return None
        return self.started_at + self.started_for


@dataclass(frozen=True)
class Approval:
    """A StartRequest as received: which event, when, through which VM's view, from where."""

    event_id: str
    at: float
    vm: str
    remote: str

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "at": iso8601(self.at),
            "vm": self.vm,
            "remote": self.remote,
        }


@dataclass(frozen=True)
class EventSpec:
    """A validated request to add an event; times are absolute."""

    event_type: str
    resources: tuple[str, ...]
    status: str
    not_before: float
    started_for: float | None
    duration: int
    description: str
    source: str
    resource_type: str
    event_id: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    impact: Impact = field(default_factory=Impact)
    linger: float | None = None
    start_when: str = ANY_APPROVAL


class UnknownEventError(Exception):
    """A StartRequest named an EventId the document does not hold."""

    def __init__(self, event_ids: Sequence[str]) -> None:
        super().__init__(", ".join(event_ids))
        self.event_ids = list(event_ids)


def render_event(event: ScheduledEvent, api_version: str) -> dict[str, Any]:
    """The event as IMDS shows it for ``api_version``; ``extra`` is merged last, on purpose."""
    resources = list(event.resources)
    if api_version < "2017-08-01" and event.resource_type == "VirtualMachine":
        # The 2017-03-01 preview prefixed IaaS VM names with "_" (removed in 2017-08-01).
        resources = ["_" + name for name in resources]
    not_before = ""
    if event.status == SCHEDULED and event.not_before is not None:
        not_before = rfc1123(event.not_before)
    out: dict[str, Any] = {
        "EventId": event.event_id,
        "EventType": event.event_type,
        "ResourceType": event.resource_type,
        "Resources": resources,
        "EventStatus": event.status,
        "NotBefore": not_before,
    }
    if api_version >= "2019-04-01":
        out["Description"] = event.description
    if api_version >= "2019-08-01":
        out["EventSource"] = event.source
    if api_version >= "2020-07-01":
        out["DurationInSeconds"] = event.duration
    out.update(event.extra)
    return out


class EventBook:
    """The one Scheduled Events document every VM view shares, plus the approvals received."""

    def __init__(self, clock: Clock, incarnation: int = 0) -> None:
        self._clock = clock
        self._events: dict[str, ScheduledEvent] = {}
        self._incarnation = incarnation
        self._approvals: list[Approval] = []

    @property
    def incarnation(self) -> int:
        self.advance()
        return self._incarnation

    @property
    def approvals(self) -> list[Approval]:
        return list(self._approvals)

    def events(self) -> list[ScheduledEvent]:
        self.advance()
        return list(self._events.values())

    def get(self, event_id: str) -> ScheduledEvent | None:
        self.advance()
        return self._events.get(event_id.casefold())

    def advance(self) -> None:
        """Apply the platform's moves that fell due since the last look."""
        now = self._clock()
        for key, event in list(self._events.items()):
            due = event.not_before
            if event.status == SCHEDULED and due is not None and due <= now:
                event.status = STARTED
                event.started_at = max(due, event.created_at)
                self._bump()
            removal = event.removal_due()
            if event.status == STARTED and removal is not None and removal <= now:
                del self._events[key]
                self._bump()

    def document(self, api_version: str) -> dict[str, Any]:
        """What IMDS shows for ``api_version``: events of types it did not know are left out."""
        self.advance()
        return {
            "DocumentIncarnation": self._incarnation,
            "Events": [
                render_event(event, api_version)
                for event in self._events.values()
                if event_type_known(event.event_type, api_version)
            ],
        }

    def add(self, spec: EventSpec) -> ScheduledEvent:
        self.advance()
        key = spec.event_id.casefold()
        if key in self._events:
            raise ControlError(409, f"event {spec.event_id} already exists")
        now = self._clock()
        started = spec.status == STARTED
        event = ScheduledEvent(
            event_id=spec.event_id,
            event_type=spec.event_type,
            resources=list(spec.resources),
            resource_type=spec.resource_type,
            status=spec.status,
            not_before=None if started else spec.not_before,
            started_at=now if started else None,
            started_for=spec.started_for,
            duration=spec.duration,
            description=spec.description,
            source=spec.source,
            extra=dict(spec.extra),
            created_at=now,
            impact=Impact(after=spec.impact.after, seconds=spec.impact.seconds),
            linger=spec.linger,
            start_when=spec.start_when,
        )
        self._events[key] = event
        self._bump()
        return event

    def start(self, event_id: str) -> ScheduledEvent:
        """Start an event now, as the platform would once it decides to go ahead."""
        event = self._require(event_id)
        if event.status == SCHEDULED:
            event.status = STARTED
            event.started_at = self._clock()
            self._bump()
        return event

    def begin_impact(self, event_id: str) -> ScheduledEvent:
        """The impact begins now (the event starts first if it has not)."""
        event = self.start(event_id)
        event.impact.begin_now(event.started_at, self._clock())
        self.advance()
        return event

    def end_impact(self, event_id: str) -> ScheduledEvent:
        """The impact is over now; removal by ``linger`` counts from here."""
        event = self._require(event_id)
        if event.status == SCHEDULED:
            raise ControlError(409, f"event {event.event_id} has not started; no impact to end")
        event.impact.end_now(event.started_at, self._clock())
        self.advance()
        return event

    def approve(
        self,
        event_ids: Sequence[str],
        vm: str,
        remote: str,
        api_version: str = SCHEDULED_EVENTS_NEWEST,
    ) -> list[ScheduledEvent]:
        """Record StartRequests; each named event starts for every VM it names, at once or, for
        ``all-approvals``, once the last VM named has approved.

        All-or-nothing: one unknown id refuses the whole request; an event ``api_version``'s
        document leaves out counts as unknown. Approving an event that has already started is
        accepted (Microsoft documents 200 even when another VM approved it).
        """
        self.advance()
        unknown = [
            event_id
            for event_id in event_ids
            if event_id.casefold() not in self._events
            or not event_type_known(self._events[event_id.casefold()].event_type, api_version)
        ]
        if unknown:
            raise UnknownEventError(unknown)
        now = self._clock()
        changed = False
        approved: list[ScheduledEvent] = []
        for event_id in event_ids:
            event = self._events[event_id.casefold()]
            self._approvals.append(Approval(event.event_id, now, vm, remote))
            if event.status == SCHEDULED and not self.awaiting_approval(event):
                event.status = STARTED
                event.started_at = now
                changed = True
            approved.append(event)
        if changed:
            self._bump()
        return approved

    def awaiting_approval(self, event: ScheduledEvent) -> list[str]:
        """The VMs an ``all-approvals`` event still waits for (none once it has started)."""
        if event.status != SCHEDULED or event.start_when != ALL_APPROVALS:
            return []
        approved = {a.vm.casefold() for a in self._approvals if a.event_id == event.event_id}
        return [name for name in event.resources if name.casefold() not in approved]

    def update(
        self,
        event_id: str,
        *,
        not_before: float | None = None,
        resources: Sequence[str] | None = None,
        started_for: float | None = None,
        change_started_for: bool = False,
        timing: Mapping[str, float | None] | None = None,
        start_when: str | None = None,
    ) -> ScheduledEvent:
        """Change what the control API may change; ``timing`` holds the keys given among
        ``linger``, ``impact_after`` and ``impact_seconds`` (none of them visible in IMDS).

        An ``all-approvals`` event whose VMs have now all approved starts now."""
        event = self._require(event_id)
        changed = False
        if not_before is not None:
            if event.status != SCHEDULED:
                raise ControlError(409, f"event {event.event_id} has started; NotBefore is fixed")
            if event.not_before != not_before:
                event.not_before = not_before
                changed = True
        if resources is not None and list(resources) != event.resources:
            event.resources = list(resources)
            changed = True
        if change_started_for:
            event.started_for = started_for
        for key, value in (timing or {}).items():
            if key == "linger":
                event.linger = value
            elif key == "impact_after":
                event.impact.after = value if value is not None else 0.0
            elif key == "impact_seconds":
                event.impact.seconds = value
        if start_when is not None:
            event.start_when = start_when
        approved = any(a.event_id == event.event_id for a in self._approvals)
        if event.status == SCHEDULED and approved and not self.awaiting_approval(event):
            event.status = STARTED
            event.started_at = self._clock()
            changed = True
        if changed:
            self._bump()
        self.advance()
        return event

    def cancel(self, event_id: str) -> ScheduledEvent:
        event = self._require(event_id)
        del self._events[event.event_id.casefold()]
        self._bump()
        return event

    def clear(self) -> int:
        self.advance()
        count = len(self._events)
        if count:
            self._events.clear()
            self._bump()
        return count

    def clear_approvals(self) -> None:
        self._approvals.clear()

    def describe(self, event: ScheduledEvent) -> dict[str, Any]:
        """The control API's view: the IMDS form (newest version) plus what IMDS hides."""
        removal = event.removal_due()
        return {
            **render_event(event, SCHEDULED_EVENTS_NEWEST),
            "not_before": iso8601(event.not_before) if event.not_before is not None else None,
            "started_at": iso8601(event.started_at) if event.started_at is not None else None,
            "started_for": event.started_for,
            "linger": event.linger,
            "removal_at": iso8601(removal) if removal is not None else None,
            "created_at": iso8601(event.created_at),
            **event.impact.describe(event.started_at, self._clock()),
            "start_when": event.start_when,
            "awaiting_approval": self.awaiting_approval(event),
            "approvals": [a.to_json() for a in self._approvals if a.event_id == event.event_id],
        }

    def _require(self, event_id: str) -> ScheduledEvent:
        self.advance()
        event = self._events.get(event_id.casefold())
        if event is None:
            raise ControlError(404, f"no event {event_id}")
        return event

    def _bump(self) -> None:
        self._incarnation += 1


_SPEC_KEYS = frozenset(
    {
        "type",
        "resources",
        "status",
        "not_before",
        "not_before_in",
        "duration",
        "started_for",
        "description",
        "source",
        "resource_type",
        "event_id",
        "extra",
        "impact_after",
        "impact_seconds",
        "linger",
        "start_when",
    }
)


def parse_event_spec(
    body: object,
    *,
    now: float,
    default_vm: str,
    started_seconds: float,
    start_when: str = ANY_APPROVAL,
) -> EventSpec:
    """Validate one control-API event object; unknown keys are refused to catch typos."""
    if not isinstance(body, dict):
        raise ControlError(400, "an event must be a JSON object")
    unknown = sorted(set(body) - _SPEC_KEYS)
    if unknown:
        raise ControlError(400, f"unknown event fields: {', '.join(unknown)}")
    event_type = body.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise ControlError(400, "'type' (a non-empty string) is required")
    status = body.get("status", SCHEDULED)
    if status not in (SCHEDULED, STARTED):
        raise ControlError(400, "'status' must be 'Scheduled' or 'Started'")
    duration = _integer(body, "duration", -1)
    return EventSpec(
        event_type=event_type,
        resources=tuple(parse_resources(body.get("resources", [default_vm]))),
        status=status,
        not_before=parse_not_before(body, now=now, event_type=event_type),
        started_for=_optional_seconds(body, "started_for", started_seconds),
        duration=duration,
        description=_text(
            body, "description", DEFAULT_DESCRIPTIONS.get(event_type, OTHER_DESCRIPTION)
        ),
        source=_text(body, "source", "Platform"),
        resource_type=_text(body, "resource_type", "VirtualMachine"),
        event_id=_text(body, "event_id", str(uuid.uuid4())),
        extra=_extra(body),
        impact=parse_impact(body, event_type=event_type, duration=duration),
        linger=seconds_field(body, "linger", None, nullable=True),
        start_when=parse_start_when(body.get("start_when", start_when)),
    )


def parse_start_when(value: object) -> str:
    if value not in START_WHEN:
        raise ControlError(400, f"'start_when' must be one of {', '.join(START_WHEN)}")
    return str(value)


def parse_resources(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ControlError(400, "'resources' must be a list of VM names")
    return list(value)


def parse_not_before(body: Mapping[str, Any], *, now: float, event_type: str) -> float:
    if "not_before" in body and "not_before_in" in body:
        raise ControlError(400, "give 'not_before' or 'not_before_in', not both")
    if "not_before" in body:
        text = body["not_before"]
        if not isinstance(text, str):
            raise ControlError(400, "'not_before' must be an RFC 1123 or ISO 8601 string")
        try:
            return parse_time(text)
        except ValueError as exc:
            raise ControlError(400, str(exc)) from exc
    seconds = body.get("not_before_in", DEFAULT_NOTICE.get(event_type, OTHER_NOTICE))
    if not _is_number(seconds) or not math.isfinite(seconds):
        raise ControlError(400, "'not_before_in' must be a number of seconds")
    return now + float(seconds)


def _optional_seconds(body: Mapping[str, Any], key: str, default: float) -> float | None:
    value = body.get(key, default)
    if value is None:
        return None
    if not _is_number(value) or value < 0 or not math.isfinite(value):
        raise ControlError(400, f"'{key}' must be a non-negative number of seconds or null")
    return float(value)


def _integer(body: Mapping[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ControlError(400, f"'{key}' must be an integer")
    return value


def _text(body: Mapping[str, Any], key: str, default: str) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise ControlError(400, f"'{key}' must be a string")
    return value


def _extra(body: Mapping[str, Any]) -> dict[str, Any]:
    value = body.get("extra", {})
    if not isinstance(value, dict):
        raise ControlError(400, "'extra' must be a JSON object")
    return dict(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
