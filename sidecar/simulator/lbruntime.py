"""The load balancers' moving parts in a running simulator: the prober and the frontends.

Invariants: started once the servers listen and stopped before they close, by the simulator
alone; one supervisor task keeps both in line with the world (rules that ask for a loopback
frontend, backends that have a loopback port), so a reset or a NIC write through ARM takes
effect within one ``RECONCILE_SECONDS`` without anyone telling it; a failed reconcile is
retried on the next round, never the end of the simulator.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from sidecar.simulator.frontend import Frontends
from sidecar.simulator.prober import RECONCILE_SECONDS, Prober
from sidecar.simulator.world import World

_log = logging.getLogger(__name__)


class LbRuntime:
    def __init__(self, world: World, *, reconcile_seconds: float = RECONCILE_SECONDS) -> None:
        self.world = world
        self.prober = Prober(world)
        self.frontends = Frontends(world)
        self.reconcile_seconds = reconcile_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="lb-runtime")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.prober.stop()
        await self.frontends.stop()

    async def reconcile(self) -> None:
        self.prober.reconcile()
        await self.frontends.reconcile()

    async def _supervise(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:  # a bug here must not end the simulator: say it, go on
                _log.exception("load balancer runtime: reconcile failed")
            await asyncio.sleep(self.reconcile_seconds)


LB_RUNTIME = web.AppKey("lb_runtime", LbRuntime)
