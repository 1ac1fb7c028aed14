"""An event's life in the simulator beyond Scheduled and Started: its impact window, when it
leaves the document, and when approvals start it. All on the hand-driven clock."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.simulator.times import parse_time
from tests.simulator_helpers import FakeClock, RunningSimulator, quick_options


def internals(sim: RunningSimulator, event_id: str) -> dict[str, Any]:
    """The control API's view of one event (it must still be listed)."""
    (event,) = [
        e for e in sim.control("GET", "/events").json()["events"] if e["EventId"] == event_id
    ]
    return event


def listed(sim: RunningSimulator) -> list[str]:
    return [event["EventId"] for event in sim.events()["Events"]]


# The impact window -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "seconds"),
    [
        ({"type": "Reboot"}, 7.0),
        ({"type": "Redeploy"}, 60.0),
        ({"type": "Freeze"}, 5.0),
        ({"type": "Freeze", "duration": 9}, 9.0),
        ({"type": "Freeze", "duration": 0}, 0.0),
        ({"type": "Preempt"}, None),
        ({"type": "Terminate"}, None),
        ({"type": "Hibernate"}, 7.0),
        ({"type": "Reboot", "impact_seconds": 30}, 30.0),
        ({"type": "Reboot", "impact_seconds": None}, None),
    ],
)
def test_impact_lasts_by_type(
    sim: RunningSimulator, fields: dict[str, Any], seconds: float | None
) -> None:
    created = sim.add_event(**fields)
    assert created["impact_seconds"] == seconds
    assert created["impact_after"] == 0.0
    assert created["impact"] is None  # not started
    assert created["impact_started_at"] is None and created["impact_ended_at"] is None
    assert created["linger"] is None


def test_impact_window_follows_the_start(sim: RunningSimulator, clock: FakeClock) -> None:
    created = sim.add_event(type="Reboot", impact_after=10, started_for=600)
    event_id = created["EventId"]
    sim.control("POST", f"/events/{event_id}/start")
    started_at = parse_time(internals(sim, event_id)["started_at"])
    incarnation = sim.events()["DocumentIncarnation"]
    assert internals(sim, event_id)["impact"] == "pending"
    clock.advance(9.9)
    assert internals(sim, event_id)["impact"] == "pending"
    clock.advance(0.2)
    during = internals(sim, event_id)
    assert during["impact"] == "in-progress"
    assert parse_time(during["impact_started_at"]) == pytest.approx(started_at + 10, abs=0.002)
    assert during["impact_ended_at"] is None
    clock.advance(7)  # 17.1 s in: the 7 s impact ended at 17
    after = internals(sim, event_id)
    assert after["impact"] == "over"
    assert parse_time(after["impact_ended_at"]) == pytest.approx(started_at + 17, abs=0.002)
    # The impact is invisible in IMDS: the event is still Started, the document unchanged.
    document = sim.events()
    assert [e["EventStatus"] for e in document["Events"]] == ["Started"]
    assert document["DocumentIncarnation"] == incarnation


def test_no_return_impact_never_ends(sim: RunningSimulator, clock: FakeClock) -> None:
    created = sim.add_event(type="Preempt", status="Started", started_for=None)
    clock.advance(3600)
    event = internals(sim, created["EventId"])
    assert event["impact"] == "in-progress"
    assert event["impact_ended_at"] is None


def test_control_begins_and_ends_the_impact(sim: RunningSimulator, clock: FakeClock) -> None:
    created = sim.add_event(type="Reboot", impact_after=30, started_for=None)
    event_id = created["EventId"]
    incarnation = sim.events()["DocumentIncarnation"]
    reply = sim.control("POST", f"/events/{event_id}/impact")
    assert reply.status == 200
    begun = reply.json()
    # It started the event first, then the impact began at once (not 30 s later).
    assert begun["EventStatus"] == "Started"
    assert begun["impact"] == "in-progress"
    assert begun["impact_started_at"] == begun["started_at"]
    assert sim.events()["DocumentIncarnation"] == incarnation + 1  # the start, nothing else
    clock.advance(2)
    ended = sim.control("POST", f"/events/{event_id}/impact/end").json()
    assert ended["impact"] == "over"
    assert parse_time(ended["impact_ended_at"]) == pytest.approx(clock.now, abs=0.002)
    clock.advance(60)
    assert internals(sim, event_id)["impact"] == "over"
    # A second impact while still Started: Microsoft warns about shorter secondary impacts.
    again = sim.control("POST", f"/events/{event_id}/impact").json()
    assert again["impact"] == "in-progress"
    assert parse_time(again["impact_started_at"]) == pytest.approx(clock.now, abs=0.002)
    clock.advance(7)
    assert internals(sim, event_id)["impact"] == "over"
    assert sim.events()["DocumentIncarnation"] == incarnation + 1


