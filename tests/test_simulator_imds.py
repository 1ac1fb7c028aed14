"""The simulator's IMDS side over real loopback HTTP: Scheduled Events, instance metadata,
managed-identity tokens, and the request hygiene IMDS enforces."""

from __future__ import annotations

import email.utils
import uuid

import pytest

from sidecar.simulator.options import ScheduleSpec
from sidecar.simulator.times import dotnet_general, parse_time
from tests.simulator_helpers import (
    INSTANCE_VERSION,
    SE_VERSION,
    FakeClock,
    RunningSimulator,
    quick_options,
    wait_for,
)

SE_PATH = f"/metadata/scheduledevents?api-version={SE_VERSION}"
COMPUTE_PATH = f"/metadata/instance/compute?api-version={INSTANCE_VERSION}"
SUB = "11111111-2222-4333-8444-555555555555"


# Request hygiene ---------------------------------------------------------------------------


def test_metadata_header_is_required(sim: RunningSimulator) -> None:
    reply = sim.imds(SE_PATH, headers={})
    assert reply.status == 400
    assert reply.json() == {"error": "Bad request. Required metadata header not specified"}
    assert sim.imds(SE_PATH, headers={"Metadata": "false"}).status == 400
    assert sim.imds(COMPUTE_PATH, headers={}).status == 400


def test_proxied_requests_are_refused(sim: RunningSimulator) -> None:
    reply = sim.imds(SE_PATH, headers={"Metadata": "true", "X-Forwarded-For": "10.1.2.3"})
    assert reply.status == 400
    assert "error" in reply.json()


@pytest.mark.parametrize(
    "query", ["", "?api-version=", "?api-version=2099-01-01", "?api-version=2021-02-01"]
)
def test_scheduled_events_version_errors(sim: RunningSimulator, query: str) -> None:
    reply = sim.imds(f"/metadata/scheduledevents{query}")
    assert reply.status == 400
    body = reply.json()
    assert body["error"].startswith("Bad request. api-version is invalid or was not specified")
    assert body["newest-versions"] == ["2020-07-01", "2019-08-01", "2019-04-01"]


def test_instance_metadata_has_its_own_versions(sim: RunningSimulator) -> None:
    # 2020-07-01 is a Scheduled Events version, not an instance-metadata one.
    reply = sim.imds("/metadata/instance/compute?api-version=2020-07-01")
    assert reply.status == 400
    assert reply.json()["newest-versions"] == ["2025-04-07", "2024-07-17", "2024-03-15"]
    assert sim.imds("/metadata/instance/compute?api-version=2025-04-07").status == 200


def test_duplicate_query_parameters_are_refused(sim: RunningSimulator) -> None:
    reply = sim.imds(f"{SE_PATH}&api-version={SE_VERSION}")
    assert reply.status == 400


def test_unknown_paths_and_methods(sim: RunningSimulator) -> None:
    assert sim.imds(f"/metadata/nothing?api-version={SE_VERSION}").status == 404
    assert sim.imds("/elsewhere").status == 404
    reply = sim.imds(COMPUTE_PATH, method="POST", body={})
    assert reply.status == 405
    assert reply.json() == {"error": "Method not allowed"}


# The document ------------------------------------------------------------------------------

FIELDS_BY_VERSION = {
    "2017-03-01": set(),
    "2017-08-01": set(),
    "2017-11-01": set(),
    "2019-01-01": set(),
    "2019-04-01": {"Description"},
    "2019-08-01": {"Description", "EventSource"},
    "2020-07-01": {"Description", "EventSource", "DurationInSeconds"},
}
BASE_FIELDS = {"EventId", "EventType", "ResourceType", "Resources", "EventStatus", "NotBefore"}


@pytest.mark.parametrize(("version", "added"), sorted(FIELDS_BY_VERSION.items()))
def test_event_fields_follow_the_api_version(
    sim: RunningSimulator, version: str, added: set[str]
) -> None:
    sim.add_event(type="Reboot", duration=120, description="planned", source="User")
    (event,) = sim.events(version)["Events"]
    assert set(event) == BASE_FIELDS | added
    # The 2017-03-01 preview prefixed IaaS VM names with an underscore.
    assert event["Resources"] == (["_web-1"] if version == "2017-03-01" else ["web-1"])
    if "DurationInSeconds" in added:
        assert event["DurationInSeconds"] == 120
    if "EventSource" in added:
        assert event["EventSource"] == "User"


def test_not_before_is_rfc1123_and_empty_once_started(
    sim: RunningSimulator, clock: FakeClock
) -> None:
    created = sim.add_event(type="Freeze", not_before_in=600)
    (event,) = sim.events()["Events"]
    assert event["EventStatus"] == "Scheduled"
    assert event["NotBefore"].endswith(" GMT")
    parsed = email.utils.parsedate_to_datetime(event["NotBefore"]).timestamp()
    assert parsed == int(clock.now + 600)
    assert abs(parsed - parse_time(created["not_before"])) < 1
    assert event["DurationInSeconds"] == -1
    sim.control("POST", f"/events/{created['EventId']}/start")
    (started,) = sim.events()["Events"]
    assert started["EventStatus"] == "Started"
    assert started["NotBefore"] == ""


TYPES_BY_VERSION = {
    "2017-03-01": {"Reboot", "Redeploy", "Freeze", "Hibernate"},
    "2017-08-01": {"Reboot", "Redeploy", "Freeze", "Hibernate"},
    "2017-11-01": {"Reboot", "Redeploy", "Freeze", "Hibernate", "Preempt"},
    "2019-01-01": {"Reboot", "Redeploy", "Freeze", "Hibernate", "Preempt", "Terminate"},
    "2020-07-01": {"Reboot", "Redeploy", "Freeze", "Hibernate", "Preempt", "Terminate"},
}


@pytest.mark.parametrize(("version", "shown"), sorted(TYPES_BY_VERSION.items()))
def test_event_types_appear_from_the_version_that_introduced_them(
    sim: RunningSimulator, version: str, shown: set[str]
) -> None:
    # Preempt came with 2017-11-01, Terminate with 2019-01-01; unknown types are always shown.
    for event_type in ("Reboot", "Redeploy", "Freeze", "Preempt", "Terminate", "Hibernate"):
        sim.add_event(type=event_type)
    document = sim.events(version)
    assert {event["EventType"] for event in document["Events"]} == shown
    assert document["DocumentIncarnation"] == sim.events()["DocumentIncarnation"] == 6


def test_an_older_version_cannot_approve_what_it_does_not_show(sim: RunningSimulator) -> None:
    terminate = sim.add_event(type="Terminate")
    body = {"StartRequests": [{"EventId": terminate["EventId"]}]}
    old = sim.imds("/metadata/scheduledevents?api-version=2017-11-01", method="POST", body=body)
    assert old.status == 400
    assert "Unknown EventId" in old.json()["error"]
    assert sim.events()["Events"][0]["EventStatus"] == "Scheduled"
    assert sim.approve(terminate["EventId"]).status == 200
    assert sim.events()["Events"][0]["EventStatus"] == "Started"


@pytest.mark.parametrize("event_type", ["Reboot", "Redeploy", "Freeze", "Preempt", "Terminate"])
@pytest.mark.parametrize("status", ["Scheduled", "Started"])
def test_every_event_carries_event_source_and_duration(
    sim: RunningSimulator, event_type: str, status: str
) -> None:
    sim.add_event(type=event_type, status=status, started_for=None)
    sim.add_event(type=event_type, status=status, duration=9, source="User", started_for=None)
    plain, custom = sim.events()["Events"]
    assert (plain["EventSource"], plain["DurationInSeconds"]) == ("Platform", -1)
    assert (custom["EventSource"], custom["DurationInSeconds"]) == ("User", 9)
    assert "EventSource" in sim.events("2019-08-01")["Events"][0]
    assert "DurationInSeconds" not in sim.events("2019-08-01")["Events"][0]


def test_approved_and_scheduled_at_start_up_events_keep_source_and_duration() -> None:
    options = quick_options(arm=False, schedule=(ScheduleSpec("Freeze", 60.0),))
    with RunningSimulator(options) as sim:
        (event,) = sim.events()["Events"]
        assert (event["EventSource"], event["DurationInSeconds"]) == ("Platform", -1)
        assert sim.approve(event["EventId"]).status == 200
        (started,) = sim.events()["Events"]
        assert started["EventStatus"] == "Started"
        assert (started["EventSource"], started["DurationInSeconds"]) == ("Platform", -1)


