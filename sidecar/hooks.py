"""Drain hooks: the app ends its keep-alive connections once no new flow can reach it.

A layer-4 balancer keeps established flows where they are; only the app can end them cleanly
(finish the request in flight, answer `Connection: close`, close idle connections), and only
after the balancer has stopped sending new flows here, or clients reconnect to this very VM.
So the drain hook (an HTTP POST and/or a command) runs once per drain, when the minimum drain
has passed since the probe turned 503 and the NIC is out of its pools (pool removal on), and
the undrain hook runs once the VM serves again.

Invariants:
- approval waits for the drain hook's outcome: until it succeeded, the gate BLOCKs (a hook that
  failed or timed out means no early approval: the platform starts the event at NotBefore);
- a hook is bounded by SIDECAR_HOOK_TIMEOUT and by the drain's deadline, runs in its own task,
  never holds the probe, and never runs twice for one drain unless the sidecar restarted while
  it ran (so hooks should be idempotent, as a graceful reload is);
- the outcome is in the state file: a restart neither forgets a failure nor repeats a success.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sidecar.events import format_time
from sidecar.gates import Approval, Wanted
from sidecar.metrics import Metrics
from sidecar.settings import Settings
from sidecar.store import StateDocument

log = logging.getLogger(__name__)

SECTION = "hooks"
MIN_HOOK_SECONDS = 1.0
"""Even a drain that reaches its deadline gives the app this long to close its connections."""
OUTPUT_KEPT = 2000


@dataclass
class Run:
    """One drain, as far as hooks are concerned."""

    events: frozenset[str]
    manual: bool
    outcome: str = "pending"
    """pending, running, ok, failed (what approval waits for)."""
    called_at: float | None = None
    detail: str | None = None
    undrain: str | None = None
    """None until the VM serves again; then pending, ok or failed."""

    def to_json(self) -> dict[str, Any]:
        return {
            "events": sorted(self.events),
            "manual": self.manual,
            "outcome": self.outcome,
            "called_at": self.called_at,
            "detail": self.detail,
            "undrain": self.undrain,
        }


@dataclass
class HookCall:
    """What a hook is told: the drain's main event (or the drain by hand), for HTTP and env."""

    phase: str
    vm: str | None
    event: dict[str, Any] | None
    events: list[dict[str, Any]] = field(default_factory=list)
    manual_reason: str | None = None

    def body(self) -> dict[str, Any]:
        main = self.event or {}
        return {
            "phase": self.phase,
            "vm": self.vm,
            "id": main.get("id"),
            "type": main.get("type"),
            "not_before": main.get("not_before"),
            "resources": main.get("resources", []),
            "status": main.get("status"),
            "events": self.events,
            "manual": None if self.manual_reason is None else {"reason": self.manual_reason},
        }

    def environment(self) -> dict[str, str]:
        body = self.body()
        return {
            "SIDECAR_EVENT_PHASE": self.phase,
            "SIDECAR_EVENT_ID": str(body["id"] or ""),
            "SIDECAR_EVENT_TYPE": str(body["type"] or ""),
            "SIDECAR_EVENT_NOT_BEFORE": str(body["not_before"] or ""),
            "SIDECAR_EVENT_RESOURCES": ",".join(body["resources"]),
            "SIDECAR_EVENT_STATUS": str(body["status"] or ""),
            "SIDECAR_EVENT_VM": str(self.vm or ""),
            "SIDECAR_EVENT_MANUAL_REASON": self.manual_reason or "",
        }


