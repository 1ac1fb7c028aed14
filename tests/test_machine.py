"""The pure decision logic, table by table: no I/O, no clock, `now` is an argument."""

from __future__ import annotations

from dataclasses import replace
from email.utils import formatdate
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import machine
from sidecar.events import EventsDocument, ScheduledEvent, parse_document
from sidecar.machine import Approve, DrainState, Phase, Policy
from sidecar.store import drain_section, restore_drain

NOW = 1_800_000_000.0
ME = "web-1"
POLICY = Policy(
    vm_name=ME,
    event_types=frozenset({"Reboot", "Redeploy", "Preempt", "Terminate"}),
    drain_seconds=30,
    min_drain_seconds=10,
    deadline_margin_seconds=5,
    approve="leader",
)


def event(
    event_id: str = "e1",
    kind: str = "Reboot",
    resources: tuple[str, ...] = (ME,),
    status: str = "Scheduled",
    not_before: float | str | None = NOW + 900,
) -> dict[str, Any]:
    if isinstance(not_before, float):
        not_before = formatdate(not_before, usegmt=True)
    return {
        "EventId": event_id,
        "EventType": kind,
        "ResourceType": "VirtualMachine",
        "Resources": list(resources),
        "EventStatus": status,
        "NotBefore": "" if status == "Started" else (not_before or ""),
    }


def doc(*events: dict[str, Any], incarnation: int = 1) -> EventsDocument:
    return parse_document({"DocumentIncarnation": incarnation, "Events": list(events)})


def first_sight(entry: dict[str, Any], policy: Policy = POLICY) -> machine.Decision:
    return machine.observe(DrainState(), doc(entry), NOW, policy)


# --- one event, first sight: what phase, does the probe go down, when is approval due
FIRST_SIGHT = [
    # id, event, policy, phase, serving, approve_at (seconds after NOW)
    ("reboot for us", event(), POLICY, Phase.DRAINING, False, 30),
    ("redeploy for us", event(kind="Redeploy"), POLICY, Phase.DRAINING, False, 30),
    ("terminate for us", event(kind="Terminate"), POLICY, Phase.DRAINING, False, 30),
    ("names us in another case", event(resources=("WEB-1",)), POLICY, Phase.DRAINING, False, 30),
    ("freeze is opt-in", event(kind="Freeze"), POLICY, Phase.IGNORED, True, None),
    (
        "freeze opted in",
        event(kind="Freeze"),
        replace(POLICY, event_types=POLICY.event_types | {"Freeze"}),
        Phase.DRAINING,
        False,
        30,
    ),
    ("unknown type", event(kind="Hibernate"), POLICY, Phase.IGNORED, True, None),
    ("other VM only", event(resources=("web-2",)), POLICY, Phase.IGNORED, True, None),
    ("prefix of our name", event(resources=("web-10",)), POLICY, Phase.IGNORED, True, None),
    ("we are not the leader", event(resources=("web-0", ME)), POLICY, Phase.WAITING, False, None),
    (
        "not leader, approve=always",
        event(resources=("web-0", ME)),
        replace(POLICY, approve="always"),
        Phase.DRAINING,
        False,
        30,
    ),
    ("approve=never", event(), replace(POLICY, approve="never"), Phase.WAITING, False, None),
    ("already started", event(status="Started"), POLICY, Phase.STARTED, False, None),
    ("preempt with 30 s notice", event(kind="Preempt", not_before=NOW + 30), POLICY,
     Phase.DRAINING, False, 25),
    ("deadline inside the drain", event(not_before=NOW + 20), POLICY, Phase.DRAINING, False, 15),
    ("too little time to drain", event(not_before=NOW + 12), POLICY, Phase.WAITING, False, None),
    (
        "no minimum drain",
        event(not_before=NOW + 12),
        replace(POLICY, min_drain_seconds=0),
        Phase.DRAINING,
        False,
        7,
    ),
    ("unreadable NotBefore", event(not_before="soon"), POLICY, Phase.DRAINING, False, 30),
    ("zero drain approves now", event(), replace(POLICY, drain_seconds=0, min_drain_seconds=0),
     Phase.APPROVING, False, 0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "policy", "phase", "serving", "approve_in"),
    [case[1:] for case in FIRST_SIGHT],
    ids=[case[0] for case in FIRST_SIGHT],
)
def test_first_sight(
    entry: dict[str, Any], policy: Policy, phase: Phase, serving: bool, approve_in: float | None
) -> None:
    decision = first_sight(entry, policy)
    tracked = decision.state.events["e1"]
    assert tracked.phase is phase
    assert decision.state.serving is serving
    expected = None if approve_in is None else NOW + approve_in
    assert tracked.approve_at == expected
    assert decision.actions == ((Approve("e1"),) if phase is Phase.APPROVING else ())
    assert decision.changes[-1].after is phase


