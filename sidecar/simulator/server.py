"""The running simulator: IMDS + control over HTTP on one port, ARM over HTTPS on another.

Invariants: sockets are bound before any app is built, so the URLs every answer names are the
real ones (port 0 works); the ready file is written, atomically, only once both servers
accept connections; the load balancers' prober and frontends run only while the servers do;
``stop`` releases hanging requests first, stops the load balancers, then closes both servers
and removes the CA directory it created.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType

from aiohttp import web

from sidecar.simulator.arm import add_arm_routes
from sidecar.simulator.control import routes as control_routes
from sidecar.simulator.control_lb import routes as lb_control_routes
from sidecar.simulator.endpoints import URLS, WORLD, SimulatorUrls
from sidecar.simulator.imds import add_imds_routes
from sidecar.simulator.lbruntime import LB_RUNTIME, LbRuntime
from sidecar.simulator.middleware import arm_middleware, imds_middleware
from sidecar.simulator.options import SimulatorOptions
from sidecar.simulator.times import Clock
from sidecar.simulator.tls import TlsMaterial, make_tls
from sidecar.simulator.world import World, WorldConfig

_SHUTDOWN_SECONDS = 1.0


def world_config(options: SimulatorOptions) -> WorldConfig:
    return WorldConfig(
        subscription_id=options.subscription_id,
        resource_group=options.resource_group,
        location=options.location,
        default_vm=options.vm_name,
        started_seconds=options.started_seconds,
        arm_retry_after=options.arm_retry_after,
        arm_page_size=options.arm_page_size,
        arm_throttle=options.arm_throttle,
        schedule=tuple((s.event_type, s.seconds) for s in options.schedule),
        start_when=options.start_when,
        warmup_seconds=options.warmup_seconds,
    )


def build_imds_app(world: World, urls: SimulatorUrls) -> web.Application:
    """IMDS at the root and under /vms/{vm}, plus the control API under /control."""
    app = web.Application(middlewares=[imds_middleware])
    app[WORLD] = world
    app[URLS] = urls
    app.router.add_routes(lb_control_routes)  # before control's catch-all for unknown paths
    app.router.add_routes(control_routes)
    add_imds_routes(app)
    return app


def build_arm_app(world: World, urls: SimulatorUrls) -> web.Application:
    app = web.Application(middlewares=[arm_middleware])
    app[WORLD] = world
    app[URLS] = urls
    add_arm_routes(app)
    return app


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):  # noqa: S104 - naming a wildcard bind, not binding one
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def write_ready_file(path: Path, urls: SimulatorUrls) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(urls.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


class Simulator:
    """Start with ``await sim.start()`` (or ``async with``), stop with ``await sim.stop()``."""

    def __init__(
        self, options: SimulatorOptions | None = None, *, clock: Clock = time.time
    ) -> None:
        self.options = options or SimulatorOptions()
        self.world = World(world_config(self.options), clock)
        self.lb = LbRuntime(self.world)
        self._runners: list[web.AppRunner] = []
        self._tls: TlsMaterial | None = None
        self._urls: SimulatorUrls | None = None

    @property
    def urls(self) -> SimulatorUrls:
        if self._urls is None:
            raise RuntimeError("the simulator is not running")
        return self._urls

    async def start(self) -> SimulatorUrls:
        if self._urls is not None or self._runners:
            raise RuntimeError("the simulator is already running")
        options = self.options
        sockets: list[socket.socket] = []
        try:
            imds_socket = _bind(options.host, options.port)
            sockets.append(imds_socket)
            arm_socket = None
            if options.arm:
                arm_socket = _bind(options.host, options.arm_port)
                sockets.append(arm_socket)
                self._tls = await asyncio.to_thread(make_tls, options.ca_file)
            urls = self._make_urls(imds_socket, arm_socket)
            imds_app = build_imds_app(self.world, urls)
            imds_app[LB_RUNTIME] = self.lb
            await self._serve(imds_app, sockets.pop(0), None)
            if arm_socket is not None and self._tls is not None:
                arm_app = build_arm_app(self.world, urls)
                arm_app[LB_RUNTIME] = self.lb
                await self._serve(arm_app, sockets.pop(0), self._tls)
            await self.lb.reconcile()
            self.lb.start()
            if options.ready_file is not None:
                await asyncio.to_thread(write_ready_file, options.ready_file, urls)
        except BaseException:
            for sock in sockets:
                sock.close()
            await self.stop()
            raise
        self._urls = urls
        return urls

    def _make_urls(self, imds: socket.socket, arm: socket.socket | None) -> SimulatorUrls:
        host = _url_host(self.options.host)
        imds_url = f"http://{host}:{imds.getsockname()[1]}"
        return SimulatorUrls(
            imds_url=imds_url,
            control_url=f"{imds_url}/control",
            arm_url=f"https://{host}:{arm.getsockname()[1]}" if arm is not None else None,
            ca_file=self._tls.ca_file if self._tls is not None else None,
        )

    async def _serve(
        self, app: web.Application, sock: socket.socket, tls: TlsMaterial | None
    ) -> None:
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that leaves ends its hanging request
            shutdown_timeout=_SHUTDOWN_SECONDS,
            access_log=None,
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.SockSite(runner, sock, ssl_context=tls.context if tls is not None else None)
        await site.start()

    async def stop(self) -> None:
        self.world.faults.clear()  # releases requests held by 'hang' faults
        await self.lb.stop()
        while self._runners:
            await self._runners.pop().cleanup()
        if self._tls is not None and self._tls.created_dir is not None:
            shutil.rmtree(self._tls.created_dir, ignore_errors=True)
        self._tls = None
        self._urls = None

    async def __aenter__(self) -> SimulatorUrls:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
