"""Test support for backend-pool removal: the simulator with ARM, and readers of its NICs.

The default simulated world: VM web-1 whose NIC web-1-nic has ipconfig1 in pool-http and
pool-admin (plus a NAT rule, an ASG, tags...) and ipconfig2 in pool-http; decoy NICs of another
VM and of no VM sit in the same resource group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support import Sidecar, SidecarFactory, Simulator, wait_for


def arm_simulator(workdir: Path) -> Simulator:
    """The simulator with ARM on HTTPS and fast long-running operations."""
    return Simulator(
        workdir, "--arm-port", "0", "--arm-retry-after", "0.2", "--started-seconds", "2"
    )


NIC = "web-1-nic"


def arm_settings(simulator: Simulator, **more: str) -> dict[str, str]:
    assert simulator.arm_url and simulator.ca_file
    return {
        "vm_name": "",  # from instance metadata, as in production
        "arm_enabled": "true",
        # The dead HTTPS proxy of every child applies to ARM (which honours proxy variables)
        # except for localhost; IMDS, at 127.0.0.1, must reach us without any proxy.
        "arm_url": simulator.arm_url.replace("127.0.0.1", "localhost"),
        "arm_ca_bundle": simulator.ca_file,
        "min_drain_seconds": "0",
        **more,
    }


def nic(simulator: Simulator, name: str = NIC) -> dict[str, Any]:
    document: dict[str, Any] = simulator.control("GET", f"/nics/{name}")
    return document


def pools(simulator: Simulator, name: str = NIC) -> dict[str, list[str]]:
    """Pool names per IP configuration, in order."""
    result = {}
    for config in nic(simulator, name)["properties"]["ipConfigurations"]:
        members = config["properties"].get("loadBalancerBackendAddressPools", [])
        result[config["name"]] = [member["id"].rsplit("/", 1)[-1] for member in members]
    return result


ORIGINAL = {"ipconfig1": ["pool-http", "pool-admin"], "ipconfig2": ["pool-http"]}
EMPTY = {"ipconfig1": [], "ipconfig2": []}


def pool_status(sidecar: Sidecar) -> dict[str, Any]:
    status: dict[str, Any] = sidecar.status()["pools"]
    return status


def puts(simulator: Simulator) -> list[dict[str, Any]]:
    log = simulator.control("GET", "/requests")["log"]
    return [entry for entry in log if entry["kind"] == "arm-put"]


def saved_removals(workdir: Path) -> dict[str, Any]:
    try:
        document = json.loads((workdir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    removed: dict[str, Any] = document.get("pools", {}).get("removed", {})
    return removed


def drain_with_the_nic_out(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> tuple[Sidecar, dict[str, Any]]:
    """A sidecar in a long drain for a Reboot, its NIC already out of its pools."""
    sidecar = start_arm_sidecar(drain_seconds="600")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: pool_status(sidecar)["removal_done"], "the removal")
    return sidecar, event


def seen(simulator: Simulator, kind: str) -> bool:
    """Whether a request of this kind reached the simulator (a hung one has no status yet)."""
    return any(entry["kind"] == kind for entry in simulator.control("GET", "/requests")["log"])
