"""The README's drain-hook recipes, each tried for real against `sidecar run` and the simulator.

Each app gets a keep-alive connection opened before the maintenance (idle when the hook runs)
and a slow request in flight across the hook. After the hook the app must have closed the idle
connection (EOF, or `Connection: close` on a request sent before the close) and answered the slow
request in full; then SIDECAR_APP_PORTS sees no connection left and approval comes long before
the 120 s drain period. The recipes:

- nginx from Debian, the command hook for systemd installs: the README's script that sends
  SIGHUP to the master named in nginx's pid file, a graceful reload;
- nginx under compose: the web container's entrypoint (configs/compose/nginx-reload-on-drain.sh)
  runs nginx and reloads it when the sidecar's command (`touch DIR/reload`) asks; here on the
  host, the same script and the same command (the container check runs it in containers);
- gunicorn with uvicorn workers (PyPI), the same script with gunicorn's pid file: a graceful
  worker restart;
- the app's own endpoint (benchmarks/webapp.py, `POST /drain`) through SIDECAR_DRAIN_HOOK_URL.

A missing nginx skips its tests, unless CI_REQUIRE_ALL=1 (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from benchmarks.lab import ROOT, Child, Nginx, WebApp, child_env, free_port, listening
from tests.support import PATIENCE, SidecarFactory, Simulator, wait_for
from tests.test_drain_e2e import epoch

RELOAD_SCRIPT = """#!/bin/sh
# SIGHUP to the master process named in the pid file: a graceful reload (restart of workers)
exec kill -HUP "$(cat {pid_file})"
"""
"""The README's command hook for systemd installs, with the pid file of the app under test."""


def reload_script(directory: Path, pid_file: Path) -> str:
    script = directory / "graceful-reload"
    script.write_text(RELOAD_SCRIPT.format(pid_file=pid_file))
    script.chmod(0o755)
    return str(script)


DRAIN_SECONDS = 120
"""Far beyond the test: an approval before it came from 'no connection left'."""