def test_ending_an_impact_that_is_pending_or_not_started(
    sim: RunningSimulator, clock: FakeClock
) -> None:
    created = sim.add_event(type="Reboot", impact_after=30, started_for=None)
    event_id = created["EventId"]
    assert sim.control("POST", f"/events/{event_id}/impact/end").status == 409
    sim.control("POST", f"/events/{event_id}/start")
    ended = sim.control("POST", f"/events/{event_id}/impact/end").json()
    assert ended["impact"] == "over"
    assert ended["impact_started_at"] == ended["impact_ended_at"]
    assert sim.control("POST", "/events/nope/impact").status == 404
    assert sim.control("GET", f"/events/{event_id}/impact").status == 405


def test_started_for_still_decides_removal(sim: RunningSimulator, clock: FakeClock) -> None:
    # The default: removal started_for seconds after the start, whatever the impact does.
    created = sim.add_event(type="Redeploy", status="Started", started_for=20)
    clock.advance(19)
    assert internals(sim, created["EventId"])["impact"] == "in-progress"
    clock.advance(1.1)
    assert listed(sim) == []


def test_linger_counts_from_the_end_of_the_impact(sim: RunningSimulator, clock: FakeClock) -> None:
    created = sim.add_event(
        type="Reboot", not_before_in=60, impact_after=5, linger=600, started_for=1
    )
    event_id = created["EventId"]
    clock.advance(60)  # starts at NotBefore; impact 65..72; removal at 672
    assert internals(sim, event_id)["removal_at"] is not None
    assert parse_time(internals(sim, event_id)["removal_at"]) == pytest.approx(
        parse_time(created["not_before"]) + 612, abs=0.002
    )
    clock.advance(611.9)
    assert listed(sim) == [event_id]  # started_for (1 s) is ignored when linger is given
    clock.advance(0.2)
    assert listed(sim) == []


def test_linger_after_an_impact_ended_by_hand(sim: RunningSimulator, clock: FakeClock) -> None:
    created = sim.add_event(type="Preempt", status="Started", linger=10)
    event_id = created["EventId"]
    clock.advance(300)
    assert listed(sim) == [event_id]  # a no-return impact never ends: no removal
    assert internals(sim, event_id)["removal_at"] is None
    sim.control("POST", f"/events/{event_id}/impact/end")
    clock.advance(9.9)
    assert listed(sim) == [event_id]
    clock.advance(0.2)
    assert listed(sim) == []


def test_microsofts_rough_timeline(sim: RunningSimulator, clock: FakeClock) -> None:
    # Approval timeout 15 min, impact about 7 s, Started to removed about 10 minutes.
    created = sim.add_event(type="Reboot", started_for=600)
    event_id = created["EventId"]
    clock.advance(900)
    assert sim.events()["Events"][0]["EventStatus"] == "Started"
    clock.advance(7.5)
    assert internals(sim, event_id)["impact"] == "over"
    clock.advance(592)
    assert listed(sim) == [event_id]
    clock.advance(1)
    assert listed(sim) == []


def test_patching_the_timing(sim: RunningSimulator, clock: FakeClock) -> None:
    created = sim.add_event(type="Reboot", status="Started", started_for=None)
    event_id = created["EventId"]
    reply = sim.control(
        "PATCH", f"/events/{event_id}", {"impact_after": 100, "impact_seconds": None, "linger": 5}
    )
    assert reply.status == 200, reply.text
    patched = reply.json()
    assert (patched["impact_after"], patched["impact_seconds"], patched["linger"]) == (
        100.0,
        None,
        5.0,
    )
    assert patched["impact"] == "pending"
    for body in ({"linger": -1}, {"impact_after": None}, {"impact_seconds": "7"}):
        assert sim.control("PATCH", f"/events/{event_id}", body).status == 400


@pytest.mark.parametrize(
    "body",
    [
        {"type": "Reboot", "impact_after": -1},
        {"type": "Reboot", "impact_after": None},
        {"type": "Reboot", "impact_seconds": "7"},
        {"type": "Reboot", "linger": True},
        {"type": "Reboot", "linger": float("inf")},
    ],
)
def test_bad_impact_fields(sim: RunningSimulator, body: dict[str, Any]) -> None:
    reply = sim.control("POST", "/events", body)
    assert reply.status == 400
    assert sim.events()["Events"] == []


# When approvals start an event ---------------------------------------------------------------


def test_all_approvals_waits_for_every_vm_named(sim: RunningSimulator) -> None:
    created = sim.add_event(
        type="Freeze", resources=["web-1", "web-2", "web-3"], start_when="all-approvals"
    )
    event_id = created["EventId"]
    assert created["start_when"] == "all-approvals"
    assert created["awaiting_approval"] == ["web-1", "web-2", "web-3"]
    incarnation = sim.events()["DocumentIncarnation"]
    assert sim.approve(event_id, vm="web-2").status == 200
    assert sim.approve(event_id, vm="web-2").status == 200  # again: still counts once
    assert sim.approve(event_id, vm="other-vm").status == 200  # not named: does not count
    assert sim.approve(event_id).status == 200  # the default view, web-1
    document = sim.events()
    assert document["Events"][0]["EventStatus"] == "Scheduled"
    assert document["DocumentIncarnation"] == incarnation  # nothing visible changed
    assert internals(sim, event_id)["awaiting_approval"] == ["web-3"]
    assert sim.approve(event_id, vm="WEB-3").status == 200  # names compare case-insensitively
    document = sim.events()
    assert document["Events"][0]["EventStatus"] == "Started"
    assert document["DocumentIncarnation"] == incarnation + 1
    assert internals(sim, event_id)["awaiting_approval"] == []
    approvals = [(a["event_id"], a["vm"]) for a in sim.control("GET", "/approvals").json()]
    assert [vm for _, vm in approvals] == ["web-2", "web-2", "other-vm", "web-1", "WEB-3"]


def test_all_approvals_starts_at_not_before_anyway(sim: RunningSimulator, clock: FakeClock) -> None:
    created = sim.add_event(
        type="Reboot", resources=["web-1", "web-2"], not_before_in=120, start_when="all-approvals"
    )
    sim.approve(created["EventId"])
    clock.advance(119)
    assert sim.events()["Events"][0]["EventStatus"] == "Scheduled"
    clock.advance(1)
    assert sim.events()["Events"][0]["EventStatus"] == "Started"
    assert internals(sim, created["EventId"])["started_at"] == created["not_before"]


def test_any_approval_is_the_default(sim: RunningSimulator) -> None:
    created = sim.add_event(type="Reboot", resources=["web-1", "web-2"])
    assert created["start_when"] == "any-approval"
    assert created["awaiting_approval"] == []
    sim.approve(created["EventId"], vm="web-2")
    assert sim.events()["Events"][0]["EventStatus"] == "Started"


def test_the_global_setting_is_the_default_for_new_events(sim: RunningSimulator) -> None:
    assert sim.control("GET", "/settings").json()["start_when"] == "any-approval"
    before = sim.add_event(type="Reboot", resources=["web-1", "web-2"])
    reply = sim.control("PATCH", "/settings", {"start_when": "all-approvals"})
    assert reply.json()["start_when"] == "all-approvals"
    after = sim.add_event(type="Reboot", resources=["web-1", "web-2"])
    overridden = sim.add_event(
        type="Reboot", resources=["web-1", "web-2"], start_when="any-approval"
    )
    assert [before["start_when"], after["start_when"], overridden["start_when"]] == [
        "any-approval",
        "all-approvals",
        "any-approval",
    ]
    sim.approve(before["EventId"], after["EventId"], overridden["EventId"])
    statuses = {e["EventId"]: e["EventStatus"] for e in sim.events()["Events"]}
    assert statuses == {
        before["EventId"]: "Started",
        after["EventId"]: "Scheduled",
        overridden["EventId"]: "Started",
    }
    assert sim.control("PATCH", "/settings", {"start_when": "never"}).status == 400
    assert sim.control("POST", "/events", {"type": "Reboot", "start_when": 1}).status == 400


def test_patching_resources_or_start_when_can_complete_the_approvals(
    sim: RunningSimulator,
) -> None:
    first = sim.add_event(
        type="Reboot", resources=["web-1", "web-2"], start_when="all-approvals", event_id="a"
    )
    second = sim.add_event(
        type="Reboot", resources=["web-1", "web-2"], start_when="all-approvals", event_id="b"
    )
    sim.approve("a", "b")
    incarnation = sim.events()["DocumentIncarnation"]
    # web-2 leaves the event: everyone left has approved, so it starts.
    reply = sim.control("PATCH", "/events/a", {"resources": ["web-1"]})
    assert reply.json()["EventStatus"] == "Started"
    reply = sim.control("PATCH", "/events/b", {"start_when": "any-approval"})
    assert reply.json()["EventStatus"] == "Started"
    assert sim.events()["DocumentIncarnation"] == incarnation + 2
    assert {first["EventId"], second["EventId"]} == {"a", "b"}
    assert sim.control("PATCH", "/events/a", {"start_when": "sometimes"}).status == 400


def test_start_when_flag() -> None:
    options = quick_options(arm=False, start_when="all-approvals")
    with RunningSimulator(options) as sim:
        assert sim.control("GET", "/settings").json()["start_when"] == "all-approvals"
        created = sim.add_event(type="Reboot", resources=["web-1", "web-2"])
        sim.approve(created["EventId"])
        assert sim.events()["Events"][0]["EventStatus"] == "Scheduled"
        sim.control("PATCH", "/settings", {"start_when": "any-approval"})
        sim.control("POST", "/reset")
        assert sim.control("GET", "/settings").json()["start_when"] == "all-approvals"


