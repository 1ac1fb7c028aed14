"""Faults a test injects into the IMDS and ARM answers: what they cover and how they spoil.

Invariants: a fault covers only the request kinds its target names (never the control API),
and optionally one VM; it affects at most ``count`` requests and then leaves the list (so
"all served" reads as an empty list); a ``hang`` holds a request until its fault is deleted
(a used-up hang keeps holding until then), never past ``HANG_CAP_SECONDS``; an ``answer``
fault's status, body and headers are sent as given, so they are validated here to be
sendable (framing headers stay aiohttp's).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.simulator.errors import ControlError
from sidecar.simulator.times import Clock, iso8601

IMDS_KINDS: tuple[str, ...] = (
    "scheduledevents",
    "approve",
    "compute",
    "instance",
    "token",
    "versions",
    "maintenance",
    "instanceinfo",
)
ARM_KINDS: tuple[str, ...] = (
    "arm-list",
    "arm-get",
    "arm-put",
    "arm-operation",
    "arm-lb-get",
    "arm-lb-health",
)
GROUPS: Mapping[str, tuple[str, ...]] = {
    "imds": IMDS_KINDS,
    "arm": ARM_KINDS,
    "all": IMDS_KINDS + ARM_KINDS,
}
TARGETS: tuple[str, ...] = IMDS_KINDS + ARM_KINDS + tuple(GROUPS)
FAULT_KINDS: tuple[str, ...] = ("status", "malformed", "slow", "hang", "failed", "late", "answer")
VARIANTS: tuple[str, ...] = ("not-json", "not-object", "bad-event")
HANG_CAP_SECONDS = 600.0

_FAULT_KEYS = frozenset(
    {
        "target",
        "kind",
        "status",
        "retry_after",
        "seconds",
        "variant",
        "count",
        "vm",
        "code",
        "message",
        "body",
        "content_type",
        "headers",
        "apply",
    }
)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "content-type", "connection"})


@dataclass
class Fault:
    fault_id: str
    target: str
    kind: str
    status: int = 500
    retry_after: float | None = None
    seconds: float = 0.0
    variant: str = "not-json"
    count: int | None = None
    vm: str = ""
    code: str = ""
    message: str = ""
    body: str = ""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    apply: bool = False
    hits: int = 0
    created_at: float = 0.0

    @property
    def active(self) -> bool:
        return self.count is None or self.hits < self.count

    def covers(self, kind: str, vm: str | None) -> bool:
        kinds = GROUPS.get(self.target, (self.target,))
        if kind not in kinds:
            return False
        return not self.vm or (vm is not None and vm.casefold() == self.vm.casefold())

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.fault_id,
            "target": self.target,
            "kind": self.kind,
            "status": self.status,
            "retry_after": self.retry_after,
            "seconds": self.seconds,
            "variant": self.variant,
            "count": self.count,
            "vm": self.vm,
            "code": self.code,
            "message": self.message,
            "body": self.body,
            "content_type": self.content_type,
            "headers": dict(self.headers),
            "apply": self.apply,
            "hits": self.hits,
            "active": self.active,
            "created_at": iso8601(self.created_at),
        }


class FaultBook:
    """Faults in the order they were added; the first active covering fault wins."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._faults: dict[str, Fault] = {}
        self._holding: dict[str, Fault] = {}  # used-up hangs, still holding their requests
        self._next = 1

    def add(self, spec: Mapping[str, Any]) -> Fault:
        fault = Fault(fault_id=f"f{self._next}", created_at=self._clock(), **spec)
        self._next += 1
        self._faults[fault.fault_id] = fault
        return fault

    def take(
        self, kind: str, vm: str | None, accept: Callable[[Fault], bool] | None = None
    ) -> Fault | None:
        """The fault that applies to this request (counting the hit), if any."""
        for fault in self._faults.values():
            if fault.active and fault.covers(kind, vm) and (accept is None or accept(fault)):
                fault.hits += 1
                if not fault.active:
                    # Used up: it leaves the list, but a hang keeps holding until deleted.
                    del self._faults[fault.fault_id]
                    if fault.kind == "hang":
                        self._holding[fault.fault_id] = fault
                return fault
        return None

    def present(self, fault_id: str) -> bool:
        """Whether the fault still exists (a hang waits for this to turn false)."""
        return fault_id in self._faults or fault_id in self._holding

    def remove(self, fault_id: str) -> bool:
        found = self._faults.pop(fault_id, None) or self._holding.pop(fault_id, None)
        return found is not None

    def clear(self) -> None:
        self._faults.clear()
        self._holding.clear()

    def to_json(self) -> list[dict[str, Any]]:
        return [fault.to_json() for fault in self._faults.values()]


