"""The simulator's control API over loopback HTTP: events, faults, request counts, VMs,
NICs, permissions, settings and reset."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.simulator_helpers import (
    SE_VERSION,
    FakeClock,
    Reply,
    RunningSimulator,
    wait_for,
)

SE_PATH = f"/metadata/scheduledevents?api-version={SE_VERSION}"
RG_ID = "/subscriptions/11111111-2222-4333-8444-555555555555/resourceGroups/RG-SIM"


def test_index_describes_the_api(sim: RunningSimulator) -> None:
    index = sim.control("GET", "").json()
    paths = {(e["method"], e["path"]) for e in index["endpoints"]}
    assert ("POST", "/control/faults") in paths
    assert ("POST", "/control/reset") in paths
    assert index["urls"]["imds_url"] == sim.urls.imds_url
    assert index["environment"]["SIDECAR_IMDS_URL"] == sim.urls.imds_url
    assert sim.control("GET", "/nothing").status == 404
    assert sim.control("PUT", "/events").status == 405


# Events --------------------------------------------------------------------------------------


def test_adding_events_with_defaults_and_extras(sim: RunningSimulator, clock: FakeClock) -> None:
    reply = sim.control(
        "POST",
        "/events",
        [
            {"type": "Preempt"},
            {"type": "Hibernate", "extra": {"NewField": {"x": 1}}, "event_id": "my-id"},
        ],
    )
    assert reply.status == 201
    preempt, odd = reply.json()
    assert preempt["EventType"] == "Preempt" and preempt["Resources"] == ["web-1"]
    assert preempt["EventSource"] == "Platform" and preempt["DurationInSeconds"] == -1
    assert odd["EventId"] == "my-id"
    document = sim.events()
    assert document["DocumentIncarnation"] == 2
    assert document["Events"][1]["NewField"] == {"x": 1}
    assert document["Events"][1]["EventType"] == "Hibernate"
    listed = sim.control("GET", "/events").json()
    assert listed["DocumentIncarnation"] == 2
    assert [e["EventId"] for e in listed["events"]] == [preempt["EventId"], "my-id"]
    # Preempt's notice is 30 s, the others' 15 min.
    from sidecar.simulator.times import parse_time

    assert abs(parse_time(preempt["not_before"]) - (clock.now + 30)) < 0.01
    assert abs(parse_time(odd["not_before"]) - (clock.now + 900)) < 0.01


@pytest.mark.parametrize(
    "body",
    [
        {"type": ""},
        {"tpye": "Reboot"},
        {"type": "Reboot", "status": "Completed"},
        {"type": "Reboot", "resources": "web-1"},
        {"type": "Reboot", "not_before": "tomorrow"},
        {"type": "Reboot", "not_before": "Mon, 19 Sep 2016 18:29:47 GMT", "not_before_in": 5},
        {"type": "Reboot", "duration": "long"},
        {"type": "Reboot", "extra": []},
        [],
    ],
)
def test_bad_event_requests(sim: RunningSimulator, body: object) -> None:
    reply = sim.control("POST", "/events", body)
    assert reply.status == 400
    assert "error" in reply.json()
    assert sim.events()["Events"] == []


def test_event_ids_are_unique(sim: RunningSimulator) -> None:
    sim.add_event(type="Reboot", event_id="one")
    assert sim.control("POST", "/events", {"type": "Reboot", "event_id": "one"}).status == 409


def test_absolute_not_before_accepts_both_forms(sim: RunningSimulator) -> None:
    sim.add_event(type="Reboot", not_before="Mon, 19 Sep 2039 18:29:47 GMT")
    sim.add_event(type="Reboot", not_before="2039-09-19T18:29:47Z")
    first, second = sim.events()["Events"]
    assert first["NotBefore"] == second["NotBefore"] == "Mon, 19 Sep 2039 18:29:47 GMT"


def test_clearing_events(sim: RunningSimulator) -> None:
    sim.add_event(type="Reboot")
    sim.add_event(type="Freeze")
    assert sim.control("DELETE", "/events").json() == {"cancelled": 2}
    assert sim.events() == {"DocumentIncarnation": 3, "Events": []}


# Faults --------------------------------------------------------------------------------------


def add_fault(sim: RunningSimulator, **fields: object) -> str:
    reply = sim.control("POST", "/faults", fields)
    assert reply.status == 201, reply.text
    return str(reply.json()["id"])


def test_status_fault_with_count_and_retry_after(sim: RunningSimulator) -> None:
    add_fault(sim, target="scheduledevents", kind="status", status=503, retry_after=2, count=2)
    for _ in range(2):
        reply = sim.imds(SE_PATH)
        assert reply.status == 503
        assert reply.headers["Retry-After"] == "2"
        assert "error" in reply.json()
    assert sim.imds(SE_PATH).status == 200
    assert sim.control("GET", "/faults").json() == []


def test_status_fault_shapes_follow_the_api(sim: RunningSimulator) -> None:
    add_fault(sim, target="imds", kind="status", status=429)
    token = sim.imds("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r")
    assert token.status == 429
    assert token.json()["error"] == "too_many_requests"
    assert sim.imds("/metadata/instance/compute?api-version=2021-02-01").status == 429
    # the control API is never faulted
    assert sim.control("GET", "/faults").status == 200


def test_fault_targets_one_kind_and_one_vm(sim: RunningSimulator) -> None:
    add_fault(sim, target="approve", kind="status", status=500, vm="web-2")
    created = sim.add_event(type="Reboot", resources=["web-1", "web-2"])
    assert sim.events(vm="web-2")["Events"]  # GETs are not covered
    assert sim.approve(created["EventId"], vm="web-2").status == 500
    assert sim.events()["Events"][0]["EventStatus"] == "Scheduled"  # no side effect
    assert sim.approve(created["EventId"]).status == 200


def test_malformed_not_json(sim: RunningSimulator) -> None:
    add_fault(sim, target="scheduledevents", kind="malformed", variant="not-json")
    sim.add_event(type="Reboot")
    reply = sim.imds(SE_PATH)
    assert reply.status == 200
    with pytest.raises(ValueError):
        json.loads(reply.body)


def test_malformed_not_object(sim: RunningSimulator) -> None:
    add_fault(sim, target="compute", kind="malformed", variant="not-object")
    reply = sim.imds("/metadata/instance/compute?api-version=2021-02-01")
    assert reply.status == 200
    assert isinstance(reply.json(), list)


def test_malformed_bad_event(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot")
    add_fault(sim, target="scheduledevents", kind="malformed", variant="bad-event", count=1)
    (bad,) = sim.imds(SE_PATH).json()["Events"]
    assert "EventId" not in bad
    assert bad["Resources"] == "web-1"
    assert sim.events()["Events"][0]["EventId"] == created["EventId"]


def test_slow_fault_delays_then_answers(sim: RunningSimulator) -> None:
    add_fault(sim, target="scheduledevents", kind="slow", seconds=0.5, count=1)
    started = time.monotonic()
    reply = sim.imds(SE_PATH)
    assert reply.status == 200
    assert time.monotonic() - started >= 0.45
    log = sim.control("GET", "/requests").json()["log"]
    assert log[-1]["fault"] is not None and log[-1]["status"] == 200


def test_hang_holds_until_the_fault_is_cleared(sim: RunningSimulator) -> None:
    fault_id = add_fault(sim, target="scheduledevents", kind="hang")
    with pytest.raises(socket.timeout):
        sim.imds(SE_PATH, timeout=0.3)
    replies: list[Reply] = []
    waiter = threading.Thread(target=lambda: replies.append(sim.imds(SE_PATH, timeout=30)))
    waiter.start()
    wait_for(lambda: sim.control("GET", "/faults").json()[0]["hits"] == 2)
    assert waiter.is_alive()
    assert sim.control("DELETE", f"/faults/{fault_id}").status == 200
    waiter.join(timeout=30)
    assert [reply.status for reply in replies] == [200]
    assert sim.control("DELETE", f"/faults/{fault_id}").status == 404


def test_used_up_hang_keeps_holding_until_deleted(sim: RunningSimulator) -> None:
    fault_id = add_fault(sim, target="scheduledevents", kind="hang", count=1)
    replies: list[Reply] = []
    waiter = threading.Thread(target=lambda: replies.append(sim.imds(SE_PATH, timeout=30)))
    waiter.start()
    wait_for(lambda: sim.control("GET", "/faults").json() == [])
    assert sim.imds(SE_PATH).status == 200  # the next request is not held
    assert waiter.is_alive()
    sim.control("DELETE", f"/faults/{fault_id}")
    waiter.join(timeout=30)
    assert [reply.status for reply in replies] == [200]


@pytest.mark.parametrize(
    "body",
    [
        {"target": "everything", "kind": "status"},
        {"target": "imds", "kind": "explode"},
        {"target": "imds", "kind": "slow"},
        {"target": "imds", "kind": "status", "status": 200},
        {"target": "imds", "kind": "malformed", "variant": "garbled"},
        {"target": "imds", "kind": "status", "count": 0},
        {"target": "scheduledevents", "kind": "failed"},
    ],
)
def test_bad_fault_requests(sim: RunningSimulator, body: dict[str, object]) -> None:
    assert sim.control("POST", "/faults", body).status == 400


# Requests ------------------------------------------------------------------------------------


def test_requests_are_counted_by_kind(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot")
    assert sim.control("DELETE", "/requests").status == 200
    for _ in range(3):
        sim.events()
    sim.events(vm="web-2")
    sim.approve(created["EventId"])
    sim.imds("/metadata/instance/compute?api-version=2021-02-01")
    sim.imds("/metadata/instance?api-version=2021-02-01")
    sim.token()
    sim.imds(SE_PATH, headers={})  # refused, but still an IMDS request
    counts = sim.control("GET", "/requests").json()
    assert counts["counts"] == {
        "GET compute": 1,
        "GET instance": 1,
        "GET scheduledevents": 5,
        "GET token": 1,
        "POST approve": 1,
    }
    assert counts["totals"] == {"all": 9, "imds": 9, "arm": 0}
    assert counts["by_vm"] == {"web-1": 8, "web-2": 1}
    statuses = [(entry["kind"], entry["status"]) for entry in counts["log"]]
    assert statuses[-1] == ("scheduledevents", 400)
    assert all(entry["remote"] == "127.0.0.1" for entry in counts["log"])
    assert len(sim.control("GET", "/requests?limit=2").json()["log"]) == 2


# VMs, NICs, permissions, settings ------------------------------------------------------------


def test_adding_vms(sim: RunningSimulator) -> None:
    reply = sim.control("POST", "/vms", {"name": "db-1", "pools": ["pool-admin"]})
    assert reply.status == 201
    assert reply.json()["nics"][0].endswith("/networkInterfaces/db-1-nic")
    (nic,) = [n for n in sim.control("GET", "/nics").json() if n["name"] == "db-1-nic"]
    assert nic["ip_configurations"][0]["pools"][0].endswith("/backendAddressPools/pool-admin")
    assert nic["vm_id"].endswith(
        "/resourceGroups/RG-SIM/providers/Microsoft.Compute/virtualMachines/db-1"
    )
    assert sim.control("POST", "/vms", {"name": "DB-1"}).status == 409
    assert sim.control("POST", "/vms", {"name": "x", "orchestration": "Uniform"}).status == 400
    uniform = sim.control("POST", "/vms", {"scale_set": "ss", "instance_id": "0"}).json()
    assert (
        "/virtualMachineScaleSets/ss/virtualMachines/0/networkInterfaces/ss-nic"
        in uniform["nics"][0]
    )


def test_default_nics(sim: RunningSimulator) -> None:
    nics = {nic["name"]: nic for nic in sim.control("GET", "/nics").json()}
    assert set(nics) == {"web-1-nic", "other-vm-nic", "web-1-nic-orphan"}
    web = nics["web-1-nic"]
    assert [c["name"] for c in web["ip_configurations"]] == ["ipconfig1", "ipconfig2"]
    first, second = web["ip_configurations"]
    assert [p.rsplit("/", 1)[1] for p in first["pools"]] == ["pool-http", "pool-admin"]
    assert [p.rsplit("/", 1)[1] for p in second["pools"]] == ["pool-http"]
    assert first["nat_rules"] and first["asgs"]
    assert web["etag"].startswith('W/"')
    assert nics["web-1-nic-orphan"]["vm_id"] is None
    full = sim.control("GET", "/nics/web-1-nic").json()
    assert full["properties"]["enableAcceleratedNetworking"] is True
    assert full["properties"]["networkSecurityGroup"]["id"].endswith("/nsg-web")


def test_setting_pools_directly_changes_the_etag(sim: RunningSimulator) -> None:
    before = sim.control("GET", "/nics/web-1-nic").json()
    reply = sim.control("PUT", "/nics/web-1-nic/pools", {"pools": ["pool-http"]})
    assert reply.status == 200
    after = reply.json()
    assert after["etag"] != before["etag"]
    assert [p.rsplit("/", 1)[1] for p in after["ip_configurations"][0]["pools"]] == ["pool-http"]
    reply = sim.control(
        "PUT", "/nics/web-1-nic/pools", {"ip_configurations": {"ipconfig2": ["lb-other/pool-x"]}}
    )
    assert reply.json()["ip_configurations"][1]["pools"][0].endswith(
        "/loadBalancers/lb-other/backendAddressPools/pool-x"
    )
    assert (
        sim.control("PUT", "/nics/web-1-nic/pools", {"ip_configurations": {"nope": []}}).status
        == 404
    )
    assert sim.control("PUT", "/nics/missing/pools", {"pools": []}).status == 404


def test_custom_nic(sim: RunningSimulator) -> None:
    body = {
        "name": "custom-nic",
        "properties": {
            "virtualMachine": {"id": f"{RG_ID}/providers/Microsoft.Compute/virtualMachines/c"},
            "ipConfigurations": [{"name": "only", "properties": {"primary": True}}],
        },
    }
    reply = sim.control("POST", "/nics", body)
    assert reply.status == 201, reply.text
    created = reply.json()
    assert created["properties"]["virtualMachine"]["id"].endswith("/virtualMachines/c")
    assert created["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
    assert sim.control("POST", "/nics", body).status == 409
    assert sim.control("POST", "/nics", {"name": "bad", "properties": {}}).status == 400


def test_permissions_round_trip(sim: RunningSimulator) -> None:
    deny = {"deny": [{"action": "Microsoft.Network/networkInterfaces/write", "vm": "web-1"}]}
    assert sim.control("PUT", "/permissions", deny).status == 200
    listed = sim.control("GET", "/permissions").json()
    assert listed["deny"][0]["action"] == "Microsoft.Network/networkInterfaces/write"
    assert sim.control("PUT", "/permissions", {"deny": [{}]}).status == 400
    assert sim.control("DELETE", "/permissions").json() == {"deny": []}


def test_settings(sim: RunningSimulator, clock: FakeClock) -> None:
    assert sim.control("PATCH", "/settings", {"started_seconds": 1}).json()["started_seconds"] == 1
    sim.add_event(type="Reboot", status="Started")
    clock.advance(1.01)
    assert sim.events()["Events"] == []
    assert sim.control("PATCH", "/settings", {"arm_page_size": -1}).status == 400
    assert sim.control("PATCH", "/settings", {"bogus": 1}).status == 400


def test_reset_restores_the_initial_world(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot")
    sim.approve(created["EventId"])
    add_fault(sim, target="compute", kind="status", status=500)
    sim.control("POST", "/vms", {"name": "extra"})
    sim.control("PUT", "/nics/web-1-nic/pools", {"pools": []})
    incarnation = sim.events()["DocumentIncarnation"]
    reply = sim.control("POST", "/reset")
    assert reply.status == 200
    document = sim.events()
    assert document["Events"] == []
    assert document["DocumentIncarnation"] > incarnation  # never goes backwards
    assert sim.control("GET", "/faults").json() == []
    assert sim.control("GET", "/approvals").json() == []
    assert "extra" not in {vm["name"] for vm in sim.control("GET", "/vms").json()}
    web = next(n for n in sim.control("GET", "/nics").json() if n["name"] == "web-1-nic")
    assert len(web["ip_configurations"][0]["pools"]) == 2