# The service starting up -------------------------------------------------------------------

SE_PATH = "/metadata/scheduledevents?api-version=2020-07-01"


def test_no_warmup_by_default(sim: RunningSimulator) -> None:
    settings = sim.control("GET", "/settings").json()
    assert (settings["warmup_seconds"], settings["warmup_status"]) == (0.0, 410)
    assert sim.imds(SE_PATH, vm="fresh-vm").status == 200


def test_each_vm_warms_up_from_its_first_call(sim: RunningSimulator, clock: FakeClock) -> None:
    sim.control("PATCH", "/settings", {"warmup_seconds": 70})
    created = sim.add_event(type="Reboot", resources=["web-1", "web-2"])
    first = sim.imds(SE_PATH)
    assert first.status == 410
    assert first.json() == {"error": "Gone"}
    clock.advance(30)
    # An approval while warming up is refused and changes nothing.
    assert sim.approve(created["EventId"]).status == 410
    assert sim.control("GET", "/approvals").json() == []
    # web-2's service is enabled by web-2's own first call, 30 s later.
    assert sim.imds(SE_PATH, vm="web-2").status == 410
    clock.advance(39.9)
    assert sim.imds(SE_PATH).status == 410
    clock.advance(0.2)  # 70.1 s after web-1's first call
    assert sim.events()["Events"][0]["EventStatus"] == "Scheduled"
    assert sim.imds(SE_PATH, vm="web-2").status == 410  # 40.1 s after web-2's
    clock.advance(30)
    assert sim.approve(created["EventId"], vm="web-2").status == 200
    assert sim.events(vm="web-2")["Events"][0]["EventStatus"] == "Started"
    # Other IMDS endpoints never warm up.
    assert sim.imds("/metadata/instance?api-version=2021-02-01", vm="web-3").status == 200
    statuses = [e["status"] for e in sim.control("GET", "/requests").json()["log"]]
    assert statuses.count(410) == 5


def test_warmup_can_answer_404(sim: RunningSimulator, clock: FakeClock) -> None:
    sim.control("PATCH", "/settings", {"warmup_seconds": 5, "warmup_status": 404})
    reply = sim.imds(SE_PATH)
    assert (reply.status, reply.json()) == (404, {"error": "Not found"})
    clock.advance(5)
    assert sim.imds(SE_PATH).status == 200
    for bad in ({"warmup_status": 503}, {"warmup_status": True}, {"warmup_seconds": -1}):
        assert sim.control("PATCH", "/settings", bad).status == 400


def test_a_silent_day_turns_the_service_off(sim: RunningSimulator, clock: FakeClock) -> None:
    sim.control("PATCH", "/settings", {"warmup_seconds": 10})
    assert sim.imds(SE_PATH).status == 410
    clock.advance(10)
    assert sim.imds(SE_PATH).status == 200
    clock.advance(24 * 3600 - 1)
    assert sim.imds(SE_PATH).status == 200  # called within the day: still on
    clock.advance(24 * 3600)
    assert sim.imds(SE_PATH).status == 410  # a day without calls: enabled (and warming) again
    clock.advance(10)
    assert sim.imds(SE_PATH).status == 200


def test_patching_warmup_rearms_every_vm(sim: RunningSimulator, clock: FakeClock) -> None:
    assert sim.imds(SE_PATH).status == 200  # enabled with no warm-up
    sim.control("PATCH", "/settings", {"warmup_seconds": 3})
    assert sim.imds(SE_PATH).status == 410
    clock.advance(3)
    assert sim.imds(SE_PATH).status == 200
    sim.control("PATCH", "/settings", {"started_seconds": 5})  # other settings do not re-arm
    assert sim.imds(SE_PATH).status == 200


def test_refused_requests_do_not_enable_the_service(
    sim: RunningSimulator, clock: FakeClock
) -> None:
    sim.control("PATCH", "/settings", {"warmup_seconds": 10})
    assert sim.imds(SE_PATH, headers={}).status == 400
    clock.advance(20)
    assert sim.imds(SE_PATH).status == 410  # the first valid call enables it


def test_warmup_flag(clock: FakeClock) -> None:
    options = quick_options(arm=False, warmup_seconds=70)
    with RunningSimulator(options, clock=clock) as sim:
        assert sim.control("GET", "/settings").json()["warmup_seconds"] == 70
        assert sim.imds(SE_PATH).status == 410
        clock.advance(70)
        assert sim.imds(SE_PATH).status == 200
        sim.control("POST", "/reset")  # a reset forgets which VMs enabled the service
        assert sim.imds(SE_PATH).status == 410
