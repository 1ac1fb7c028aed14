"""`sidecar run`: wires the pieces together and owns their lifecycle.

Start-up: descriptor limit raised, state file checked (a newer version's file stops start-up),
probe server listening (503 until the first poll), then the background tasks under supervision:
the drain loop and each gate's own task (pool removal reaches ARM through a helper process, so
the Azure SDKs are never loaded here). A task that fails is restarted; the probe server never
depends on one. Shutdown on SIGTERM/SIGINT: the tasks are cancelled, the state written, the
probe server closed last; all within a few seconds, exit code 0.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from sidecar.app_health import AppHealth
from sidecar.drainer import Drainer, EventSource
from sidecar.gates import Gate
from sidecar.hooks import DrainHooks
from sidecar.imds import ImdsClient, new_session
from sidecar.legacy import LegacyClient
from sidecar.metrics import Metrics
from sidecar.notify import Notifier
from sidecar.server import IDLE_SECONDS, MAX_CONNECTIONS, CappedSite, make_app
from sidecar.settings import LEGACY_2016, Settings
from sidecar.store import StateDocument, StateStore
from sidecar.supervise import Supervisor

log = logging.getLogger(__name__)


class PoolGate(Gate, Protocol):
    """The pool action as the rest of the app sees it (keeps the Azure SDKs unimported)."""

    @property
    def settled(self) -> bool: ...


SHUTDOWN_GRACE_SECONDS = 3.0


class CannotListen(Exception):
    """The probe's address is taken or not ours: a configuration problem, said in one line."""


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serves until `stop` is set (or SIGTERM/SIGINT arrives when `stop` is not given)."""
    stop = stop or _stop_on_signals()
    _raise_descriptor_limit()
    asyncio.get_running_loop().set_exception_handler(_log_loop_error)
    store = StateStore(settings.state_file)
    if settings.dry_run:
        log.warning("dry run: nothing will be changed, sent or written; reports only")
    else:
        store.check_writable()
    document = StateDocument(store, enabled=not settings.dry_run)
    metrics = Metrics()
    session = new_session()
    imds: EventSource = (
        LegacyClient(session, settings.imds_url, settings.vm_name)
        if settings.api_version == LEGACY_2016
        else ImdsClient(
            session,
            settings.imds_url,
            api_version=settings.api_version,
            instance_api_version=settings.instance_api_version,
        )
    )
    drainer = Drainer(settings, imds, document, metrics, boot_id=read_boot_id(settings))
    supervisor = Supervisor(metrics)
    if settings.app_health_url:
        app_health = AppHealth(
            settings.app_health_url,
            interval=settings.app_health_interval,
            timeout=settings.app_health_timeout,
            metrics=metrics,
            on_change=drainer.wake,
        )
        drainer.add_gate(app_health)
        supervisor.start("app-health", app_health.run)
    pools = (
        _start_pool_action(settings, document, metrics, drainer, supervisor)
        if settings.arm_enabled
        else None
    )
    if any(
        (
            settings.drain_hook_url,
            settings.drain_command,
            settings.undrain_hook_url,
            settings.undrain_command,
        )
    ):
        hooks = DrainHooks(
            settings,
            document,
            metrics,
            vm_name=lambda: drainer.vm_name,
            pools_out=lambda: pools is None or pools.settled,
            on_change=drainer.wake,
        )
        drainer.add_gate(hooks)
        supervisor.start("hooks", hooks.run)
    if settings.webhook_urls or settings.syslog_address:
        notifier = Notifier(settings, document, metrics)
        drainer.on_notice = notifier.publish
        drainer.extra_status["notify"] = notifier.status
        supervisor.start("notify", notifier.run)
    runner = web.AppRunner(
        make_app(drainer, supervisor, settings.health_path, settings.admin_token),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
        keepalive_timeout=IDLE_SECONDS,
    )
    await runner.setup()
    try:
        site = CappedSite(
            runner,
            settings.host,
            settings.port,
            limit=MAX_CONNECTIONS,
            on_shed=metrics.probe_connections_shed.inc,
        )
        try:
            await site.start()
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
        supervisor.start("drain-loop", drainer.run)
        await stop.wait()
    finally:
        await supervisor.stop()
        await drainer.close()
        await session.close()
        await runner.cleanup()
        log.info("stopped")


def _start_pool_action(
    settings: Settings,
    document: StateDocument,
    metrics: Metrics,
    drainer: Drainer,
    supervisor: Supervisor,
) -> PoolGate:
    """Pool removal and the fleet gates. ARM is reached through a helper process that carries
    the Azure SDKs (about 60 MiB) only while ARM is needed (`sidecar.arm_process`); this VM's
    NICs are found at start-up, so a missing permission shows now, not at the first drain."""
    from sidecar.arm_model import NicRef
    from sidecar.arm_process import ArmProcess
    from sidecar.fleet import CapacityGuard, FleetView, Minimum, PeerApproval
    from sidecar.pools import PoolAction

    pools = PoolAction(settings, document, metrics, on_change=drainer.wake)
    drainer.add_gate(pools)
    view = FleetView(settings, pools)
    fleet: list[CapacityGuard | PeerApproval] = []
    if settings.min_healthy_backends:
        guard = CapacityGuard(
            Minimum.parse(settings.min_healthy_backends), view, on_change=drainer.wake
        )
        guard.me = lambda: drainer.vm_name
        fleet.append(guard)
    if settings.peer_aware_approval:
        fleet.append(PeerApproval(view, on_change=drainer.wake))
    for gate in fleet:
        drainer.add_gate(gate)

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
        network = ArmProcess(settings, subscription)
        drainer.extra_status["arm_helper"] = network.status
        view.network = network
        if document.store.existed and document.store.report.problem is None and not pools.removed:
            pools.startup_checked = True  # an intact state file vouches: nothing is out
            drainer.wake()
        pools.mode = "discovering"
        try:
            await asyncio.gather(pools.run(compute, network), *(gate.run() for gate in fleet))
        finally:
            await network.close()

    supervisor.start("pool-action", run)
    return pools


def read_boot_id(settings: Settings) -> str | None:
    """This boot's id; without it a reboot cannot be recognised (return-after=impact waits)."""
    try:
        return Path(settings.boot_id_file).read_text().strip() or None
    except OSError as error:
        log.warning(
            "cannot read the boot id from SIDECAR_BOOT_ID_FILE=%s: %s",
            settings.boot_id_file,
            error.strerror or error,
        )
        return None


def _raise_descriptor_limit() -> None:
    """The soft limit (often 1,024) up to the hard one: a connection storm on the probe port
    must hit the cap on connections, not the descriptor limit (state-file writes need one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, error)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own errors (accept() out of descriptors, ...) as one rate-limited line each."""
    error = context.get("exception")
    detail = f": {type(error).__name__}: {error}" if error is not None else ""
    log.error("event loop: %s%s", context.get("message", "error"), detail)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop
