"""Each backend's probe state, as Azure Load Balancer keeps it, and a log of every change.

Invariants (Azure's health-probe pages): only a definite result counts, one per probe; a new
backend starts ``Down`` with reason ``NA`` ("not probed yet") and is marked ``Up`` by its first
successful probe ("successful once after the VM boots"); from then on ``threshold`` consecutive
opposite results flip it, and the reason says when a flip is approaching. A backend without a
loopback port is not probed at all: it stands ``Up`` (as if a healthy app answered) and is
marked ``probed: false``. A backend that leaves its pool, gains or loses its loopback port, is
forgotten and starts again. Pure: time is passed in; the log is bounded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

UP = "Up"
DOWN = "Down"
NOT_PROBED_YET = "NA"
SUCCESS = "Up_Probe_Success"
APPROACHING_UNHEALTHY = "Up_Probe_ApproachingUnhealthyThreshold"
APPROACHING_HEALTHY = "Down_Probe_ApproachingHealthyThreshold"
ALL_DOWN_IS_UP = "Up_Probe_AllDownIsUp"
HTTP_STATUS_ERROR = "Down_Probe_HttpStatusCodeError"
ENDPOINT_UNREACHABLE = "Down_Probe_HttpEndpointUnreachable"
TCP_TIMEOUT = "Down_Probe_TcpProbeTimeout"
NO_RESPONSE = "Down_Probe_HttpNoResponse"

BackendKey = tuple[str, str]
"""(probe id, ipconfig id), both casefolded."""


@dataclass
class BackendHealth:
    probed: bool
    state: str
    reason: str
    changed_at: float
    ever_up: bool = False
    streak: int = 0
    """Consecutive results against the current state."""
    probes: int = 0
    failures: int = 0
    last_probe_at: float | None = None
    detail: str = ""

    @classmethod
    def new(cls, probed: bool, now: float) -> BackendHealth:
        if probed:
            return cls(True, DOWN, NOT_PROBED_YET, now)
        return cls(False, UP, SUCCESS, now)

    def observe(
        self, ok: bool, failure_reason: str, detail: str, threshold: int, now: float
    ) -> bool:
        """Count one probe result; True when the state flipped."""
        self.probes += 1
        self.last_probe_at = now
        self.detail = detail
        if not ok:
            self.failures += 1
        before = self.state
        if ok and self.state == UP:
            self.streak, self.reason = 0, SUCCESS
        elif ok and not self.ever_up:
            self._flip(UP, SUCCESS, now)
        elif ok:
            self.streak += 1
            if self.streak >= threshold:
                self._flip(UP, SUCCESS, now)
            else:
                self.reason = APPROACHING_HEALTHY
        elif self.state == DOWN:
            self.streak, self.reason = 0, failure_reason
        else:
            self.streak += 1
            if self.streak >= threshold:
                self._flip(DOWN, failure_reason, now)
            else:
                self.reason = APPROACHING_UNHEALTHY
        return self.state != before

    def _flip(self, state: str, reason: str, now: float) -> None:
        self.state, self.reason, self.streak, self.changed_at = state, reason, 0, now
        if state == UP:
            self.ever_up = True

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "probed": self.probed,
            "probes": self.probes,
            "failures": self.failures,
            "last_probe_at": self.last_probe_at,
            "changed_at": self.changed_at,
            "detail": self.detail,
        }


class HealthBook:
    """Backend states by key, what each key stands for, and the change log benchmarks plot."""

    def __init__(self, keep: int = 100_000) -> None:
        self._states: dict[BackendKey, BackendHealth] = {}
        self._labels: dict[BackendKey, dict[str, Any]] = {}
        self._log: deque[dict[str, Any]] = deque(maxlen=keep)

    def get(self, key: BackendKey) -> BackendHealth | None:
        return self._states.get(key)

    def sync(
        self, wanted: Iterable[tuple[BackendKey, bool, dict[str, Any]]], now: float
    ) -> tuple[list[tuple[BackendKey, bool]], list[dict[str, Any]]]:
        """Track exactly ``wanted`` (key, probed, label).

        Returns the keys started afresh (with whether they were tracked before) and the labels
        of the keys forgotten.
        """
        fresh: list[tuple[BackendKey, bool]] = []
        seen: set[BackendKey] = set()
        for key, probed, label in wanted:
            seen.add(key)
            self._labels[key] = label
            current = self._states.get(key)
            if current is None or current.probed != probed:
                self._states[key] = BackendHealth.new(probed, now)
                fresh.append((key, current is not None))
        gone = [key for key in self._states if key not in seen]
        labels = []
        for key in gone:
            del self._states[key]
            labels.append(self._labels.pop(key, {}))
        return fresh, labels

    def log(self, entry: dict[str, Any]) -> None:
        self._log.append(entry)

    def history(self, since: float | None = None) -> list[dict[str, Any]]:
        return [e for e in self._log if since is None or e["t"] > since]
