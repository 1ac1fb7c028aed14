"""The state file: what must survive a crash, a restart or the reboot itself.

Invariants:
- the file on disk is always a complete document (temporary file, fsync, rename, fsync of the
  directory); each section sits on a line of its own, so a file damaged later (a torn write on a
  careless filesystem, a hand edit) still yields every section whose line parses;
- nothing is discarded: a damaged file is copied aside before anything is written over it, what
  parses of it is kept (and written back as a whole file at the first write), and what was lost
  is said in the log and in /status; a file written by a
  newer version stops start-up with a message instead (its format is not ours to guess);
- sections this version does not know are kept as they were.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class StateFileError(Exception):
    """The state file cannot be used: start-up stops with this message (it names the setting)."""


@dataclass
class LoadReport:
    """What start-up found in the state file, for the log and /status."""

    problem: str | None = None
    copied_to: str | None = None
    salvaged: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any] | None:
        if self.problem is None:
            return None
        return {
            "problem": self.problem,
            "copied_to": self.copied_to,
            "salvaged": self.salvaged,
            "lost": self.lost,
        }


class StateStore:
    """Reads once at start-up, then writes whole documents atomically and only when they change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.report = LoadReport()
        self.existed = False
        """Whether a state file was there to read at start-up."""
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
        """The sections of the file; salvages a damaged one, refuses a newer version's."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            self.existed = True
            return self._damaged(f"cannot be read ({error.strerror or error})", b"")
        self.existed = True
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return self._damaged(f"is not JSON ({error})", raw)
        if not isinstance(document, dict):
            return self._damaged("is not a JSON object", raw)
        version = document.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise StateFileError(
                f"SIDECAR_STATE_FILE={self.path}: written by a newer sidecar (format {version}, "
                f"this one reads {FORMAT_VERSION}); it is left as it is: run the newer version, "
                "or move the file away to start afresh"
            )
        if version != FORMAT_VERSION:
            return self._damaged(f"has no known format version ({version!r})", raw)
        self._last_written = raw
        return {key: value for key, value in document.items() if key != "version"}

    def save(self, document: Mapping[str, Any]) -> bool:
        """Returns whether anything was written; blocking, so call it off the event loop."""
        payload = render(document)
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

    def _damaged(self, problem: str, raw: bytes) -> dict[str, Any]:
        sections, lost = salvage(raw)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        self.report = LoadReport(problem, None, sorted(sections), lost)
        try:
            shutil.copyfile(self.path, aside)
            self.report.copied_to = str(aside)
        except OSError as error:
            log.warning("could not copy the damaged state file aside: %s", error.strerror or error)
        log.warning(
            "state file %s %s; kept a copy as %s; salvaged sections: %s; lost: %s",
            self.path,
            problem,
            self.report.copied_to or "(none)",
            ", ".join(self.report.salvaged) or "none",
            ", ".join(lost) or "nothing readable",
        )
        return sections


def render(document: Mapping[str, Any]) -> bytes:
    """One section per line: still JSON, and still readable by `salvage` if torn later."""
    lines = [f'"version": {FORMAT_VERSION}']
    lines += [
        f"{json.dumps(key)}: {json.dumps(value, sort_keys=True)}"
        for key, value in sorted(document.items())
        if key != "version"
    ]
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def salvage(raw: bytes) -> tuple[dict[str, Any], list[str]]:
    """The sections whose line still parses, and the names (or line numbers) of the others."""
    sections: dict[str, Any] = {}
    lost: list[str] = []
    text = raw.decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip().rstrip(",")
        if stripped in ("", "{", "}") or stripped.startswith('"version"'):
            continue
        try:
            parsed = json.loads("{" + stripped + "}")
        except json.JSONDecodeError:
            name = stripped.split(":", 1)[0].strip('"') if stripped.startswith('"') else ""
            lost.append(name[:40] or f"line {number}")
            continue
        if isinstance(parsed, dict):
            sections.update(parsed)
    return sections, lost


class StateDocument:
    """The one state file, shared by the drain loop and the gates, one section each.

    Writes are serialized and happen off the event loop; `write` returns only once the new
    document is on disk, so a caller can rely on it before acting (approvals and pool removals
    do). With `enabled` False (a dry run) nothing is ever written.
    """

    def __init__(self, store: StateStore, *, enabled: bool = True) -> None:
        self.store = store
        self.enabled = enabled
        self.sections: dict[str, Any] = store.load()
        self._lock = asyncio.Lock()
        self._saved = store.report.problem is None
        """Whether the file holds `sections`: False after a failed or interrupted write, and
        after a salvage, so that the first write puts a whole file back even when no section
        changed (a torn file would otherwise stay torn, and be found damaged at every start)."""

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
            if not self.enabled:
                return False
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
