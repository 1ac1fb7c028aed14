"""The maintenance rehearsal: users' traffic through a real load balancer while web-1 reboots.

Two backends, `web-1` and `web-2`, each a stand-in web app (benchmarks/webapp.py) with its own
`sidecar run` and its own view of one `sidecar simulate`. HAProxy stands in for the Azure Load
Balancer: layer 4 (`mode tcp`: each connection is a flow balanced once, a failed connection is
not retried for the client, flows established before a backend goes down continue), probing each
sidecar's `/health` every second (fall 2, rise 2). A closed-loop client (benchmarks/loadgen.py)
sends steady traffic through it.

A maintenance event for web-1 is scheduled; when the sidecar approves it, web-1 "reboots": its
app and sidecar are killed (SIGKILL), the event is cleared, and after `reboot_seconds` both start
again, the sidecar with its state file. Then the same maintenance runs **without the sidecar**:
HAProxy probes the app port itself, and web-1 is killed at the same offset after the event.

With pool removal (`reboot-arm`), the sidecar also takes web-1's NIC out of the simulated ARM's
`pool-http`. HAProxy knows no Azure pools, so `PoolMirror` models the pool: it watches the
simulator's `/control/nics` and puts HAProxy's web-1 into maintenance while the NIC is out of
`pool-http` (a server is in rotation only while it is in its pool *and* its probe passes).

`python -m benchmarks.rehearsal [--quick] [--scenario NAME]...` prints the two runs side by side
and writes benchmarks/results/rehearsal.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.lab import (
    PATIENCE,
    Backend,
    CheckPolicy,
    Child,
    HAProxy,
    Sidecar,
    Simulator,
    StatusWatcher,
    WebApp,
    distribution,
    machine,
    python_module,
    table,
    wait_for,
    wall_time,
    write_results,
)

VMS = ("web-1", "web-2")
TARGET = "web-1"


@dataclass(frozen=True)
class Plan:
    """Timings and load shared by every scenario; the CI test uses a shorter one."""

    rate: float = 250.0
    """Requests/s the client sends through HAProxy."""
    concurrency: int = 8
    warmup: float = 3.0
    """Traffic before the event, seconds."""
    reboot_seconds: float = 5.0
    """How long web-1 stays dead."""
    tail: float = 3.0
    """Traffic after web-1 is back in rotation, seconds."""
    poll_interval: float = 1.0
    drain_seconds: float = 6.0
    """Must cover the balancer's reaction: one poll + `fall` probe intervals, with room to spare."""
    min_drain_seconds: float = 3.0
    checks: CheckPolicy = field(default_factory=CheckPolicy)
    pool_sync_every: float = 0.1
    """How often the pool model reads the simulated ARM (Azure applies pool changes in seconds)."""


QUICK = Plan(rate=200.0, warmup=1.5, reboot_seconds=3.0, tail=1.5)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    event_type: str = "Reboot"
    not_before_in: float = 900.0
    arm: bool = False
    keepalive: bool = False
    settings: Mapping[str, str] = field(default_factory=dict)
    """More SIDECAR_* settings, for both sidecars."""


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("reboot", "Reboot, NotBefore in 15 min: approved after the drain period"),
        Scenario(
            "preempt",
            "Preempt with 10 s notice (30 s in Azure): approved 2 s before NotBefore",
            event_type="Preempt",
            not_before_in=10.0,
            settings={"SIDECAR_DRAIN_SECONDS": "30", "SIDECAR_DEADLINE_MARGIN_SECONDS": "2"},
        ),
        Scenario(
            "reboot-arm",
            "Reboot with backend-pool removal through the simulated ARM",
            arm=True,
        ),
        Scenario(
            "reboot-keepalive",
            "Reboot, clients on keep-alive connections (flows pinned to a backend)",
            keepalive=True,
        ),
    )
}


