"""`sidecar status` and `sidecar events`: what an operator on the VM asks, answered as text.

Invariant: standard library only (these run in a shell on the VM or `docker exec`, next to a
sidecar that may be struggling): plain HTTP to the running sidecar on loopback, and to IMDS with
`Metadata: true` and never through a proxy (http.client reads no proxy variables).
"""

from __future__ import annotations

import http.client
import json
import os
from typing import Any
from urllib.parse import urlsplit

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def fetch_status(timeout: float = 5.0) -> dict[str, Any]:
    """The running sidecar's /status, in full: asked on loopback (with the admin token, when
    it is set, for a sidecar bound elsewhere)."""
    host = os.environ.get("SIDECAR_HOST") or "0.0.0.0"  # noqa: S104 - reached on loopback
    port = int(os.environ.get("SIDECAR_PORT") or "8080")
    headers = {}
    token = os.environ.get("SIDECAR_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = _get(WILDCARDS.get(host, host), port, "/status", headers, timeout, https=False)
    loaded: dict[str, Any] = json.loads(body)
    return loaded


def fetch_events(timeout: float = 10.0) -> Any:
    """This VM's Scheduled Events document as IMDS serves it right now."""
    base = urlsplit((os.environ.get("SIDECAR_IMDS_URL") or "http://169.254.169.254").rstrip("/"))
    version = os.environ.get("SIDECAR_API_VERSION") or "2020-07-01"
    prefix = base.path
    if version == "legacy-2016":
        path = f"{prefix}/metadata/v1/maintenance"
    else:
        path = f"{prefix}/metadata/scheduledevents?api-version={version}"
    port = base.port or (443 if base.scheme == "https" else 80)
    body = _get(
        base.hostname or "", port, path, {"Metadata": "true"}, timeout, https=base.scheme == "https"
    )
    return json.loads(body)


def _get(
    host: str, port: int, path: str, headers: dict[str, str], timeout: float, *, https: bool
) -> bytes:
    kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
    connection = kind(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise OSError(f"GET {path}: HTTP {response.status}: {body[:300].decode(errors='replace')}")
    return body


def render_status(status: dict[str, Any]) -> str:
    """The phase, each event, what approval waits on, the pools, the hooks and the last errors."""
    rows: list[tuple[str, str]] = [
        ("state", f"{status.get('state')} (probe: {status.get('probe')})"),
        ("vm", str(status.get("vm_name") or "?")),
    ]
    if status.get("dry_run"):
        rows.append(("dry run", "on: nothing is changed, sent or written"))
    manual = status.get("manual")
    if manual:
        rows.append(
            ("by hand", f"out of rotation since {manual.get('since')}: {manual.get('reason')}")
        )
    waits = status.get("approval_waits_for") or []
    blocked = status.get("approval_blocked_by") or []
    if waits or blocked:
        rows.append(
            (
                "approval",
                f"waits for {', '.join(waits) or '-'}; blocked by {', '.join(blocked) or '-'}",
            )
        )
    imds = status.get("imds") or {}
    rows.append(
        (
            "imds",
            f"last success {imds.get('last_success')}, {imds.get('consecutive_failures')} "
            f"failures in a row"
            + (f"; last error: {imds['last_error']}" if imds.get("last_error") else ""),
        )
    )
    pools = status.get("pools")
    if pools:
        text = f"{pools.get('mode')}, {pools.get('pools_out')} pool memberships out"
        if pools.get("last_error"):
            text += f"; last error: {pools['last_error']}"
        rows.append(("pools", text))
    hooks = status.get("hooks")
    if hooks:
        rows.append(("hooks", f"drain {hooks.get('drain')}, undrain {hooks.get('undrain')}"))
    for name, task in (status.get("tasks") or {}).items():
        if task.get("failures"):
            rows.append(
                (f"task {name}", f"{task['failures']} failures; last: {task.get('last_error')}")
            )
    width = max(len(key) for key, _ in rows)
    lines = [f"{key.ljust(width)}  {value}" for key, value in rows]
    events = status.get("events") or []
    lines.append("")
    lines.append(
        _table(
            ["EVENT", "TYPE", "STATUS", "PHASE", "NOT BEFORE", "APPROVE AT", "REASON"],
            [
                [
                    str(e.get("id", "-")),
                    str(e.get("type")),
                    str(e.get("status")),
                    str(e.get("phase")),
                    str(e.get("not_before") or "-"),
                    str(e.get("approve_at") or "-"),
                    str(e.get("reason")),
                ]
                for e in events
            ],
        )
        if events
        else "no events"
    )
    return "\n".join(lines)


def render_events(document: Any) -> str:
    if not isinstance(document, dict):
        return json.dumps(document, indent=2)
    events = document.get("Events")
    head = json.dumps(document, indent=2)
    if not isinstance(events, list) or not events:
        return head
    table = _table(
        ["EVENT ID", "TYPE", "STATUS", "NOT BEFORE", "RESOURCES"],
        [
            [
                str(e.get("EventId")),
                str(e.get("EventType")),
                str(e.get("EventStatus")),
                str(e.get("NotBefore") or "-"),
                ",".join(str(r) for r in e.get("Resources") or []),
            ]
            for e in events
            if isinstance(e, dict)
        ],
    )
    return f"{table}\n\n{head}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join
    return "\n".join(
        [line(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        + [line(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    )
