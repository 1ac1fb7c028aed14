"""Long-running operations behind ARM writes and POST actions (``Azure-AsyncOperation``).

Invariants: the first prompt poll of an operation answers ``InProgress`` and a later one
``Succeeded``, so clients really exercise their polling; an operation nobody polls still
finishes ``settle`` seconds after it began (ARM does not wait for clients); a finished
operation never changes status again; a POST's result is fixed when the operation is created.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sidecar.simulator.times import Clock, iso8601

IN_PROGRESS = "InProgress"
SUCCEEDED = "Succeeded"
FAILED = "Failed"


@dataclass
class Operation:
    operation_id: str
    resource_id: str
    created_at: float
    settle: float
    polls: int = 0
    status: str = IN_PROGRESS
    error_code: str = ""
    error_message: str = ""
    finished_at: float | None = None
    hold_until: float = 0.0
    result: Any = None
    """What the ``Location`` URL answers once the operation succeeded (POST actions)."""

    def body(self) -> dict[str, Any]:
        """What the operation URL answers."""
        out: dict[str, Any] = {"status": self.status}
        if self.status == FAILED:
            out["error"] = {"code": self.error_code, "message": self.error_message}
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.operation_id,
            "resource_id": self.resource_id,
            "status": self.status,
            "polls": self.polls,
            "created_at": iso8601(self.created_at),
            "finished_at": iso8601(self.finished_at) if self.finished_at is not None else None,
        }


class OperationBook:
    """Operations by id; lookups apply the time-based completion lazily."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._operations: dict[str, Operation] = {}

    def create(self, resource_id: str, *, settle: float, result: Any = None) -> Operation:
        operation = Operation(
            operation_id=str(uuid.uuid4()),
            resource_id=resource_id,
            created_at=self._clock(),
            settle=settle,
            result=result,
        )
        self._operations[operation.operation_id] = operation
        return operation

    def get(self, operation_id: str) -> Operation | None:
        return self._operations.get(operation_id.casefold())

    def all(self) -> list[Operation]:
        for operation in self._operations.values():
            self.settle(operation)
        return list(self._operations.values())

    def age(self, operation: Operation) -> float:
        return self._clock() - operation.created_at

    def hold(self, operation: Operation, until: float) -> None:
        """Keep the operation running until ``until`` (a 'slow' fault on the operation URL)."""
        operation.hold_until = max(operation.hold_until, until)

    def settle(self, operation: Operation) -> Operation:
        """Finish an operation whose time is up, without counting a poll."""
        now = self._clock()
        running = operation.status == IN_PROGRESS and now >= operation.hold_until
        if running and now - operation.created_at >= operation.settle:
            self._finish(operation, SUCCEEDED)
        return operation

    def poll(self, operation: Operation) -> Operation:
        """A client's poll: the first one while running sees InProgress, the next Succeeded."""
        self.settle(operation)
        if operation.status == IN_PROGRESS and self._clock() >= operation.hold_until:
            operation.polls += 1
            if operation.polls >= 2:
                self._finish(operation, SUCCEEDED)
        return operation

    def fail(self, operation: Operation, code: str, message: str) -> Operation:
        if operation.status == IN_PROGRESS:
            operation.error_code = code
            operation.error_message = message
            self._finish(operation, FAILED)
        return operation

    def _finish(self, operation: Operation, status: str) -> None:
        operation.status = status
        operation.finished_at = self._clock()
