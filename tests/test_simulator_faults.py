"""The ``late`` and ``answer`` fault kinds, on IMDS and ARM alike: the side effect happens
(or not) as the fault says, and the client sees exactly what the fault says."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.simulator_helpers import (
    SE_VERSION,
    FakeClock,
    RunningSimulator,
    quick_options,
    wait_for,
)

SE_PATH = f"/metadata/scheduledevents?api-version={SE_VERSION}"
SUB = "11111111-2222-4333-8444-555555555555"
NIC_PATH = (
    f"/subscriptions/{SUB}/resourceGroups/rg-sim/providers/Microsoft.Network/networkInterfaces"
)
ARM_VERSION = "api-version=2026-03-01"


def add_fault(sim: RunningSimulator, **fields: object) -> dict[str, Any]:
    reply = sim.control("POST", "/faults", fields)
    assert reply.status == 201, reply.text
    fault: dict[str, Any] = reply.json()
    return fault


def last_log(sim: RunningSimulator, kind: str) -> dict[str, Any]:
    log = sim.control("GET", "/requests").json()["log"]
    entry: dict[str, Any] = [e for e in log if e["kind"] == kind][-1]
    return entry


@pytest.fixture
def arm_sim(clock: FakeClock) -> Iterator[RunningSimulator]:
    with RunningSimulator(quick_options(), clock=clock) as running:
        yield running


# late ----------------------------------------------------------------------------------------


def test_late_approval_is_applied_although_the_client_gave_up(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot", resources=["web-1", "web-2"])
    add_fault(sim, target="approve", kind="late", seconds=30, count=1)
    with pytest.raises(socket.timeout):
        sim.imds(
            SE_PATH,
            method="POST",
            body={"StartRequests": [{"EventId": created["EventId"]}]},
            timeout=0.5,
        )
    # IMDS accepted the approval: recorded, and the event started for every VM it names.
    assert [a["event_id"] for a in sim.control("GET", "/approvals").json()] == [created["EventId"]]
    assert sim.events(vm="web-2")["Events"][0]["EventStatus"] == "Started"
    # The answer never reached the client: the request ends as "client went away".
    wait_for(lambda: last_log(sim, "approve")["status"] == 499)
    assert last_log(sim, "approve")["fault"] is not None


def test_late_answer_arrives_after_the_delay(sim: RunningSimulator) -> None:
    sim.add_event(type="Freeze")
    add_fault(sim, target="scheduledevents", kind="late", seconds=0.5, count=1)
    started = time.monotonic()
    reply = sim.imds(SE_PATH)
    assert time.monotonic() - started >= 0.45
    assert reply.status == 200
    assert reply.json()["Events"][0]["EventType"] == "Freeze"
    assert sim.control("GET", "/faults").json() == []


def test_late_needs_seconds(sim: RunningSimulator) -> None:
    assert sim.control("POST", "/faults", {"target": "approve", "kind": "late"}).status == 400


# answer ----------------------------------------------------------------------------------------


def test_answer_replaces_the_reply_byte_for_byte(sim: RunningSimulator) -> None:
    fault = add_fault(
        sim,
        target="scheduledevents",
        kind="answer",
        body='{"DocumentIncarnation": 3, "Events": [',
        content_type="text/html; charset=utf-8",
        headers={"X-Custom": "yes", "Retry-After": "7"},
        count=1,
    )
    assert (fault["status"], fault["apply"]) == (200, False)
    reply = sim.imds(SE_PATH)
    assert reply.status == 200
    assert reply.body == b'{"DocumentIncarnation": 3, "Events": ['
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    assert reply.headers["X-Custom"] == "yes"
    assert reply.headers["Retry-After"] == "7"
    assert sim.imds(SE_PATH).json() == {"DocumentIncarnation": 0, "Events": []}


@pytest.mark.parametrize(
    ("fields", "status", "body"),
    [
        ({}, 200, b""),  # an empty body
        ({"body": "[1, 2]"}, 200, b"[1, 2]"),  # JSON, but a list
        ({"body": '"just a string"'}, 200, b'"just a string"'),
        ({"body": "null"}, 200, b"null"),
        ({"status": 503, "body": "<html>busy</html>"}, 503, b"<html>busy</html>"),
        ({"status": 204, "body": "dropped"}, 204, b""),  # HTTP: no body with 204
        ({"body": "caf\u00e9"}, 200, "caf\u00e9".encode()),
    ],
)
def test_answer_shapes(
    sim: RunningSimulator, fields: dict[str, Any], status: int, body: bytes
) -> None:
    add_fault(sim, target="compute", kind="answer", **fields)
    reply = sim.imds("/metadata/instance/compute?api-version=2021-02-01")
    assert (reply.status, reply.body) == (status, body)


def test_answer_without_apply_has_no_side_effect(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot")
    add_fault(sim, target="approve", kind="answer", body="{}", count=1)
    reply = sim.approve(created["EventId"])
    assert (reply.status, reply.body) == (200, b"{}")
    assert sim.control("GET", "/approvals").json() == []
    assert sim.events()["Events"][0]["EventStatus"] == "Scheduled"


def test_answer_with_apply_acts_first(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot")
    add_fault(sim, target="approve", kind="answer", status=500, body="oops", apply=True, count=1)
    reply = sim.approve(created["EventId"])
    assert (reply.status, reply.body) == (500, b"oops")
    assert len(sim.control("GET", "/approvals").json()) == 1
    assert sim.events()["Events"][0]["EventStatus"] == "Started"


@pytest.mark.parametrize(
    "body",
    [
        {"target": "imds", "kind": "answer", "status": 99},
        {"target": "imds", "kind": "answer", "status": 600},
        {"target": "imds", "kind": "answer", "body": 5},
        {"target": "imds", "kind": "answer", "body": None},
        {"target": "imds", "kind": "answer", "content_type": "text/plain\r\nX-Evil: 1"},
        {"target": "imds", "kind": "answer", "headers": ["X-A"]},
        {"target": "imds", "kind": "answer", "headers": {"X-A": 1}},
        {"target": "imds", "kind": "answer", "headers": {"Bad Name": "x"}},
        {"target": "imds", "kind": "answer", "headers": {"X-A": "a\nb"}},
        {"target": "imds", "kind": "answer", "headers": {"Content-Length": "3"}},
        {"target": "imds", "kind": "answer", "headers": {"content-type": "text/plain"}},
        {"target": "imds", "kind": "answer", "apply": "yes"},
        {"target": "imds", "kind": "status", "status": 200},  # still refused for 'status'
    ],
)
def test_bad_answer_faults(sim: RunningSimulator, body: dict[str, Any]) -> None:
    assert sim.control("POST", "/faults", body).status == 400
    assert sim.control("GET", "/faults").json() == []


# ARM kinds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "method", "path"),
    [
        ("arm-list", "GET", f"{NIC_PATH}?{ARM_VERSION}"),
        ("arm-get", "GET", f"{NIC_PATH}/web-1-nic?{ARM_VERSION}"),
        ("arm", "GET", f"{NIC_PATH}/web-1-nic?{ARM_VERSION}"),
    ],
)
def test_answer_on_arm_reads(
    arm_sim: RunningSimulator, target: str, method: str, path: str
) -> None:
    token = arm_sim.token()
    add_fault(arm_sim, target=target, kind="answer", body='[{"value": 1}]', count=1)
    reply = arm_sim.arm(method, path, token=token)
    assert (reply.status, reply.json()) == (200, [{"value": 1}])
    assert reply.headers["Content-Type"] == "application/json"
    assert arm_sim.arm(method, path, token=token).status == 200  # count: 1


def test_answer_on_arm_put_with_apply(arm_sim: RunningSimulator) -> None:
    token = arm_sim.token()
    nic = arm_sim.control("GET", "/nics/web-1-nic").json()
    before = nic["etag"]
    nic["properties"]["ipConfigurations"][1]["properties"]["loadBalancerBackendAddressPools"] = []
    add_fault(arm_sim, target="arm-put", kind="answer", body='{"properties": ', apply=True, count=1)
    reply = arm_sim.arm("PUT", f"{NIC_PATH}/web-1-nic?{ARM_VERSION}", token=token, body=nic)
    assert reply.status == 200
    with pytest.raises(json.JSONDecodeError):
        reply.json()
    assert "Azure-AsyncOperation" not in reply.headers
    # The PUT was applied all the same.
    stored = arm_sim.control("GET", "/nics/web-1-nic").json()
    assert stored["etag"] != before
    ipconfig2 = stored["properties"]["ipConfigurations"][1]["properties"]
    assert ipconfig2.get("loadBalancerBackendAddressPools", []) == []


def test_answer_on_arm_put_without_apply(arm_sim: RunningSimulator) -> None:
    token = arm_sim.token()
    nic = arm_sim.control("GET", "/nics/web-1-nic").json()
    add_fault(arm_sim, target="arm-put", kind="answer", body="Created", content_type="text/plain")
    reply = arm_sim.arm("PUT", f"{NIC_PATH}/web-1-nic?{ARM_VERSION}", token=token, body=nic)
    assert (reply.status, reply.body) == (200, b"Created")
    assert arm_sim.control("GET", "/nics/web-1-nic").json()["etag"] == nic["etag"]
    assert arm_sim.control("GET", "/operations").json() == []


def test_answer_and_late_on_the_arm_operation(arm_sim: RunningSimulator) -> None:
    token = arm_sim.token()
    nic = arm_sim.control("GET", "/nics/web-1-nic").json()
    put = arm_sim.arm("PUT", f"{NIC_PATH}/web-1-nic?{ARM_VERSION}", token=token, body=nic)
    operation = put.headers["Azure-AsyncOperation"][len(str(arm_sim.urls.arm_url)) :]
    add_fault(arm_sim, target="arm-operation", kind="answer", body='"Succeeded"', count=1)
    reply = arm_sim.arm("GET", operation, token=token)
    assert (reply.status, reply.json()) == (200, "Succeeded")
    add_fault(arm_sim, target="arm-operation", kind="late", seconds=0.3, count=1)
    started = time.monotonic()
    reply = arm_sim.arm("GET", operation, token=token)
    assert time.monotonic() - started >= 0.25
    assert reply.json() == {"status": "InProgress"}  # the first real poll