def require(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path:
        return path
    reason = f"{tool} is not installed (Debian: apt-get install -y {package})"
    if os.environ.get("CI_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason}, and CI_REQUIRE_ALL=1 forbids skipping")
    pytest.skip(reason)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    started: float = 0.0
    ended: float = 0.0
    closed_after: bool = False
    """The server closed the connection after this answer."""


@dataclass
class KeepAlive:
    """One client connection, kept open between requests (HTTP/1.1 keep-alive)."""

    port: int
    sock: socket.socket = field(init=False)
    buffer: bytes = b""

    def __post_init__(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=PATIENCE)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionAbortedError("closed before a whole answer")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def get(self, path: str) -> Answer:
        started = time.time()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\n\r\n".encode())
        head = self._read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in head[1:])
        }
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionAbortedError(f"closed after {len(self.buffer)} of {length} bytes")
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(int(head[0].split()[1]), headers, body, started, time.time())

    def closed_by_server(self, timeout: float) -> bool:
        """True once the server has closed this connection (EOF, or a reset)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def slow_request(port: int, path: str, into: list[Answer]) -> threading.Thread:
    """A request in flight across the hook, on a connection of its own."""

    def run() -> None:
        client = KeepAlive(port)
        try:
            answer = client.get(path)
            answer.closed_after = client.closed_by_server(timeout=PATIENCE)
            into.append(answer)
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def rehearse_drain(
    simulator: Simulator,
    start_sidecar: SidecarFactory,
    *,
    port: int,
    slow_path: str,
    slow_bytes: int | None = None,
    **hook: str,
) -> None:
    """One maintenance: the hook must end both connections cleanly, and the drain early."""
    sidecar = start_sidecar(
        app_ports=str(port),
        drain_seconds=str(DRAIN_SECONDS),
        min_drain_seconds="1",
        **hook,
    )
    sidecar.wait_probe(200)
    idle = KeepAlive(port)
    try:
        first = idle.get("/")
        assert first.status == 200 and first.headers.get("connection") != "close", first

        slow: list[Answer] = []
        thread = slow_request(port, slow_path, slow)  # sent before the event
        event = simulator.add_event(type="Reboot", not_before_in=900)
        sidecar.wait_probe(503)
        events_at = time.monotonic()

        wait_for(lambda: sidecar.status()["hooks"]["drain"] == "ok", "the drain hook")
        called_at = epoch(sidecar.status()["hooks"]["called_at"])
        # the keep-alive connection opened before the drain: the app closed it
        assert idle.closed_by_server(timeout=PATIENCE), "the idle keep-alive connection is open"

        thread.join(PATIENCE)
        assert slow, "the request in flight got no answer"
        answer = slow[0]
        assert answer.status == 200, answer.headers
        if slow_bytes is not None:
            assert len(answer.body) == slow_bytes, "the request in flight was cut short"
        assert answer.started < called_at < answer.ended, "the request was not in flight"
        assert answer.closed_after or answer.headers.get("connection") == "close", (
            "the connection of the request in flight stayed open after its answer"
        )
    finally:
        idle.close()

    approval = wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    assert approval, approval
    assert time.monotonic() - events_at < DRAIN_SECONDS / 2, "no early approval"


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    require("nginx", "nginx")
    app = Nginx(tmp_path, "web-1")
    app.wait_listening()
    yield app
    app.close()


def test_nginx_graceful_reload_through_the_command_hook(
    simulator: Simulator, start_sidecar: SidecarFactory, nginx: Nginx, tmp_path: Path
) -> None:
    rehearse_drain(
        simulator,
        start_sidecar,
        port=nginx.port,
        slow_path="/slow",
        slow_bytes=Nginx.SLOW_BYTES,
        drain_command=reload_script(tmp_path, nginx.root / "nginx.pid"),
    )


def test_nginx_under_compose_reloaded_by_its_entrypoint_on_the_sidecars_request(
    simulator: Simulator, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    require("nginx", "nginx")
    app = Nginx(tmp_path, "web-1")  # its config: nginx in the foreground, as in the image
    app.close()  # started again below, under the entrypoint script
    drain_dir = tmp_path / "drain"
    entrypoint = Child(
        ["sh", str(ROOT / "configs/compose/nginx-reload-on-drain.sh"), *app.command()],
        tmp_path / "entrypoint.log",
        child_env({"DRAIN_DIR": str(drain_dir)}),
    )
    app.child = entrypoint
    try:
        app.wait_listening()
        rehearse_drain(
            simulator,
            start_sidecar,
            port=app.port,
            slow_path="/slow",
            slow_bytes=Nginx.SLOW_BYTES,
            # what docker-compose.drain-hook.yml sets: ask, then wait until nginx took it
            drain_command=f"sh -c 'touch {drain_dir}/reload && "
            f"while [ -e {drain_dir}/reload ]; do sleep 0.2; done'",
        )
        assert "nginx reloaded gracefully" in entrypoint.output()
        assert entrypoint.terminate(PATIENCE) == 0, "docker stop: nginx should stop gracefully"
    finally:
        entrypoint.close()


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    pid_file = tmp_path / "gunicorn.pid"
    child = Child(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--worker-class",
            "uvicorn_worker.UvicornWorker",
            "--workers",
            "1",
            "--bind",
            f"127.0.0.1:{port}",
            "--keep-alive",
            "75",  # as long as nginx's: idle connections stay unless the drain ends them
            "--graceful-timeout",
            "30",
            "--pid",
            str(pid_file),
            "tests.asgi_app:app",
        ],
        tmp_path / "gunicorn.log",
        child_env({"PYTHONWARNINGS": "ignore"}),
    )

    def up() -> bool:
        if not child.alive():
            raise RuntimeError(f"gunicorn exited:\n{child.output()}")
        return listening(port) and pid_file.exists()

    wait_for(up, "gunicorn")
    yield port, pid_file
    child.terminate(10)
    child.close()


def test_gunicorn_uvicorn_graceful_worker_restart_through_the_command_hook(
    simulator: Simulator, start_sidecar: SidecarFactory, gunicorn: tuple[int, Path], tmp_path: Path
) -> None:
    port, pid_file = gunicorn
    rehearse_drain(
        simulator,
        start_sidecar,
        port=port,
        slow_path="/?delay=6",
        drain_command=reload_script(tmp_path, pid_file),
    )


def test_app_endpoint_through_the_hook_url(
    simulator: Simulator, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    app = WebApp(tmp_path, "web-1")
    try:
        app.wait_listening()
        rehearse_drain(
            simulator,
            start_sidecar,
            port=app.port,
            slow_path="/?delay=6",
            **{k.removeprefix("SIDECAR_").lower(): v for k, v in app.hook_settings().items()},
        )
    finally:
        app.close()