def parse_fault(body: object) -> dict[str, Any]:
    """Validate a control-API fault object into ``Fault`` keyword arguments."""
    if not isinstance(body, dict):
        raise ControlError(400, "a fault must be a JSON object")
    unknown = sorted(set(body) - _FAULT_KEYS)
    if unknown:
        raise ControlError(400, f"unknown fault fields: {', '.join(unknown)}")
    target, kind = body.get("target"), body.get("kind")
    if target not in TARGETS:
        raise ControlError(400, f"'target' must be one of {', '.join(TARGETS)}")
    if kind not in FAULT_KINDS:
        raise ControlError(400, f"'kind' must be one of {', '.join(FAULT_KINDS)}")
    if kind == "failed" and target not in ("arm-operation", "arm", "all"):
        raise ControlError(400, "kind 'failed' applies to the ARM operation URL only")
    spec: dict[str, Any] = {"target": target, "kind": kind}
    if kind == "answer":
        status = body.get("status", 200)
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise ControlError(400, "'status' must be an HTTP status code (100-599)")
        spec.update(_parse_answer(body))
    else:
        status = body.get("status", 500)
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            raise ControlError(400, "'status' must be an HTTP error code (400-599)")
    spec["status"] = status
    for key in ("retry_after", "seconds"):
        if key in body and body[key] is not None:
            value = body[key]
            valid = isinstance(value, int | float) and not isinstance(value, bool)
            if not valid or value < 0 or not math.isfinite(value):
                raise ControlError(400, f"'{key}' must be a non-negative number")
            spec[key] = float(value)
    if kind in ("slow", "late") and "seconds" not in spec:
        raise ControlError(400, f"a '{kind}' fault needs 'seconds'")
    variant = body.get("variant", "not-json")
    if variant not in VARIANTS:
        raise ControlError(400, f"'variant' must be one of {', '.join(VARIANTS)}")
    spec["variant"] = variant
    count = body.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ControlError(400, "'count' must be a positive integer or null (unlimited)")
    spec["count"] = count
    for key in ("vm", "code", "message"):
        value = body.get(key, "")
        if not isinstance(value, str):
            raise ControlError(400, f"'{key}' must be a string")
        spec[key] = value
    return spec


def _parse_answer(body: Mapping[str, Any]) -> dict[str, Any]:
    """An ``answer`` fault's reply: raw text, any content type, extra headers, ``apply``."""
    text = body.get("body", "")
    if not isinstance(text, str):
        raise ControlError(400, "'body' must be a string (sent as UTF-8, as it is)")
    content_type = body.get("content_type", "application/json")
    if not isinstance(content_type, str) or not _sendable(content_type):
        raise ControlError(400, "'content_type' must be a string without line breaks")
    headers = body.get("headers", {})
    if headers is None:
        headers = {}
    if not isinstance(headers, dict) or not all(
        isinstance(v, str) and _TOKEN.match(k) and _sendable(v) for k, v in headers.items()
    ):
        raise ControlError(400, "'headers' must map header names to single-line strings")
    framing = sorted(k for k in headers if k.casefold() in _FRAMING_HEADERS)
    if framing:
        raise ControlError(
            400, f"'headers' cannot set {', '.join(framing)} (use content_type; framing is ours)"
        )
    apply = body.get("apply", False)
    if not isinstance(apply, bool):
        raise ControlError(400, "'apply' must be true or false")
    return {"body": text, "content_type": content_type, "headers": dict(headers), "apply": apply}


def _sendable(value: str) -> bool:
    return not any(ch in value for ch in "\r\n\0")


def malform(kind: str, variant: str, body: bytes) -> bytes:
    """Spoil an answer's body the way ``variant`` says (the status stays 200)."""
    if variant == "not-json":
        return body[: len(body) // 2] if len(body) > 2 else b'{"'
    if variant == "not-object":
        return b"[" + body + b"]" if body else b"[]"
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return body
    return json.dumps(_break_schema(kind, data)).encode()


def _break_schema(kind: str, data: Any) -> Any:
    """'bad-event': right JSON type, wrong schema, in the way each kind can go wrong."""
    if not isinstance(data, dict):
        return data
    if kind == "scheduledevents":
        events = data.get("Events")
        if isinstance(events, list) and events and isinstance(events[0], dict):
            first = events[0]
            first.pop("EventId", None)
            resources = first.get("Resources")
            first["Resources"] = ",".join(resources) if isinstance(resources, list) else ""
        else:
            data["Events"] = [{"EventType": "Reboot", "Resources": "", "EventStatus": "Scheduled"}]
    elif kind == "compute":
        data.pop("name", None)
        data.pop("resourceId", None)
    elif kind == "instance":
        compute = data.get("compute")
        if isinstance(compute, dict):
            compute.pop("name", None)
            compute.pop("resourceId", None)
    elif kind == "token":
        data.pop("access_token", None)
    elif kind == "arm-list":
        data["value"] = {}
    elif kind == "arm-operation":
        data.pop("status", None)
    else:
        props = data.get("properties")
        if isinstance(props, dict):
            props["ipConfigurations"] = "ipconfig1"
        else:
            data["properties"] = "none"
    return data