class DrainHooks:
    name = "hooks"

    def __init__(
        self,
        settings: Settings,
        document: StateDocument,
        metrics: Metrics,
        *,
        vm_name: Callable[[], str | None],
        pools_out: Callable[[], bool],
        on_change: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.document = document
        self.metrics = metrics
        self.vm_name = vm_name
        self.pools_out = pools_out
        self.on_change = on_change
        self.run_state: Run | None = _restore(document.sections)
        self.wanted: Wanted | None = None
        self._changed = asyncio.Event()
        self._dirty = False

    @property
    def has_drain_hook(self) -> bool:
        return bool(self.settings.drain_hook_url or self.settings.drain_command)

    @property
    def has_undrain_hook(self) -> bool:
        return bool(self.settings.undrain_hook_url or self.settings.undrain_command)

    # --- the gate

    def follow(self, wanted: Wanted) -> None:
        self.wanted = wanted
        if not wanted.ready:
            return
        events = frozenset(t.event_id for t in wanted.events)
        manual = wanted.manual is not None
        run = self.run_state
        if wanted.draining:
            same = (
                run is not None
                and run.undrain is None
                and bool(run.events & events or (run.manual and manual))
            )
            if run is not None and same:
                run.events |= events
            else:  # a new drain (a record left from an old one does not count for it)
                self.run_state = Run(events, manual)
                self._dirty = True
        elif run is not None and run.undrain is None:
            # the drain is over: the undrain hook waits for the VM to serve again
            called = run.called_at is not None or not self.has_drain_hook
            if called and self.has_undrain_hook:
                run.undrain = "pending"
            else:
                self.run_state = None
            self._dirty = True
        self._changed.set()

    def approval(self) -> Approval:
        run = self.run_state
        if not self.has_drain_hook or run is None or run.undrain is not None:
            return Approval.OPEN
        return Approval.OPEN if run.outcome == "ok" else Approval.BLOCK

    def probe_hold(self) -> str | None:
        return None

    def failure(self) -> str | None:
        run = self.run_state
        if run is None or run.outcome != "failed":
            return None
        return f"the drain hook failed ({run.detail}): no early approval"

    def keeps_serving(self) -> str | None:
        return None

    def status(self, *, detailed: bool) -> dict[str, Any]:
        run = self.run_state
        body: dict[str, Any] = {
            "drain": None if run is None else run.outcome,
            "called_at": format_time(run.called_at) if run is not None else None,
            "undrain": None if run is None else run.undrain,
        }
        if detailed and run is not None:
            body["detail"] = run.detail
        return body

    # --- the work

    async def run(self) -> None:
        """Calls each hook when it is due; until cancelled."""
        while True:
            self._changed.clear()
            pause = await self._step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), pause)

    async def _step(self) -> float | None:
        if self._dirty:
            self._dirty = False
            await self._save()
        run, wanted = self.run_state, self.wanted
        if run is None or wanted is None:
            return None
        if run.undrain == "pending":
            if wanted.serving:
                await self._undrain(run, wanted)
            return None
        if not self.has_drain_hook or run.undrain is not None or run.outcome != "pending":
            return None
        wait = self._due_in(wanted)
        if wait is None:
            return None  # the NIC is still leaving its pools: the next decision wakes us
        if wait > 0:
            return wait
        await self._drain(run, wanted)
        return None

    def _due_in(self, wanted: Wanted) -> float | None:
        """Seconds until the drain hook is due: the balancer has stopped sending new flows (the
        minimum drain is over and the NIC is out of its pools), or the deadline is near."""
        now = time.monotonic()
        since = wanted.since if wanted.since is not None else now
        due = since + self.settings.min_drain_seconds
        if all(t.status == "Started" for t in wanted.events) and wanted.events:
            due = since  # the impact is under way: nothing to wait for
        latest = None
        if wanted.deadline is not None:
            latest = wanted.deadline - min(self.settings.hook_timeout, MIN_HOOK_SECONDS * 5)
            due = min(due, latest)
        if not self.pools_out() and (latest is None or now < latest):
            return None if now >= due else due - now
        return max(0.0, due - now)

    async def _drain(self, run: Run, wanted: Wanted) -> None:
        timeout = self.settings.hook_timeout
        if wanted.deadline is not None:
            timeout = min(timeout, max(MIN_HOOK_SECONDS, wanted.deadline - time.monotonic()))
        run.outcome = "running"
        run.called_at = time.time()
        await self._save()  # a restart mid-hook calls it again (it may not have run)
        call = self._call("drain", wanted)
        error = await self._invoke(
            "drain", self.settings.drain_hook_url, self.settings.drain_command, call, timeout
        )
        run.outcome = "ok" if error is None else "failed"
        run.detail = error
        if error is not None:
            log.error("drain hook failed: %s; no early approval for this drain", error)
        else:
            log.info("drain hook done: the app has closed its connections")
        await self._save()
        self.on_change()

    async def _undrain(self, run: Run, wanted: Wanted) -> None:
        call = self._call("undrain", wanted)
        error = await self._invoke(
            "undrain",
            self.settings.undrain_hook_url,
            self.settings.undrain_command,
            call,
            self.settings.hook_timeout,
        )
        if error is not None:
            log.error("undrain hook failed: %s", error)
        else:
            log.info("undrain hook done")
        self.run_state = None
        await self._save()

    def _call(self, phase: str, wanted: Wanted) -> HookCall:
        events = [
            {
                "id": t.event_id,
                "type": t.event_type,
                "not_before": format_time(t.not_before_wall),
                "resources": list(t.resources),
                "status": t.status,
            }
            for t in wanted.events
        ]
        return HookCall(
            phase=phase,
            vm=self.vm_name(),
            event=events[0] if events else None,
            events=events,
            manual_reason=wanted.manual.reason if wanted.manual is not None else None,
        )

    async def _invoke(
        self, phase: str, url: str | None, command: str | None, call: HookCall, timeout: float
    ) -> str | None:
        """Runs the URL and the command of a phase; the first problem, or None."""
        if self.settings.dry_run:
            log.info("dry run: would call the %s hook now (%s)", phase, call.body()["id"])
            self.metrics.hooks.labels(phase, "dry-run").inc()
            return None
        problems = []
        if url:
            problems.append(await _post(url, call.body(), timeout))
        if command:
            problems.append(await _run(command, call.environment(), timeout))
        error = next((p for p in problems if p is not None), None)
        self.metrics.hooks.labels(phase, "ok" if error is None else "failed").inc()
        return error

    async def _save(self) -> None:
        run = self.run_state
        try:
            await self.document.write(SECTION, {"run": run.to_json() if run else None})
        except OSError as error:
            log.error("cannot record the hook's outcome in the state file: %s", error)