def test_probe_is_down_until_the_first_successful_poll() -> None:
    assert not DrainState().serving
    assert machine.observe(DrainState(), doc(), NOW, POLICY).state.serving


def test_approves_once_when_the_drain_period_is_over() -> None:
    state = first_sight(event()).state
    assert machine.tick(state, NOW + 29.9, POLICY).actions == ()
    due = machine.tick(state, NOW + 30, POLICY)
    assert due.actions == (Approve("e1"),)
    assert due.state.events["e1"].phase is Phase.APPROVING
    assert machine.tick(due.state, NOW + 31, POLICY).actions == (), "a second POST while one is out"

    done = machine.approval_succeeded(due.state, "e1", NOW + 30.2).state
    assert done.events["e1"].phase is Phase.APPROVED
    assert done.approved == {"e1": NOW + 30.2}
    again = machine.observe(done, doc(event(), incarnation=2), NOW + 40, POLICY)
    assert again.actions == ()
    assert again.state.events["e1"].phase is Phase.APPROVED
    assert not again.state.serving


def test_failed_approval_is_retried_with_back_off() -> None:
    state = machine.tick(first_sight(event()).state, NOW + 30, POLICY).state
    failed = machine.approval_failed(state, "e1", "HTTP 500", NOW + 30, POLICY).state
    assert failed.events["e1"].retry_at == NOW + 31
    assert failed.next_wakeup() == NOW + 31
    assert machine.tick(failed, NOW + 30.5, POLICY).actions == ()
    retry = machine.tick(failed, NOW + 31, POLICY)
    assert retry.actions == (Approve("e1"),)
    twice = machine.approval_failed(retry.state, "e1", "HTTP 500", NOW + 31, POLICY).state
    assert twice.events["e1"].retry_at == NOW + 33
    assert twice.events["e1"].last_error == "HTTP 500"
    # a poll in between keeps the retry schedule instead of starting over
    polled = machine.observe(twice, doc(event(), incarnation=2), NOW + 32, POLICY).state
    assert polled.events["e1"].phase is Phase.APPROVING
    assert polled.events["e1"].retry_at == NOW + 33


def test_started_event_is_never_approved() -> None:
    state = first_sight(event()).state
    started = machine.observe(state, doc(event(status="Started"), incarnation=2), NOW + 31, POLICY)
    assert started.actions == ()
    assert started.state.events["e1"].phase is Phase.STARTED
    assert machine.tick(started.state, NOW + 100, POLICY).actions == ()


def test_event_leaving_a_complete_document_brings_the_probe_back() -> None:
    state = first_sight(event()).state
    gone = machine.observe(state, doc(incarnation=2), NOW + 5, POLICY)
    assert gone.state.serving
    assert gone.state.events == {}
    assert gone.changes[0].after is None


def test_event_missing_from_an_incomplete_document_keeps_draining() -> None:
    state = first_sight(event()).state
    broken = doc({"EventId": "e1", "EventType": "Reboot"}, incarnation=2)
    assert not broken.complete
    kept = machine.observe(state, broken, NOW + 5, POLICY).state
    assert kept.events["e1"].phase is Phase.DRAINING
    assert not kept.serving


def test_event_that_stops_naming_us_is_released() -> None:
    state = first_sight(event()).state
    moved = machine.observe(state, doc(event(resources=("web-2",)), incarnation=2), NOW, POLICY)
    assert moved.state.events["e1"].phase is Phase.IGNORED
    assert moved.state.serving


def test_later_not_before_moves_the_deadline() -> None:
    state = first_sight(event(kind="Preempt", not_before=NOW + 30)).state
    assert state.events["e1"].approve_at == NOW + 25
    later = machine.observe(state, doc(event(not_before=NOW + 600), incarnation=2), NOW + 1, POLICY)
    assert later.state.events["e1"].approve_at == NOW + 30


def test_restart_resumes_the_drain_and_remembers_approvals() -> None:
    draining = first_sight(event("e1")).state
    approved = machine.observe(
        DrainState(), doc(event("e2", not_before=NOW + 60)), NOW - 40, POLICY
    )
    approved_state = machine.approval_succeeded(
        machine.tick(approved.state, NOW - 10, POLICY).state, "e2", NOW - 10
    ).state
    saved = {
        "drain": drain_section(
            replace(
                draining,
                events={**draining.events, **approved_state.events},
                approved=approved_state.approved,
            )
        )
    }

    restored = restore_drain(saved)
    assert not restored.serving, "not ready until the first poll after the restart"
    after = machine.observe(
        restored, doc(event("e1"), event("e2", not_before=NOW + 60)), NOW + 20, POLICY
    )
    assert after.state.events["e1"].approve_at == NOW + 30, "drain clock kept across restart"
    assert after.state.events["e2"].phase is Phase.APPROVED
    assert after.actions == ()


