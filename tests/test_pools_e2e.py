"""Backend-pool removal end to end: `sidecar run` with SIDECAR_ARM_ENABLED against the simulator's
IMDS (tokens included) and ARM (HTTPS), through the real azure-identity and azure-mgmt-network.

The default simulated world: VM web-1 whose NIC web-1-nic has ipconfig1 in pool-http and
pool-admin (plus a NAT rule, an ASG, tags...) and ipconfig2 in pool-http; decoy NICs of another
VM and of no VM sit in the same resource group.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.lab import without_pools
from sidecar.pools import RESTORE_BACKOFF_MAX
from sidecar.simulator.throttle import READS, WRITES, operation_of
from tests.arm_support import (
    EMPTY,
    NIC,
    ORIGINAL,
    arm_simulator,
    drain_with_the_nic_out,
    nic,
    pool_status,
    pools,
    puts,
    saved_removals,
    seen,
)
from tests.conftest import SidecarFactory
from tests.receiver import Receiver
from tests.support import PATIENCE, Sidecar, Simulator, wait_for
from tests.test_drain_e2e import epoch


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    """Overrides conftest's: this one also serves ARM."""
    sim = arm_simulator(tmp_path)
    yield sim
    sim.close()


def test_drain_takes_the_nic_out_and_puts_back_exactly_its_pools(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    before = {name: nic(simulator, name) for name in (NIC, "other-vm-nic", f"{NIC}-orphan")}
    sidecar = start_arm_sidecar(drain_seconds="1", log_level="DEBUG")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    sidecar.wait_probe(503)
    wait_for(lambda: pools(simulator) == EMPTY, "the NIC to leave every pool")
    assert pool_status(sidecar)["nics"] == [before[NIC]["id"]], "picked the wrong NIC"
    assert without_pools(nic(simulator)) == without_pools(before[NIC]), "touched more than pools"

    approval = wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    removal = simulator.control("GET", "/operations")[0]
    assert removal["status"] == "Succeeded"
    assert epoch(removal["finished_at"]) <= epoch(approval[0]["at"]), "approved before removal"
    sidecar.wait_probe(200)
    assert pools(simulator) == ORIGINAL
    assert without_pools(nic(simulator)) == without_pools(before[NIC])
    for decoy in ("other-vm-nic", f"{NIC}-orphan"):
        assert nic(simulator, decoy) == before[decoy], f"{decoy} was changed"
    assert pool_status(sidecar)["removed"] == {}
    assert all(put["status"] == 200 for put in puts(simulator))
    log = sidecar.process.output()
    assert "eyJ" not in log, "a token reached the log"  # every JWT opens with "eyJ"


def test_pool_filter_leaves_only_the_chosen_pools(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    admin = next(
        pool
        for pool in nic(simulator)["properties"]["ipConfigurations"][0]["properties"][
            "loadBalancerBackendAddressPools"
        ]
        if pool["id"].endswith("/pool-admin")
    )["id"]
    sidecar = start_arm_sidecar(drain_seconds="600", backend_pool_ids=admin.upper())
    sidecar.wait_probe(200)
    simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: pool_status(sidecar)["removal_done"], "the removal")
    assert pools(simulator) == {"ipconfig1": ["pool-http"], "ipconfig2": ["pool-http"]}
    assert pool_status(sidecar)["removed"] == {nic(simulator)["id"]: {"ipconfig1": [admin]}}


@pytest.mark.parametrize(
    ("fault", "nic_out_at_kill"),
    [
        ({"target": "arm-put", "kind": "hang"}, False),  # recorded, PUT not yet applied
        # PUT applied; ARM takes 8 s to finish it, and nothing is written before it did
        ({"target": "arm-operation", "kind": "slow", "seconds": 8}, True),
    ],
    ids=["between state write and PUT", "during the long-running operation"],
)
def test_sigkill_mid_removal_ends_with_the_nic_back_in_its_pools(
    simulator: Simulator,
    start_arm_sidecar: SidecarFactory,
    tmp_path: Path,
    fault: dict[str, Any],
    nic_out_at_kill: bool,
) -> None:
    sidecar = start_arm_sidecar(drain_seconds="600")
    sidecar.wait_probe(200)
    simulator.fault(**fault)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: saved_removals(tmp_path), "the removal plan in the state file")
    wait_for(lambda: seen(simulator, fault["target"]), f"a {fault['target']} request")
    sidecar.process.kill()
    assert (pools(simulator) == EMPTY) is nic_out_at_kill

    simulator.clear_faults()
    simulator.control("DELETE", f"/events/{event['EventId']}")
    sidecar.restart()
    sidecar.wait_probe(200)
    # the restarted sidecar meets the NIC still Updating, and retries with its restore back-off
    # (jittered, doubling up to RESTORE_BACKOFF_MAX) until ARM has finished the operation
    wait_for(
        lambda: pools(simulator) == ORIGINAL,
        "the NIC back once ARM is done",
        timeout=PATIENCE + RESTORE_BACKOFF_MAX,
    )
    wait_for(lambda: saved_removals(tmp_path) == {}, "the record cleared")
    assert "out of backend pools" in sidecar.process.output()


