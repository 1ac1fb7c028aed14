"""The maintenance rehearsal: users' traffic through a real load balancer while web-1 reboots.

Two backends, `web-1` and `web-2`, each a stand-in web app (benchmarks/webapp.py) with its own
`sidecar run` and its own view of one `sidecar simulate`. HAProxy stands in for the Azure Load
Balancer: layer 4 (`mode tcp`: each connection is a flow balanced once, a failed connection is
not retried for the client, flows established before a backend goes down continue), probing each
sidecar's `/health` every second (fall 2, rise 2). A closed-loop client (benchmarks/loadgen.py)
sends steady traffic through it.

A maintenance event for web-1 is scheduled with an impact window (the simulator's
`impact_after`/`impact_seconds`) and stays listed after it, as in Azure. The harness watches the
event's control view and reboots web-1 as a real VM reboots: when the impact begins, its app and
sidecar are stopped (SIGSTOP: silent, no connection is reset, clients wait for their timeout);
when it ends, both are killed and started again (the boot), the sidecar with its state file and a
new boot id, so that SIDECAR_RETURN_AFTER=impact brings web-1 back while the event still lingers.
Then the same maintenance runs **without the sidecar**: HAProxy probes the app port itself, and
the impact is started (`POST /control/events/{id}/impact`) at the same offset after the event.

Keep-alive scenarios run with and without the drain hook: the stand-in app's `POST /drain`, or
Debian's nginx gracefully reloaded (`nginx -s reload` as SIDECAR_DRAIN_COMMAND).

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
    HAProxy,
    LoadGenerator,
    Nginx,
    Sidecar,
    Simulator,
    StatusWatcher,
    WebApp,
    distribution,
    machine,
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
    """The impact: how long web-1 stays silent (stopped) before it boots."""
    linger: float = 600.0
    """How long a started Reboot stays listed after its impact, as in Azure (~10 minutes): the
    sidecars run with SIDECAR_RETURN_AFTER=impact, so web-1 returns long before it leaves."""
    request_timeout: float = 2.0
    """The client's timeout per request: a request to a frozen VM fails after this."""
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
    hook: bool = False
    """The sidecars call the app's drain hook: webapp `POST /drain`, nginx a graceful reload."""
    app: str = "webapp"
    """webapp (benchmarks/webapp.py) or nginx (Debian's)."""
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
            "Reboot, clients on keep-alive connections (flows pinned to a backend), no hook",
            keepalive=True,
        ),
        Scenario(
            "reboot-keepalive-hook",
            "Reboot, keep-alive clients, drain hook: the app's POST /drain",
            keepalive=True,
            hook=True,
        ),
        Scenario(
            "nginx-keepalive",
            "Reboot, keep-alive clients, Debian's nginx as the app, no hook",
            keepalive=True,
            app="nginx",
        ),
        Scenario(
            "nginx-keepalive-hook",
            "Reboot, keep-alive clients, nginx, drain hook: graceful reload (nginx -s reload)",
            keepalive=True,
            hook=True,
            app="nginx",
        ),
    )
}

PAIRS = (
    ("reboot-keepalive", "reboot-keepalive-hook"),
    ("nginx-keepalive", "nginx-keepalive-hook"),
)
"""Keep-alive scenarios without and with the drain hook, shown side by side."""


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
    freeze: float = 0.0
    """The impact began: web-1's app and sidecar stopped (SIGSTOP)."""
    boot: float = 0.0
    """The impact is over: both killed and started again, with a new boot id."""
    app_up: float = 0.0
    back: float = 0.0
    end: float = 0.0


App = WebApp | Nginx


def impact_of(simulator: Simulator, event_id: str) -> str | None:
    """The simulator's impact state of an event: None, pending, in-progress, over."""
    for view in simulator.control("GET", "/events")["events"]:
        if view["EventId"] == event_id:
            state: str | None = view["impact"]
            return state
    return None


def reboot_through_impact(
    simulator: Simulator,
    event_id: str,
    app: App,
    sidecar: Sidecar | None,
    moments: Moments,
    timeout: float,
) -> None:
    """The VM reboots, timed by the simulator's impact window. At the impact it goes silent
    (SIGSTOP to the app and the sidecar: no answer and no reset, as for packets to a rebooting
    VM); when the impact is over it boots: both are killed and started again, the sidecar with a
    new boot id, the app first, the sidecar once the app listens (as a unit ordering would)."""
    wait_for(
        lambda: impact_of(simulator, event_id) in ("in-progress", "over"),
        "the impact to begin",
        timeout=timeout,
        every=0.005,
    )
    moments.freeze = time.monotonic()
    app.child.freeze()
    if sidecar is not None:
        sidecar.child.freeze()
    wait_for(lambda: impact_of(simulator, event_id) == "over", "the impact to end", every=0.01)
    moments.boot = time.monotonic()
    app.kill()
    if sidecar is not None:
        sidecar.kill()
        sidecar.new_boot_id()
    app.start()
    app.wait_listening()
    moments.app_up = time.monotonic()
    if sidecar is not None:
        sidecar.restart()  # same port, same state file, a new boot id


def run_phase(
    workdir: Path,
    scenario: Scenario,
    plan: Plan,
    *,
    with_sidecar: bool,
    impact_after: float | None = None,
) -> dict[str, Any]:
    """One rehearsal run. Without the sidecar, the impact begins `impact_after` seconds after
    the event (the moment it began in the run with the sidecar)."""
    workdir.mkdir(parents=True, exist_ok=True)
    moments = Moments()
    with contextlib.ExitStack() as stack:
        simulator = Simulator(
            workdir,
            *(("--arm-port", "0", "--arm-retry-after", "0.2") if scenario.arm else ("--no-arm",)),
        )
        stack.callback(simulator.close)
        simulator.control("POST", "/vms", {"name": "web-2"})
        apps: dict[str, App] = {}
        for vm in VMS:
            apps[vm] = Nginx(workdir, vm) if scenario.app == "nginx" else WebApp(workdir, vm)
            stack.callback(apps[vm].close)
        for app in apps.values():
            app.wait_listening()
        sidecars: dict[str, Sidecar] = {}
        if with_sidecar:
            for vm in VMS:
                settings = _sidecar_settings(simulator, vm, scenario, plan)
                if scenario.hook:
                    settings |= apps[vm].hook_settings()
                sidecars[vm] = Sidecar(workdir, vm, settings)
                stack.callback(sidecars[vm].close)
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
        load.wait_ready("the first answer through HAProxy")
        moments.load_ready = time.monotonic()
        time.sleep(plan.warmup)

        moments.event = time.monotonic()
        event = simulator.add_event(
            type=scenario.event_type,
            resources=[TARGET],
            not_before_in=scenario.not_before_in,
            impact_after=0,
            impact_seconds=plan.reboot_seconds,
            # Azure keeps a started Reboot listed for ~10 minutes; a Preempt's VM never comes
            # back, so only the event's removal can bring the sidecar back: let it go soon
            linger=1 if scenario.event_type == "Preempt" else plan.linger,
        )
        approval = None
        hooks = None
        if with_sidecar:
            approval = wait_for(
                lambda: simulator.approvals_of(event["EventId"]),
                "the sidecar's approval",
                timeout=scenario.not_before_in + PATIENCE,
                every=0.01,
            )[0]
            moments.approval_seen = time.monotonic()
            if scenario.hook:  # approval waited for the hook: its outcome is known now
                hooks = sidecars[TARGET].status()["hooks"]
        else:
            assert impact_after is not None, "the baseline needs the sidecar run's impact moment"
            time.sleep(max(0.0, moments.event + impact_after - time.monotonic()))
            simulator.control("POST", f"/events/{event['EventId']}/impact")  # NotBefore, early

        reboot_through_impact(
            simulator,
            event["EventId"],
            apps[TARGET],
            sidecars.get(TARGET),
            moments,
            timeout=scenario.not_before_in + PATIENCE,
        )
        back = watchers[TARGET].wait(
            lambda: watchers[TARGET].back_since(moments.boot),
            f"{TARGET} back in HAProxy's rotation",
            timeout=PATIENCE + plan.poll_interval * 5,
        )
        moments.back = back
        time.sleep(plan.tail)
        records, retried = load.stop()
        moments.end = time.monotonic()
        approvals = len(simulator.approvals_of(event["EventId"])) if with_sidecar else 0
        return _summarize(
            records,
            moments,
            event=event,
            approval=approval,
            approvals=approvals,
            retried=retried,
            target=watchers[TARGET],
            other=watchers["web-2"],
            mirror=mirror,
            with_sidecar=with_sidecar,
            hooks=hooks,
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
        # back once the VM has rebooted, while the event still lingers (as in Azure)
        "SIDECAR_RETURN_AFTER": "impact",
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


def _start_load(workdir: Path, port: int, scenario: Scenario, plan: Plan) -> LoadGenerator:
    bound = plan.warmup + scenario.not_before_in + plan.reboot_seconds + plan.tail + 3 * PATIENCE
    return LoadGenerator(
        workdir,
        "load",
        f"http://127.0.0.1:{port}/",
        rate=plan.rate,
        concurrency=plan.concurrency,
        duration=bound,
        max_requests=int(plan.rate * bound),
        timeout=plan.request_timeout,
        keepalive=scenario.keepalive,
    )


def _summarize(
    records: list[list[Any]],
    moments: Moments,
    *,
    event: dict[str, Any],
    approval: dict[str, Any] | None,
    approvals: int,
    retried: int,
    target: StatusWatcher,
    other: StatusWatcher,
    mirror: PoolMirror | None,
    with_sidecar: bool,
    hooks: dict[str, Any] | None,
) -> dict[str, Any]:
    failures = [r for r in records if r[2] is not None]
    latencies = [r[1] * 1000 for r in records if r[2] is None]  # of the answered requests
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
        "retried": retried,
        "retried_then_failed": sum(1 for r in failures if r[4]),
        "hooks": hooks,
        "latency_ms": {k: v for k, v in distribution(latencies).items() if k != "count"},
        "event_to_approval_s": (
            round(wall_time(approval["at"]) - wall_time(event["created_at"]), 3)
            if approval
            else None
        ),
        "approvals": approvals,
        "event_to_impact_s": rel(moments.freeze),
        "impact_s": round(moments.boot - moments.freeze, 3),
        "out_of_rotation_s": round(moments.back - out, 3) if out is not None else None,
        "out_of_rotation_before_impact_s": (
            round(moments.freeze - out, 3) if out is not None else None
        ),
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
            "impact_frozen": rel(moments.freeze),
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
    """With the sidecar, then without it, the impact beginning when it did with the sidecar."""
    with_sidecar = run_phase(workdir / "with-sidecar", scenario, plan, with_sidecar=True)
    without = run_phase(
        workdir / "without-sidecar",
        scenario,
        plan,
        with_sidecar=False,
        impact_after=with_sidecar["event_to_impact_s"],
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
    ("retried on a new connection", "retried"),
    ("latency p50 ms", "p50"),
    ("latency p99 ms", "p99"),
    ("latency max ms", "max"),
    ("event -> approval s", "event_to_approval_s"),
    ("event -> impact (web-1 frozen) s", "event_to_impact_s"),
    ("web-1 left rotation, s after event", "left"),
    ("web-1 out before the impact s", "out_of_rotation_before_impact_s"),
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
                f"{w['retried']} / {wo['retried']}",
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
            "retried",
            "max latency ms",
            "web-1 out of rotation s",
            "event -> approval s",
        ),
        rows,
    )


def render_pairs(results: dict[str, Any]) -> str | None:
    """Keep-alive clients with the sidecar, without and with its drain hook, side by side."""
    scenarios = results["scenarios"]
    rows = []
    for plain, hooked in PAIRS:
        if plain not in scenarios or hooked not in scenarios:
            continue
        p, h = scenarios[plain]["with_sidecar"], scenarios[hooked]["with_sidecar"]
        baseline = scenarios[plain]["without_sidecar"]
        rows.append(
            (
                f"{plain} / {hooked}",
                f"{p['failed']} / {h['failed']}",
                f"{p['retried']} / {h['retried']}",
                f"{p['requests']:,} / {h['requests']:,}",
                (h["hooks"] or {}).get("drain"),
                baseline["failed"],
            )
        )
    if not rows:
        return None
    return table(
        (
            "keep-alive: no hook / hook",
            "failed",
            "retried",
            "requests",
            "hook",
            "failed without sidecar",
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
        pairs = render_pairs(results)
        if pairs:
            print()
            print(pairs)
        print()
        path = write_results("rehearsal.quick" if args.quick else "rehearsal", results)
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
