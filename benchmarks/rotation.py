"""Time out of rotation per maintenance: how long the load balancer keeps a VM out, by type.

For each of Reboot, Redeploy and an opted-in Freeze, three VMs go through the same maintenance
at once, each with its own stand-in app behind one HAProxy probing like the Azure Load Balancer
(every 5 s, 2 failures out, 2 successes back, 5 s check timeout):
- `impact`: a sidecar with SIDECAR_RETURN_AFTER=impact (serving again once the VM has booted,
  or a Freeze's duration has passed, while the event is still listed);
- `completed`: a sidecar with the default SIDECAR_RETURN_AFTER=completed (serving again once
  the event has left the document);
- `none`: no sidecar; HAProxy probes the app, and the platform starts the event at NotBefore.

Every event follows Microsoft's timeline for a typical maintenance: it stays listed as Started
for `started_for` seconds (600: "Started to completed about 10 minutes"); the impact begins as
it starts and lasts the simulator's default for its type (Reboot 7 s, Redeploy 60 s, Freeze its
DurationInSeconds, 5 s here). The VM lives through the impact as in the rehearsal: silent
(SIGSTOP to the app and the sidecar) for the impact, then, for a Reboot or Redeploy, killed and
started again with a new boot id; a Freeze is resumed (SIGCONT, same boot id).

Sidecars run with their defaults otherwise (drain 30 s, minimum drain 15 s, poll 1 s), so the
figures are what a deployment sees. Measured from HAProxy's side: when the VM left rotation and
when it came back; with the parts: the drain (event to approval), the impact, and the rise (the
probe serving again to HAProxy's `rise` checks passing).

`python -m benchmarks.rotation [--quick] [--started-for S]` prints a table and writes
benchmarks/results/rotation.json (~11 minutes: the `completed` VMs wait for the event to leave).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.lab import (
    PATIENCE,
    Backend,
    CheckPolicy,
    HAProxy,
    Sidecar,
    Simulator,
    StatusWatcher,
    WebApp,
    fetch,
    in_rotation,
    machine,
    table,
    wait_for,
    wall_time,
    write_results,
)

TYPES = ("Reboot", "Redeploy", "Freeze")
MODES = ("impact", "completed", "none")
REBOOTS = ("Reboot", "Redeploy")
AZURE_PROBE = CheckPolicy(inter_ms=5000, fall=2, rise=2, timeout_ms=5000)


@dataclass(frozen=True)
class Plan:
    started_for: float = 600.0
    """Seconds a started event stays listed (Microsoft: about 10 minutes)."""
    freeze_seconds: int = 5
    """The Freeze's DurationInSeconds (Microsoft's example)."""
    baseline_not_before_in: float = 40.0
    """Without a sidecar nobody approves: the platform starts the event at NotBefore. Sooner
    than Azure's 15 minutes of notice, which would change nothing but the wait."""
    impact_seconds: dict[str, float] = field(default_factory=dict)
    """Impact per type where not the simulator's default (Reboot 7, Redeploy 60, Freeze its
    duration)."""
    checks: CheckPolicy = field(default_factory=lambda: AZURE_PROBE)
    settings: dict[str, str] = field(default_factory=dict)
    """SIDECAR_* settings beyond the defaults (the quick run shortens the drain)."""


QUICK = Plan(
    started_for=40.0,
    baseline_not_before_in=12.0,
    impact_seconds={"Redeploy": 10.0},  # the impact must end before the event leaves
    checks=CheckPolicy(inter_ms=1000, fall=2, rise=2, timeout_ms=1000),
    settings={"SIDECAR_DRAIN_SECONDS": "6", "SIDECAR_MIN_DRAIN_SECONDS": "3"},
)


@dataclass
class Cell:
    """One VM: its maintenance type, its mode, what it runs and what was seen."""

    event_type: str
    mode: str
    vm: str
    app: WebApp | None = None
    sidecar: Sidecar | None = None
    watcher: StatusWatcher | None = None
    event: dict[str, Any] = field(default_factory=dict)
    moments: dict[str, float] = field(default_factory=dict)
    """CLOCK_MONOTONIC: event, freeze, boot, serving, back."""
    error: str | None = None

    @property
    def probe_url(self) -> str:
        if self.sidecar is not None:
            return f"{self.sidecar.url}/health"
        assert self.app is not None
        return f"http://127.0.0.1:{self.app.port}/health"


def _impact(simulator: Simulator, event_id: str) -> dict[str, Any] | None:
    for view in simulator.control("GET", "/events")["events"]:
        if view["EventId"] == event_id:
            found: dict[str, Any] = view
            return found
    return None


def _serving(url: str) -> bool:
    with contextlib.suppress(OSError):
        return fetch(url, timeout=1.0).status == 200
    return False


def drive(simulator: Simulator, cell: Cell, plan: Plan) -> None:
    """One VM through its maintenance; every wait event-driven and bounded."""
    assert cell.app is not None and cell.watcher is not None
    fields: dict[str, Any] = {
        "type": cell.event_type,
        "resources": [cell.vm],
        "started_for": plan.started_for,
    }
    if cell.event_type == "Freeze":
        fields["duration"] = plan.freeze_seconds
    if cell.event_type in plan.impact_seconds:
        fields["impact_seconds"] = plan.impact_seconds[cell.event_type]
    if cell.mode == "none":
        fields["not_before_in"] = plan.baseline_not_before_in
    cell.moments["event"] = time.monotonic()
    cell.event = simulator.add_event(**fields)
    event_id = cell.event["EventId"]
    notice = plan.baseline_not_before_in if cell.mode == "none" else 900.0

    def impact_state() -> str:
        view = _impact(simulator, event_id)
        return "gone" if view is None else str(view["impact"])

    wait_for(
        lambda: impact_state() in ("in-progress", "over", "gone"),
        f"{cell.vm}: the impact to begin",
        timeout=notice + PATIENCE,
        every=0.005,
    )
    cell.moments["freeze"] = time.monotonic()
    cell.app.child.freeze()
    if cell.sidecar is not None:
        cell.sidecar.child.freeze()
    wait_for(
        lambda: impact_state() in ("over", "gone"),
        f"{cell.vm}: the impact to end",
        timeout=plan.started_for + PATIENCE,
    )
    cell.moments["boot"] = time.monotonic()
    view = _impact(simulator, event_id)
    if view is not None:  # the impact's start and end, while the event is still listed
        cell.event = view
    if cell.event_type in REBOOTS:
        cell.app.kill()
        if cell.sidecar is not None:
            cell.sidecar.kill()
            cell.sidecar.new_boot_id()
        cell.app.start()
        cell.app.wait_listening()
        if cell.sidecar is not None:
            cell.sidecar.restart()
    else:  # a Freeze: the same processes carry on, the same boot
        cell.app.child.thaw()
        if cell.sidecar is not None:
            cell.sidecar.child.thaw()
    wait_for(
        lambda: _serving(cell.probe_url),
        f"{cell.vm}: the probe to serve again",
        timeout=plan.started_for + PATIENCE,
        every=0.05,
    )
    cell.moments["serving"] = time.monotonic()
    watcher = cell.watcher
    serving = cell.moments["serving"]

    def back() -> float | None:
        """In rotation again after the boot; a VM the balancer never took out is back (still
        in) as soon as it serves."""
        if watcher.out_since(cell.moments["event"]) is None and in_rotation(
            watcher.current() or ""
        ):
            return serving
        return watcher.back_since(cell.moments["boot"])

    cell.moments["back"] = watcher.wait(
        back,
        f"{cell.vm} back in HAProxy's rotation",
        timeout=PATIENCE + plan.checks.inter_ms / 1000 * (plan.checks.rise + 2),
    )
    cell.event["EventStatus"] = (_impact(simulator, event_id) or {}).get("EventStatus")


def summarize(cell: Cell, simulator: Simulator, plan: Plan) -> dict[str, Any]:
    assert cell.watcher is not None
    m = cell.moments
    out = cell.watcher.out_since(m["event"])
    left = out is not None and out < m["back"]
    event = cell.event
    approvals = simulator.approvals_of(event["EventId"])
    approval_s = (
        round(wall_time(approvals[0]["at"]) - wall_time(event["created_at"]), 3)
        if approvals
        else None
    )
    impact_s = None
    if event.get("impact_started_at") and event.get("impact_ended_at"):
        impact_s = round(
            wall_time(event["impact_ended_at"]) - wall_time(event["impact_started_at"]), 3
        )
    rise_s = round(m["back"] - m["serving"], 3) if left else None
    drain_setting = float(plan.settings.get("SIDECAR_DRAIN_SECONDS", "30"))
    rise_budget = plan.checks.inter_ms / 1000 * plan.checks.rise
    goal = None
    if cell.mode == "impact" and impact_s is not None:
        goal = round(drain_setting + impact_s + rise_budget, 3)
    out_s = round(m["back"] - out, 3) if left and out is not None else 0.0
    return {
        "type": cell.event_type,
        "mode": cell.mode,
        "vm": cell.vm,
        "out_of_rotation_s": out_s,
        "left_rotation": left,
        "event_to_out_s": round(out - m["event"], 3) if left and out is not None else None,
        "event_to_approval_s": approval_s,
        "event_to_impact_s": round(m["freeze"] - m["event"], 3),
        "impact_s": impact_s,
        "boot_to_serving_s": round(m["serving"] - m["boot"], 3),
        "rise_s": rise_s,
        "goal_s": goal,
        "goal_met": None if goal is None else out_s <= goal,
        "approvals": len(approvals),
        "still_listed_when_back": event.get("EventStatus") == "Started",
        "haproxy_status_changes": [[round(t - m["event"], 3), s] for t, s in cell.watcher.changes],
        "error": cell.error,
    }


def run(workdir: Path, plan: Plan, types: tuple[str, ...], modes: tuple[str, ...]) -> list[Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    cells = [Cell(t, m, f"{t.lower()}-{m}") for t in types for m in modes]
    with contextlib.ExitStack() as stack:
        simulator = Simulator(workdir, "--no-arm")
        stack.callback(simulator.close)
        for cell in cells:
            simulator.control("POST", "/vms", {"name": cell.vm})
            cell.app = WebApp(workdir, cell.vm)
            stack.callback(cell.app.close)
        for cell in cells:
            assert cell.app is not None
            cell.app.wait_listening()
            if cell.mode != "none":
                settings = {
                    "SIDECAR_IMDS_URL": simulator.view(cell.vm),
                    "SIDECAR_RETURN_AFTER": cell.mode,
                    "SIDECAR_EVENT_TYPES": "Reboot,Redeploy,Preempt,Terminate,Freeze",
                    **plan.settings,
                }
                cell.sidecar = Sidecar(workdir, cell.vm, settings)
                stack.callback(cell.sidecar.close)
        for cell in cells:
            if cell.sidecar is not None:
                cell.sidecar.wait_probe(200)
        backends = []
        for cell in cells:
            assert cell.app is not None
            check_port = cell.sidecar.port if cell.sidecar is not None else cell.app.port
            backends.append(Backend(cell.vm, cell.app.port, check_port, "/health"))
        haproxy = HAProxy(workdir, backends, plan.checks)
        stack.callback(haproxy.close)
        haproxy.wait_all_up(timeout=PATIENCE + plan.checks.inter_ms / 1000 * 4)
        for cell in cells:
            cell.watcher = StatusWatcher(haproxy, cell.vm, every=0.05)
            stack.callback(cell.watcher.close)

        def guarded(cell: Cell) -> None:
            try:
                drive(simulator, cell, plan)
            except Exception:  # reported in the results, the other VMs go on
                cell.error = traceback.format_exc(limit=3)

        threads = [
            threading.Thread(target=guarded, args=(cell,), name=cell.vm, daemon=True)
            for cell in cells
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results = []
        for cell in cells:
            if cell.error:
                results.append({"type": cell.event_type, "mode": cell.mode, "error": cell.error})
            else:
                results.append(summarize(cell, simulator, plan))
        return results


def render(results: list[dict[str, Any]]) -> str:
    """The headline: out of rotation per type, for each mode, and the parts of it."""
    by = {(r["type"], r["mode"]): r for r in results}
    rows = []
    for event_type in TYPES:
        present = [by[(event_type, m)] for m in MODES if (event_type, m) in by]
        if not present:
            continue
        cells: list[object] = [event_type]
        for mode in MODES:
            r = by.get((event_type, mode))
            if r is None or r.get("error"):
                cells.append("error" if r else "-")
                continue
            cells.append(r["out_of_rotation_s"] if r["left_rotation"] else "0 (never left)")
        impact = by.get((event_type, "impact"), {})
        cells += [
            impact.get("event_to_approval_s"),
            impact.get("impact_s"),
            impact.get("rise_s"),
            impact.get("goal_s"),
            {True: "met", False: "missed", None: "-"}[impact.get("goal_met")],
        ]
        rows.append(cells)
    return table(
        (
            "type",
            "out s: impact",
            "out s: completed",
            "out s: no sidecar",
            "drain (event->approval) s",
            "impact s",
            "rise s",
            "goal s",
            "impact mode",
        ),
        rows,
    )


def render_details(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        if r.get("error"):
            rows.append((r["type"], r["mode"], "error", *["-"] * 7))
            continue
        rows.append(
            (
                r["type"],
                r["mode"],
                r["out_of_rotation_s"],
                r["event_to_out_s"],
                r["event_to_approval_s"],
                r["event_to_impact_s"],
                r["impact_s"],
                r["boot_to_serving_s"],
                r["rise_s"],
                "yes" if r["still_listed_when_back"] else "no",
            )
        )
    return table(
        (
            "type",
            "mode",
            "out s",
            "event->out s",
            "event->approval s",
            "event->impact s",
            "impact s",
            "boot->probe 200 s",
            "rise s",
            "event still listed when back",
        ),
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument("--started-for", type=float, help="seconds a started event is listed")
    parser.add_argument("--type", action="append", choices=TYPES, help="default: all")
    parser.add_argument("--mode", action="append", choices=MODES, help="default: all")
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    if args.started_for:
        plan = replace(plan, started_for=args.started_for)
    types = tuple(args.type or TYPES)
    modes = tuple(args.mode or MODES)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="rotation-"))
        )
        print(f"running {len(types) * len(modes)} VMs at once ...", flush=True)
        started = time.monotonic()
        results = run(workdir, plan, types, modes)
        print(f"done in {time.monotonic() - started:.0f} s\n")
        print(render(results))
        print()
        print(render_details(results))
        for r in results:
            if r.get("error"):
                print(f"\n{r['type']} {r['mode']}:\n{r['error']}")
        data = {
            "benchmark": "rotation",
            "quick": args.quick,
            "machine": machine(),
            "plan": asdict(plan),
            "results": results,
        }
        path = write_results("rotation.quick" if args.quick else "rotation", data)
        print(
            f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
        )


if __name__ == "__main__":
    main()
