"""The app's own health, checked in the background and folded into the load-balancer probe.

Why: once the load balancer probes the sidecar instead of the app, a crashed app, or one still
starting after a reboot, would keep receiving traffic. With SIDECAR_APP_HEALTH_URL set, the probe
answers 200 only while the app's health endpoint answers 2xx as well.

Invariant: the probe never waits for the app; it reads the verdict of the last check, which is
"unhealthy" until a first check has passed. Every check is bounded by its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from sidecar.events import format_time
from sidecar.gates import Approval, Wanted
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)


class AppHealth:
    name = "app"

    def __init__(
        self,
        url: str,
        *,
        interval: float,
        timeout: float,
        metrics: Metrics,
        on_change: Callable[[], None],
    ) -> None:
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self.metrics = metrics
        self.on_change = on_change
        self.healthy = False
        self.checked = False
        self.last_check: float | None = None
        self.last_error: str | None = None

    async def run(self) -> None:
        """Checks every `interval` until cancelled; a local app, so never through a proxy."""
        async with aiohttp.ClientSession(trust_env=False) as session:
            while True:
                error = await self._check(session)
                self._record(error)
                await asyncio.sleep(self.interval)

    async def _check(self, session: aiohttp.ClientSession) -> str | None:
        try:
            async with session.get(
                self.url,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except aiohttp.ClientError as error:
            return str(error) or type(error).__name__

    def _record(self, error: str | None) -> None:
        healthy = error is None
        self.last_check = time.time()
        self.last_error = error
        self.metrics.app_healthy.set(1 if healthy else 0)
        if healthy != self.healthy or not self.checked:
            if healthy:
                log.info("app health check passes (%s)", self.url)
            else:
                log.warning("app health check fails (%s): %s", self.url, error)
            self.healthy = healthy
            self.checked = True
            self.on_change()

    def follow(self, wanted: Wanted) -> None:
        """The app's health does not depend on the drain."""

    def approval(self) -> Approval:
        return Approval.OPEN

    def probe_hold(self) -> str | None:
        return None if self.healthy else "app unhealthy"

    def failure(self) -> str | None:
        return None  # the app's own health is its monitoring's business, not a maintenance

    def keeps_serving(self) -> str | None:
        return None

    def status(self, *, detailed: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"healthy": self.healthy, "last_check": format_time(self.last_check)}
        if detailed:
            body.update(url=self.url, last_error=self.last_error)
        return body
