"""`sidecar run`: wires the pieces together and owns their lifecycle.

Start-up: state file checked, Azure SDKs imported if pool removal is on (now, not when the first
event arrives), probe server listening (503 until the first poll), then the drain loop and the
pool action. Shutdown on SIGTERM/SIGINT: the tasks are cancelled, the state written, the probe
server closed last; all within a few seconds, exit code 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from sidecar.app_health import AppHealth
from sidecar.drainer import Drainer
from sidecar.imds import ImdsClient, new_session
from sidecar.metrics import Metrics
from sidecar.server import make_app
from sidecar.settings import Settings
from sidecar.store import StateDocument, StateStore

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 3.0


class CannotListen(Exception):
    """The probe's address is taken or not ours: a configuration problem, said in one line."""


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serves until `stop` is set (or SIGTERM/SIGINT arrives when `stop` is not given)."""
    stop = stop or _stop_on_signals()
    store = StateStore(settings.state_file)
    store.check_writable()
    document = StateDocument(store)
    metrics = Metrics()
    session = new_session()
    imds = ImdsClient(
        session,
        settings.imds_url,
        api_version=settings.api_version,
        instance_api_version=settings.instance_api_version,
    )
    drainer = Drainer(settings, imds, document, metrics)
    tasks: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {"drain-loop": drainer.run}
    if settings.arm_enabled:
        tasks["pool-action"] = _pool_action(settings, document, metrics, drainer)
    if settings.app_health_url:
        drainer.app = AppHealth(
            settings.app_health_url,
            interval=settings.app_health_interval,
            timeout=settings.app_health_timeout,
            metrics=metrics,
            on_change=drainer.wake,
        )
        tasks["app-health"] = drainer.app.run
    runner = web.AppRunner(
        make_app(drainer, settings.health_path),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
    )
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.host, settings.port).start()
        except OSError as error:
            raise CannotListen(
                f"SIDECAR_HOST={settings.host} SIDECAR_PORT={settings.port}: cannot listen: "
                f"{error.strerror or error}"
            ) from None
        log.info(
            "probe on http://%s:%d%s, polling %s every %gs",
            settings.host,
            settings.port,
            settings.health_path,
            settings.imds_url,
            settings.poll_interval,
        )
        await _until_stopped_or_crashed(tasks, stop)
    finally:
        await drainer.close()
        await session.close()
        await runner.cleanup()
        log.info("stopped")


def _pool_action(
    settings: Settings, document: StateDocument, metrics: Metrics, drainer: Drainer
) -> Callable[[], Coroutine[Any, Any, None]]:
    """Imports the Azure SDKs now, at start-up: a Preempt leaves 30 s, not time to import."""
    from sidecar.arm import ArmNetwork, NicRef
    from sidecar.pools import PoolAction

    pools = PoolAction(settings, document, metrics, on_change=drainer.wake)
    drainer.pools = pools

    async def run() -> None:
        await drainer.identified.wait()
        compute = drainer.compute
        subscription = (
            NicRef.parse(settings.nic_id).subscription
            if settings.nic_id
            else compute.subscription_id
            if compute is not None
            else ""
        )
        network = ArmNetwork(settings, subscription)
        try:
            await pools.run(compute, network)
        finally:
            await network.close()

    return run


async def _until_stopped_or_crashed(
    loops: dict[str, Callable[[], Coroutine[Any, Any, None]]], stop: asyncio.Event
) -> None:
    """Runs the loops until `stop`; a loop that crashes stops the others and re-raises."""
    tasks = [asyncio.create_task(loop(), name=name) for name, loop in loops.items()]
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (*tasks, stopping):
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop
