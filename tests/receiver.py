"""A real HTTP endpoint on loopback that records what it is sent: the app's drain hook, a
webhook receiver. How it answers (status, delay) can be changed while it runs."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    at: float
    """time.monotonic() when the request arrived (the same clock in every process)."""
    wall: float = field(default_factory=time.time)


class Receiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.status = 200
        self.delay = 0.0
        self.failures_left = 0
        self.failure_status = 500
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body: Any = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw.decode(errors="replace")
                with receiver._lock:
                    receiver.received.append(
                        Received(self.path, dict(self.headers), body, time.monotonic())
                    )
                    status, delay = receiver.status, receiver.delay
                    if receiver.failures_left > 0:
                        receiver.failures_left -= 1
                        status = receiver.failure_status
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, status: int = 200, delay: float = 0.0) -> None:
        with self._lock:
            self.status, self.delay = status, delay

    def fail_next(self, count: int, status: int = 500) -> None:
        """The next `count` requests get `status`, whatever `answer` says."""
        with self._lock:
            self.failures_left, self.failure_status = count, status

    def calls(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if path is None or r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
