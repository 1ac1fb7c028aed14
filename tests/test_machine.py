"""The pure decision logic, table by table: no I/O, no clock, `now` is an argument.

`now` is a `Now`: the monotonic reading drives every duration, the wall reading only maps
NotBefore; `at(seconds, skew)` moves both, and a skew is a step of the wall clock alone.
"""

from __future__ import annotations

from dataclasses import replace
from email.utils import formatdate
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import machine
from sidecar.events import EventsDocument, ScheduledEvent, parse_document
from sidecar.machine import Approve, Decision, DrainState, Now, Phase, Policy
from sidecar.records import drain_section, restore_drain

NOW = 1_800_000_000.0
"""Wall clock at the start of every test."""
MONO = 5_000.0
"""Monotonic clock at the start of every test (any value: only differences count)."""
ME = "web-1"
POLICY = Policy(
    vm_name=ME,
    event_types=frozenset({"Reboot", "Redeploy", "Preempt", "Terminate"}),
    drain_seconds=30,
    min_drain_seconds=10,
    deadline_margin_seconds=5,
    approve="leader",
)
IMPACT = replace(POLICY, return_after="impact", event_types=POLICY.event_types | {"Freeze"})


def at(seconds: float = 0.0, skew: float = 0.0) -> Now:
    """`seconds` after the test began; `skew` steps the wall clock only."""
    return Now(MONO + seconds, NOW + seconds + skew)


def mono(seconds: float) -> float:
    return MONO + seconds


def event(
    event_id: str = "e1",
    kind: str = "Reboot",
    resources: tuple[str, ...] = (ME,),
    status: str = "Scheduled",
    not_before: float | str | None = NOW + 900,
    duration: int = -1,
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
        "DurationInSeconds": duration,
    }


def doc(*events: dict[str, Any], incarnation: int = 1) -> EventsDocument:
    return parse_document({"DocumentIncarnation": incarnation, "Events": list(events)})


def decide(
    state: DrainState, document: EventsDocument, now: Now, policy: Policy = POLICY
) -> Decision:
    """A poll as the drain loop makes it: fold the document in, then see what is due."""
    observed = machine.observe(state, document, now, policy)
    due = machine.tick(observed.state, now, policy)
    return Decision(due.state, due.actions, (*observed.changes, *due.changes))


def first_sight(entry: dict[str, Any], policy: Policy = POLICY) -> Decision:
    return decide(DrainState(), doc(entry), at(), policy)


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
    expected = None if approve_in is None else mono(approve_in)
    assert tracked.approve_at == expected
    assert decision.actions == ((Approve("e1"),) if phase is Phase.APPROVING else ())
    assert decision.changes[-1].after is phase


def test_probe_is_down_until_the_first_successful_poll() -> None:
    assert not DrainState().serving
    assert decide(DrainState(), doc(), at()).state.serving


def test_approves_once_when_the_drain_period_is_over() -> None:
    state = first_sight(event()).state
    assert machine.tick(state, at(29.9), POLICY).actions == ()
    due = machine.tick(state, at(30), POLICY)
    assert due.actions == (Approve("e1"),)
    assert due.state.events["e1"].phase is Phase.APPROVING
    assert machine.tick(due.state, at(31), POLICY).actions == (), "a second POST while one is out"

    done = machine.approval_succeeded(due.state, "e1", at(30.2)).state
    assert done.events["e1"].phase is Phase.APPROVED
    assert done.approved == {"e1": NOW + 30.2}
    again = decide(done, doc(event(), incarnation=2), at(40))
    assert again.actions == ()
    assert again.state.events["e1"].phase is Phase.APPROVED
    assert not again.state.serving


def test_failed_approval_is_retried_with_back_off() -> None:
    state = machine.tick(first_sight(event()).state, at(30), POLICY).state
    failed = machine.approval_failed(state, "e1", "HTTP 500", at(30), POLICY, unknown=False).state
    assert failed.events["e1"].retry_at == mono(31)
    assert failed.next_wakeup() == mono(31)
    assert machine.tick(failed, at(30.5), POLICY).actions == ()
    retry = machine.tick(failed, at(31), POLICY)
    assert retry.actions == (Approve("e1"),)
    twice = machine.approval_failed(
        retry.state, "e1", "HTTP 500", at(31), POLICY, unknown=False
    ).state
    assert twice.events["e1"].retry_at == mono(33)
    assert twice.events["e1"].last_error == "HTTP 500"
    # a poll in between keeps the retry schedule instead of starting over
    polled = machine.observe(twice, doc(event(), incarnation=2), at(32), POLICY).state
    assert polled.events["e1"].phase is Phase.APPROVING
    assert polled.events["e1"].retry_at == mono(33)


def test_unanswered_approval_is_sent_again_only_after_a_poll_shows_it_scheduled() -> None:
    """Found by review: an approval IMDS accepted but answered late was retried blindly."""
    state = machine.tick(first_sight(event()).state, at(30), POLICY).state
    lost = machine.approval_failed(state, "e1", "no answer", at(30), POLICY, unknown=True).state
    assert lost.events["e1"].outcome_unknown
    assert machine.tick(lost, at(100), POLICY).actions == (), "sent again without re-reading"
    assert lost.next_wakeup() is None

    started = decide(lost, doc(event(status="Started"), incarnation=2), at(31))
    assert started.actions == ()
    assert started.state.events["e1"].phase is Phase.STARTED

    still_scheduled = decide(lost, doc(event(), incarnation=2), at(31))
    assert still_scheduled.actions == (Approve("e1"),)


def test_started_event_is_never_approved() -> None:
    state = first_sight(event()).state
    started = decide(state, doc(event(status="Started"), incarnation=2), at(31))
    assert started.actions == ()
    assert started.state.events["e1"].phase is Phase.STARTED
    assert machine.tick(started.state, at(100), POLICY).actions == ()


def test_event_leaving_a_complete_document_brings_the_probe_back() -> None:
    state = first_sight(event()).state
    gone = decide(state, doc(incarnation=2), at(5))
    assert gone.state.serving
    assert gone.state.events == {}
    assert gone.changes[0].after is None


def test_event_missing_from_an_incomplete_document_keeps_draining() -> None:
    state = first_sight(event()).state
    broken = doc({"EventId": "e1", "EventType": "Reboot"}, incarnation=2)
    assert not broken.complete
    kept = decide(state, broken, at(5)).state
    assert kept.events["e1"].phase is Phase.DRAINING
    assert not kept.serving


def test_event_that_stops_naming_us_is_released() -> None:
    state = first_sight(event()).state
    moved = decide(state, doc(event(resources=("web-2",)), incarnation=2), at())
    assert moved.state.events["e1"].phase is Phase.IGNORED
    assert moved.state.serving


def test_later_not_before_moves_the_deadline() -> None:
    state = first_sight(event(kind="Preempt", not_before=NOW + 30)).state
    assert state.events["e1"].approve_at == mono(25)
    later = decide(state, doc(event(not_before=NOW + 600), incarnation=2), at(1))
    assert later.state.events["e1"].approve_at == mono(30)


def test_restart_resumes_the_drain_and_remembers_approvals() -> None:
    draining = first_sight(event("e1")).state
    approved = decide(DrainState(), doc(event("e2", not_before=NOW + 60)), at(-40))
    approved_state = machine.approval_succeeded(
        machine.tick(approved.state, at(-10), POLICY).state, "e2", at(-10)
    ).state
    both = replace(
        draining,
        events={**draining.events, **approved_state.events},
        approved=approved_state.approved,
    )
    saved = {"drain": drain_section(both, at(1))}

    # the new process: another monotonic origin, the same wall clock
    later = Now(77.0, NOW + 20)
    restored = restore_drain(saved, later, boot_id=None)
    assert not restored.serving, "not ready until the first poll after the restart"
    after = decide(restored, doc(event("e1"), event("e2", not_before=NOW + 60)), later)
    assert after.state.events["e1"].approve_at == pytest.approx(77.0 + 10), "drain clock kept"
    assert after.state.events["e2"].phase is Phase.APPROVED
    assert after.actions == ()


def test_restart_with_an_approval_in_flight_re_reads_before_sending_again() -> None:
    sending = machine.tick(first_sight(event()).state, at(30), POLICY).state
    saved = {"drain": drain_section(sending, at(30))}
    assert saved["drain"]["draining"]["e1"]["approval"] == "sent"
    restored = restore_drain(saved, at(31), boot_id=None)
    assert machine.tick(restored, at(40), POLICY).actions == ()
    assert decide(restored, doc(event(status="Started")), at(40)).actions == ()
    assert decide(restored, doc(event()), at(40)).actions == (Approve("e1"),)


def test_approvals_are_forgotten_a_week_after_the_event_left() -> None:
    state = DrainState(approved={"old": NOW - 8 * 24 * 3600, "recent": NOW - 3600})
    assert set(decide(state, doc(), at()).state.approved) == {"recent"}


def test_unknown_fields_are_ignored() -> None:
    entry = {**event(), "Surprise": {"nested": [1, 2]}, "DurationInSeconds": 900}
    assert first_sight(entry).state.events["e1"].phase is Phase.DRAINING


# --- the clock: durations are monotonic; only NotBefore is read through the wall clock


@pytest.mark.parametrize("step", [-3600.0, -31.0, 31.0, 3600.0], ids=lambda s: f"{s:+g}s")
def test_a_wall_clock_step_neither_shortens_nor_stretches_the_drain(step: float) -> None:
    """Found by review: the drain was timed with the wall clock (a time sync after a Freeze
    or a live migration steps it)."""
    state = first_sight(event(not_before=None)).state  # no NotBefore: only the drain period
    stepped = decide(state, doc(event(not_before=None), incarnation=2), at(10, skew=step)).state
    assert machine.tick(stepped, at(29.9, skew=step), POLICY).actions == ()
    assert machine.tick(stepped, at(30, skew=step), POLICY).actions == (Approve("e1"),)


def test_not_before_is_read_through_the_wall_clock_after_a_step() -> None:
    """NotBefore is the platform's wall time: after a step, the deadline follows the new
    reading of it (approving by NotBefore - margin as this clock now tells it)."""
    state = first_sight(event(kind="Preempt", not_before=NOW + 30)).state
    assert state.events["e1"].approve_at == mono(25)
    ahead = decide(state, doc(event(not_before=NOW + 30), incarnation=2), at(1, skew=10)).state
    assert ahead.events["e1"].deadline == mono(15)


# --- gates: waiting until the deadline, blocking outright


def test_approval_waits_for_a_gate_until_the_deadline() -> None:
    state = first_sight(event(not_before=NOW + 60)).state  # approve at +30, deadline +55
    waiting = replace(state, waits_for=frozenset({"pools"}))
    assert machine.tick(waiting, at(30), POLICY).actions == ()
    assert waiting.next_wakeup() == mono(55)
    assert machine.tick(waiting, at(55), POLICY).actions == (Approve("e1"),)

    open_again = replace(waiting, waits_for=frozenset())
    assert open_again.next_wakeup() == mono(30)
    assert machine.tick(open_again, at(31), POLICY).actions == (Approve("e1"),)


def test_a_gate_that_opens_early_does_not_shorten_the_drain() -> None:
    assert machine.tick(first_sight(event()).state, at(10), POLICY).actions == ()


def test_a_blocking_gate_allows_no_approval_even_at_the_deadline() -> None:
    state = first_sight(event(not_before=NOW + 60)).state
    blocked = replace(state, blocked_by=frozenset({"hooks"}))
    assert blocked.next_wakeup() is None
    for moment in (30, 55, 59, 120):
        assert machine.tick(blocked, at(moment), POLICY).actions == ()
    retrying = machine.approval_failed(
        machine.tick(state, at(30), POLICY).state, "e1", "x", at(30), POLICY, unknown=False
    ).state
    assert (
        machine.tick(replace(retrying, blocked_by=frozenset({"hooks"})), at(99), POLICY).actions
        == ()
    )


def test_idle_app_ends_the_drain_after_the_minimum() -> None:
    state = first_sight(event()).state  # drain 30 s, minimum 10 s
    busy = replace(state, connections=3)
    assert machine.tick(busy, at(29), POLICY).actions == ()
    idle = replace(state, connections=0)
    assert idle.next_wakeup() == mono(10)
    assert machine.tick(idle, at(9.9), POLICY).actions == (), "idle, but before the minimum"
    due = machine.tick(idle, at(10), POLICY)
    assert due.actions == (Approve("e1"),)
    assert due.changes[0].reason == "no connections left to the app"
    uncounted = replace(state, connections=None)
    assert machine.tick(uncounted, at(10), POLICY).actions == ()


# --- by hand


def test_a_drain_by_hand_holds_the_probe_until_undone() -> None:
    ready = decide(DrainState(), doc(), at()).state
    drained = machine.drain_by_hand(ready, "deploy", at(1))
    assert not drained.serving
    assert drained.drain_since == mono(1)
    again = machine.drain_by_hand(drained, "still deploying", at(5))
    assert again.drain_since == mono(1), "a second request keeps the first's start"
    assert decide(again, doc(), at(6)).state.serving is False
    assert machine.undrain_by_hand(again).serving


# --- back in rotation when the impact is over (SIDECAR_RETURN_AFTER=impact)


def rebooted(policy: Policy, *, boot_after: str) -> DrainState:
    """A Reboot seen in boot A, approved, started; then the process restarts in `boot_after`."""
    seen = decide(DrainState(boot_id="A"), doc(event()), at(), policy).state
    approving = machine.tick(seen, at(30), policy).state
    approved = machine.approval_succeeded(approving, "e1", at(30)).state
    started = decide(approved, doc(event(status="Started"), incarnation=2), at(31), policy).state
    saved = {"drain": drain_section(started, at(31))}
    return restore_drain(saved, Now(10.0, NOW + 60), boot_id=boot_after)


def test_reboot_over_serves_while_the_event_is_still_listed() -> None:
    after = decide(
        rebooted(IMPACT, boot_after="B"), doc(event(status="Started")), Now(10.0, NOW + 60), IMPACT
    )
    assert after.state.events["e1"].phase is Phase.OVER
    assert "booted again" in after.state.events["e1"].reason
    assert after.state.serving
    assert after.actions == ()


def test_a_restart_of_the_sidecar_alone_is_not_a_reboot() -> None:
    after = decide(
        rebooted(IMPACT, boot_after="A"), doc(event(status="Started")), Now(10.0, NOW + 60), IMPACT
    )
    assert after.state.events["e1"].phase is Phase.STARTED
    assert not after.state.serving


def test_by_default_a_rebooted_vm_waits_for_the_event_to_leave() -> None:
    after = decide(
        rebooted(POLICY, boot_after="B"), doc(event(status="Started")), Now(10.0, NOW + 60)
    )
    assert after.state.events["e1"].phase is Phase.STARTED
    assert not after.state.serving
    gone = decide(after.state, doc(incarnation=3), Now(11.0, NOW + 61))
    assert gone.state.serving


def test_a_started_event_without_a_record_of_ours_stays_conservative() -> None:
    """State lost: first seen already Started, after the reboot: nothing proves it is over."""
    first = decide(DrainState(boot_id="B"), doc(event(status="Started")), at(), IMPACT)
    tracked = first.state.events["e1"]
    assert tracked.phase is Phase.STARTED
    assert "no record from before the start" in tracked.reason
    assert not first.state.serving


def test_an_impact_that_is_over_never_drains_again() -> None:
    over = decide(
        rebooted(IMPACT, boot_after="B"), doc(event(status="Started")), Now(10.0, NOW + 60), IMPACT
    )
    later = decide(
        over.state, doc(event(status="Started"), incarnation=5), Now(20.0, NOW + 70), IMPACT
    )
    assert later.state.events["e1"].phase is Phase.OVER
    assert later.state.serving


FREEZES = [
    # duration, seconds after it was seen Started, phase
    (30, 34.9, Phase.STARTED),
    (30, 35.0, Phase.OVER),  # 30 s + the 5 s margin
    (-1, 3600.0, Phase.STARTED),  # unknown duration: until it leaves
]


@pytest.mark.parametrize(("duration", "later", "phase"), FREEZES)
def test_a_freeze_is_over_after_its_duration(duration: int, later: float, phase: Phase) -> None:
    started = decide(
        DrainState(), doc(event(kind="Freeze", status="Started", duration=duration)), at(), IMPACT
    ).state
    assert started.events["e1"].phase is Phase.STARTED
    assert machine.tick(started, at(later), IMPACT).state.events["e1"].phase is phase


# --- whatever happens, the invariants hold

IDS = ["a", "b", "c"]
event_strategy = st.builds(
    event,
    event_id=st.sampled_from(IDS),
    kind=st.sampled_from(["Reboot", "Freeze", "Preempt", "Hibernate"]),
    resources=st.sampled_from([(ME,), ("web-2",), (ME, "web-2"), ("web-2", ME), ()]),
    status=st.sampled_from(["Scheduled", "Started"]),
    not_before=st.one_of(st.none(), st.floats(NOW - 100, NOW + 1000)),
    duration=st.sampled_from([-1, 0, 10]),
)
step_strategy = st.one_of(
    st.tuples(st.just("poll"), st.lists(event_strategy, max_size=3)),
    st.tuples(st.just("wait"), st.floats(0, 60)),
    st.tuples(st.just("clock step"), st.floats(-7200, 7200)),
    st.tuples(st.just("answers"), st.sampled_from(["ok", "error", "unanswered"])),
    st.tuples(st.just("gates"), st.sampled_from(["open", "wait", "block", "hold"])),
    st.tuples(st.just("restart"), st.sampled_from(["A", "B"])),
)


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(step_strategy, max_size=40), policy=st.sampled_from([POLICY, IMPACT]))
def test_never_approves_twice_nor_what_is_not_ours(
    steps: list[tuple[str, Any]], policy: Policy
) -> None:
    state, elapsed, skew = DrainState(boot_id="A"), 0.0, 0.0
    latest: dict[str, ScheduledEvent] = {}
    succeeded: list[str] = []
    answers = "ok"
    for kind, value in steps:
        now = at(elapsed, skew)
        if kind == "poll":
            entries = {entry["EventId"]: entry for entry in value}
            document = doc(*entries.values())
            latest = {e.event_id: e for e in document.events}
            decision = decide(state, document, now, policy)
        elif kind in ("wait", "clock step"):
            elapsed += value if kind == "wait" else 0.0
            skew += value if kind == "clock step" else 0.0
            decision = machine.tick(state, at(elapsed, skew), policy)
        elif kind == "answers":
            answers = value
            continue
        elif kind == "gates":
            waits = frozenset({"g"}) if value == "wait" else frozenset()
            blocks = frozenset({"g"}) if value == "block" else frozenset()
            holds = frozenset({"g"}) if value == "hold" else frozenset()
            state = replace(state, waits_for=waits, blocked_by=blocks, held_by=holds)
            continue
        else:  # the process restarts: the state file is all that is left
            saved = {"drain": drain_section(state, now)}
            state = restore_drain(saved, now, boot_id=value)
            continue
        state = decision.state
        for action in decision.actions:
            seen = latest[action.event_id]
            assert seen.names(ME) and seen.led_by(ME)
            assert seen.event_type in policy.event_types
            assert not seen.started
            assert not state.blocked_by, "approved while a gate blocks"
            assert action.event_id not in succeeded
            if answers == "ok":
                state = machine.approval_succeeded(state, action.event_id, now).state
                succeeded.append(action.event_id)
            else:
                unknown = answers == "unanswered"
                state = machine.approval_failed(
                    state, action.event_id, "x", now, policy, unknown=unknown
                ).state
        if kind == "poll" and state.ready:
            holding = [t for t in state.events.values() if t.holds_probe_down]
            assert state.serving is (not holding)
            for event_id, seen in latest.items():
                ours = seen.names(ME) and seen.event_type in policy.event_types
                if ours and state.events[event_id].phase not in (Phase.OVER, Phase.HELD):
                    assert not state.serving, "serving while an event of ours is pending"
        for tracked in state.events.values():  # a drain, once begun, is never held again
            if tracked.phase is Phase.HELD:
                assert tracked.drain_started is None


# --- the capacity guard: serving a while before the drain starts