class PoolMirror:
    """Models web-1's membership of the Azure backend pool `pool-http` in HAProxy.

    It reads the simulator's NICs every `every` seconds and sets HAProxy's server to `maint`
    while the NIC has left the pool, `ready` once it is back (health checks still apply).
    """

    def __init__(
        self, simulator: Simulator, haproxy: HAProxy, server: str, nic: str, every: float
    ) -> None:
        self.simulator = simulator
        self.haproxy = haproxy
        self.server = server
        self.nic = nic
        self.every = every
        self.changes: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-mirror", daemon=True)
        self._thread.start()

    def member(self) -> bool | None:
        for nic in self.simulator.control("GET", "/nics"):
            if nic["name"] == self.nic:
                return any(
                    pool.rsplit("/", 1)[-1] == "pool-http"
                    for config in nic["ip_configurations"]
                    for pool in config["pools"]
                )
        return None

    def _run(self) -> None:
        last: bool | None = True
        while not self._stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                member = self.member()
                if member is not None and member != last:
                    self._apply(member)
                    self.changes.append((time.monotonic(), member))
                    last = member
            self._stop.wait(self.every)

    def _apply(self, member: bool) -> None:
        server = f"web/{self.server}"
        if not member:
            self.haproxy.command(f"set server {server} state maint")
            return
        # Leaving maintenance, HAProxy would put the server straight back UP whatever its probe
        # says; a backend that rejoins its pool must pass `rise` probes first. In DRAIN it gets
        # no new flows, its health can be forced down, and then it waits for its checks.
        for command in ("state drain", "health down", "state ready"):
            self.haproxy.command(f"set server {server} {command}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Moments:
    """CLOCK_MONOTONIC moments of one run."""

    load_ready: float = 0.0
    event: float = 0.0
    approval_seen: float | None = None
    kill: float = 0.0
    boot: float = 0.0
    app_up: float = 0.0
    back: float = 0.0
    end: float = 0.0


def run_phase(
    workdir: Path,
    scenario: Scenario,
    plan: Plan,
    *,
    with_sidecar: bool,
    kill_after: float | None = None,
) -> dict[str, Any]:
    """One rehearsal run. Without the sidecar, web-1 dies `kill_after` seconds after the event."""
    workdir.mkdir(parents=True, exist_ok=True)
    moments = Moments()
    with contextlib.ExitStack() as stack:
        simulator = Simulator(
            workdir,
            *(("--arm-port", "0", "--arm-retry-after", "0.2") if scenario.arm else ("--no-arm",)),
            "--started-seconds",
            "2",
        )
        stack.callback(simulator.close)
        simulator.control("POST", "/vms", {"name": "web-2"})
        apps: dict[str, WebApp] = {}
        for vm in VMS:
            apps[vm] = WebApp(workdir, vm)
            stack.callback(apps[vm].close)
        sidecars: dict[str, Sidecar] = {}
        if with_sidecar:
            for vm in VMS:
                sidecars[vm] = Sidecar(
                    workdir, vm, _sidecar_settings(simulator, vm, scenario, plan)
                )
                stack.callback(sidecars[vm].close)
        for app in apps.values():
            app.wait_listening()
        for sidecar in sidecars.values():
            sidecar.wait_probe(200)
            if scenario.arm:
                _wait_pools_active(sidecar)
        backends = [
            Backend(vm, apps[vm].port, sidecars[vm].port, "/health")
            if with_sidecar
            else Backend(vm, apps[vm].port, apps[vm].port, "/")
            for vm in VMS
        ]
        haproxy = HAProxy(workdir, backends, plan.checks)
        stack.callback(haproxy.close)
        haproxy.wait_all_up()
        watchers = {vm: StatusWatcher(haproxy, vm) for vm in VMS}
        for watcher in watchers.values():
            stack.callback(watcher.close)
        mirror = None
        if scenario.arm and with_sidecar:
            mirror = PoolMirror(simulator, haproxy, TARGET, f"{TARGET}-nic", plan.pool_sync_every)
            stack.callback(mirror.close)

        load = _start_load(workdir, haproxy.port, scenario, plan)
        stack.callback(load.close)
        ready = workdir / "load-ready.json"
        wait_for(lambda: ready.exists() or _died(load), "the first answer through HAProxy")
        moments.load_ready = time.monotonic()
        time.sleep(plan.warmup)

        moments.event = time.monotonic()
        event = simulator.add_event(
            type=scenario.event_type, resources=[TARGET], not_before_in=scenario.not_before_in
        )
        approval = None
        if with_sidecar:
            approval = wait_for(
                lambda: simulator.approvals_of(event["EventId"]),
                "the sidecar's approval",
                timeout=scenario.not_before_in + PATIENCE,
                every=0.01,
            )[0]
            moments.approval_seen = time.monotonic()
        else:
            assert kill_after is not None, "the baseline needs the sidecar run's kill moment"
            time.sleep(max(0.0, moments.event + kill_after - time.monotonic()))

        # the reboot: power off, the platform retires the event, power on
        moments.kill = time.monotonic()
        apps[TARGET].kill()
        if with_sidecar:
            sidecars[TARGET].kill()
        simulator.cancel_event(event["EventId"])
        time.sleep(plan.reboot_seconds)
        moments.boot = time.monotonic()
        apps[TARGET].start()
        apps[TARGET].wait_listening()
        moments.app_up = time.monotonic()
        if with_sidecar:
            sidecars[TARGET].restart()  # same port, same state file
        back = watchers[TARGET].wait(
            lambda: watchers[TARGET].back_since(moments.boot),
            f"{TARGET} back in HAProxy's rotation",
            timeout=PATIENCE + plan.poll_interval * 5,
        )
        moments.back = back
        time.sleep(plan.tail)
        records = _stop_load(load, workdir)
        moments.end = time.monotonic()
        approvals = len(simulator.approvals_of(event["EventId"])) if with_sidecar else 0
        return _summarize(
            records,
            moments,
            event=event,
            approval=approval,
            approvals=approvals,
            target=watchers[TARGET],
            other=watchers["web-2"],
            mirror=mirror,
            with_sidecar=with_sidecar,
        )


def _wait_pools_active(sidecar: Sidecar) -> None:
    """The pool action found the NIC: a drain will take it out of its pools."""

    def active() -> bool:
        pools = sidecar.status()["pools"] or {}
        return pools.get("mode") == "active"

    wait_for(active, f"{sidecar.name}'s NIC discovery")


def _sidecar_settings(
    simulator: Simulator, vm: str, scenario: Scenario, plan: Plan
) -> dict[str, str]:
    settings = {
        "SIDECAR_IMDS_URL": simulator.view(vm),
        "SIDECAR_POLL_INTERVAL": str(plan.poll_interval),
        "SIDECAR_DRAIN_SECONDS": str(plan.drain_seconds),
        "SIDECAR_MIN_DRAIN_SECONDS": str(plan.min_drain_seconds),
        **scenario.settings,
    }
    if scenario.arm:
        assert simulator.arm_url and simulator.ca_file
        settings |= {
            "SIDECAR_ARM_ENABLED": "true",
            # ARM traffic honours proxy variables; child_env sets NO_PROXY=localhost for it
            "SIDECAR_ARM_URL": simulator.arm_url.replace("127.0.0.1", "localhost"),
            "SIDECAR_ARM_CA_BUNDLE": simulator.ca_file,
        }
    return settings


def _start_load(workdir: Path, port: int, scenario: Scenario, plan: Plan) -> Child:
    (workdir / "load-ready.json").unlink(missing_ok=True)
    bound = plan.warmup + scenario.not_before_in + plan.reboot_seconds + plan.tail + 3 * PATIENCE
    args = [
        "--url",
        f"http://127.0.0.1:{port}/",
        "--rate",
        str(plan.rate),
        "--concurrency",
        str(plan.concurrency),
        "--duration",
        str(bound),
        "--max-requests",
        str(int(plan.rate * bound)),
        "--out",
        str(workdir / "load.json"),
        "--ready-file",
        str(workdir / "load-ready.json"),
    ]
    if scenario.keepalive:
        args.append("--keepalive")
    return Child(python_module("benchmarks.loadgen", *args), workdir / "loadgen.log")


def _died(child: Child) -> bool:
    if not child.alive():
        raise RuntimeError(f"the load generator exited:\n{child.output()}")
    return False


def _stop_load(load: Child, workdir: Path) -> list[list[Any]]:
    load.terminate(timeout=PATIENCE)
    result = json.loads((workdir / "load.json").read_text())
    records: list[list[Any]] = result["records"]
    return records


def _summarize(
    records: list[list[Any]],
    moments: Moments,
    *,
    event: dict[str, Any],
    approval: dict[str, Any] | None,
    approvals: int,
    target: StatusWatcher,
    other: StatusWatcher,
    mirror: PoolMirror | None,
    with_sidecar: bool,
) -> dict[str, Any]:
    failures = [r for r in records if r[2] is not None]
    latencies = [r[1] * 1000 for r in records]
    out = target.out_since(moments.event)
    since_event = moments.event

    def rel(moment: float | None) -> float | None:
        return None if moment is None else round(moment - since_event, 3)

    after_back = [r for r in records if r[0] >= moments.back]
    return {
        "with_sidecar": with_sidecar,
        "requests": len(records),
        "failed": len(failures),
        "failure_rate": len(failures) / len(records) if records else None,
        "failures_by_error": dict(Counter(r[2] for r in failures)),
        "latency_ms": {k: v for k, v in distribution(latencies).items() if k != "count"},
        "event_to_approval_s": (
            round(wall_time(approval["at"]) - wall_time(event["created_at"]), 3)
            if approval
            else None
        ),
        "approvals": approvals,
        "event_to_kill_s": rel(moments.kill),
        "out_of_rotation_s": round(moments.back - out, 3) if out is not None else None,
        "out_of_rotation_before_kill_s": round(moments.kill - out, 3) if out is not None else None,
        "back_in_rotation_after_boot_s": round(moments.back - moments.boot, 3),
        "served_by_target_after_back": sum(1 for r in after_back if r[3] == TARGET),
        "requests_after_back": len(after_back),
        "failed_between_s": (
            [rel(failures[0][0]), rel(failures[-1][0] + failures[-1][1])] if failures else None
        ),
        "other_backend_changes": [[rel(t), s] for t, s in other.changes[1:]],
        "timeline_s": {
            "load_ready": rel(moments.load_ready),
            "event": 0.0,
            "left_rotation": rel(out),
            "approval_seen": rel(moments.approval_seen),
            "kill": rel(moments.kill),
            "boot": rel(moments.boot),
            "app_listening": rel(moments.app_up),
            "back_in_rotation": rel(moments.back),
            "end": rel(moments.end),
        },
        "haproxy_status_changes": [[rel(t), s] for t, s in target.changes],
        "pool_changes": (
            [[rel(t), "in pool" if member else "out of pool"] for t, member in mirror.changes]
            if mirror
            else None
        ),
    }


def run_scenario(workdir: Path, scenario: Scenario, plan: Plan) -> dict[str, Any]:
    """With the sidecar, then without it, killing web-1 at the moment the sidecar run did."""
    with_sidecar = run_phase(workdir / "with-sidecar", scenario, plan, with_sidecar=True)
    without = run_phase(
        workdir / "without-sidecar",
        scenario,
        plan,
        with_sidecar=False,
        kill_after=with_sidecar["event_to_kill_s"],
    )
    return {
        "title": scenario.title,
        "scenario": asdict(scenario),
        "with_sidecar": with_sidecar,
        "without_sidecar": without,
    }


ROWS: tuple[tuple[str, str], ...] = (
    ("requests sent", "requests"),
    ("failed requests", "failed"),
    ("failure rate %", "failure_rate"),
    ("latency p50 ms", "p50"),
    ("latency p99 ms", "p99"),
    ("latency max ms", "max"),
    ("event -> approval s", "event_to_approval_s"),
    ("event -> web-1 killed s", "event_to_kill_s"),
    ("web-1 left rotation, s after event", "left"),
    ("web-1 out before the kill s", "out_of_rotation_before_kill_s"),
    ("web-1 out of rotation s", "out_of_rotation_s"),
    ("requests web-1 served after return", "served_by_target_after_back"),
)


def _value(run: dict[str, Any], key: str) -> object:
    if key in ("p50", "p99", "max"):
        return run["latency_ms"][key]
    if key == "failure_rate":
        rate = run["failure_rate"]
        return None if rate is None else round(rate * 100, 3)
    if key == "left":
        return run["timeline_s"]["left_rotation"]
    value: object = run[key]
    return value


def render_summary(results: dict[str, Any]) -> str:
    """One line per scenario: what users saw with the sidecar and without it."""
    rows = []
    for name, outcome in results["scenarios"].items():
        w, wo = outcome["with_sidecar"], outcome["without_sidecar"]
        rows.append(
            (
                name,
                f"{w['failed']} / {wo['failed']}",
                f"{w['requests']:,} / {wo['requests']:,}",
                f"{w['latency_ms']['max']:.1f} / {wo['latency_ms']['max']:.1f}",
                f"{w['out_of_rotation_s']:.1f} / {wo['out_of_rotation_s']:.1f}",
                w["event_to_approval_s"],
            )
        )
    return table(
        (
            "scenario",
            "failed: with / without",
            "requests: with / without",
            "max latency ms",
            "web-1 out of rotation s",
            "event -> approval s",
        ),
        rows,
    )


def render(results: dict[str, Any]) -> str:
    parts = []
    for name, outcome in results["scenarios"].items():
        rows = [
            (label, _value(outcome["with_sidecar"], key), _value(outcome["without_sidecar"], key))
            for label, key in ROWS
        ]
        parts.append(f"{name}: {outcome['title']}")
        parts.append(table(("", "with sidecar", "without sidecar"), rows))
        failures = outcome["without_sidecar"]["failures_by_error"]
        if failures or outcome["with_sidecar"]["failures_by_error"]:
            parts.append(
                f"failures: with {outcome['with_sidecar']['failures_by_error'] or '{}'}; "
                f"without {failures or '{}'}"
            )
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only these (repeatable); default: all",
    )
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    parser.add_argument("--rate", type=float, help="requests/s through HAProxy")
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    if args.rate:
        plan = replace(plan, rate=args.rate)
    names = args.scenario or list(SCENARIOS)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="rehearsal-"))
        )
        results: dict[str, Any] = {
            "benchmark": "rehearsal",
            "quick": args.quick,
            "machine": machine(),
            "plan": asdict(plan),
            "scenarios": {},
        }
        for name in names:
            print(f"running {name} ...", flush=True)
            results["scenarios"][name] = run_scenario(workdir / name, SCENARIOS[name], plan)
        print()
        print(render(results))
        print(render_summary(results))
        print()
        path = write_results("rehearsal.quick" if args.quick else "rehearsal", results)
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
