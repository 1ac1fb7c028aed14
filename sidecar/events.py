"""The Scheduled Events document, parsed strictly enough to be safe and loosely enough to last.

Invariant: an `EventsDocument` holds only events whose identity (EventId, EventType, Resources,
EventStatus) is well formed. Unknown fields and event types pass through untouched; an entry that
cannot be trusted is skipped and the document marked incomplete, so nobody concludes that an event
has gone just because one poll could not read it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError


class MalformedDocument(ValueError):
    """The answer is not a Scheduled Events document at all."""


SCHEDULED = "Scheduled"
STARTED = "Started"


class ScheduledEvent(BaseModel):
    """One entry of `Events`, with IMDS's field names as aliases."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    event_id: Annotated[StrictStr, Field(alias="EventId", min_length=1)]
    event_type: Annotated[StrictStr, Field(alias="EventType", min_length=1)]
    resources: Annotated[tuple[StrictStr, ...], Field(alias="Resources")]
    status: Annotated[StrictStr, Field(alias="EventStatus", min_length=1)]
    resource_type: Annotated[StrictStr, Field(alias="ResourceType")] = ""
    not_before_text: Annotated[StrictStr, Field(alias="NotBefore")] = ""
    description: Annotated[StrictStr, Field(alias="Description")] = ""
    source: Annotated[StrictStr, Field(alias="EventSource")] = ""
    duration_seconds: Annotated[StrictInt, Field(alias="DurationInSeconds")] = -1

    @property
    def started(self) -> bool:
        return self.status == STARTED

    @property
    def not_before(self) -> float | None:
        """NotBefore as a Unix time; None once started, or when Azure sends something unreadable."""
        return parse_not_before(self.not_before_text)

    def names(self, vm_name: str) -> bool:
        """Azure compares VM names case-insensitively, so do we."""
        wanted = vm_name.casefold()
        return any(resource.casefold() == wanted for resource in self.resources)

    def led_by(self, vm_name: str) -> bool:
        """Microsoft's suggested leader for an approval is the first VM in `Resources`."""
        return bool(self.resources) and self.resources[0].casefold() == vm_name.casefold()


class EventsDocument(BaseModel):
    model_config = ConfigDict(frozen=True)

    incarnation: int
    events: tuple[ScheduledEvent, ...]
    skipped: tuple[str, ...] = ()
    """Why entries were dropped; non-empty means absence from `events` proves nothing."""
    unknown_fields: frozenset[str] = frozenset()
    """Fields this version does not know (a newer api-version?): ignored, worth a log line."""

    @property
    def complete(self) -> bool:
        return not self.skipped


DOCUMENT_FIELDS = frozenset({"DocumentIncarnation", "Events"})
EVENT_FIELDS = frozenset(field.alias for field in ScheduledEvent.model_fields.values())


def parse_not_before(text: str) -> float | None:
    """RFC 1123 (`Mon, 19 Sep 2016 18:29:47 GMT`) to Unix time; "" means already started."""
    if not text:
        return None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # RFC 1123 dates are GMT; "-0000" parses as naive
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_time(moment: float | None) -> str | None:
    """ISO 8601 in UTC for /status and logs, where people read it."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")


def parse_document(payload: Any) -> EventsDocument:
    """Reads a decoded JSON answer; raises `MalformedDocument` when it is not a document."""
    if not isinstance(payload, dict):
        raise MalformedDocument(f"expected a JSON object, got {type(payload).__name__}")
    incarnation = payload.get("DocumentIncarnation")
    entries = payload.get("Events")
    if not isinstance(incarnation, int) or isinstance(incarnation, bool):
        raise MalformedDocument("DocumentIncarnation is missing or not an integer")
    if not isinstance(entries, list):
        raise MalformedDocument("Events is missing or not a list")
    events: list[ScheduledEvent] = []
    skipped: list[str] = []
    unknown = {str(key) for key in payload if key not in DOCUMENT_FIELDS}
    for index, entry in enumerate(entries):
        try:
            events.append(ScheduledEvent.model_validate(entry))
        except ValidationError as error:
            skipped.append(f"Events[{index}]: {_first_problem(error)}")
        if isinstance(entry, dict):
            unknown.update(f"Events[].{key}" for key in entry if key not in EVENT_FIELDS)
    return EventsDocument(
        incarnation=incarnation,
        events=tuple(events),
        skipped=tuple(skipped),
        unknown_fields=frozenset(unknown),
    )


def _first_problem(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "entry"
    return f"{where}: {first['msg']}"
