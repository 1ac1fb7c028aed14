"""The drain loop: learn who we are, poll Scheduled Events, let the machine decide, act, persist.

Invariants: every wait is bounded by a timeout; a failed poll never changes what the probe says
(it keeps its last known state) and never stops the loop; an approval is recorded in the state
file as soon as IMDS accepts it, before anything else happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sidecar import machine
from sidecar.backoff import Backoff
from sidecar.connections import count_established
from sidecar.events import format_time
from sidecar.imds import Compute, ImdsClient, ImdsError
from sidecar.machine import Decision, DrainState, Phase, Policy
from sidecar.metrics import Metrics
from sidecar.settings import Settings
from sidecar.store import StateDocument, drain_section, restore_drain

log = logging.getLogger(__name__)


class AppGate(Protocol):
    """What the probe needs of the app's health check."""

    @property
    def healthy(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...


class PoolGate(Protocol):
    """What the drain loop needs of the pool action (kept apart so Azure stays unimported)."""

    def want(self, out: bool) -> None: ...

    @property
    def settled(self) -> bool: ...

    @property
    def holds_probe(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...


@dataclass
class PollHealth:
    """How IMDS has been answering, for /status and the logs."""

    last_attempt: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    successes: int = 0


class Drainer:
    def __init__(
        self,
        settings: Settings,
        imds: ImdsClient,
        document: StateDocument,
        metrics: Metrics,
        *,
        pools: PoolGate | None = None,
        app: AppGate | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.imds = imds
        self.document = document
        self.metrics = metrics
        self.clock = clock
        self.state: DrainState = restore_drain(document.sections)
        self.polls = PollHealth()
        self.compute: Compute | None = None
        self.vm_name: str | None = settings.vm_name
        self.pools = pools
        self.app = app
        self.identified = asyncio.Event()
        """Set once `vm_name` (and `compute`, when it is needed) are known."""
        self._wake = asyncio.Event()
        self._verdict_logged: str | None = None
        self._skipped_logged: tuple[str, ...] = ()
        self._fields_logged: frozenset[str] = frozenset()
        self._publish()

    def verdict(self) -> str:
        """What the load-balancer probe says, and why: one word or two, in the probe's body."""
        if not self.state.ready:
            return "starting"  # no poll has succeeded yet
        if not self.state.serving:
            return "draining"
        if self.app is not None and not self.app.healthy:
            return "app unhealthy"
        if self.pools is not None and self.pools.holds_probe:
            return "restoring pools"  # put back, then serve
        return "serving"

    @property
    def serving(self) -> bool:
        return self.verdict() == "serving"

    def wake(self) -> None:
        """Re-decide now: the pool action or the app check changed something."""
        self._wake.set()

    async def run(self) -> None:
        """Runs until cancelled."""
        policy = Policy.from_settings(self.settings, await self._resolve_identity())
        backoff = Backoff(self.settings.poll_interval, self.settings.backoff_max)
        next_poll = time.monotonic()
        while True:
            if time.monotonic() >= next_poll:
                started = time.monotonic()
                error = await self._poll(policy)
                if error is None:
                    backoff.reset()
                    next_poll = started + self.settings.poll_interval
                else:
                    next_poll = time.monotonic() + backoff.next_delay(error.retry_after)
            await self._count_connections()
            await self._apply(machine.tick(self.state, self.clock(), policy), policy)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._pause_until(next_poll))
            self._wake.clear()

    async def _count_connections(self) -> None:
        """Only while draining and only when asked: /proc/net/tcp of a busy server is large."""
        ports = self.settings.app_ports
        draining = any(t.phase is Phase.DRAINING for t in self.state.events.values())
        count = await asyncio.to_thread(count_established, ports) if ports and draining else None
        if count != self.state.connections:
            self.state = replace(self.state, connections=count)
            self.metrics.app_connections.set(-1 if count is None else count)

    def _pause_until(self, next_poll: float) -> float:
        pause = next_poll - time.monotonic()
        wakeup = self.state.next_wakeup()
        if wakeup is not None:
            pause = min(pause, wakeup - self.clock())
        return max(0.0, pause)

    async def _resolve_identity(self) -> str:
        """`compute.name` is what Azure puts in `Resources` (not the hostname)."""
        if self.vm_name is not None and not self.settings.arm_enabled:
            log.info("this VM is %s (SIDECAR_VM_NAME)", self.vm_name)
            self.identified.set()
            return self.vm_name
        backoff = Backoff(self.settings.poll_interval, self.settings.backoff_max)
        while True:
            try:
                self.compute = await self.imds.compute(self.settings.imds_timeout)
            except ImdsError as error:
                self._record_failure(f"instance metadata: {error}")
                await asyncio.sleep(backoff.next_delay(error.retry_after))
                continue
            source = "SIDECAR_VM_NAME" if self.vm_name else "instance metadata compute.name"
            self.vm_name = self.vm_name or self.compute.name
            log.info("this VM is %s (%s)", self.vm_name, source)
            self.identified.set()
            return self.vm_name

    async def _poll(self, policy: Policy) -> ImdsError | None:
        timeout = (
            self.settings.imds_timeout
            if self.polls.last_success is not None
            else self.settings.imds_first_timeout
        )
        self.polls.last_attempt = self.clock()
        started = time.monotonic()
        try:
            document = await self.imds.scheduled_events(timeout)
        except ImdsError as error:
            self.metrics.polls.labels("error").inc()
            self._record_failure(str(error))
            return error
        finally:
            self.metrics.poll_seconds.observe(time.monotonic() - started)
        self.metrics.polls.labels("ok").inc()
        if self.polls.consecutive_failures:
            log.info("IMDS answers again after %d failed polls", self.polls.consecutive_failures)
        if self.polls.last_success is None:
            log.info("first Scheduled Events document read (incarnation %d)", document.incarnation)
        if document.skipped != self._skipped_logged:  # once per distinct problem, not per poll
            for problem in document.skipped:
                log.warning("skipped an unreadable event: %s", problem)
            self._skipped_logged = document.skipped
        if new_fields := document.unknown_fields - self._fields_logged:
            log.info(
                "ignoring fields this version does not know: %s", ", ".join(sorted(new_fields))
            )
            self._fields_logged |= new_fields
        self.polls = PollHealth(
            last_attempt=self.polls.last_attempt,
            last_success=self.clock(),
            successes=self.polls.successes + 1,
        )
        self.metrics.last_success.set(self.polls.last_success or 0)
        self.metrics.incarnation.set(document.incarnation)
        await self._apply(machine.observe(self.state, document, self.clock(), policy), policy)
        return None

    def _record_failure(self, message: str) -> None:
        self.polls.consecutive_failures += 1
        self.polls.last_error = message
        verdict = "probe keeps its state" if self.state.ready else "probe stays 503"
        log.warning("IMDS failure %d: %s (%s)", self.polls.consecutive_failures, message, verdict)

    async def _apply(self, decision: Decision, policy: Policy) -> None:
        state = decision.state
        if self.pools is not None and state.ready:
            # the probe has flipped (it reads the state); now the pools follow, in the background
            self.pools.want(state.draining)
            state = replace(state, pools_settled=self.pools.settled)
        self.state = state
        for change in decision.changes:
            self._log_change(change)
        self._publish()
        await self._persist()
        for action in decision.actions:
            await self._approve(action.event_id, policy)

    async def _approve(self, event_id: str, policy: Policy) -> None:
        try:
            await self.imds.approve(event_id, self.settings.imds_timeout)
        except ImdsError as error:
            self.metrics.approvals.labels("error").inc()
            log.warning("approval of %s failed: %s", event_id, error)
            decision = machine.approval_failed(
                self.state, event_id, str(error), self.clock(), policy
            )
        else:
            self.metrics.approvals.labels("ok").inc()
            decision = machine.approval_succeeded(self.state, event_id, self.clock())
        await self._apply(decision, policy)

    async def _persist(self) -> None:
        try:
            written = await self.document.write("drain", drain_section(self.state))
        except OSError as error:
            self.metrics.state_writes.labels("error").inc()
            log.error("cannot write state file %s: %s", self.document.store.path, error)
        else:
            if written:
                self.metrics.state_writes.labels("ok").inc()

    async def close(self) -> None:
        """Writes the final state; called on shutdown, after the loop stopped."""
        await self._persist()

    def _log_change(self, change: machine.Change) -> None:
        tracked = self.state.events.get(change.event_id)
        if change.after is None:
            log.info("event %s (%s) %s", change.event_id, change.event_type, change.reason)
        elif change.after is Phase.IGNORED:
            log.info("event %s (%s) ignored: %s", change.event_id, change.event_type, change.reason)
        else:
            extra = ""
            if tracked is not None and change.after is Phase.DRAINING:
                extra = f" at {format_time(tracked.approve_at)}"
            log.info(
                "event %s (%s) %s: %s%s",
                change.event_id,
                change.event_type,
                change.after,
                change.reason,
                extra,
            )

    def _publish(self) -> None:
        """Mirrors the state into metrics, and logs each change of the probe's answer once."""
        verdict = self.verdict()
        serving = verdict == "serving"
        self.metrics.serving.set(1 if serving else 0)
        for phase in Phase:
            count = sum(1 for t in self.state.events.values() if t.phase is phase)
            self.metrics.events.labels(phase.value).set(count)
        if verdict != self._verdict_logged:
            log.info("probe: %d %s", 200 if serving else 503, verdict)
            self._verdict_logged = verdict

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "state": self.verdict(),
            "vm_name": self.vm_name,
            "incarnation": state.incarnation,
            "app_connections": state.connections,
            "events": [_event_status(t) for t in state.events.values()],
            "approved": {
                event_id: format_time(moment) for event_id, moment in state.approved.items()
            },
            "imds": {
                "last_attempt": format_time(self.polls.last_attempt),
                "last_success": format_time(self.polls.last_success),
                "last_error": self.polls.last_error,
                "consecutive_failures": self.polls.consecutive_failures,
                "successful_polls": self.polls.successes,
            },
            "pools": self.pools.status() if self.pools is not None else None,
            "app": self.app.status() if self.app is not None else None,
        }


def _event_status(tracked: machine.Tracked) -> dict[str, Any]:
    return {
        "id": tracked.event_id,
        "type": tracked.event_type,
        "status": tracked.status,
        "phase": tracked.phase.value,
        "reason": tracked.reason,
        "resources": list(tracked.resources),
        "not_before": format_time(tracked.not_before),
        "drain_started": format_time(tracked.drain_started),
        "approve_at": format_time(tracked.approve_at),
        "approved_at": format_time(tracked.approved_at),
        "approval_attempts": tracked.attempts,
        "last_error": tracked.last_error,
    }