def test_a_held_drain_starts_when_the_gate_lets_go() -> None:
    guarded = DrainState(held_by=frozenset({"capacity"}))
    first = decide(guarded, doc(event(not_before=NOW + 900)), at())
    tracked = first.state.events["e1"]
    assert tracked.phase is Phase.HELD
    assert first.state.serving, "held means still in rotation"
    assert tracked.hold_until == mono(900 - 5 - 10)  # NotBefore - margin - minimum drain
    still = decide(first.state, doc(event(not_before=NOW + 900), incarnation=2), at(60)).state
    assert still.events["e1"].phase is Phase.HELD

    released = machine.tick(replace(still, held_by=frozenset()), at(100), POLICY)
    drained = released.state.events["e1"]
    assert drained.phase is Phase.DRAINING
    assert drained.drain_started == mono(100) and drained.approve_at == mono(130)
    assert not released.state.serving
    assert released.changes[0].before is Phase.HELD


def test_a_held_drain_starts_anyway_when_only_the_minimum_is_left() -> None:
    guarded = DrainState(held_by=frozenset({"capacity"}))
    state = decide(guarded, doc(event(not_before=NOW + 60)), at()).state  # hold until +45
    assert state.next_wakeup() == mono(45)
    assert machine.tick(state, at(44.9), POLICY).state.events["e1"].phase is Phase.HELD
    late = machine.tick(state, at(45), POLICY).state
    assert late.events["e1"].phase is Phase.DRAINING
    assert late.events["e1"].approve_at == mono(55), "the deadline: a short drain beats none"


def test_a_started_drain_is_never_held_again() -> None:
    draining = first_sight(event()).state
    guarded = replace(draining, held_by=frozenset({"capacity"}))
    again = decide(guarded, doc(event(), incarnation=2), at(5)).state
    assert again.events["e1"].phase is Phase.DRAINING


def test_nothing_is_held_without_time_to_spare() -> None:
    guarded = DrainState(held_by=frozenset({"capacity"}))
    short = decide(guarded, doc(event(kind="Preempt", not_before=NOW + 14)), at()).state
    assert short.events["e1"].phase is not Phase.HELD


def test_a_freeze_that_paused_this_process_counts_from_before_it() -> None:
    """Found by the time-out-of-rotation benchmark: the freeze pauses the sidecar too, so it
    first sees the event `Started` after the freeze; counting the duration from then held the
    VM out for a second duration."""
    scheduled = decide(DrainState(), doc(event(kind="Freeze", duration=30)), at(), IMPACT).state
    started = decide(
        scheduled, doc(event(kind="Freeze", status="Started", duration=30)), at(30.5), IMPACT
    ).state
    assert started.events["e1"].impact_over_at == mono(35.5)  # not 30.5 + 30 + 5
    assert machine.tick(started, at(35.5), IMPACT).state.events["e1"].phase is Phase.OVER


def _held_then_restarted(boot_after: str) -> DrainState:
    """A VM the guard held (boot A), its state file read by a new process in boot `boot_after`,
    the guard holding again before the first decision (as the drain loop asks it)."""
    guarded = DrainState(held_by=frozenset({"capacity"}), boot_id="A")
    held = decide(guarded, doc(event(not_before=NOW + 900)), at(), IMPACT).state
    assert held.events["e1"].phase is Phase.HELD
    saved = {"drain": drain_section(held, at(1))}
    restored = restore_drain(saved, Now(10.0, NOW + 60), boot_id=boot_after)
    return replace(restored, held_by=frozenset({"capacity"}))


def test_a_held_vm_the_platform_rebooted_is_over_not_drained() -> None:
    """Found by the fleet rehearsal: a held event was not recorded, so after the platform's
    reboot nothing proved the impact over and the VM drained for it."""
    after = decide(
        _held_then_restarted(boot_after="B"),
        doc(event(status="Started")),
        Now(11.0, NOW + 61),
        IMPACT,
    )
    assert after.state.events["e1"].phase is Phase.OVER
    assert after.state.serving and after.actions == ()


def test_a_held_vm_restarted_without_a_reboot_stays_held_or_waits_for_its_reboot() -> None:
    still = decide(
        _held_then_restarted(boot_after="A"),
        doc(event(not_before=NOW + 900)),
        Now(11.0, NOW + 61),
        IMPACT,
    )
    assert still.state.events["e1"].phase is Phase.HELD and still.state.serving
    started = decide(
        _held_then_restarted(boot_after="A"),
        doc(event(status="Started")),
        Now(11.0, NOW + 61),
        IMPACT,
    )
    assert started.state.events["e1"].phase is Phase.STARTED, "its reboot is still to come"
    assert not started.state.serving
