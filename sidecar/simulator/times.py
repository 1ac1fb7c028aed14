"""The simulator's notion of time: an injectable clock and the text forms Azure uses.

Invariant: inside the simulator a time is POSIX seconds (a float, UTC) read from the injected
clock; text forms (RFC 1123 for Scheduled Events, ISO 8601 for the control API, .NET's general
form for the 2016 preview) are made and parsed only here.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], float]
"""Returns the current time as POSIX seconds; tests pass a hand-driven one."""


def rfc1123(timestamp: float) -> str:
    """Scheduled Events' NotBefore form, e.g. ``Mon, 19 Sep 2016 18:29:47 GMT``."""
    return email.utils.formatdate(math.floor(timestamp), usegmt=True)


def iso8601(timestamp: float) -> str:
    """The control API's form: UTC with milliseconds and a ``Z``."""
    text = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def dotnet_general(timestamp: float) -> str:
    """The 2016 preview's EventCreationTime, .NET's en-US general form in UTC:
    ``9/15/2015 6:42:51 AM``."""
    moment = datetime.fromtimestamp(math.floor(timestamp), UTC)
    hour = moment.hour % 12 or 12
    half = "AM" if moment.hour < 12 else "PM"
    return f"{moment.month}/{moment.day}/{moment.year} {hour}:{moment:%M:%S} {half}"


def parse_time(text: str) -> float:
    """Read ISO 8601 or RFC 1123 (what users paste from IMDS); a time without a zone is UTC."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty time")
    try:
        parsed = datetime.fromisoformat(stripped)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(stripped)
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not an ISO 8601 or RFC 1123 time: {text!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
