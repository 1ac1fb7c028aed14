"""Fleet rehearsal: a hundred VMs, each with its own `sidecar run`, behind one simulated load
balancer, through the maintenances a fleet sees.

One `sidecar simulate` plays Azure for every VM: IMDS (a view per VM), ARM over HTTPS with
Azure's documented throttling on (per subscription and identity, 429 with Retry-After), and the
load balancer `lb-fleet`: every VM's NIC in `pool-fleet`; a probe of each sidecar's /health
every `probe_interval` seconds, `probe_threshold` results to flip; and the rule `rule-fleet`,
whose loopback frontend spreads each new TCP connection over the backends in the pool and up.
Each VM is a real `sidecar run` (pool removal on, SIDECAR_RETURN_AFTER=impact, the app's drain
hook) and a stand-in app (one `benchmarks.apphost` process serves them all). Two load
generators send traffic through the frontend, one on keep-alive connections, one a new
connection per request, and count what users would see fail (`benchmarks.loadgen`).

The platform plays its part as in the rehearsal: when the simulator says an event's impact has
begun, each VM it names goes silent (its sidecar stopped with SIGSTOP, its app answers nothing);
when the impact is over, each boots: its sidecar is killed and started again with a new boot id,
its app starts afresh. Started events linger `linger` seconds after their impact, as in Azure.

Scenarios (`--scenario`, default all):
- `ud-walk`: events naming 20 % of the VMs at a time, each after the fleet settled from the last;
  capacity guard at 75 %, peer-aware approval;
- `all-named-guard` / `all-named-no-guard`: one event naming every VM of the pool, with the
  guard at 80 % and without it. The platform reboots every VM when the event starts, so no
  sidecar can prevent failures then; what the guard saves is the drain: without it every probe
  turns 503 at once and the rule has no backend from the drain's start to the end of the reboot;
- `mass-restarts`: one event naming half the VMs, guard at 40 %, peer-aware approval, while a
  quarter of the fleet's sidecars (drawn among the VMs named) are SIGKILLed at random moments of
  the maintenance and started again after a random pause.

Checked after each scenario, and recorded in `benchmarks/results/fleet.json`: NICs left out of
their pool (or still carrying the sidecar's record tag), approvals beyond one per event, approvals
after NotBefore, failed requests, the fewest healthy backends while the sidecars decide (from the
event to the platform's first impact) and over the whole scenario, ARM writes and throttled
requests, the time from each event to the fleet settling (every NIC back in the pool and every
backend up), and per sidecar memory and CPU. A plot of healthy backends over time goes to
`benchmarks/results/fleet.png`.

`python -m benchmarks.fleet [--quick] [--vms N] [--scenario NAME ...] [--workdir DIR]`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import random
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.lab import (
    MIB,
    PATIENCE,
    RECORD_TAG,
    RESULTS,
    Child,
    ListenPorts,
    LoadGenerator,
    Sidecar,
    Simulator,
    children,
    cpu_seconds,
    fetch,
    free_port,
    listening,
    machine,
    python_module,
    rss_bytes,
    table,
    wait_for,
    wall_time,
    write_results,
)

LB, POOL, RULE, PROBE = "lb-fleet", "pool-fleet", "rule-fleet", "probe-fleet"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    named: str
    """walk: 20 % of the VMs per event, in turn; all: every VM; half: every other VM."""
    guard: float | None
    """The capacity guard's minimum as a share of the fleet (a count is set); None: off."""
    peer_aware: bool
    restarts: float = 0.0
    """Share of the fleet's sidecars killed (SIGKILL) and started again during the event."""


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "ud-walk",
            "update-domain walk: 20% of the VMs per event, in turn",
            "walk",
            guard=0.75,
            peer_aware=True,
        ),
        Scenario(
            "all-named-guard",
            "one event naming every VM, capacity guard at 80%",
            "all",
            guard=0.8,
            peer_aware=False,
        ),
        Scenario(
            "all-named-no-guard",
            "one event naming every VM, no guard",
            "all",
            guard=None,
            peer_aware=False,
        ),
        Scenario(
            "mass-restarts",
            "one event naming half the VMs; a quarter of the sidecars killed and restarted",
            "half",
            guard=0.4,
            peer_aware=True,
            restarts=0.25,
        ),
    )
}


@dataclass(frozen=True)
class Plan:
    vms: int = 100
    walk_share: float = 0.2
    probe_interval: float = 5.0
    """Azure's minimum (and a common default)."""
    probe_threshold: int = 2
    drain_seconds: float = 30.0
    """The sidecar's default."""
    min_drain_seconds: float = 15.0
    """The sidecar's default: one poll and the balancer's `probe_threshold` failed probes, with
    room."""
    not_before_in: float = 300.0
    impact_seconds: float = 7.0
    """Microsoft's rough figure for a reboot's impact."""
    linger: float = 60.0
    """A started event stays listed this long after its impact (Azure: minutes)."""
    rate: float = 150.0
    """Requests/s through the frontend, both load generators together."""
    request_timeout: float = 5.0
    start_batch: int = 10
    sidecar_nice: int = 10
    """Every "VM" shares this machine's cores with the simulated platform (IMDS, ARM, the
    balancer's prober and frontend), which a real fleet does not: the sidecars (and their ARM
    helpers) run at a lower CPU priority, so that a hundred of them starting their helpers at
    once cannot starve the balancer's probes into false failures."""
    arm_idle_seconds: float | None = None
    """SIDECAR_ARM_IDLE_SECONDS; None keeps the default (60)."""
    idle_window: float = 30.0
    """Seconds of quiet before the first event, for the idle cost per sidecar."""
    settle_timeout: float = 300.0


QUICK = Plan(
    vms=10,
    probe_interval=1.0,
    drain_seconds=6.0,
    min_drain_seconds=4.0,
    not_before_in=120.0,
    impact_seconds=3.0,
    linger=20.0,
    rate=40.0,
    start_batch=5,
    arm_idle_seconds=5.0,
    idle_window=5.0,
    settle_timeout=120.0,
)


def vm_name(index: int) -> str:
    return f"vm-{index:03d}"


@dataclass
class Vm:
    """One simulated VM: its app's port, its sidecar, and what the rehearsal did to it."""

    name: str
    app_port: int
    sidecar: Sidecar
    lock: threading.Lock = field(default_factory=threading.Lock)
    frozen: bool = False
    cpu_spent: float = 0.0
    """CPU seconds of sidecar processes that were killed (their helpers included)."""
    kills: int = 0
    reboots: int = 0

    def cpu_now(self) -> float:
        """This sidecar's CPU so far, its reaped children (the ARM helpers) included."""
        with contextlib.suppress(OSError):
            return cpu_seconds(self.sidecar.child.pid, reaped_children=True)
        return 0.0


class AppHost:
    """`benchmarks.apphost`: every VM's stand-in app in one process."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.child = Child(
            python_module("benchmarks.apphost", "--control-port", str(self.port)),
            workdir / "apphost.log",
        )
        wait_for(lambda: self._up(), "the app host's control port")

    def _up(self) -> bool:
        if not self.child.alive():
            raise RuntimeError(f"the app host exited:\n{self.child.output()}")
        return listening(self.port)

    def post(self, path: str) -> None:
        answer = fetch(f"http://127.0.0.1:{self.port}{path}", "POST", timeout=PATIENCE)
        if answer.status != 200:
            raise RuntimeError(f"app host {path}: {answer.status} {answer.body!r}")

    def close(self) -> None:
        self.child.terminate(5)
        self.child.close()


class Fleet:
    """The simulator, the apps and the sidecars of one scenario, and the platform's hand."""

    def __init__(self, workdir: Path, plan: Plan, scenario: Scenario, stack: Any) -> None:
        self.workdir = workdir
        self.plan = plan
        self.scenario = scenario
        self.simulator = Simulator(
            workdir,
            "--arm-port",
            "0",
            "--arm-retry-after",
            "1",
            "--arm-throttle",
            "--started-seconds",
            str(plan.linger),
        )
        stack.callback(self.simulator.close)
        self.names = [vm_name(i + 1) for i in range(plan.vms)]
        self.minimum = math.ceil(plan.vms * scenario.guard) if scenario.guard is not None else None
        self._make_load_balancer()
        self.apps = AppHost(workdir)
        stack.callback(self.apps.close)
        self.vms: dict[str, Vm] = {}
        self.ports = ListenPorts()
        self._start_vms(stack)
        self.rule_id = next(
            r["id"] for r in self.simulator.control("GET", f"/load-balancers/{LB}")["rules"]
        )
        self.frontend_port = self._rule()["frontend_listener"]["port"]
        self.pool = self.pool_id()
        self.events: list[dict[str, Any]] = []
        self.impacts: dict[str, dict[str, float]] = {}
        """Event id -> CLOCK_MONOTONIC moments: frozen, booted."""
        self.errors: list[str] = []
        self.helper_peak = 0
        self.helper_rss_peak = 0
        self._stop = threading.Event()
        self._chaos: list[threading.Thread] = []
        self._platform = threading.Thread(target=self._follow_platform, name="platform")
        self._platform.start()
        self._watch = threading.Thread(target=self._watch_helpers, name="helpers")
        self._watch.start()

    # --- set-up

    def _make_load_balancer(self) -> None:
        self.simulator.control(
            "POST",
            "/load-balancers",
            {
                "name": LB,
                "pools": [POOL],
                "probes": [
                    {
                        "name": PROBE,
                        "port": 8080,
                        "path": "/health",
                        "interval": self.plan.probe_interval,
                        "threshold": self.plan.probe_threshold,
                    }
                ],
                "rules": [
                    {
                        "name": RULE,
                        "frontend_port": 80,
                        "backend_port": 80,
                        "pool": POOL,
                        "probe": PROBE,
                        "listen": 0,
                    }
                ],
            },
        )
        self.simulator.control(
            "POST", "/vms", [{"name": name, "pools": [f"{LB}/{POOL}"]} for name in self.names]
        )

    def _settings(self, name: str, app_port: int) -> dict[str, str]:
        sim = self.simulator
        assert sim.arm_url and sim.ca_file
        app = f"http://127.0.0.1:{app_port}"
        settings = {
            "SIDECAR_IMDS_URL": sim.view(name),
            "SIDECAR_ARM_ENABLED": "true",
            # ARM honours proxy variables; child_env's NO_PROXY covers localhost
            "SIDECAR_ARM_URL": sim.arm_url.replace("127.0.0.1", "localhost"),
            "SIDECAR_ARM_CA_BUNDLE": sim.ca_file,
            "SIDECAR_DRAIN_SECONDS": f"{self.plan.drain_seconds:g}",
            "SIDECAR_MIN_DRAIN_SECONDS": f"{self.plan.min_drain_seconds:g}",
            "SIDECAR_RETURN_AFTER": "impact",
            "SIDECAR_DRAIN_HOOK_URL": f"{app}/drain",
            "SIDECAR_UNDRAIN_HOOK_URL": f"{app}/undrain",
            "SIDECAR_PEER_AWARE_APPROVAL": "true" if self.scenario.peer_aware else "false",
        }
        if self.minimum is not None:
            settings["SIDECAR_MIN_HEALTHY_BACKENDS"] = str(self.minimum)
        if self.plan.arm_idle_seconds is not None:
            settings["SIDECAR_ARM_IDLE_SECONDS"] = f"{self.plan.arm_idle_seconds:g}"
        return settings

    def _start_vms(self, stack: Any) -> None:
        """In batches: a hundred Pythons starting at once would starve the probes on 2 CPUs."""
        for first in range(0, len(self.names), self.plan.start_batch):
            batch = []
            for name in self.names[first : first + self.plan.start_batch]:
                app_port = self.ports.take()
                self.apps.post(f"/vms/{name}?port={app_port}")
                sidecar = Sidecar(
                    self.workdir,
                    name,
                    self._settings(name, app_port),
                    nice=self.plan.sidecar_nice,
                    port=self.ports.take(),
                )
                stack.callback(sidecar.close)
                self.vms[name] = Vm(name, app_port, sidecar)
                batch.append(self.vms[name])
            for vm in batch:
                vm.sidecar.wait_probe(200, timeout=PATIENCE * 4)
                self.simulator.control(
                    "PUT", f"/vms/{vm.name}/ports", {"8080": vm.sidecar.port, "80": vm.app_port}
                )
        for vm in self.vms.values():
            wait_for(functools.partial(self._pools_active, vm), f"{vm.name}'s NIC discovery")
        wait_for(
            lambda: self.counts()["up"] == len(self.names),
            "every backend up",
            timeout=PATIENCE + 4 * self.plan.probe_interval,
        )

    @staticmethod
    def _pools_active(vm: Vm) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return bool(vm.sidecar.status()["pools"]["mode"] == "active")
        return False

    # --- what the simulator says

    def _rule(self) -> dict[str, Any]:
        balancer = self.simulator.control("GET", f"/load-balancers/{LB}")
        found: dict[str, Any] = next(r for r in balancer["rules"] if r["name"] == RULE)
        return found

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self._rule()["counts"]
        return counts

    def pool_id(self) -> str:
        balancer = self.simulator.control("GET", f"/load-balancers/{LB}")
        pool_id: str = next(p["id"] for p in balancer["pools"] if p["name"] == POOL)
        return pool_id

    def settled(self) -> bool:
        counts = self.counts()
        return counts["members"] == len(self.names) and counts["up"] == len(self.names)

    def booted(self, event_id: str) -> bool:
        """Whether the platform has rebooted every VM this event names."""
        return "booted" in self.impacts.get(event_id, {})

    def event_view(self, event_id: str) -> dict[str, Any] | None:
        for view in self.simulator.control("GET", "/events")["events"]:
            if view["EventId"] == event_id:
                found: dict[str, Any] = view
                return found
        return None

    # --- the platform: impacts and boots

    def _follow_platform(self) -> None:
        """Freezes the VMs an event names when its impact begins; boots them when it ends."""
        frozen: set[str] = set()
        booted: set[str] = set()
        known: dict[str, list[str]] = {}
        with ThreadPoolExecutor(16) as pool:
            while not self._stop.is_set():
                try:
                    views = {
                        v["EventId"]: v for v in self.simulator.control("GET", "/events")["events"]
                    }
                except (OSError, RuntimeError, ValueError):
                    self._stop.wait(0.1)
                    continue
                for view in views.values():
                    known.setdefault(view["EventId"], list(view["Resources"]))
                for event_id, resources in known.items():
                    state = views[event_id]["impact"] if event_id in views else "gone"
                    moments = self.impacts.setdefault(event_id, {})
                    if event_id not in frozen and state in ("in-progress", "over", "gone"):
                        if state == "gone" and event_id not in views and not moments:
                            continue  # cancelled before any impact
                        frozen.add(event_id)
                        moments["frozen"] = time.monotonic()
                        list(pool.map(self._freeze, resources))
                    if event_id in frozen and event_id not in booted and state in ("over", "gone"):
                        booted.add(event_id)
                        list(pool.map(self._boot, resources))
                        moments["booted"] = time.monotonic()
                self._stop.wait(0.1)

    def _freeze(self, name: str) -> None:
        vm = self.vms[name]
        with vm.lock:
            vm.frozen = True
            self.apps.post(f"/vms/{name}/freeze")
            vm.sidecar.child.freeze()

    def _boot(self, name: str) -> None:
        vm = self.vms[name]
        with vm.lock:
            try:
                vm.cpu_spent += vm.cpu_now()
                vm.sidecar.kill()
                vm.sidecar.new_boot_id()
                self.apps.post(f"/vms/{name}/boot")
                vm.sidecar.restart()
                vm.reboots += 1
            except Exception:  # reported; the rehearsal goes on
                self.errors.append(f"boot {name}: {traceback.format_exc(limit=2)}")
            finally:
                vm.frozen = False

    def restart_at_random(self, victims: list[str], window: float, rng: random.Random) -> None:
        """Kills each victim's sidecar (SIGKILL) at a random moment of `window` seconds and
        starts it again after a random pause; never a VM the platform has frozen."""

        def chaos(name: str, after: float, pause: float) -> None:
            if self._stop.wait(after):
                return
            vm = self.vms[name]
            with vm.lock:
                if vm.frozen:
                    return
                vm.cpu_spent += vm.cpu_now()
                vm.sidecar.kill()
                vm.kills += 1
                time.sleep(pause)
                vm.sidecar.restart()

        threads = [
            threading.Thread(
                target=chaos,
                args=(name, rng.uniform(0, window), rng.uniform(0.5, 3.0)),
                name=f"chaos-{name}",
                daemon=True,
            )
            for name in victims
        ]
        for thread in threads:
            thread.start()
        self._chaos = threads

    def _watch_helpers(self) -> None:
        """How many ARM helpers run at once, and the largest one's memory."""
        while not self._stop.wait(0.5):
            alive = 0
            for vm in list(self.vms.values()):
                with contextlib.suppress(OSError, RuntimeError):
                    for pid in children(vm.sidecar.child.pid):
                        alive += 1
                        self.helper_rss_peak = max(self.helper_rss_peak, rss_bytes(pid))
            self.helper_peak = max(self.helper_peak, alive)

    def join_chaos(self) -> None:
        for thread in self._chaos:
            thread.join(PATIENCE * 2)

    def close(self) -> None:
        self._stop.set()
        self._platform.join(PATIENCE)
        self._watch.join(PATIENCE)


# --- load


class Load:
    """Two load generators through the rule's frontend: keep-alive and one request per flow."""

    def __init__(self, workdir: Path, port: int, plan: Plan) -> None:
        self.generators = {
            kind: LoadGenerator(
                workdir,
                f"load-{kind}",
                f"http://127.0.0.1:{port}/",
                rate=plan.rate * share,
                concurrency=concurrency,
                duration=7200,
                max_requests=100_000_000,
                timeout=plan.request_timeout,
                keepalive=kind == "keepalive",
            )
            for kind, share, concurrency in (("keepalive", 0.6, 24), ("fresh", 0.4, 12))
        }
        for kind, generator in self.generators.items():
            generator.wait_ready(f"{kind} load's first answer")

    def stop(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for kind, generator in self.generators.items():
            records, retried = generator.stop()
            failures = [r for r in records if r[2] is not None]
            result[kind] = {
                "requests": len(records),
                "failed": len(failures),
                "retried": retried,
                "failures_by_error": dict(Counter(r[2] for r in failures)),
                "failed_at": [round(r[0], 3) for r in failures],
            }
        return result

    def close(self) -> None:
        for generator in self.generators.values():
            generator.close()


# --- one scenario


def run_scenario(workdir: Path, plan: Plan, scenario: Scenario, seed: int) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        fleet = Fleet(workdir, plan, scenario, stack)
        stack.callback(fleet.close)
        set_up_s = time.monotonic() - started
        cost = idle_cost(fleet, plan)
        load = Load(workdir, fleet.frontend_port, plan)
        stack.callback(load.close)
        history_since = time.time()
        initial_up = fleet.counts()["up"]
        time.sleep(2.0)  # traffic before the first event
        per_event = drive(fleet, plan, scenario, rng)
        time.sleep(2.0)  # traffic after the fleet settled
        traffic = load.stop()
        fleet.join_chaos()
        fleet.close()
        return summarize(
            fleet, plan, scenario, per_event, traffic, cost, (history_since, initial_up), set_up_s
        )


def groups(scenario: Scenario, names: list[str], plan: Plan) -> list[list[str]]:
    if scenario.named == "all":
        return [names]
    if scenario.named == "half":
        return [names[::2]]
    size = max(1, round(len(names) * plan.walk_share))
    return [names[i : i + size] for i in range(0, len(names), size)]


def drive(fleet: Fleet, plan: Plan, scenario: Scenario, rng: random.Random) -> list[dict[str, Any]]:
    """The events, one after another (each after the fleet settled from the last)."""
    results = []
    for resources in groups(scenario, fleet.names, plan):
        created = time.monotonic()
        event = fleet.simulator.add_event(
            type="Reboot",
            resources=resources,
            not_before_in=plan.not_before_in,
            impact_after=0,
            impact_seconds=plan.impact_seconds,
            linger=plan.linger,
        )
        fleet.events.append(event)
        if scenario.restarts:
            victims = rng.sample(
                resources, min(len(resources), round(plan.vms * scenario.restarts))
            )
            fleet.restart_at_random(victims, plan.drain_seconds + 8.0, rng)
        event_id = event["EventId"]
        wait_for(
            functools.partial(fleet.booted, event_id),
            f"event {event_id}'s impact and the reboots",
            timeout=plan.not_before_in + PATIENCE,
            every=0.1,
        )
        wait_for(fleet.settled, "the fleet to settle", timeout=plan.settle_timeout, every=0.2)
        settled = time.monotonic()
        view = fleet.event_view(event_id) or {}
        moments = fleet.impacts[event_id]
        results.append(
            {
                "event_id": event_id,
                "vms_named": len(resources),
                "event_to_impact_s": round(moments["frozen"] - created, 3),
                "impact_to_boot_s": round(moments["booted"] - moments["frozen"], 3),
                "event_to_settled_s": round(settled - created, 3),
                "created_wall": wall_time(event["created_at"]),
                "impact_wall": time.time() - (time.monotonic() - moments["frozen"]),
                "not_before": view.get("not_before") or event.get("not_before"),
            }
        )
    return results


def idle_cost(fleet: Fleet, plan: Plan) -> dict[str, Any]:
    """Each sidecar's memory and CPU while nothing happens (its ARM helper gone idle)."""
    wait_for(
        lambda: not any(children(vm.sidecar.child.pid) for vm in fleet.vms.values()),
        "the start-up ARM helpers to stop",
        timeout=PATIENCE + (plan.arm_idle_seconds or 60.0) * 2,
        every=0.5,
    )
    pids = [vm.sidecar.child.pid for vm in fleet.vms.values()]
    cpu_start = [cpu_seconds(pid) for pid in pids]
    began = time.monotonic()
    time.sleep(plan.idle_window)
    elapsed = time.monotonic() - began
    cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_start, strict=True)]
    rss = sorted(rss_bytes(pid) / MIB for pid in pids)
    return {
        "window_s": round(elapsed, 1),
        "rss_mib_median": round(rss[len(rss) // 2], 1),
        "rss_mib_max": round(rss[-1], 1),
        "cpu_s_per_hour_median": round(sorted(cpu)[len(cpu) // 2] / elapsed * 3600, 2),
        "cpu_s_per_hour_fleet": round(sum(cpu) / elapsed * 3600, 1),
    }


# --- the record


def summarize(
    fleet: Fleet,
    plan: Plan,
    scenario: Scenario,
    per_event: list[dict[str, Any]],
    traffic: dict[str, Any],
    cost: dict[str, Any],
    start: tuple[float, int],
    set_up_s: float,
) -> dict[str, Any]:
    """`start`: when the record begins (wall clock) and how many backends were up then."""
    history_since, initial_up = start
    sim = fleet.simulator
    approvals = sim.control("GET", "/approvals")
    by_event = Counter(a["event_id"] for a in approvals)
    not_before = {e["event_id"]: wall_time(e["not_before"]) for e in per_event if e["not_before"]}
    late = [
        a
        for a in approvals
        if a["event_id"] in not_before and wall_time(a["at"]) > not_before[a["event_id"]]
    ]
    left_out = [name for name in fleet.names if not _nic_back(fleet, name)]
    requests = sim.control("GET", "/requests?limit=0")
    counts: dict[str, int] = requests["counts"]
    writes = sum(n for key, n in counts.items() if key.split()[0] in ("PUT", "PATCH", "DELETE"))
    health_posts = counts.get("POST arm-lb-health", 0)
    history = sim.control("GET", f"/load-balancers/{LB}/history?since={history_since}")["entries"]
    series = [(0.0, initial_up)] + [
        (round(entry["t"] - history_since, 3), entry["rules"][RULE]["up"])
        for entry in history
        if RULE in entry.get("rules", {})
    ]
    first_wall = per_event[0]["created_wall"] if per_event else history_since
    deciding = [
        (e["created_wall"] - history_since, e["impact_wall"] - history_since) for e in per_event
    ]
    overall = [(first_wall - history_since, math.inf)]
    failed = sum(kind["failed"] for kind in traffic.values())
    sidecar_rss = sorted(rss_bytes(vm.sidecar.child.pid) / MIB for vm in fleet.vms.values())
    cpu_total = sum(vm.cpu_spent + vm.cpu_now() for vm in fleet.vms.values())
    died = [vm.name for vm in fleet.vms.values() if not vm.sidecar.child.alive()]
    return {
        "scenario": scenario.name,
        "title": scenario.title,
        "vms_named": sum(e["vms_named"] for e in per_event),
        "events": len(per_event),
        "failed_requests": failed,
        "requests": sum(kind["requests"] for kind in traffic.values()),
        "retried_requests": sum(kind["retried"] for kind in traffic.values()),
        "traffic": {
            kind: {k: v for k, v in data.items() if k != "failed_at"}
            for kind, data in traffic.items()
        },
        "min_healthy_backends": minimum_during(series, deciding),
        "min_healthy_backends_overall": minimum_during(series, overall),
        "min_healthy_goal": fleet.minimum or 0,
        "seconds_without_healthy_backend": seconds_at_zero(series, time.time() - history_since),
        "nics_left_out": len(left_out),
        "nics_left_out_names": left_out,
        "double_approvals": sum(n - 1 for n in by_event.values() if n > 1),
        "approvals": dict(by_event),
        "approvals_after_not_before": len(late),
        "arm_writes": writes,
        "arm_rule_health_posts": health_posts,
        "arm_requests": requests["totals"]["arm"],
        "arm_throttled": requests["throttled"]["total"],
        "per_event": per_event,
        "event_to_settled_s": [e["event_to_settled_s"] for e in per_event],
        "sidecar_kills": sum(vm.kills for vm in fleet.vms.values()),
        "reboots": sum(vm.reboots for vm in fleet.vms.values()),
        "sidecars_died_by_themselves": died,
        "errors": fleet.errors,
        "idle_cost": cost,
        "after": {
            "sidecar_rss_mib_median": round(sidecar_rss[len(sidecar_rss) // 2], 1),
            "sidecar_rss_mib_max": round(sidecar_rss[-1], 1),
            "arm_helpers_at_once_max": fleet.helper_peak,
            "arm_helper_rss_mib_max": round(fleet.helper_rss_peak / MIB, 1),
            "cpu_s_per_vm": round(cpu_total / len(fleet.vms), 2),
        },
        "set_up_s": round(set_up_s, 1),
        "healthy_over_time": series,
        "first_event_s": round(first_wall - history_since, 3),
    }


def seconds_at_zero(series: list[tuple[float, int]], end: float) -> float:
    """How long no backend was up (the rule sent every new flow nowhere), up to `end`."""
    total = 0.0
    for (t, up), (t_next, _) in zip(series, [*series[1:], (end, 0)], strict=True):
        if up == 0:
            total += max(0.0, t_next - t)
    return round(total, 3)


def minimum_during(series: list[tuple[float, int]], windows: list[tuple[float, float]]) -> int:
    """The fewest backends up at any moment of the windows; `series` is a step function (each
    value holds until the next), its first point at 0, before every window."""
    values = []
    for begin, end in windows:
        values.append([up for t, up in series if t <= begin][-1])
        values += [up for t, up in series if begin < t < end]
    return min(values)


def _nic_back(fleet: Fleet, name: str) -> bool:
    nic = fleet.simulator.control("GET", f"/nics/{name}-nic")
    pools = [
        pool["id"].casefold()
        for config in nic["properties"]["ipConfigurations"]
        for pool in config["properties"].get("loadBalancerBackendAddressPools", [])
    ]
    ours = [tag for tag in (nic.get("tags") or {}) if tag.startswith(RECORD_TAG)]
    return pools == [fleet.pool.casefold()] and not ours


# --- output


def totals(results: list[dict[str, Any]]) -> dict[str, int]:
    return {
        key: sum(r.get(key, 0) for r in results if "error" not in r)
        for key in ("nics_left_out", "double_approvals", "approvals_after_not_before")
    }


def render(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["scenario"], "error", *["-"] * 9))
            continue
        rows.append(
            (
                r["scenario"],
                r["failed_requests"],
                r["requests"],
                r["min_healthy_backends"],
                r["min_healthy_goal"] or "-",
                r["min_healthy_backends_overall"],
                r["nics_left_out"],
                r["double_approvals"],
                r["approvals_after_not_before"],
                f"{r['arm_writes']} / {r['arm_throttled']}",
                ", ".join(f"{s:.0f}" for s in r["event_to_settled_s"]),
            )
        )
    return table(
        (
            "scenario",
            "failed",
            "requests",
            "min healthy (sidecars deciding)",
            "guard minimum",
            "min healthy (overall)",
            "NICs left out",
            "double approvals",
            "approvals after NotBefore",
            "ARM writes / throttled",
            "event -> settled s",
        ),
        rows,
    )


def render_cost(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            continue
        idle, after = r["idle_cost"], r["after"]
        rows.append(
            (
                r["scenario"],
                idle["rss_mib_median"],
                idle["cpu_s_per_hour_median"],
                after["sidecar_rss_mib_median"],
                after["arm_helpers_at_once_max"],
                after["arm_helper_rss_mib_max"],
                after["cpu_s_per_vm"],
            )
        )
    return table(
        (
            "scenario",
            "idle RSS MiB (median)",
            "idle CPU s/hour",
            "RSS MiB after",
            "ARM helpers at once (max)",
            "helper RSS MiB (max)",
            "CPU s per VM (scenario)",
        ),
        rows,
    )


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Healthy backends over time, one panel per scenario, the guard's minimum dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if "error" not in r and r["healthy_over_time"]]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.6 * len(shown)), squeeze=False)
    for axis, result in zip(axes[:, 0], shown, strict=True):
        origin = result["first_event_s"]
        times = [t - origin for t, _ in result["healthy_over_time"]]
        ups = [up for _, up in result["healthy_over_time"]]
        axis.step(times, ups, where="post", color="tab:blue", label="healthy backends")
        if result["min_healthy_goal"]:
            axis.axhline(
                result["min_healthy_goal"], color="tab:red", linestyle="--", label="guard minimum"
            )
        for event in result["per_event"]:
            start = event["created_wall"] - result["per_event"][0]["created_wall"]
            axis.axvline(start, color="grey", linewidth=0.6)
        axis.set_title(f"{result['scenario']}: {result['title']}", fontsize=9, loc="left")
        axis.set_ylim(-2, max(ups) + 5)
        axis.set_ylabel("backends up")
        axis.legend(loc="lower right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds from the first event (grey: events)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.vms} VMs, short timings")
    parser.add_argument("--vms", type=int, help="fleet size (default 100; quick 10)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    if args.vms:
        plan = replace(plan, vms=args.vms)
    name = "fleet.quick" if args.quick else "fleet"

    earlier = _earlier_scenarios(RESULTS / f"{name}.json", plan)

    def record(results: list[dict[str, Any]]) -> Path:
        """After every scenario: a long run that fails late keeps what it measured. Scenarios
        run before with the same plan stay (a re-run of one replaces only its own entry)."""
        scenarios = {**earlier, **{r["scenario"]: r for r in results}}
        return write_results(
            name,
            {
                "benchmark": "fleet",
                "quick": args.quick,
                "machine": machine(),
                "plan": asdict(plan),
                "vms": plan.vms,
                **totals(list(scenarios.values())),
                "scenarios": scenarios,
            },
        )

    results = run(plan, args.scenario or list(SCENARIOS), args.seed, args.workdir, record)
    print(render(results))
    print()
    print(render_cost(results))
    for r in results:
        if "error" in r:
            print(f"\n{r['scenario']}:\n{r['error']}")
    every = {**earlier, **{r["scenario"]: r for r in results}}
    picture = plot([every[n] for n in SCENARIOS if n in every], RESULTS / f"{name}.png")
    print(f"\nwrote {record(results)}" + (f" and {picture}" if picture else ""))


def _earlier_scenarios(path: Path, plan: Plan) -> dict[str, dict[str, Any]]:
    """The scenarios of the last run, if it had this plan."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(path.read_text())
        if data["plan"] == json.loads(json.dumps(asdict(plan))):
            return {k: v for k, v in data["scenarios"].items() if "error" not in v}
    return {}


def run(
    plan: Plan,
    names: list[str],
    seed: int,
    workdir: Path | None,
    record: Callable[[list[dict[str, Any]]], Path],
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-")))
        for index, name in enumerate(names):
            print(f"{name}: {SCENARIOS[name].title} ({plan.vms} VMs) ...", flush=True)
            began = time.monotonic()
            try:
                result = run_scenario(root / name, plan, SCENARIOS[name], seed + index)
            except Exception:  # recorded; the other scenarios still run
                result = {"scenario": name, "error": traceback.format_exc(limit=6)}
            print(f"{name}: done in {time.monotonic() - began:.0f} s", flush=True)
            results.append(result)
            record(results)
    return results


if __name__ == "__main__":
    main()
