"""Test support: the real simulator and the real sidecar as processes, spoken to over loopback.

Nothing here fakes the sidecar or the simulator; these are thin clients and process handles.
HTTP goes through http.client, which never consults proxy variables.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.lab import PATIENCE, free_port, wait_for  # one harness for tests and benches

# A proxy that does not exist: if the sidecar ever honoured proxy variables, every request fails.
DEAD_PROXY = "http://127.0.0.1:9"
PROXY_ENV = {
    name: DEAD_PROXY
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")
}


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Answer:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    payload = None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if payload is not None else {}
    started = time.perf_counter()
    try:
        connection.request(method, path or "/", body=payload, headers={**sent, **(headers or {})})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    return Answer(response.status, data, time.perf_counter() - started, dict(response.getheaders()))


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The test runner's environment minus its SIDECAR_* settings, plus a dead proxy."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SIDECAR_")}
    return {**env, **PROXY_ENV, "PYTHONUNBUFFERED": "1", **extra}


class Process:
    """A `python -m sidecar ...` child whose output is kept in a file for failure reports."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log: Path,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.log = log
        self._log_handle = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "sidecar", *args],
            env=env,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self, timeout: float = PATIENCE) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        self.popen.wait(PATIENCE)

    def close(self) -> None:
        self.kill()
        self._log_handle.close()


class Simulator:
    """`sidecar simulate` as a process, with a client for its control API."""

    def __init__(self, workdir: Path, *args: str) -> None:
        ready = workdir / f"simulator-{time.monotonic_ns()}.json"
        self.process = Process(
            ["simulate", "--port", "0", "--ready-file", str(ready), *args],
            child_env({}),
            workdir / "simulator.log",
        )
        urls = wait_for(lambda: _read_json(ready), "the simulator's ready file")
        self.imds_url: str = urls["imds_url"]
        self.control_url: str = urls["control_url"]
        self.arm_url: str | None = urls.get("arm_url")
        self.ca_file: str | None = urls.get("ca_file")

    def control(self, method: str, path: str, body: Any = None) -> Any:
        answer = request(f"{self.control_url}{path}", method, body)
        assert answer.status < 300, f"{method} {path}: {answer.status} {answer.body!r}"
        return answer.json() if answer.body else None

    def add_event(self, **fields: Any) -> dict[str, Any]:
        created: list[dict[str, Any]] = self.control("POST", "/events", fields)
        return created[0]

    def events(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = self.control("GET", "/events")["events"]
        return listed

    def approvals(self) -> list[dict[str, Any]]:
        approvals: list[dict[str, Any]] = self.control("GET", "/approvals")
        return approvals

    def approvals_of(self, event_id: str) -> list[dict[str, Any]]:
        return [a for a in self.approvals() if a["event_id"] == event_id]

    def fault(self, **fields: Any) -> None:
        self.control("POST", "/faults", fields)

    def clear_faults(self) -> None:
        self.control("DELETE", "/faults")

    def close(self) -> None:
        self.process.close()


class Sidecar:
    """`sidecar run` as a process, configured only through SIDECAR_* variables."""

    def __init__(
        self,
        workdir: Path,
        settings: dict[str, str],
        preexec: Callable[[], None] | None = None,
    ) -> None:
        """`preexec` runs in the child before exec (e.g. to lower its descriptor limit)."""
        self.preexec = preexec
        self.port = free_port()
        self.settings = {
            "SIDECAR_HOST": "127.0.0.1",
            "SIDECAR_PORT": str(self.port),
            "SIDECAR_STATE_FILE": str(workdir / "state.json"),
            "SIDECAR_POLL_INTERVAL": "0.25",
            **settings,
        }
        self.workdir = workdir
        self.process = self._start()

    def _start(self) -> Process:
        return Process(
            ["run"], child_env(self.settings), self.workdir / "sidecar.log", self.preexec
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def probe(self, method: str = "GET", timeout: float = 10.0) -> Answer:
        path = self.settings.get("SIDECAR_HEALTH_PATH", "/health")
        return request(f"{self.url}{path}", method, timeout=timeout)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = request(f"{self.url}/status").json()
        return body

    def probe_code(self) -> int | None:
        """The probe's status code, or None while nothing listens yet."""
        with contextlib.suppress(OSError):
            return self.probe(timeout=2).status
        return None

    def wait_probe(self, code: int, timeout: float = PATIENCE) -> None:
        wait_for(
            lambda: self.probe_code() == code or self._died(),
            f"probe {code} (log:\n{self.process.output()[-3000:]})",
            timeout,
        )
        assert self.process.alive(), self.process.output()

    def wait_phase(self, event_id: str, phase: str, timeout: float = PATIENCE) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            try:
                events = self.status()["events"]
            except OSError:  # not listening yet, e.g. right after a restart
                return None
            for entry in events:
                if entry["id"] == event_id and entry["phase"] == phase:
                    return dict(entry)
            return None

        return wait_for(found, f"event {event_id} in phase {phase}", timeout)

    def polls(self) -> int:
        count: int = self.status()["imds"]["successful_polls"]
        return count

    def wait_polls(self, count: int) -> None:
        """Waits for `count` more successful polls: room for a wrong decision to show."""
        target = self.polls() + count
        wait_for(lambda: self.polls() >= target, f"{count} more successful polls")

    def _died(self) -> bool:
        return not self.process.alive()

    def restart(self) -> None:
        self.process.close()
        self.process = self._start()

    def close(self) -> None:
        self.process.close()


SidecarFactory = Callable[..., Sidecar]
"""Starts `sidecar run` with SIDECAR_* overrides as keywords (see the conftest fixtures)."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return loaded