def test_empty_document(sim: RunningSimulator) -> None:
    assert sim.events() == {"DocumentIncarnation": 0, "Events": []}


# Approvals ---------------------------------------------------------------------------------


def test_approval_starts_the_event_for_every_named_vm(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot", resources=["web-1", "web-2"])
    before = sim.events()["DocumentIncarnation"]
    reply = sim.approve(created["EventId"], vm="web-2")
    assert reply.status == 200
    for view in (None, "web-2"):
        document = sim.events(vm=view)
        assert document["DocumentIncarnation"] == before + 1
        (event,) = document["Events"]
        assert event["EventStatus"] == "Started"
        assert event["NotBefore"] == ""
        assert event["Resources"] == ["web-1", "web-2"]
    (approval,) = sim.control("GET", "/approvals").json()
    assert approval["event_id"] == created["EventId"]
    assert approval["vm"] == "web-2"
    assert approval["remote"] == "127.0.0.1"
    assert parse_time(approval["at"]) > 0


def test_approving_a_started_event_again_is_fine(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot", resources=["web-1", "web-2"])
    assert sim.approve(created["EventId"], vm="web-2").status == 200
    incarnation = sim.events()["DocumentIncarnation"]
    assert sim.approve(created["EventId"]).status == 200
    assert sim.events()["DocumentIncarnation"] == incarnation
    assert [a["vm"] for a in sim.control("GET", "/approvals").json()] == ["web-2", "web-1"]


def test_unknown_event_id_is_refused_and_changes_nothing(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot")
    before = sim.events()
    reply = sim.approve(created["EventId"], str(uuid.uuid4()))
    assert reply.status == 400
    assert "Unknown EventId" in reply.json()["error"]
    assert sim.events() == before
    assert sim.control("GET", "/approvals").json() == []


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"StartRequests": "abc"}',
        '{"StartRequests": [{"Id": "abc"}]}',
        '{"StartRequests": [{"EventId": 5}]}',
        '{"startrequests": []}',
    ],
)
def test_malformed_approval_bodies_are_refused(sim: RunningSimulator, body: str) -> None:
    reply = sim.imds(SE_PATH, method="POST", body=body)
    assert reply.status == 400
    assert "error" in reply.json()


# The simulated platform ---------------------------------------------------------------------


def test_platform_starts_at_not_before_and_retires_after_started_for(
    sim: RunningSimulator, clock: FakeClock
) -> None:
    created = sim.add_event(type="Reboot", not_before_in=60, started_for=30)
    incarnation = sim.events()["DocumentIncarnation"]
    clock.advance(59)
    assert sim.events()["Events"][0]["EventStatus"] == "Scheduled"
    clock.advance(2)
    document = sim.events()
    assert document["Events"][0]["EventStatus"] == "Started"
    assert document["DocumentIncarnation"] == incarnation + 1
    internals = sim.control("GET", "/events").json()["events"][0]
    assert internals["started_at"] == created["not_before"]
    clock.advance(28)  # 89 s in: started at 60, leaves at 90
    assert len(sim.events()["Events"]) == 1
    clock.advance(2)
    assert sim.events() == {"DocumentIncarnation": incarnation + 2, "Events": []}


def test_started_events_default_to_started_seconds(sim: RunningSimulator, clock: FakeClock) -> None:
    created = sim.add_event(type="Freeze", status="Started")
    assert created["started_for"] == 5.0
    assert sim.events()["Events"][0]["NotBefore"] == ""
    clock.advance(5.1)
    assert sim.events()["Events"] == []


def test_platform_runs_on_the_real_clock_too() -> None:
    with RunningSimulator(quick_options(arm=False, started_seconds=0.5)) as sim:
        sim.add_event(type="Preempt", not_before_in=0.2)
        wait_for(lambda: [e["EventStatus"] for e in sim.events()["Events"]] == ["Started"])
        wait_for(lambda: sim.events()["Events"] == [])
        assert sim.events()["DocumentIncarnation"] == 3


