"""The answer shapes of the three APIs: IMDS, managed identity, ARM and the control API.

Invariant: every JSON answer is built here, so each API keeps one error shape: IMDS
``{"error": message}``, identity ``{"error": code, "error_description": ...}``, ARM
``{"error": {"code", "message"}}``, control ``{"error": message}``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web

from sidecar.simulator.errors import ArmError

JSON_TYPE = "application/json"


def seconds_text(seconds: float) -> str:
    """A Retry-After value: whole seconds when whole (the SDK also accepts fractions)."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _json(
    data: Any, status: int, headers: Mapping[str, str] | None, *, indent: int | None = None
) -> web.Response:
    separators = (",", ":") if indent is None else None
    body = json.dumps(data, indent=indent, separators=separators)
    return web.Response(
        text=body, status=status, content_type=JSON_TYPE, charset="utf-8", headers=headers
    )


def imds_json(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """IMDS answers compact JSON."""
    return _json(data, status, headers)


def imds_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


def dotnet_json(data: Any) -> web.Response:
    """JSON as the 2016 preview's .NET serializer wrote it: compact, ``/`` escaped as ``\\/``.

    Only string contents can hold a ``/``, so escaping every one is exact; any JSON parser
    reads the same values."""
    body = json.dumps(data, separators=(",", ":")).replace("/", "\\/")
    return web.Response(text=body, content_type=JSON_TYPE, charset="utf-8")


def identity_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return _json({"error": error, "error_description": description}, status, headers)


def arm_headers(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    request_id = str(uuid.uuid4())
    headers = {
        "x-ms-request-id": request_id,
        "x-ms-correlation-request-id": request_id,
        "Cache-Control": "no-cache",
    }
    headers.update(extra or {})
    return headers


def arm_json(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return _json(data, status, arm_headers(headers))


def arm_error(error: ArmError) -> web.Response:
    body = {"error": {"code": error.code, "message": error.message}}
    return _json(body, error.status, arm_headers(error.headers))


def control_json(data: Any, status: int = 200) -> web.Response:
    """The control API answers indented JSON: people read it with curl."""
    return _json(data, status, None, indent=2)


def control_error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status, None, indent=2)


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
