"""The drain loop: learn who we are, poll Scheduled Events, let the machine decide, act, persist.

Invariants: every wait is bounded by a timeout; a failed poll never changes what the probe says
(it keeps its last known state) and never stops the loop; an approval is recorded in the state
file as soon as IMDS accepts it, before anything else happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar import machine
from sidecar.backoff import Backoff
from sidecar.events import format_time
from sidecar.imds import Compute, ImdsClient, ImdsError
from sidecar.machine import Decision, DrainState, Phase, Policy
from sidecar.metrics import Metrics
from sidecar.settings import Settings
from sidecar.store import StateStore, drain_section, restore_drain

log = logging.getLogger(__name__)


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
        store: StateStore,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.imds = imds
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.document = store.load()
        self.state: DrainState = restore_drain(self.document)
        self.polls = PollHealth()
        self.compute: Compute | None = None
        self.vm_name: str | None = settings.vm_name
        self._serving_logged: bool | None = None
        self._skipped_logged: tuple[str, ...] = ()
        self._publish()

    @property
    def serving(self) -> bool:
        return self.state.serving

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
            await self._apply(machine.tick(self.state, self.clock(), policy), policy)
            await asyncio.sleep(self._pause_until(next_poll))

    def _pause_until(self, next_poll: float) -> float:
        pause = next_poll - time.monotonic()
        wakeup = self.state.next_wakeup()
        if wakeup is not None:
            pause = min(pause, wakeup - self.clock())
        return max(0.0, pause)

    async def _resolve_identity(self) -> str:
        """`compute.name` is what Azure puts in `Resources` (not the hostname)."""
        if self.vm_name is not None:
            log.info("this VM is %s (SIDECAR_VM_NAME)", self.vm_name)
            return self.vm_name
        backoff = Backoff(self.settings.poll_interval, self.settings.backoff_max)
        while True:
            try:
                self.compute = await self.imds.compute(self.settings.imds_timeout)
            except ImdsError as error:
                self._record_failure(f"instance metadata: {error}")
                await asyncio.sleep(backoff.next_delay(error.retry_after))
                continue
            self.vm_name = self.compute.name
            log.info("this VM is %s (instance metadata compute.name)", self.vm_name)
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
        self.state = decision.state
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
        self.document = {**self.document, "drain": drain_section(self.state)}
        try:
            written = await asyncio.to_thread(self.store.save, self.document)
        except OSError as error:
            self.metrics.state_writes.labels("error").inc()
            log.error("cannot write state file %s: %s", self.store.path, error)
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
        """Mirrors the state into metrics and logs each flip of the probe once."""
        serving = self.state.serving
        self.metrics.serving.set(1 if serving else 0)
        for phase in Phase:
            count = sum(1 for t in self.state.events.values() if t.phase is phase)
            self.metrics.events.labels(phase.value).set(count)
        if serving != self._serving_logged:
            if serving:
                log.info("probe: 200 serving")
            else:
                why = "draining" if self.state.ready else "not ready: no poll has succeeded yet"
                log.info("probe: 503 %s", why)
            self._serving_logged = serving

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "state": "serving" if state.serving else ("draining" if state.ready else "starting"),
            "vm_name": self.vm_name,
            "incarnation": state.incarnation,
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
