"""`sidecar run`: wires the pieces together and owns their lifecycle.

Start-up: state file checked, probe server listening (answering 503 until the first poll), then
the drain loop. Shutdown on SIGTERM/SIGINT: the loop is cancelled, the state written, the probe
server closed last; all within a few seconds, exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from sidecar.drainer import Drainer
from sidecar.imds import ImdsClient, new_session
from sidecar.metrics import Metrics
from sidecar.server import make_app
from sidecar.settings import Settings
from sidecar.store import StateStore

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 3.0


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serves until `stop` is set (or SIGTERM/SIGINT arrives when `stop` is not given)."""
    stop = stop or _stop_on_signals()
    store = StateStore(settings.state_file)
    store.check_writable()
    session = new_session()
    imds = ImdsClient(
        session,
        settings.imds_url,
        api_version=settings.api_version,
        instance_api_version=settings.instance_api_version,
    )
    drainer = Drainer(settings, imds, store, Metrics())
    runner = web.AppRunner(
        make_app(drainer, settings.health_path),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info(
            "probe on http://%s:%d%s, polling %s every %gs",
            settings.host,
            settings.port,
            settings.health_path,
            settings.imds_url,
            settings.poll_interval,
        )
        loop = asyncio.create_task(drainer.run(), name="drain-loop")
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        await asyncio.wait({loop, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (loop, stopping):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop  # re-raises a crash of the loop, after the state is saved below
    finally:
        await drainer.close()
        await session.close()
        await runner.cleanup()
        log.info("stopped")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop
