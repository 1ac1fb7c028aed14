"""The fleet gates end to end: three VMs behind the simulator's load balancer, each with its own
`sidecar run`, the load balancer probing every sidecar's /health on its own schedule, and the
sidecars reading the rule's health through ARM (the real SDK, over HTTPS).

web-1's NIC has two IP configurations in pool-http; web-2's and web-3's one each; the seeded
decoy `other-vm`, never probed, counts as up. Capacity is counted per VM: rule-http has four.
web-1 is also alone in pool-admin (rule-admin): the sidecars are told to guard rule-http only
(SIDECAR_LB_RULE_IDS), as a user would for a rule whose capacity matters.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.arm_support import arm_settings, arm_simulator
from tests.support import PATIENCE, Sidecar, Simulator, wait_for

VMS = ("web-1", "web-2", "web-3")
SUBSCRIPTION = "11111111-2222-4333-8444-555555555555"


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    sim = arm_simulator(tmp_path)
    sim.control("POST", "/vms", [{"name": "web-2"}, {"name": "web-3"}])
    # probes every 0.3 s, two in a row flip a backend: the load balancer reacts in about 1 s
    sim.control("PATCH", "/load-balancers/lb-web/probes/probe-http", {"interval": 0.3})
    yield sim
    sim.close()


class Fleet:
    def __init__(self, simulator: Simulator, workdir: Path) -> None:
        self.simulator = simulator
        self.workdir = workdir
        self.sidecars: dict[str, Sidecar] = {}

    def start(self, vm: str, **settings: str) -> Sidecar:
        home = self.workdir / vm
        home.mkdir(exist_ok=True)
        rule_http = (
            f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-sim/providers/Microsoft.Network"
            "/loadBalancers/lb-web/loadBalancingRules/rule-http"
        )
        variables = {
            "NO_PROXY": "localhost",
            "SIDECAR_LB_RULE_IDS": rule_http,
            "SIDECAR_IMDS_URL": f"{self.simulator.imds_url}/vms/{vm}",
            "SIDECAR_STATE_FILE": str(home / "state.json"),
            **{f"SIDECAR_{k.upper()}": v for k, v in arm_settings(self.simulator).items() if v},
            **{f"SIDECAR_{k.upper()}": v for k, v in settings.items()},
        }
        sidecar = Sidecar(home, variables)
        self.simulator.control("PUT", f"/vms/{vm}/ports", {"8080": sidecar.port})
        self.sidecars[vm] = sidecar
        return sidecar

    def close(self) -> None:
        for sidecar in self.sidecars.values():
            sidecar.close()


@pytest.fixture
def fleet(simulator: Simulator, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(simulator, tmp_path)
    yield fleet
    fleet.close()


def rule(simulator: Simulator) -> dict[str, Any]:
    lb = simulator.control("GET", "/load-balancers/lb-web")
    found: dict[str, Any] = next(r for r in lb["rules"] if r["name"] == "rule-http")
    return found


def up_vms(simulator: Simulator) -> set[str]:
    """Which of our three VMs rule-http has up."""
    return {b["vm"] for b in rule(simulator)["backends"] if b["state"] == "Up"} & set(VMS)


def phase(sidecar: Sidecar, event_id: str) -> str | None:
    return next((e["phase"] for e in sidecar.status()["events"] if e["id"] == event_id), None)


def test_the_guard_lets_one_vm_go_and_holds_the_others(simulator: Simulator, fleet: Fleet) -> None:
    for vm in VMS:
        fleet.start(vm, min_healthy_backends="3", approve="never", min_drain_seconds="1")
    wait_for(lambda: up_vms(simulator) == set(VMS), "the load balancer to see all three up")

    event = simulator.add_event(type="Reboot", resources=list(VMS), not_before_in=600)
    wait_for(lambda: up_vms(simulator) == {"web-2", "web-3"}, "web-1 out of rotation")
    first, second, third = (fleet.sidecars[vm] for vm in VMS)
    assert phase(first, event["EventId"]) == "waiting"  # draining, left to the platform
    for held in (second, third):
        assert phase(held, event["EventId"]) == "held"
        assert held.probe().status == 200
    until = time.monotonic() + 3  # several checks of the guard: nobody else leaves
    while time.monotonic() < until:
        assert up_vms(simulator) == {"web-2", "web-3"}
        time.sleep(0.1)
    # the guard reads again (with back-off) and, with web-1 gone, still holds the others:
    # web-2, web-3 and other-vm make the minimum of 3, with no room to spare
    wait_for(
        lambda: second.status()["capacity"]["rules"][0]["up"] == 3,
        "web-2's guard to read the rule with web-1 out",
    )
    assert second.status()["capacity"]["holding"]
    assert phase(second, event["EventId"]) == "held" and up_vms(simulator) == {"web-2", "web-3"}

    simulator.control("DELETE", f"/events/{event['EventId']}")
    wait_for(lambda: up_vms(simulator) == set(VMS), "all back")


def test_a_held_vm_leaves_once_another_is_back(simulator: Simulator, fleet: Fleet) -> None:
    for vm in VMS:
        fleet.start(vm, min_healthy_backends="3", approve="never", min_drain_seconds="1")
    wait_for(lambda: up_vms(simulator) == set(VMS), "the load balancer to see all three up")
    walk_1 = simulator.add_event(type="Reboot", resources=["web-1"], not_before_in=600)
    wait_for(lambda: up_vms(simulator) == {"web-2", "web-3"}, "web-1 out")
    walk_2 = simulator.add_event(type="Reboot", resources=["web-2"], not_before_in=600)
    web2 = fleet.sidecars["web-2"]
    wait_for(lambda: phase(web2, walk_2["EventId"]) == "held", "web-2 held: one spare only")
    web2.wait_polls(8)
    assert phase(web2, walk_2["EventId"]) == "held"

    simulator.control("DELETE", f"/events/{walk_1['EventId']}")  # web-1's maintenance is over
    wait_for(lambda: up_vms(simulator) == {"web-1", "web-3"}, "web-2 out once web-1 is back")
    assert phase(web2, walk_2["EventId"]) == "waiting"


def test_the_guard_never_holds_past_the_last_moment_to_drain(
    simulator: Simulator, fleet: Fleet
) -> None:
    for vm in VMS:
        fleet.start(
            vm,
            min_healthy_backends="4",  # nobody may leave
            approve="never",
            min_drain_seconds="4",
            deadline_margin_seconds="1",
        )
    wait_for(lambda: up_vms(simulator) == set(VMS), "all three up")
    event = simulator.add_event(type="Reboot", resources=["web-2"], not_before_in=12)
    web2 = fleet.sidecars["web-2"]
    wait_for(lambda: phase(web2, event["EventId"]) == "held", "web-2 held")
    # NotBefore in 12 s, margin 1 s, minimum drain 4 s: the drain starts 7 s after the event
    wait_for(lambda: web2.probe_code() == 503, "the drain anyway", timeout=PATIENCE)
    entry = next(e for e in web2.status()["events"] if e["id"] == event["EventId"])
    assert entry["phase"] == "waiting"


def test_peer_aware_approval_waits_until_every_vm_named_is_out(
    simulator: Simulator, fleet: Fleet
) -> None:
    for vm in ("web-1", "web-2"):
        fleet.start(vm, peer_aware_approval="true", drain_seconds="1", min_drain_seconds="0")
    fleet.start("web-3", peer_aware_approval="true", drain_seconds="1", min_drain_seconds="0")
    web3 = fleet.sidecars.pop("web-3")
    web3.close()  # web-3 answers no probe now: the load balancer marks it down...
    simulator.control("PUT", "/vms/web-3/ports", {})  # ...unless nobody probes it: then up
    wait_for(lambda: up_vms(simulator) == set(VMS), "all three in rotation")

    event = simulator.add_event(type="Reboot", resources=list(VMS), not_before_in=600)
    leader = fleet.sidecars["web-1"]
    wait_for(lambda: up_vms(simulator) == {"web-3"}, "web-1 and web-2 out")
    leader.wait_polls(12)  # 3 s: three drain periods
    assert simulator.approvals_of(event["EventId"]) == [], "approved while web-3 serves"
    assert leader.status()["approval_waits_for"] == ["peers"]
    # the gate reads the rule again (with back-off): web-1 and web-2 out, web-3 still in
    wait_for(lambda: leader.status()["peers"]["still_in"] == ["web-3"], "the gate's next read")
    assert simulator.approvals_of(event["EventId"]) == [], "approved while web-3 serves"

    fleet.start("web-3", peer_aware_approval="true", drain_seconds="1", min_drain_seconds="0")
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval once all are out")
    assert len(simulator.approvals_of(event["EventId"])) == 1


def test_a_held_vm_the_platform_rebooted_serves_again_and_never_drains_for_it(
    simulator: Simulator, fleet: Fleet, tmp_path: Path
) -> None:
    """Found by the fleet rehearsal: a VM the guard held was rebooted by the platform (the
    event named every VM); its restarted sidecar had no record of the event from before the
    start, so it drained (NIC out, hook called) for an impact already over, and stayed out until
    the event left the document. Held events are now recorded with the boot id they were seen
    in."""
    boot_ids = {vm: tmp_path / f"{vm}-boot_id" for vm in VMS}
    for vm in VMS:
        boot_ids[vm].write_text(str(uuid.uuid4()))
        fleet.start(
            vm,
            min_healthy_backends="3",
            approve="never",
            return_after="impact",
            boot_id_file=str(boot_ids[vm]),
        )
    wait_for(lambda: up_vms(simulator) == set(VMS), "all three up")
    event = simulator.add_event(
        type="Reboot", resources=list(VMS), not_before_in=600, impact_seconds=2, linger=600
    )
    web2 = fleet.sidecars["web-2"]
    wait_for(lambda: phase(web2, event["EventId"]) == "held", "web-2 held")
    puts_before = seen_puts(simulator, "web-2-nic")

    simulator.control("POST", f"/events/{event['EventId']}/start")  # the platform goes ahead
    wait_for(lambda: impact(simulator, event["EventId"]) == "in-progress", "the impact")
    web2.process.kill()  # web-2 goes down with the reboot...
    boot_ids["web-2"].write_text(str(uuid.uuid4()))
    wait_for(lambda: impact(simulator, event["EventId"]) == "over", "the impact's end")
    web2.restart()  # ...and boots

    web2.wait_probe(200)
    assert phase(web2, event["EventId"]) == "over"
    web2.wait_polls(8)
    assert web2.probe().status == 200 and phase(web2, event["EventId"]) == "over"
    assert seen_puts(simulator, "web-2-nic") == puts_before, "web-2's NIC was written"


def test_a_held_vm_restarted_alone_stays_held(simulator: Simulator, fleet: Fleet) -> None:
    """A restart of the sidecar (same boot) while the guard holds its VM changes nothing: the
    gates are asked before the first decision, so the held event does not start draining."""
    for vm in VMS:
        fleet.start(vm, min_healthy_backends="3", approve="never", min_drain_seconds="1")
    wait_for(lambda: up_vms(simulator) == set(VMS), "all three up")
    event = simulator.add_event(type="Reboot", resources=list(VMS), not_before_in=600)
    web2 = fleet.sidecars["web-2"]
    wait_for(lambda: phase(web2, event["EventId"]) == "held", "web-2 held")
    wait_for(lambda: up_vms(simulator) == {"web-2", "web-3"}, "web-1 out")

    web2.restart()
    web2.wait_probe(200)
    for _ in range(12):  # three seconds of polls and guard checks: still held, still serving
        web2.wait_polls(1)
        assert phase(web2, event["EventId"]) == "held" and web2.probe().status == 200
    assert up_vms(simulator) == {"web-2", "web-3"}


def impact(simulator: Simulator, event_id: str) -> str | None:
    view = next((e for e in simulator.events() if e["EventId"] == event_id), None)
    return None if view is None else str(view["impact"])


def seen_puts(simulator: Simulator, nic_name: str) -> int:
    log = simulator.control("GET", "/requests")["log"]
    return sum(1 for r in log if r["method"] == "PUT" and r["path"].endswith(f"/{nic_name}"))
