"""Logging to stderr, as text for people or JSON lines for log pipelines.

Invariants:
- one record is one line: in the text format every control character of a message (values from
  IMDS, ARM or HTTP clients included) is escaped, and a traceback's lines are indented under it,
  so nothing a peer sends can forge a log line; JSON escapes by construction;
- a flood cannot drown the log: the same line repeats at most once per `REPEAT_WINDOW`, and all
  lines together stay within a budget; what was held back is counted on the next line that
  passes.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REPEAT_WINDOW = 10.0
BUDGET_PER_SECOND = 20.0
BUDGET_BURST = 200.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """Control characters as visible escapes; printable text (any script) unchanged."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def _held_note(record: logging.LogRecord) -> str:
    held = getattr(record, "held_back", 0)
    return f" ({held} similar lines held back)" if held else ""


class TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message) + _held_note(record)
        return super().formatMessage(record)

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return "\n".join(
            f"    | {escape(line)}" for line in super().formatException(ei).split("\n")
        )

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(f"    | {escape(line)}" for line in stack_info.split("\n"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage() + _held_note(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class FloodGuard(logging.Filter):
    """Holds back repeats of one line within `window`, and everything beyond a budget."""

    def __init__(
        self,
        window: float = REPEAT_WINDOW,
        rate: float = BUDGET_PER_SECOND,
        burst: float = BUDGET_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window, self.rate, self.burst, self.clock = window, rate, burst, clock
        self._last: OrderedDict[tuple[str, int, str], tuple[float, int]] = OrderedDict()
        self._tokens = burst
        self._refilled = clock()
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        key = (record.name, record.levelno, record.getMessage()[:300])
        last, held = self._last.get(key, (None, 0))
        if last is not None and now - last < self.window:
            self._last[key] = (last, held + 1)
            return False
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            self._dropped += 1
            return False
        self._tokens -= 1
        record.held_back = held + self._dropped
        self._dropped = 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > 1000:
            self._last.popitem(last=False)
        return True


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT)
    formatter.converter = time.gmtime
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    handler.setFormatter(formatter)
    handler.addFilter(FloodGuard())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The Azure SDK logs every HTTP request at INFO and MSAL its token cache at DEBUG (both
    # redact secrets): keep them to warnings, whatever the level asked for.
    for noisy in ("azure", "msal"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
