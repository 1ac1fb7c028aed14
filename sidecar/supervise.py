"""Background tasks that outlive their own failures.

Invariant: an exception in a background task (the drain loop, the pool action, the app-health
check, hooks, whatever comes later) never stops the probe server or another task. It is logged
with its type and traceback, counted (`sidecar_task_failures_total`), shown in /status, and the
task starts again after a jittered back-off; a task that ends by itself is started again too.
Only cancellation ends a task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sidecar.backoff import Backoff
from sidecar.events import format_time
from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

Loop = Callable[[], Coroutine[Any, Any, None]]
RESTART_BASE_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
HEALTHY_RUN_SECONDS = 60.0
"""A task that ran this long before failing starts its back-off afresh."""


@dataclass
class TaskHealth:
    failures: int = 0
    last_failure: float | None = None
    last_error: str | None = None


class Supervisor:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.health: dict[str, TaskHealth] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, loop: Loop) -> None:
        self.health[name] = TaskHealth()
        self._tasks.append(asyncio.create_task(self._guarded(name, loop), name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def status(self, *, detailed: bool) -> dict[str, Any]:
        return {
            name: {
                "failures": health.failures,
                "last_failure": format_time(health.last_failure),
                **({"last_error": health.last_error} if detailed else {}),
            }
            for name, health in self.health.items()
        }

    async def _guarded(self, name: str, loop: Loop) -> None:
        backoff = Backoff(RESTART_BASE_SECONDS, RESTART_MAX_SECONDS)
        health = self.health[name]
        while True:
            started = time.monotonic()
            try:
                await loop()
                error = "it returned"
                log.error("task %s ended by itself; restarting it", name)
            except Exception as failure:  # CancelledError is a BaseException: it ends the task
                error = f"{type(failure).__name__}: {failure}"
                log.exception("task %s failed (%s); restarting it", name, type(failure).__name__)
            health.failures += 1
            health.last_failure = time.time()
            health.last_error = error[:500]
            self.metrics.task_failures.labels(name).inc()
            if time.monotonic() - started > HEALTHY_RUN_SECONDS:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())