def test_cancel_removes_the_event(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Redeploy")
    incarnation = sim.events()["DocumentIncarnation"]
    assert sim.control("DELETE", f"/events/{created['EventId']}").status == 200
    assert sim.events() == {"DocumentIncarnation": incarnation + 1, "Events": []}
    assert sim.control("DELETE", f"/events/{created['EventId']}").status == 404


def test_rescheduling_and_retargeting_bump_the_incarnation(
    sim: RunningSimulator, clock: FakeClock
) -> None:
    created = sim.add_event(type="Reboot", not_before_in=900)
    incarnation = sim.events()["DocumentIncarnation"]
    reply = sim.control("PATCH", f"/events/{created['EventId']}", {"not_before_in": 120})
    assert reply.status == 200
    (event,) = sim.events()["Events"]
    assert email.utils.parsedate_to_datetime(event["NotBefore"]).timestamp() == int(clock.now + 120)
    assert sim.events()["DocumentIncarnation"] == incarnation + 1
    sim.control("PATCH", f"/events/{created['EventId']}", {"resources": ["web-1", "web-3"]})
    assert sim.events()["Events"][0]["Resources"] == ["web-1", "web-3"]
    assert sim.events()["DocumentIncarnation"] == incarnation + 2


# Views of several VMs ------------------------------------------------------------------------


def test_every_view_shares_one_document(sim: RunningSimulator) -> None:
    sim.add_event(type="Reboot", resources=["web-2"])
    assert sim.events(vm="web-2") == sim.events() == sim.events(vm="web-3")
    names = {vm["name"] for vm in sim.control("GET", "/vms").json()}
    assert {"web-1", "other-vm", "web-2", "web-3"} <= names


def test_instance_metadata_of_a_plain_vm(sim: RunningSimulator) -> None:
    compute = sim.imds(COMPUTE_PATH).json()
    assert compute["name"] == "web-1"
    assert compute["resourceId"] == (
        f"/subscriptions/{SUB}/resourceGroups/rg-sim/providers/Microsoft.Compute/virtualMachines/web-1"
    )
    assert compute["resourceGroupName"] == "rg-sim"
    assert compute["subscriptionId"] == SUB
    assert compute["location"] == "westeurope"
    assert compute["vmScaleSetName"] == ""
    assert compute["azEnvironment"] == "AzurePublicCloud"
    assert compute["osType"] == "Linux"
    assert compute["zone"] == ""
    uuid.UUID(compute["vmId"])
    other = sim.imds(COMPUTE_PATH, vm="web-2").json()
    assert other["name"] == "web-2"
    assert other["vmId"] != compute["vmId"]
    assert sim.imds(COMPUTE_PATH).json()["vmId"] == compute["vmId"]


def test_compute_fields_follow_the_instance_version(sim: RunningSimulator) -> None:
    old = sim.imds("/metadata/instance/compute?api-version=2017-08-01").json()
    assert "resourceId" not in old and "vmScaleSetName" not in old
    assert old["name"] == "web-1" and old["subscriptionId"] == SUB
    assert "resourceId" in sim.imds("/metadata/instance/compute?api-version=2019-03-11").json()


def test_instance_metadata_of_scale_set_vms(sim: RunningSimulator) -> None:
    reply = sim.control(
        "POST", "/vms", {"scale_set": "web-vmss", "instance_id": "3", "orchestration": "Uniform"}
    )
    assert reply.status == 201, reply.text
    assert reply.json()["view"].endswith("/vms/web-vmss_3")
    path = "/metadata/instance/compute?api-version=2021-12-13"  # virtualMachineScaleSet: 2021-03-01
    uniform = sim.imds(path, vm="web-vmss_3").json()
    assert uniform["name"] == "web-vmss_3"
    assert uniform["vmScaleSetName"] == "web-vmss"
    assert uniform["resourceId"] == (
        f"/subscriptions/{SUB}/resourceGroups/rg-sim/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/web-vmss/virtualMachines/3"
    )
    assert uniform["virtualMachineScaleSet"] == {"id": ""}
    sim.control(
        "POST",
        "/vms",
        {"scale_set": "flex", "instance_id": "a1b2c3d4", "orchestration": "Flexible"},
    )
    flexible = sim.imds(path, vm="flex_a1b2c3d4").json()
    assert flexible["vmScaleSetName"] == "flex"
    assert flexible["resourceId"].endswith("/Microsoft.Compute/virtualMachines/flex_a1b2c3d4")
    assert flexible["virtualMachineScaleSet"]["id"].endswith("/virtualMachineScaleSets/flex")


def test_instance_document_and_route_filters(sim: RunningSimulator) -> None:
    instance = sim.imds(f"/metadata/instance?api-version={INSTANCE_VERSION}").json()
    assert instance["compute"]["name"] == "web-1"
    (interface,) = instance["network"]["interface"]
    addresses = [a["privateIpAddress"] for a in interface["ipv4"]["ipAddress"]]
    assert addresses == ["10.0.1.4", "10.0.1.5"]
    assert interface["ipv4"]["subnet"] == [{"address": "10.0.1.0", "prefix": "24"}]
    assert len(interface["macAddress"]) == 12
    name = sim.imds(f"/metadata/instance/compute/name?api-version={INSTANCE_VERSION}&format=text")
    assert name.status == 200 and name.text == "web-1"
    leaf_as_json = sim.imds(f"/metadata/instance/compute/name?api-version={INSTANCE_VERSION}")
    assert leaf_as_json.status == 400
    first_ip = (
        f"/metadata/instance/network/interface/0/ipv4/ipAddress/0?api-version={INSTANCE_VERSION}"
    )
    assert sim.imds(first_ip).json()["privateIpAddress"] == "10.0.1.4"
    assert sim.imds(f"/metadata/instance/compute/nope?api-version={INSTANCE_VERSION}").status == 404


def test_versions_endpoint_needs_no_api_version(sim: RunningSimulator) -> None:
    versions = sim.imds("/metadata/versions").json()["apiVersions"]
    assert "2021-02-01" in versions and "2020-07-01" not in versions


# Managed identity ----------------------------------------------------------------------------


def test_token_answer(sim: RunningSimulator, clock: FakeClock) -> None:
    path = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com"
    reply = sim.imds(path, vm="web-2")
    assert reply.status == 200
    token = reply.json()
    assert set(token) >= {
        "access_token",
        "refresh_token",
        "expires_in",
        "expires_on",
        "not_before",
        "resource",
        "token_type",
        "client_id",
    }
    assert all(isinstance(value, str) for value in token.values())
    assert token["resource"] == "https://management.azure.com"
    assert {"token_type": "Bearer"}.items() <= token.items()
    assert int(token["expires_on"]) == int(clock.now) + int(token["expires_in"])
    assert token["access_token"] != sim.imds(path).json()["access_token"]
    with_client = sim.imds(f"{path}&client_id=1234").json()
    assert with_client["client_id"] == "1234"


def test_token_errors(sim: RunningSimulator) -> None:
    base = "/metadata/identity/oauth2/token?api-version=2018-02-01"
    missing_resource = sim.imds(base)
    assert missing_resource.status == 400
    assert missing_resource.json()["error"] == "invalid_request"
    no_header = sim.imds(f"{base}&resource=https://management.azure.com", headers={})
    assert no_header.status == 400
    assert no_header.json()["error"] == "invalid_request"
    assert sim.imds("/metadata/identity/oauth2/token?resource=x").status == 400
    sim.control("POST", "/vms", {"name": "locked", "identities": ["allowed-id"]})
    unknown = sim.imds(f"{base}&resource=r&client_id=other-id", vm="locked")
    assert unknown.status == 400
    assert "Identity not found" in unknown.json()["error_description"]
    assert sim.imds(f"{base}&resource=r&client_id=allowed-id", vm="locked").status == 200


# The 2016 preview ("In-VM Metadata service") --------------------------------------------------


def test_maintenance_is_empty_without_an_event_for_this_vm(sim: RunningSimulator) -> None:
    sim.add_event(type="Reboot", resources=["web-2"])
    reply = sim.imds("/metadata/v1/maintenance", headers={})  # no Metadata header in 2016
    assert reply.status == 200
    assert reply.json() == {}
    assert reply.headers["Content-Type"].startswith("application/json")


def test_maintenance_shows_the_earliest_event_naming_the_vm(
    sim: RunningSimulator, clock: FakeClock
) -> None:
    clock.now = 1442299371.4  # 2015-09-15 06:42:51.4 UTC
    later = sim.add_event(type="Reboot", resources=["web-2", "WEB-1"], not_before_in=600)
    clock.advance(60)
    sooner = sim.add_event(type="Freeze", resources=["web-2"], not_before_in=300)
    sim.add_event(type="Preempt", resources=["web-2"], not_before_in=30)  # unknown in 2016
    reply = sim.imds("/metadata/v1/maintenance", vm="web-2", headers={})
    assert reply.json() == {
        "EventID": sooner["EventId"],
        "EventCreationTime": "9/15/2015 6:43:51 AM",
    }
    # .NET's serializer escaped "/" as "\/"; any JSON parser reads the same value.
    assert b'"9\\/15\\/2015 6:43:51 AM"' in reply.body
    mine = sim.imds("/metadata/v1/maintenance", headers={"Metadata": "true"}).json()
    assert mine == {"EventID": later["EventId"], "EventCreationTime": "9/15/2015 6:42:51 AM"}
    # A started event comes first; once it has left the document, the next one shows.
    sim.control("POST", f"/events/{later['EventId']}/start")
    assert sim.imds("/metadata/v1/maintenance", vm="web-2").json()["EventID"] == later["EventId"]
    sim.control("DELETE", f"/events/{later['EventId']}")
    assert sim.imds("/metadata/v1/maintenance", vm="web-2").json()["EventID"] == sooner["EventId"]
    assert sim.imds("/metadata/v1/maintenance").json() == {}


def test_event_creation_time_is_dotnet_general_form() -> None:
    assert dotnet_general(1442299371.9) == "9/15/2015 6:42:51 AM"
    assert dotnet_general(1442318400.0) == "9/15/2015 12:00:00 PM"
    assert dotnet_general(1451606399.0) == "12/31/2015 11:59:59 PM"
    assert dotnet_general(1451606400.0) == "1/1/2016 12:00:00 AM"


def test_instance_info(sim: RunningSimulator) -> None:
    reply = sim.imds("/metadata/v1/InstanceInfo", headers={})
    assert reply.status == 200
    info = reply.json()
    assert list(info) == ["ID", "UD", "FD"]
    assert info["ID"] == "_web-1"
    compute = sim.imds(COMPUTE_PATH).json()
    assert info["UD"] == compute["platformUpdateDomain"]
    assert info["FD"] == compute["platformFaultDomain"]
    sim.control("POST", "/vms", {"scale_set": "web-vmss", "instance_id": "3"})
    scale_set = sim.imds("/metadata/v1/instanceinfo", vm="web-vmss_3", headers={}).json()
    assert scale_set["ID"] == "_web-vmss_3"


def test_preview_requests_are_counted_and_faultable(sim: RunningSimulator) -> None:
    sim.control("DELETE", "/requests")
    sim.control("POST", "/faults", {"target": "imds", "kind": "status", "status": 500, "count": 2})
    assert sim.imds("/metadata/v1/maintenance", headers={}).status == 500
    assert sim.imds("/metadata/v1/InstanceInfo", vm="web-2", headers={}).status == 500
    assert sim.imds("/metadata/v1/maintenance", headers={}).status == 200
    counts = sim.control("GET", "/requests").json()["counts"]
    assert counts == {"GET instanceinfo": 1, "GET maintenance": 2}
    sim.control("POST", "/faults", {"target": "instanceinfo", "kind": "answer", "body": "x"})
    assert sim.imds("/metadata/v1/InstanceInfo", headers={}).body == b"x"
    assert sim.imds("/metadata/v1/maintenance", headers={}).status == 200


def test_preview_paths_and_methods(sim: RunningSimulator) -> None:
    assert sim.imds("/metadata/v1/maintenance", method="POST", body={}).status == 405
    assert sim.imds("/metadata/v1/other", headers={}).status == 404
    assert sim.imds("/metadata/v1", headers={}).status == 404
    assert sim.imds("/metadata/V1/MAINTENANCE", headers={}).json() == {}
