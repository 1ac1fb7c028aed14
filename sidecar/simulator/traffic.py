"""Counts and a bounded log of the IMDS and ARM requests the simulator answered.

Invariant: a request is counted once, on arrival, under ``"METHOD kind"`` (one ARM throttled
is counted again under ``throttled``); its log entry is completed with the status when it is
answered; the log keeps only the newest ``keep``
entries, the counts keep everything since the last reset. Control-API requests are not
counted: the observer does not disturb what it measures.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from sidecar.simulator.faults import ARM_KINDS
from sidecar.simulator.times import Clock, iso8601


@dataclass
class RequestRecord:
    at: float
    method: str
    path: str
    kind: str
    vm: str | None
    remote: str
    status: int | None = None
    duration: float | None = None
    fault: str | None = None
    throttled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "at": iso8601(self.at),
            "t": self.at,
            "method": self.method,
            "path": self.path,
            "kind": self.kind,
            "vm": self.vm,
            "remote": self.remote,
            "status": self.status,
            "duration_ms": round(self.duration * 1000, 3) if self.duration is not None else None,
            "fault": self.fault,
            "throttled": self.throttled,
        }


class RequestLog:
    def __init__(self, clock: Clock, keep: int = 1000) -> None:
        self._clock = clock
        self._log: deque[RequestRecord] = deque(maxlen=keep)
        self._counts: Counter[str] = Counter()
        self._throttled: Counter[str] = Counter()
        self._by_vm: Counter[str] = Counter()
        self._since = clock()

    def record(
        self, method: str, path: str, kind: str, vm: str | None, remote: str
    ) -> RequestRecord:
        entry = RequestRecord(self._clock(), method, path, kind, vm, remote)
        self._log.append(entry)
        self._counts[f"{method} {kind}"] += 1
        if vm is not None:
            self._by_vm[vm] += 1
        return entry

    def throttled(self, entry: RequestRecord) -> None:
        """ARM refused the request with 429 before any handler saw it."""
        entry.throttled = True
        entry.status = 429
        self._throttled[f"{entry.method} {entry.kind}"] += 1

    def reset(self) -> None:
        self._log.clear()
        self._counts.clear()
        self._throttled.clear()
        self._by_vm.clear()
        self._since = self._clock()

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        arm = sum(n for key, n in self._counts.items() if key.split(" ", 1)[1] in ARM_KINDS)
        arm += sum(n for key, n in self._counts.items() if key.endswith(" arm-unknown"))
        total = sum(self._counts.values())
        entries = list(self._log)
        if limit is not None:
            entries = entries[-limit:] if limit > 0 else []
        return {
            "since": iso8601(self._since),
            "counts": dict(sorted(self._counts.items())),
            "totals": {"all": total, "imds": total - arm, "arm": arm},
            "throttled": {
                "total": sum(self._throttled.values()),
                "counts": dict(sorted(self._throttled.items())),
            },
            "by_vm": dict(sorted(self._by_vm.items())),
            "log": [entry.to_json() for entry in entries],
        }
