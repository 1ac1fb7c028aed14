"""The load balancers' health prober: every probed backend on its own schedule, over loopback.

Invariants: a backend is probed only when its VM has a loopback port for the probe's port (no
map, no traffic); each (probe, backend) pair has its own task that probes every ``interval``
seconds of the real clock (the world's clock may be a test's hand-driven one), the first time
after a stable offset within one interval, so a fleet's probes spread out instead of arriving
together; an HTTP probe opens a new connection, sends ``GET path`` and reads the status line
only: 200 is a success; any other status, a refused or reset connection, or no answer within
min(interval, 30 s) is a failure; ``stop`` cancels and awaits every task it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.simulator import backends, health
from sidecar.simulator.health import BackendKey
from sidecar.simulator.loopback import LOOPBACK
from sidecar.simulator.world import World

_log = logging.getLogger(__name__)
RECONCILE_SECONDS = 0.2
"""How often the prober looks for backends that came, went or changed port."""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str
    detail: str


def _tls_context() -> ssl.SSLContext:
    """Azure's HTTPS probes do not validate the backend's certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def probe_once(
    port: int, *, protocol: str, path: str | None, timeout: float, host: str = LOOPBACK
) -> ProbeResult:
    """One probe, as Azure sends it: a fresh connection, then (HTTP) one GET."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tls = _tls_context() if protocol == "Https" else None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    except TimeoutError:
        return ProbeResult(False, health.TCP_TIMEOUT, f"no TCP answer within {timeout:g} s")
    except OSError as error:
        return ProbeResult(
            False, health.ENDPOINT_UNREACHABLE, f"connect: {error.strerror or error}"
        )
    try:
        if protocol == "Tcp":
            return ProbeResult(True, health.SUCCESS, "connected")
        request = (
            f"GET {path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: Load Balancer Agent\r\nConnection: close\r\n\r\n"
        )
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                writer.write(request.encode("ascii"))
                await writer.drain()
                line = await reader.readline()
        except TimeoutError:
            return ProbeResult(False, health.NO_RESPONSE, f"no HTTP answer within {timeout:g} s")
        except OSError as error:
            return ProbeResult(False, health.ENDPOINT_UNREACHABLE, f"reset: {error}")
        parts = line.decode("latin-1").split(" ", 2)
        if not line or len(parts) < 2 or not parts[0].startswith("HTTP/"):
            return ProbeResult(False, health.ENDPOINT_UNREACHABLE, "closed without an HTTP answer")
        await _drain(reader, max(0.0, deadline - loop.time()))
        if parts[1] != "200":
            return ProbeResult(False, health.HTTP_STATUS_ERROR, f"HTTP {parts[1]}")
        return ProbeResult(True, health.SUCCESS, "HTTP 200")
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


async def _drain(reader: asyncio.StreamReader, seconds: float) -> None:
    """Read the rest of the answer, so the server closes first and sees no reset."""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass


def _offset(key: BackendKey) -> float:
    """A stable fraction in [0, 1) per backend: where in the interval its probes fall."""
    return (zlib.crc32("|".join(key).encode()) % 1000) / 1000


class Prober:
    """Probes every probed backend of every load balancer; ``reconcile`` starts and ends the
    per-backend tasks (someone calls it periodically), ``stop`` ends them all."""

    def __init__(self, world: World, *, wall: Callable[[], float] = time.time) -> None:
        self.world = world
        self.wall = wall
        self._targets: dict[BackendKey, backends.Target] = {}
        self._tasks: dict[BackendKey, asyncio.Task[None]] = {}
        self.probes_sent = 0

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def reconcile(self) -> None:
        """Start a task for each newly probed backend, end those of backends that went."""
        self._targets = backends.sync(self.world, self.wall())
        probed = {key for key, target in self._targets.items() if target.port is not None}
        for key in list(self._tasks):
            if key not in probed or self._tasks[key].done():
                task = self._tasks.pop(key)
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a loop that ended is restarted below
        for key in probed - set(self._tasks):
            self._tasks[key] = asyncio.create_task(self._probe_loop(key), name=f"lb-probe {key[1]}")

    async def probe_all_once(self) -> int:
        """Probe every probed backend once, now (tests; a benchmark's warm-up)."""
        self._targets = backends.sync(self.world, self.wall())
        due = [t for t in self._targets.values() if t.port is not None]
        await asyncio.gather(*(self._probe(t) for t in due))
        return len(due)

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def _probe(self, target: backends.Target) -> None:
        if target.port is None:
            return
        probe = target.probe
        result = await probe_once(
            target.port, protocol=probe.protocol, path=probe.path, timeout=probe.timeout
        )
        self.probes_sent += 1
        backends.record(self.world, target, result.ok, result.reason, result.detail, self.wall())

    async def _probe_loop(self, key: BackendKey) -> None:
        loop = asyncio.get_running_loop()
        target = self._targets.get(key)
        if target is None:
            return
        await asyncio.sleep(_offset(key) * target.probe.interval)
        while True:
            target = self._targets.get(key)  # the newest port, path and interval
            if target is None or target.port is None:
                return
            started = loop.time()
            try:
                await self._probe(target)
            except Exception:  # a bug in one probe must not end this backend's probing
                _log.exception("load balancer probe of %s failed", target.member.ipconfig_id)
            await asyncio.sleep(max(0.0, started + target.probe.interval - loop.time()))
