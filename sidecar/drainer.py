"""The drain loop: learn who we are, poll Scheduled Events, let the machine decide, act, persist.

Invariants: every wait is bounded by a timeout; a failed poll never changes what the probe says
(it keeps its last known state) and never stops the loop; the gates hear of every decision
before approvals are weighed; an approval is sent only once the state file records it as being
sent (a crash then resumes with "outcome unknown", never with a blind second POST), and IMDS's
answer is recorded as soon as it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sidecar import machine, notices
from sidecar.backoff import Backoff
from sidecar.connections import count_established
from sidecar.events import EventsDocument, format_time
from sidecar.gates import Approval, Gate, Wanted
from sidecar.imds import Compute, ImdsError
from sidecar.machine import Decision, DrainState, Now, Phase, Policy
from sidecar.metrics import Metrics
from sidecar.notices import Notice
from sidecar.records import SECTION, drain_section, restore_drain
from sidecar.settings import LEGACY_2016, Settings
from sidecar.store import StateDocument

log = logging.getLogger(__name__)


def read_clocks() -> Now:
    return Now(time.monotonic(), time.time())


class EventSource(Protocol):
    """Where the drain loop reads events and sends approvals (IMDS, or the 2016 preview)."""

    async def scheduled_events(self, timeout: float) -> EventsDocument: ...

    async def approve(self, event_id: str, timeout: float) -> None: ...

    async def compute(self, timeout: float) -> Compute: ...

    def describe(self) -> dict[str, Any] | None:
        """Whatever this source adds to /status (the 2016 preview's InstanceInfo)."""


@dataclass
class PollHealth:
    """How IMDS has been answering, for /status and the logs (wall times, for people)."""

    last_attempt: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    successes: int = 0


class Drainer:
    def __init__(
        self,
        settings: Settings,
        imds: EventSource,
        document: StateDocument,
        metrics: Metrics,
        *,
        boot_id: str | None = None,
        clock: Callable[[], Now] = read_clocks,
    ) -> None:
        self.settings = settings
        self.imds = imds
        self.document = document
        self.metrics = metrics
        self.clock = clock
        self.state: DrainState = restore_drain(document.sections, clock(), boot_id)
        self.gates: list[Gate] = []
        self.polls = PollHealth()
        self.compute: Compute | None = None
        self.vm_name: str | None = settings.vm_name
        self.identified = asyncio.Event()
        """Set once `vm_name` (and `compute`, when it is needed) are known."""
        self._policy: Policy | None = None
        self.on_notice: Callable[[Notice], None] | None = None
        """Where notices go (webhooks, syslog); None when nobody is to be told."""
        self._ended: tuple[str, str, dict[str, Any] | None] | None = None
        """A drain that ended and the VM not serving yet: its key, how it ended, its event."""
        self._last_drain: str | None = None
        self._failures: dict[str, str | None] = {}
        self.extra_status: dict[str, Callable[..., dict[str, Any]]] = {}
        """More parts of /status (the notifier's), each called with `detailed=`."""
        self._wake = asyncio.Event()
        self._verdict_logged: str | None = None
        self._skipped_logged: tuple[str, ...] = ()
        self._fields_logged: frozenset[str] = frozenset()
        self._publish()

    def add_gate(self, gate: Gate) -> None:
        """Gates are consulted in the order added: the first probe hold names the verdict."""
        self.gates.append(gate)

    def verdict(self) -> str:
        """What the load-balancer probe says, and why: one word or two, in the probe's body."""
        if not self.state.ready:
            return "starting"  # no poll has succeeded yet
        if self.state.draining:
            return "draining" if self.state.manual is None else "drained by hand"
        for gate in self.gates:
            hold = gate.probe_hold()
            if hold is not None:
                return hold
        return "serving"

    @property
    def serving(self) -> bool:
        return self.verdict() == "serving"

    def probe_answer(self) -> tuple[bool, str]:
        """What the probe answers. A dry run serves unless the app is unhealthy, and says what
        it would have answered."""
        verdict = self.verdict()
        if not self.settings.dry_run or verdict == "serving":
            return verdict == "serving", verdict
        if verdict == "app unhealthy":
            return False, verdict
        return True, f"serving (dry run: would answer 503 {verdict})"

    def wake(self) -> None:
        """Re-decide now: a gate changed something."""
        self._wake.set()

    async def run(self) -> None:
        """Runs until cancelled."""
        policy = self._policy or Policy.from_settings(self.settings, await self._resolve_identity())
        self._policy = policy
        # the gates speak before the first decision: an event a gate held before a restart (or
        # first seen now) must not start draining because nobody had asked the gates yet
        self.state = self._follow_gates(self.state)
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

    async def change_by_hand(self, drain: bool, reason: str) -> None:
        """`POST /drain` and `/undrain`: the same steps as an event, recorded before answering."""
        now = self.clock()
        state = (
            machine.drain_by_hand(self.state, reason, now)
            if drain
            else machine.undrain_by_hand(self.state)
        )
        verb = "out of rotation by hand" if drain else "back by hand"
        log.info("%s: %s", verb, reason)
        await self._apply(Decision(state), self._policy)
        self.wake()

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
            pause = min(pause, wakeup - self.clock().mono)
        return max(0.0, pause)

    async def _resolve_identity(self) -> str:
        """`compute.name` is what Azure puts in `Resources` (not the hostname)."""
        legacy = self.settings.api_version == LEGACY_2016  # InstanceInfo shows in /status
        if self.vm_name is not None and not self.settings.arm_enabled and not legacy:
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
        self.polls.last_attempt = time.time()
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
            last_success=time.time(),
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

    def _follow_gates(self, state: DrainState) -> DrainState:
        """Tells the gates what this state wants, then reads back what approval waits for."""
        probe_held = any(gate.probe_hold() is not None for gate in self.gates)
        wanted = Wanted.of(state, serving=state.serving and not probe_held)
        waits: set[str] = set()
        blocks: set[str] = set()
        holds: set[str] = set()
        for gate in self.gates:
            gate.follow(wanted)
            answer = gate.approval()
            if answer is Approval.WAIT:
                waits.add(gate.name)
            elif answer is Approval.BLOCK:
                blocks.add(gate.name)
            if gate.keeps_serving() is not None:
                holds.add(gate.name)
        return replace(
            state,
            waits_for=frozenset(waits),
            blocked_by=frozenset(blocks),
            held_by=frozenset(holds),
        )

    async def _apply(self, decision: Decision, policy: Policy | None) -> None:
        before = self.state
        self.state = self._follow_gates(decision.state)
        for change in decision.changes:
            self._log_change(change)
        self._publish()
        if self.on_notice is not None:
            self._tell(before, decision.changes)
        recorded = await self._persist()
        for action in decision.actions:
            if policy is None:
                continue
            if not recorded:  # an approval we could not record might be sent twice later
                error = "not sent: the state file cannot record it (see the log)"
                failed = machine.approval_failed(
                    self.state, action.event_id, error, self.clock(), policy, unknown=False
                )
                await self._apply(failed, policy)
                continue
            await self._approve(action.event_id, policy)

    async def _approve(self, event_id: str, policy: Policy) -> None:
        if self.settings.dry_run:
            self.metrics.approvals.labels("dry-run").inc()
            log.info("dry run: would approve %s now", event_id)
            await self._apply(
                machine.approval_succeeded(self.state, event_id, self.clock()), policy
            )
            return
        try:
            await self.imds.approve(event_id, self.settings.imds_timeout)
        except ImdsError as error:
            outcome = "unknown" if error.unanswered else "error"
            self.metrics.approvals.labels(outcome).inc()
            then = "re-reading the document before any retry" if error.unanswered else "retrying"
            log.warning("approval of %s failed: %s (%s)", event_id, error, then)
            decision = machine.approval_failed(
                self.state, event_id, str(error), self.clock(), policy, unknown=error.unanswered
            )
        else:
            self.metrics.approvals.labels("ok").inc()
            decision = machine.approval_succeeded(self.state, event_id, self.clock())
        await self._apply(decision, policy)

    async def _persist(self) -> bool:
        """Whether the file holds the current state (written now, or unchanged)."""
        try:
            written = await self.document.write(SECTION, drain_section(self.state, self.clock()))
        except OSError as error:
            self.metrics.state_writes.labels("error").inc()
            log.error("cannot write state file %s: %s", self.document.store.path, error)
            return False
        if written:
            self.metrics.state_writes.labels("ok").inc()
        return True

    async def close(self) -> None:
        """Writes the final state; called on shutdown, after the loop stopped."""
        await self._persist()

    def _tell(self, before: DrainState, changes: tuple[machine.Change, ...]) -> None:
        """Notices for what this decision changed (the notifier drops repeats by key)."""
        after, now, vm = self.state, time.time(), self.vm_name
        told = notices.from_changes(before, after, changes, vm=vm, now=now)
        key = notices.drain_key(after) or notices.drain_key(before)
        self._last_drain = key or self._last_drain
        if before.draining and not after.draining and key is not None:
            main = before.events.get(key)
            facts = notices.event_facts(main) if main is not None else None
            self._ended = (key, notices.how_it_ended(before, after), facts)
        if self._ended is not None and self.serving:
            key, how, facts = self._ended
            told.append(notices.back_in_rotation(key, how, facts, vm=vm, now=now))
            self._ended = None
        for gate in self.gates:
            failure = gate.failure()
            if failure is not None and failure != self._failures.get(gate.name):
                told.append(notices.failure(self._last_drain, gate.name, failure, vm=vm, now=now))
            self._failures[gate.name] = failure
        for notice in told:
            if self.on_notice is not None:
                self.on_notice(replace(notice, dry_run=self.settings.dry_run))

    def _log_change(self, change: machine.Change) -> None:
        tracked = self.state.events.get(change.event_id)
        if change.after is None:
            log.info("event %s (%s) %s", change.event_id, change.event_type, change.reason)
        elif change.after is Phase.IGNORED:
            log.info("event %s (%s) ignored: %s", change.event_id, change.event_type, change.reason)
        else:
            extra = ""
            if tracked is not None and change.after is Phase.DRAINING:
                extra = f" at {format_time(self._wall(tracked.approve_at))}"
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
        self.metrics.serving.set(1 if self.probe_answer()[0] else 0)
        for phase in Phase:
            count = sum(1 for t in self.state.events.values() if t.phase is phase)
            self.metrics.events.labels(phase.value).set(count)
        if verdict != self._verdict_logged:
            answered, text = self.probe_answer()
            log.info("probe: %d %s", 200 if answered else 503, text)
            self._verdict_logged = verdict

    def _wall(self, moment: float | None) -> float | None:
        return None if moment is None else self.clock().wall_of(moment)

    def status(self, *, detailed: bool) -> dict[str, Any]:
        """/status: identifiers and error texts only when `detailed` (loopback or admin)."""
        state = self.state
        body: dict[str, Any] = {
            "state": self.verdict(),
            "probe": self.probe_answer()[1],
            "dry_run": self.settings.dry_run,
            "incarnation": state.incarnation,
            "app_connections": state.connections,
            "events": [self._event_status(t, detailed) for t in state.events.values()],
            "approval_waits_for": sorted(state.waits_for),
            "approval_blocked_by": sorted(state.blocked_by),
            "manual": None
            if state.manual is None
            else {
                "since": format_time(state.manual.since_wall),
                **({"reason": state.manual.reason} if detailed else {}),
            },
            "imds": {
                "last_success": format_time(self.polls.last_success),
                "consecutive_failures": self.polls.consecutive_failures,
                "successful_polls": self.polls.successes,
            },
            "state_file": self.document.store.report.status() if detailed else None,
            "source": self.imds.describe() if detailed else None,
        }
        for gate in self.gates:
            body[gate.name] = gate.status(detailed=detailed)
        for name, part in self.extra_status.items():
            body[name] = part(detailed=detailed)
        if detailed:
            body["vm_name"] = self.vm_name
            body["approved"] = {
                event_id: format_time(moment) for event_id, moment in state.approved.items()
            }
            body["imds"]["last_attempt"] = format_time(self.polls.last_attempt)
            body["imds"]["last_error"] = self.polls.last_error
        return body

    def _event_status(self, tracked: machine.Tracked, detailed: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": tracked.event_type,
            "status": tracked.status,
            "phase": tracked.phase.value,
            "reason": tracked.reason,
            "not_before": format_time(tracked.not_before_wall),
            "drain_started": format_time(tracked.drain_started_wall),
            "approve_at": format_time(self._wall(tracked.approve_at)),
            "approved_at": format_time(tracked.approved_wall),
            "approval_attempts": tracked.attempts,
            "approval_outcome_unknown": tracked.outcome_unknown,
        }
        if detailed:
            entry = {"id": tracked.event_id, **entry}
            entry["resources"] = list(tracked.resources)
            entry["last_error"] = tracked.last_error
        return entry
