"""SIDECAR_APP_HEALTH_URL: the probe also speaks for the app, which the LB no longer probes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import SidecarFactory
from tests.support import Simulator, free_port


class App:
    """A stand-in app whose health endpoint answers whatever status the test sets."""

    def __init__(self) -> None:
        self.status = 200
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(app.status)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                return None

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/healthz"
        self._handler = Handler
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def app() -> Iterator[App]:
    stand_in = App()
    yield stand_in
    stand_in.stop()


def test_probe_follows_the_apps_health(
    app: App, simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(app_health_url=app.url, app_health_interval="0.25")
    sidecar.wait_probe(503)  # after a reboot the app may start after the sidecar
    sidecar.wait_polls(3)
    assert sidecar.probe().body == b"app unhealthy\n"
    assert sidecar.status()["app"]["healthy"] is False

    app.start()
    sidecar.wait_probe(200)
    app.status = 500
    sidecar.wait_probe(503)
    assert sidecar.status()["app"]["last_error"] == "HTTP 500"
    app.status = 200
    sidecar.wait_probe(200)


def test_drain_wins_over_a_healthy_app(
    app: App, simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    app.start()
    sidecar = start_sidecar(app_health_url=app.url, app_health_interval="0.25")
    sidecar.wait_probe(200)
    simulator.add_event(type="Reboot", not_before_in=900)
    sidecar.wait_probe(503)
    assert sidecar.probe().body == b"draining\n"