async def _post(url: str, body: dict[str, Any], timeout: float) -> str | None:
    """A local app's endpoint: never through a proxy; any 2xx is success."""
    try:
        async with (
            aiohttp.ClientSession(trust_env=False) as session,
            session.post(
                url, json=body, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
            ) as response,
        ):
            if 200 <= response.status < 300:
                return None
            text = (await response.text(errors="replace"))[:200]
            return f"{url}: HTTP {response.status} {text}".strip()
    except TimeoutError:
        return f"{url}: no answer within {timeout:g}s"
    except aiohttp.ClientError as error:
        return f"{url}: {error or type(error).__name__}"


async def _run(command: str, extra_env: dict[str, str], timeout: float) -> str | None:
    """No shell; its own process group, killed whole on timeout; exit code 0 is success."""
    argv = shlex.split(command)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **extra_env},
            start_new_session=True,
        )
    except OSError as error:
        return f"{argv[0]}: cannot start: {error.strerror or error}"
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        await process.wait()
        return f"{argv[0]}: still running after {timeout:g}s; killed"
    text = output.decode(errors="replace")[-OUTPUT_KEPT:].strip()
    if text:
        log.info("%s said: %s", argv[0], text)
    if process.returncode != 0:
        return f"{argv[0]} exited with {process.returncode}"
    return None


def _restore(sections: dict[str, Any]) -> Run | None:
    section = sections.get(SECTION)
    saved = section.get("run") if isinstance(section, dict) else None
    if not isinstance(saved, dict):
        return None
    events = saved.get("events")
    outcome = saved.get("outcome")
    run = Run(
        events=frozenset(str(e) for e in events) if isinstance(events, list) else frozenset(),
        manual=saved.get("manual") is True,
        outcome="pending" if outcome in ("running", None) else str(outcome),
        called_at=saved.get("called_at")
        if isinstance(saved.get("called_at"), int | float)
        else None,
        detail=str(saved["detail"]) if saved.get("detail") else None,
        undrain=str(saved["undrain"]) if saved.get("undrain") else None,
    )
    return run