def test_sigkill_between_removal_and_approval_keeps_the_nic_out_until_the_drain_ends(
    simulator: Simulator, start_arm_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    sidecar, event = drain_with_the_nic_out(simulator, start_arm_sidecar)
    sidecar.process.kill()

    sidecar.restart()  # the event is still pending: the NIC stays out, the probe down
    sidecar.wait_phase(event["EventId"], "draining")
    wait_for(lambda: pool_status(sidecar)["removal_done"], "the removal to be confirmed")
    assert pools(simulator) == EMPTY
    assert sidecar.probe().status == 503

    simulator.control("DELETE", f"/events/{event['EventId']}")
    sidecar.wait_probe(200)
    assert pools(simulator) == ORIGINAL


def test_sigkill_during_the_restore_ends_with_the_nic_back(
    simulator: Simulator, start_arm_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    sidecar, event = drain_with_the_nic_out(simulator, start_arm_sidecar)
    simulator.fault(target="arm-put", kind="hang")
    simulator.control("DELETE", "/requests")
    simulator.control("DELETE", f"/events/{event['EventId']}")
    wait_for(lambda: seen(simulator, "arm-put"), "the restore PUT in flight")
    assert sidecar.probe().status == 503, "served before the first restore attempt ended"
    sidecar.process.kill()

    simulator.clear_faults()
    sidecar.restart()
    sidecar.wait_probe(200)
    # the first restore attempt may fail (the killed PUT can still land meanwhile): retried
    wait_for(lambda: pools(simulator) == ORIGINAL, f"the NIC back:\n{sidecar.process.output()}")
    wait_for(lambda: saved_removals(tmp_path) == {}, "the record cleared")


def test_missing_permission_is_said_once_and_the_drain_goes_on_probe_only(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    write = "Microsoft.Network/networkInterfaces/write"
    simulator.control("PUT", "/permissions", {"deny": [{"action": write}]})
    sidecar = start_arm_sidecar(drain_seconds="1")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    sidecar.wait_probe(503)
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the probe-only drain's approval")
    sidecar.wait_probe(200)
    assert pools(simulator) == ORIGINAL
    log = sidecar.process.output()
    assert log.count("pool removal off for this drain") == 1, log
    assert f"grant {write} to this VM's managed identity" in log
    assert [put["status"] for put in puts(simulator)] == [403]


def test_concurrent_change_gets_412_and_is_redone_on_the_fresh_nic(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    sidecar = start_arm_sidecar(drain_seconds="600")
    sidecar.wait_probe(200)
    simulator.fault(target="arm-put", kind="slow", seconds=3, count=1)
    simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: seen(simulator, "arm-put"), "the first PUT, held for 3 s")
    extra = ["pool-http", "pool-admin", "pool-extra"]  # someone adds a pool meanwhile
    simulator.control("PUT", f"/nics/{NIC}/pools", {"ip_configurations": {"ipconfig1": extra}})

    wait_for(lambda: pool_status(sidecar)["removal_done"], "the removal")
    assert [put["status"] for put in puts(simulator)] == [412, 200]
    assert pools(simulator) == EMPTY
    recorded = pool_status(sidecar)["removed"][nic(simulator)["id"]]["ipconfig1"]
    assert [pool.rsplit("/", 1)[-1] for pool in recorded] == extra


def test_failed_restore_is_retried_loudly_until_it_succeeds(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    join = "Microsoft.Network/loadBalancers/backendAddressPools/join/action"
    sidecar, event = drain_with_the_nic_out(simulator, start_arm_sidecar)
    simulator.control("PUT", "/permissions", {"deny": [{"action": join}]})
    simulator.control("DELETE", f"/events/{event['EventId']}")

    sidecar.wait_probe(200)  # outside its pools the VM gets no load-balanced traffic anyway
    wait_for(lambda: pool_status(sidecar)["restore_attempts"] >= 2, "two failed restores")
    assert join in pool_status(sidecar)["last_error"]
    assert pools(simulator) == EMPTY
    assert "restore attempt 2 failed" in sidecar.process.output()

    simulator.control("DELETE", "/permissions")
    wait_for(lambda: pools(simulator) == ORIGINAL, "the restore once the role is fixed")
    wait_for(lambda: pool_status(sidecar)["removed"] == {}, "the record to clear")


def test_uniform_scale_set_instance_drains_with_the_probe_only(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    vm = simulator.control(
        "POST", "/vms", {"scale_set": "web-vmss", "instance_id": "3", "orchestration": "Uniform"}
    )
    sidecar = start_arm_sidecar(
        imds_url=f"{simulator.imds_url}/vms/{vm['name']}", drain_seconds="0"
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", resources=[vm["name"]], not_before_in=900)
    wait_for(lambda: pool_status(sidecar)["mode"] == "probe-only", "the scale-set verdict")
    assert "Compute API" in pool_status(sidecar)["note"]
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the probe-only approval")
    assert puts(simulator) == []


def test_vm_without_a_nic_in_its_resource_group_says_what_to_set(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    simulator.control("POST", "/vms", {"name": "bare-vm", "nic": False})
    sidecar = start_arm_sidecar(imds_url=f"{simulator.imds_url}/vms/bare-vm")
    sidecar.wait_probe(200)
    simulator.add_event(type="Reboot", resources=["bare-vm"], not_before_in=900)
    wait_for(lambda: pool_status(sidecar)["mode"] == "probe-only", "the discovery verdict")
    assert "set SIDECAR_NIC_ID" in pool_status(sidecar)["note"]
    assert sidecar.process.output().count("pool removal off") == 1


def test_nic_id_setting_skips_discovery(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    other = nic(simulator, "other-vm-nic")["id"]
    sidecar = start_arm_sidecar(nic_id=other, drain_seconds="600")
    sidecar.wait_probe(200)
    simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: pool_status(sidecar)["removal_done"], "the removal")
    assert pools(simulator, "other-vm-nic") == {"ipconfig1": []}
    assert pools(simulator) == ORIGINAL


def test_the_azure_sdks_live_in_a_helper_only_while_arm_is_needed(
    simulator: Simulator,
    start_arm_sidecar: SidecarFactory,
    start_sidecar: SidecarFactory,
    tmp_path: Path,
) -> None:
    """Found by the fleet's cost per VM: the SDKs are 60 MiB, and a sidecar that loaded them kept
    them for life after its first maintenance. A helper process carries them while ARM is needed
    and stops after SIDECAR_ARM_IDLE_SECONDS without a call."""
    sidecar = start_arm_sidecar(arm_idle_seconds="1", drain_seconds="600")
    sidecar.wait_probe(200)
    wait_for(lambda: pool_status(sidecar)["mode"] == "active", "the NIC found at start-up")
    first = helper(sidecar)["pid"] or 0
    assert first, "a helper found the NIC"
    wait_for(lambda: not helper(sidecar)["running"], "the idle helper to stop")
    wait_for(lambda: not _alive(first), "the helper process to exit, not left behind")

    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: pool_status(sidecar)["removal_done"], "the removal, by a new helper")
    assert pools(simulator) == EMPTY and helper(sidecar)["starts"] >= 2
    simulator.control("DELETE", f"/events/{event['EventId']}")
    sidecar.wait_probe(200)
    assert pools(simulator) == ORIGINAL
    wait_for(lambda: not helper(sidecar)["running"], "the helper to stop after the restore")

    # the sidecar itself never loaded the SDKs: about the size of one without pool removal
    plain = start_sidecar(state_file=str(tmp_path / "plain-state.json"))
    plain.wait_probe(200)
    grown = _rss(sidecar.process.popen.pid) - _rss(plain.process.popen.pid)
    assert grown < 20 * 2**20, f"{grown / 2**20:.1f} MiB more than without pool removal"


def helper(sidecar: Sidecar) -> dict[str, Any]:
    found: dict[str, Any] = sidecar.status()["arm_helper"]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_arm_throttling_is_waited_out_and_the_nic_ends_in_its_pools(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    """ARM's throttling as Azure documents it (429 SubscriptionRequestsThrottled with
    Retry-After, from the simulator's token buckets, squeezed here so that one drain meets
    them): every call waits at least as long as ARM says, and the NIC goes out and back."""
    simulator.control(
        "PATCH",
        "/settings",
        {
            "arm_throttle": {
                "enabled": True,
                "read_bucket": 2,
                "read_refill": 0.5,
                "write_bucket": 1,
                "write_refill": 0.5,
            }
        },
    )
    sidecar = start_arm_sidecar(drain_seconds="1")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval", timeout=PATIENCE)
    assert pools(simulator) == EMPTY, "approval waited for the removal"
    simulator.control("DELETE", f"/events/{event['EventId']}")
    wait_for(lambda: pools(simulator) == ORIGINAL, "the restore", timeout=PATIENCE)
    sidecar.wait_probe(200)

    requests = simulator.control("GET", "/requests")
    assert requests["throttled"]["total"] > 0, "the buckets never ran dry: nothing was shown"
    arm = [r for r in requests["log"] if r["kind"].startswith("arm")]
    for kind in (READS, WRITES):
        calls = [r for r in arm if operation_of(r["method"]) == kind]
        for refused, after in itertools.pairwise(calls):
            if refused["throttled"]:  # Retry-After is at least one second
                assert after["t"] - refused["t"] >= 0.95, (kind, refused, after)


def test_arm_server_errors_are_retried_with_back_off(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    sidecar = start_arm_sidecar(drain_seconds="600")
    sidecar.wait_probe(200)
    simulator.fault(target="arm-put", kind="status", status=503, count=4)
    simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: pool_status(sidecar)["removal_done"], "the removal despite four 503s")
    statuses = [put["status"] for put in puts(simulator)]
    assert statuses == [503, 503, 503, 503, 200]
    assert pools(simulator) == EMPTY


def test_user_assigned_identity_is_asked_for_by_client_id(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    client_id = "0b8c9f6e-5d4a-4e3b-9a21-7c6d5e4f3a2b"
    sidecar = start_arm_sidecar(managed_identity_client_id=client_id)
    sidecar.wait_probe(200)

    def token_requests() -> list[str]:
        log = simulator.control("GET", "/requests")["log"]
        return [entry["path"] for entry in log if entry["kind"] == "token"]

    tokens = wait_for(token_requests, "a token request")  # the start-up check of the records
    assert all(f"client_id={client_id}" in path for path in tokens), tokens


def test_drain_hook_comes_after_the_nic_left_its_pools(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    receiver = Receiver()
    try:
        simulator.fault(target="arm-operation", kind="slow", seconds=3)  # a slow removal
        sidecar = start_arm_sidecar(
            drain_seconds="1", min_drain_seconds="0", drain_hook_url=receiver.url("/drain")
        )
        sidecar.wait_probe(200)
        event = simulator.add_event(type="Reboot", not_before_in=900)
        wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
        removal = simulator.control("GET", "/operations")[0]
        [call] = receiver.calls("/drain")
        assert call.wall >= epoch(removal["finished_at"]), "new flows could still arrive"
    finally:
        receiver.close()


def test_a_linked_check_names_the_join_that_is_missing(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    """ARM checks the join action on every resource a NIC PUT links, changed or not: without
    the subnet's, removal is refused, and the log must name that action, not the NIC write
    ARM's message mentions first."""
    join = "Microsoft.Network/virtualNetworks/subnets/join/action"
    simulator.control("PUT", "/permissions", {"deny": [{"action": join}]})
    sidecar = start_arm_sidecar(drain_seconds="1")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the probe-only approval")
    log = sidecar.process.output()
    assert f"grant {join} to this VM's managed identity" in log, log
    assert "grant Microsoft.Network/networkInterfaces/write" not in log


def appgw_pools(simulator: Simulator) -> dict[str, list[str]]:
    result = {}
    for config in nic(simulator)["properties"]["ipConfigurations"]:
        members = config["properties"].get("applicationGatewayBackendAddressPools", [])
        result[config["name"]] = [member["id"].rsplit("/", 1)[-1] for member in members]
    return result


def test_application_gateway_pools_leave_and_come_back_too(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    simulator.control("PUT", f"/nics/{NIC}/appgw-pools", {"pools": ["pool-app"]})
    sidecar = start_arm_sidecar(drain_seconds="600")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: pool_status(sidecar)["removal_done"], "the removal")
    assert pools(simulator) == EMPTY
    assert appgw_pools(simulator) == {"ipconfig1": [], "ipconfig2": []}
    assert "agw:agw-web/pool-app" in nic(simulator)["tags"]["drain-sidecar-removed"]

    simulator.control("DELETE", f"/events/{event['EventId']}")
    sidecar.wait_probe(200)
    assert pools(simulator) == ORIGINAL
    assert appgw_pools(simulator) == {"ipconfig1": ["pool-app"], "ipconfig2": []}
    assert "drain-sidecar-removed" not in nic(simulator)["tags"]
