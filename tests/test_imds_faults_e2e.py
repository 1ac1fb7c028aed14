"""IMDS misbehaving: the probe stays fast and at its last known state; 429 backs off."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import SidecarFactory
from tests.support import Simulator, wait_for

# Loopback HTTP to a handler that reads a flag takes about a millisecond; this bound only fails
# when the event loop is blocked (a hang of IMDS would show up here as ~1 s, the IMDS timeout).
PROBE_BOUND_SECONDS = 0.25

FAULTS = {
    "500": {"kind": "status", "status": 500},
    "429": {"kind": "status", "status": 429},
    "not json": {"kind": "malformed", "variant": "not-json"},
    "not an object": {"kind": "malformed", "variant": "not-object"},
    "hang": {"kind": "hang"},
}


def failures(sidecar: Any) -> int:
    count: int = sidecar.status()["imds"]["consecutive_failures"]
    return count


@pytest.mark.parametrize("draining", [False, True], ids=["serving", "draining"])
@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_probe_keeps_its_last_state_and_answers_fast(
    simulator: Simulator, start_sidecar: SidecarFactory, fault: dict[str, Any], draining: bool
) -> None:
    sidecar = start_sidecar(imds_timeout="1", drain_seconds="600", backoff_max="1")
    sidecar.wait_probe(200)
    if draining:
        simulator.add_event(type="Reboot", not_before_in=900)
        sidecar.wait_probe(503)
    expected = 503 if draining else 200

    simulator.fault(target="scheduledevents", **fault)
    wait_for(lambda: failures(sidecar) >= 2, "two failed polls")
    answers = [sidecar.probe(method) for method in ("GET", "HEAD") * 25]
    assert {answer.status for answer in answers} == {expected}
    slowest = max(answer.seconds for answer in answers)
    assert slowest < PROBE_BOUND_SECONDS, f"probe took {slowest * 1000:.0f} ms"
    assert sidecar.status()["imds"]["last_error"]

    simulator.clear_faults()
    wait_for(lambda: failures(sidecar) == 0, "polls to succeed again")
    assert sidecar.probe().status == expected
    assert simulator.approvals() == []


def test_unreadable_entry_does_not_end_our_drain(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(drain_seconds="600")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    sidecar.wait_probe(503)
    simulator.fault(target="scheduledevents", kind="malformed", variant="bad-event")
    sidecar.wait_polls(5)
    assert sidecar.probe().status == 503
    assert "skipped an unreadable event" in sidecar.process.output()
    simulator.clear_faults()
    simulator.control("DELETE", f"/events/{event['EventId']}")
    sidecar.wait_probe(200)


def test_probe_is_down_until_the_first_successful_poll(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    simulator.fault(target="scheduledevents", kind="status", status=500)
    sidecar = start_sidecar(backoff_max="0.5")
    wait_for(lambda: sidecar.probe_code() == 503, "the probe to listen")
    wait_for(lambda: failures(sidecar) >= 3, "three failed polls")
    answer = sidecar.probe()
    assert (answer.status, answer.body) == (503, b"starting\n")
    simulator.clear_faults()
    sidecar.wait_probe(200)


def test_429_backs_off(simulator: Simulator, start_sidecar: SidecarFactory) -> None:
    sidecar = start_sidecar(poll_interval="0.25", backoff_max="5")
    sidecar.wait_probe(200)
    simulator.control("DELETE", "/requests")
    simulator.fault(target="scheduledevents", kind="status", status=429, count=6, retry_after=1)
    wait_for(lambda: simulator.control("GET", "/faults") == [], "all six 429s to be served")
    wait_for(lambda: failures(sidecar) == 0, "a successful poll after them")

    polls = [
        entry
        for entry in simulator.control("GET", "/requests")["log"]
        if entry["kind"] == "scheduledevents"
    ]
    assert [entry["status"] for entry in polls[:7]] == [429] * 6 + [200]
    # At 0.25 s polling, seven requests take 1.5 s; honouring `Retry-After: 1` takes 6 s or more.
    spread = polls[6]["t"] - polls[0]["t"]
    assert spread >= 5.9, f"retried too fast: {spread:.2f}s for six 429s"
    assert sidecar.probe().status == 200
