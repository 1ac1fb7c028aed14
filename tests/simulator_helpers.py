"""Helpers for the simulator tests: run the real simulator on its own loop, talk plain HTTP.

Everything goes over loopback sockets with ``http.client`` (which never uses a proxy); no
helper sleeps for a machine-speed-tuned time: waits poll with generous deadlines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sidecar.simulator.endpoints import SimulatorUrls
from sidecar.simulator.options import SimulatorOptions
from sidecar.simulator.server import Simulator

SE_VERSION = "2020-07-01"
INSTANCE_VERSION = "2021-02-01"
START_TIMEOUT = 30.0


class FakeClock:
    """A hand-driven clock for the world (aiohttp keeps using real time)."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def quick_options(**overrides: Any) -> SimulatorOptions:
    """Ephemeral ports, quick LROs; the CA goes to a temp dir the simulator removes."""
    values: dict[str, Any] = {"port": 0, "arm_port": 0, "arm_retry_after": 1.0}
    values.update(overrides)
    return SimulatorOptions(**values)


class RunningSimulator:
    """The real ``Simulator`` on a private event loop in a background thread."""

    def __init__(
        self, options: SimulatorOptions | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        self.options = options or quick_options()
        self.clock = clock
        self._started: concurrent.futures.Future[SimulatorUrls] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)
        self.urls: SimulatorUrls

    def __enter__(self) -> RunningSimulator:
        self._thread.start()
        self.urls = self._started.result(timeout=START_TIMEOUT)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=START_TIMEOUT)
        assert not self._thread.is_alive(), "the simulator did not stop"

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.clock is not None:
            simulator = Simulator(self.options, clock=self.clock)
        else:
            simulator = Simulator(self.options)
        try:
            urls = await simulator.start()
        except BaseException as exc:
            self._started.set_exception(exc)
            raise
        self._started.set_result(urls)
        try:
            await self._stop.wait()
        finally:
            await simulator.stop()

    # Convenience ------------------------------------------------------------------------------

    def control(self, method: str, path: str, body: Any = None) -> Reply:
        return request(method, f"{self.urls.control_url}{path}", body=body)

    def imds(
        self,
        path: str,
        *,
        vm: str | None = None,
        method: str = "GET",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        root = self.urls.imds_url if vm is None else self.urls.vm_url(vm)
        sent = {"Metadata": "true"} if headers is None else dict(headers)
        return request(method, f"{root}{path}", body=body, headers=sent, timeout=timeout)

    def events(self, version: str = SE_VERSION, vm: str | None = None) -> dict[str, Any]:
        reply = self.imds(f"/metadata/scheduledevents?api-version={version}", vm=vm)
        assert reply.status == 200, reply.text
        data: dict[str, Any] = reply.json()
        return data

    def approve(self, *event_ids: str, vm: str | None = None) -> Reply:
        body = {"StartRequests": [{"EventId": event_id} for event_id in event_ids]}
        return self.imds(
            f"/metadata/scheduledevents?api-version={SE_VERSION}", vm=vm, method="POST", body=body
        )

    def add_event(self, **fields: Any) -> dict[str, Any]:
        reply = self.control("POST", "/events", fields)
        assert reply.status == 201, reply.text
        event: dict[str, Any] = reply.json()[0]
        return event

    def token(self, vm: str | None = None, resource: str = "https://management.azure.com") -> str:
        reply = self.imds(
            f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}", vm=vm
        )
        assert reply.status == 200, reply.text
        return str(reply.json()["access_token"])

    def arm(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        assert self.urls.arm_url is not None and self.urls.ca_file is not None
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        context = ssl.create_default_context(cafile=str(self.urls.ca_file))
        return request(
            method, f"{self.urls.arm_url}{path}", body=body, headers=sent, context=context
        )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    method: str,
    url: str,
    *,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> Reply:
    """One HTTP(S) request with ``http.client``: no proxy, no retries, no surprises."""
    parts = urlsplit(url)
    assert parts.hostname in ("127.0.0.1", "localhost", "::1"), url
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    sent = dict(headers or {})
    payload: bytes | None = None
    if isinstance(body, bytes | str):
        payload = body.encode() if isinstance(body, str) else body
    elif body is not None:
        payload = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, target, body=payload, headers=sent)
        response = connection.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> None:
    """Poll until ``predicate()`` holds; fail after a generous deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
