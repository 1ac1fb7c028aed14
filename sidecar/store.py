"""The state file: what must survive a crash, a restart or the reboot itself.

Invariants: the file on disk is always a complete document (written to a temporary file, fsynced,
then renamed over the old one); a file that cannot be read is moved aside with a warning and the
sidecar starts afresh instead of crash-looping; sections this version does not know are kept.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.machine import DrainState, Phase, Tracked

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class StateFileError(Exception):
    """The state file's directory cannot be written: persistence, and with it safety, is off."""


class StateStore:
    """Reads once at start-up, then writes whole documents atomically and only when they change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_written: bytes | None = None

    def check_writable(self) -> None:
        """Fails start-up early rather than losing the first approval record mid-drain."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=".probe-"):
                pass
        except OSError as error:
            raise StateFileError(
                f"SIDECAR_STATE_FILE={self.path}: cannot write in {self.path.parent}: "
                f"{error.strerror or error}"
            ) from None

    def load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            return self._set_aside(f"cannot be read ({error.strerror or error})")
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return self._set_aside(f"is not JSON ({error})")
        if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
            return self._set_aside(f"is not a version {FORMAT_VERSION} state document")
        self._last_written = raw
        return document

    def save(self, document: Mapping[str, Any]) -> bool:
        """Returns whether anything was written; blocking, so call it off the event loop."""
        payload = json.dumps(
            {"version": FORMAT_VERSION, **document}, indent=1, sort_keys=True
        ).encode()
        if payload == self._last_written:
            return False
        directory = self.path.parent
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(directory)
        self._last_written = payload
        return True

    def _set_aside(self, problem: str) -> dict[str, Any]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, aside)
        except OSError as error:
            log.warning(
                "state file %s %s and could not be moved aside (%s); starting with empty state",
                self.path,
                problem,
                error.strerror or error,
            )
        else:
            log.warning(
                "state file %s %s; moved it to %s and started with empty state",
                self.path,
                problem,
                aside,
            )
        return {}


class StateDocument:
    """The one state file, shared by the drain loop and the pool action, one section each.

    Writes are serialized and happen off the event loop; `write` returns only once the new
    document is on disk, so a caller can rely on it before acting (the pool action does).
    """

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.sections: dict[str, Any] = {
            key: value for key, value in store.load().items() if key != "version"
        }
        self._lock = asyncio.Lock()
        self._saved = True
        """Whether the file holds `sections` (False after a failed or interrupted write)."""

    async def write(self, section: str, value: Any) -> bool:
        """Raises OSError when the file cannot be written; returns whether anything changed.

        The drain loop calls this after every poll; an unchanged section returns at once,
        without serializing the document in a worker thread (a third of an idle poll's CPU).
        """
        async with self._lock:
            if self._saved and self.sections.get(section) == value:
                return False
            # a snapshot: callers may mutate what they passed (the pool action does)
            self.sections[section] = copy.deepcopy(value)
            self._saved = False
            written = await asyncio.to_thread(self.store.save, dict(self.sections))
            self._saved = True
            return written


def _fsync_directory(directory: Path) -> None:
    """Makes the rename itself durable, so a power cut cannot bring back the old file."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drain_section(state: DrainState) -> dict[str, Any]:
    """The part of the drain state a restart needs: drains in progress and approvals made."""
    return {
        "draining": {
            event_id: {"type": tracked.event_type, "drain_started": tracked.drain_started}
            for event_id, tracked in sorted(state.events.items())
            if tracked.holds_probe_down
        },
        "approved": dict(sorted(state.approved.items())),
    }


def restore_drain(sections: Mapping[str, Any]) -> DrainState:
    """Rebuilds what the last process knew; the first poll then brings it up to date."""
    section = sections.get("drain")
    if not isinstance(section, dict):
        return DrainState()
    events: dict[str, Tracked] = {}
    draining = section.get("draining")
    for event_id, saved in (draining if isinstance(draining, dict) else {}).items():
        if not isinstance(saved, dict):
            continue
        started = saved.get("drain_started")
        events[str(event_id)] = Tracked(
            event_id=str(event_id),
            event_type=str(saved.get("type", "")),
            phase=Phase.DRAINING,
            reason="restored from the state file",
            drain_started=float(started) if isinstance(started, int | float) else None,
        )
    approved_section = section.get("approved")
    approved = {
        str(event_id): float(moment)
        for event_id, moment in (
            approved_section if isinstance(approved_section, dict) else {}
        ).items()
        if isinstance(moment, int | float)
    }
    return DrainState(events=events, approved=approved)
