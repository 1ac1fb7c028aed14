"""The HTTP surface: the load-balancer probe, /status and /metrics.

Invariants:
- handlers only read in-memory state; nothing here awaits IMDS, ARM or the disk, so the probe
  answers in well under a millisecond of work whatever the drain loop is waiting for;
- the probe answers whatever else happens on its port: at most `MAX_CONNECTIONS` are open (the
  oldest is shed to admit a new one), and a connection idle for `IDLE_SECONDS` is closed;
- a client that is not on loopback, without the admin token, sees what a load balancer and a
  dashboard need (phase, reasons, times, counts), never identifiers or error texts
  (subscription, resource ids, other VMs' names, ARM's messages with object ids).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr

from sidecar import __version__, admin
from sidecar.drainer import Drainer
from sidecar.metrics import Metrics
from sidecar.supervise import Supervisor

MAX_CONNECTIONS = 256
"""Far above what probes and scrapers need, far below the default 1,024 descriptors."""
BACKLOG = 128
"""Connections asyncio accepts in one go before our cap sees them: small, so that accepted,
live and shed-but-not-yet-closed connections together stay far below the descriptor limit."""
IDLE_SECONDS = 5.0
"""A probe or a scrape takes milliseconds; a connection that says nothing this long is shed."""

DRAINER = web.AppKey("drainer", Drainer)
METRICS = web.AppKey("metrics", Metrics)
SUPERVISOR = web.AppKey("supervisor", Supervisor)


async def probe(request: web.Request) -> web.Response:
    serving, text = request.app[DRAINER].probe_answer()
    return web.Response(status=200 if serving else 503, text=f"{text}\n")


async def status(request: web.Request) -> web.Response:
    detailed = is_loopback(request) or admin.authorized(request)
    body: dict[str, Any] = {
        "version": __version__,
        **request.app[DRAINER].status(detailed=detailed),
        "tasks": request.app[SUPERVISOR].status(detailed=detailed),
        "detail": "full"
        if detailed
        else "public: identifiers are shown to loopback clients and admin token holders",
    }
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:  # a Unix socket or no peer: not a remote client
        return request.remote is None


def make_app(
    drainer: Drainer,
    supervisor: Supervisor,
    health_path: str,
    admin_token: SecretStr | None = None,
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[DRAINER] = drainer
    app[METRICS] = drainer.metrics
    app[SUPERVISOR] = supervisor
    app.router.add_get(health_path, probe)  # GET and HEAD
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    if admin_token is not None:
        admin.add_admin_routes(app, drainer, admin_token)
    return app


class CappedSite(web.BaseSite):
    """A TCP site that sheds its oldest connection when `limit` are open, so that a flood of
    idle connections can never crowd out the load balancer's probe. Connections are counted
    from the moment they are accepted (aiohttp learns of them only a loop iteration later)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limit: int,
        on_shed: Callable[[], None],
    ) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._host = host
        self._port = port
        self._limit = limit
        self._on_shed = on_shed
        self._open: dict[_Counted, None] = {}  # oldest first

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")

        def accept() -> _Counted:
            while len(self._open) >= self._limit:
                oldest = next(iter(self._open))
                self._open.pop(oldest)
                oldest.shed()
                self._on_shed()
            counted = _Counted(server(), self._open)
            self._open[counted] = None
            return counted

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            accept, self._host, self._port, backlog=self._backlog, reuse_address=True
        )


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted while it is open."""

    def __init__(self, inner: web.RequestHandler, registry: dict[_Counted, None]) -> None:
        self.inner = inner
        self.registry = registry
        self.transport: asyncio.Transport | None = None

    def shed(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # an idle flood connection: no goodbye owed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> None:
        self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.pop(self, None)
        self.transport = None
        self.inner.connection_lost(exc)