def test_approvals_are_forgotten_a_week_after_the_event_left() -> None:
    state = DrainState(approved={"old": NOW - 8 * 24 * 3600, "recent": NOW - 3600})
    assert set(machine.observe(state, doc(), NOW, POLICY).state.approved) == {"recent"}


def test_unknown_fields_are_ignored() -> None:
    entry = {**event(), "Surprise": {"nested": [1, 2]}, "DurationInSeconds": 900}
    assert first_sight(entry).state.events["e1"].phase is Phase.DRAINING


# --- whatever happens, the invariants hold

IDS = ["a", "b", "c"]
event_strategy = st.builds(
    event,
    event_id=st.sampled_from(IDS),
    kind=st.sampled_from(["Reboot", "Freeze", "Preempt", "Hibernate"]),
    resources=st.sampled_from([(ME,), ("web-2",), (ME, "web-2"), ("web-2", ME), ()]),
    status=st.sampled_from(["Scheduled", "Started"]),
    not_before=st.one_of(st.none(), st.floats(NOW - 100, NOW + 1000)),
)
step_strategy = st.one_of(
    st.tuples(st.just("poll"), st.lists(event_strategy, max_size=3)),
    st.tuples(st.just("wait"), st.floats(0, 60)),
    st.tuples(st.just("fail"), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(step_strategy, max_size=30))
def test_never_approves_twice_nor_what_is_not_ours(steps: list[tuple[str, Any]]) -> None:
    state, now = DrainState(), NOW
    latest: dict[str, ScheduledEvent] = {}
    succeeded: list[str] = []
    failing = False
    for kind, value in steps:
        if kind == "poll":
            entries = {entry["EventId"]: entry for entry in value}
            document = doc(*entries.values())
            latest = {e.event_id: e for e in document.events}
            decision = machine.observe(state, document, now, POLICY)
        elif kind == "wait":
            now += value
            decision = machine.tick(state, now, POLICY)
        else:
            failing = value
            continue
        state = decision.state
        for action in decision.actions:
            seen = latest[action.event_id]
            assert seen.names(ME) and seen.led_by(ME)
            assert seen.event_type in POLICY.event_types
            assert not seen.started
            assert action.event_id not in succeeded
            if failing:
                state = machine.approval_failed(state, action.event_id, "x", now, POLICY).state
            else:
                state = machine.approval_succeeded(state, action.event_id, now).state
                succeeded.append(action.event_id)
        ours = [e for e in latest.values() if e.names(ME) and e.event_type in POLICY.event_types]
        if kind == "poll" and state.ready:
            assert state.serving is (not ours)


def test_approval_waits_for_the_pools_until_the_deadline() -> None:
    state = first_sight(event(not_before=NOW + 60)).state  # approve at +30, deadline +55
    waiting = replace(state, pools_settled=False)
    assert machine.tick(waiting, NOW + 30, POLICY).actions == ()
    assert waiting.next_wakeup() == NOW + 55
    assert machine.tick(waiting, NOW + 55, POLICY).actions == (Approve("e1"),)

    settled = replace(waiting, pools_settled=True)
    assert settled.next_wakeup() == NOW + 30
    assert machine.tick(settled, NOW + 31, POLICY).actions == (Approve("e1"),)


def test_pools_that_settle_early_do_not_shorten_the_drain() -> None:
    state = replace(first_sight(event()).state, pools_settled=True)
    assert machine.tick(state, NOW + 10, POLICY).actions == ()


def test_a_drain_that_begins_waits_for_the_pool_action() -> None:
    with_pools = replace(POLICY, pool_action=True, drain_seconds=0, min_drain_seconds=0)
    begun = machine.observe(DrainState(), doc(event()), NOW, with_pools)
    assert begun.actions == (), "approved before the NIC left its pools"
    assert not begun.state.pools_settled
    without = machine.observe(
        DrainState(), doc(event()), NOW, replace(with_pools, pool_action=False)
    )
    assert without.actions == (Approve("e1"),)


def test_idle_app_ends_the_drain_after_the_minimum() -> None:
    state = first_sight(event()).state  # drain 30 s, minimum 10 s
    busy = replace(state, connections=3)
    assert machine.tick(busy, NOW + 29, POLICY).actions == ()
    idle = replace(state, connections=0)
    assert idle.next_wakeup() == NOW + 10
    assert machine.tick(idle, NOW + 9.9, POLICY).actions == (), "idle, but before the minimum"
    due = machine.tick(idle, NOW + 10, POLICY)
    assert due.actions == (Approve("e1"),)
    assert due.changes[0].reason == "no connections left to the app"
    uncounted = replace(state, connections=None)
    assert machine.tick(uncounted, NOW + 10, POLICY).actions == ()
