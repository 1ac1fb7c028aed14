"""Errors the model raises, each carrying what the HTTP layer needs to answer.

Invariant: the model never builds HTTP responses; it raises one of these and the route that
called it turns it into the error shape of its API (ARM's ``{"error": {"code", "message"}}``,
the control API's ``{"error": message}``).
"""

from __future__ import annotations


class ArmError(Exception):
    """An ARM error answer: HTTP status, ARM error code and message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class ControlError(Exception):
    """A control-API error: the request asked for something impossible or malformed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
