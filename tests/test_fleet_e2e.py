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
