"""End to end: `sidecar run` as a process against `sidecar simulate`, over loopback HTTP.

Every child runs with HTTP(S)_PROXY pointing at a dead port, so every passing test also shows that
IMDS traffic ignores proxy variables.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from tests.conftest import SidecarFactory
from tests.support import PATIENCE, Simulator, wait_for

FLIP_SLACK = 3.0  # generous: the flip itself is one poll plus microseconds


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def saved_drains(workdir: Path) -> dict[str, object]:
    try:
        drains: dict[str, object] = json.loads((workdir / "state.json").read_text())["drain"][
            "draining"
        ]
    except (FileNotFoundError, KeyError):
        return {}
    return drains


def test_reboot_for_us_drains_then_approves_exactly_once(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(poll_interval="0.5", drain_seconds="2", min_drain_seconds="0")
    sidecar.wait_probe(200)

    added = time.monotonic()
    event = simulator.add_event(type="Reboot", resources=["web-1"], not_before_in=900)
    sidecar.wait_probe(503)
    assert time.monotonic() - added < 0.5 + FLIP_SLACK
    draining = sidecar.wait_phase(event["EventId"], "draining")

    approval = wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    drained = epoch(approval[0]["at"]) - epoch(draining["drain_started"])
    assert drained >= 2.0, "approved before the drain period was over"

    # the platform starts it, it runs for --started-seconds, then leaves: back in rotation
    sidecar.wait_probe(200)
    assert len(simulator.approvals_of(event["EventId"])) == 1
    assert sidecar.status()["approved"].keys() == {event["EventId"]}


def test_events_not_for_us_leave_the_probe_healthy_and_unapproved(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(drain_seconds="0", approve="always")
    sidecar.wait_probe(200)
    ids = {
        simulator.add_event(type="Freeze", resources=["web-1"])["EventId"],
        simulator.add_event(type="Reboot", resources=["web-2", "web-3"])["EventId"],
        simulator.add_event(type="Hibernate", resources=["web-1"], extra={"Surprise": 1})[
            "EventId"
        ],
    }

    def all_ignored() -> bool:
        events = sidecar.status()["events"]
        return {e["id"] for e in events if e["phase"] == "ignored"} == ids

    wait_for(all_ignored, "the three events to be seen and ignored")
    sidecar.wait_polls(3)
    assert sidecar.probe().status == 200
    assert simulator.approvals() == []
    reasons = {e["type"]: e["reason"] for e in sidecar.status()["events"]}
    assert "not in SIDECAR_EVENT_TYPES" in reasons["Freeze"]
    assert "unknown event type" in reasons["Hibernate"]
    assert "not us" in reasons["Reboot"]
    log = sidecar.process.output()
    assert "Hibernate" in log and "ignored" in log
    assert "ignoring fields this version does not know: Events[].Surprise" in log


def test_freeze_drains_when_opted_in(simulator: Simulator, start_sidecar: SidecarFactory) -> None:
    sidecar = start_sidecar(event_types="Reboot,Freeze", drain_seconds="0")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Freeze", resources=["web-1"])
    sidecar.wait_probe(503)
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the Freeze approval")


def test_not_the_leader_drains_but_does_not_approve(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(drain_seconds="0.5", min_drain_seconds="0")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", resources=["web-0", "web-1"], not_before_in=900)
    waiting = sidecar.wait_phase(event["EventId"], "waiting")
    assert "first VM in Resources is the leader" in waiting["reason"]
    assert waiting["resources"][0] == "web-0"
    assert sidecar.probe().status == 503
    sidecar.wait_polls(10)  # 2.5 s, five drain periods: an approval would have been sent by now
    assert simulator.approvals() == []

    simulator.control("POST", f"/events/{event['EventId']}/start")  # the leader approved it
    sidecar.wait_phase(event["EventId"], "started")
    sidecar.wait_probe(200)  # it ran and left the document
    assert simulator.approvals() == []


def test_preempt_due_sooner_than_the_drain_is_approved_before_not_before(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(
        drain_seconds="30", min_drain_seconds="1", deadline_margin_seconds="3", poll_interval="0.5"
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Preempt", resources=["web-1"], not_before_in=10)
    not_before = parsedate_to_datetime(event["NotBefore"]).timestamp()
    approval = wait_for(lambda: simulator.approvals_of(event["EventId"]), "the Preempt approval")
    approved_at = epoch(approval[0]["at"])
    assert approved_at < not_before, "approved after NotBefore: the platform already started it"
    assert approved_at >= not_before - 3 - 1.0, "approved much earlier than the deadline"


def test_cancelled_event_brings_the_probe_back(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(drain_seconds="60")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Redeploy", resources=["web-1"], not_before_in=600)
    sidecar.wait_probe(503)
    simulator.control("DELETE", f"/events/{event['EventId']}")
    sidecar.wait_probe(200)
    assert simulator.approvals() == []
    assert "left the document" in sidecar.process.output()


def test_started_event_drains_at_once_without_approval(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(drain_seconds="0")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", status="Started", started_for=3)
    sidecar.wait_phase(event["EventId"], "started")
    assert sidecar.probe().status == 503
    sidecar.wait_probe(200)
    assert simulator.approvals() == []


def test_sigkill_mid_drain_resumes_and_approves_once(
    simulator: Simulator, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    sidecar = start_sidecar(drain_seconds="4", min_drain_seconds="0")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900, started_for=30)
    first = sidecar.wait_phase(event["EventId"], "draining")
    wait_for(lambda: event["EventId"] in saved_drains(tmp_path), "the drain in the state file")
    sidecar.process.kill()

    sidecar.restart()
    resumed = sidecar.wait_phase(event["EventId"], "draining")
    assert resumed["drain_started"] == first["drain_started"]
    assert sidecar.probe().status == 503

    approval = wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    drained = epoch(approval[0]["at"]) - epoch(first["drain_started"])
    assert 4.0 <= drained < 4.0 + PATIENCE / 2, "drain clock restarted instead of resuming"

    # crash right after the approval; the same EventId still pending must not be approved again
    sidecar.wait_phase(event["EventId"], "started")
    sidecar.process.kill()
    simulator.control("DELETE", f"/events/{event['EventId']}")
    simulator.add_event(type="Reboot", event_id=event["EventId"], not_before_in=900)
    sidecar.restart()
    sidecar.wait_phase(event["EventId"], "approved")
    sidecar.wait_polls(5)  # room for a wrong second POST
    assert len(simulator.approvals_of(event["EventId"])) == 1


def test_sigterm_stops_cleanly_and_saves_state(
    simulator: Simulator, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    sidecar = start_sidecar(drain_seconds="60")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot")
    sidecar.wait_phase(event["EventId"], "draining")
    started = time.monotonic()
    assert sidecar.process.terminate() == 0
    assert time.monotonic() - started < 5
    assert event["EventId"] in saved_drains(tmp_path)
    assert "stopped" in sidecar.process.output()


def test_drain_ends_early_once_the_app_has_no_connections(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as app:  # stands for the app's listening port
        port = app.getsockname()[1]
        sidecar = start_sidecar(drain_seconds="600", min_drain_seconds="1", app_ports=str(port))
        sidecar.wait_probe(200)
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = app.accept()
        event = simulator.add_event(type="Reboot", not_before_in=900)
        wait_for(lambda: sidecar.status()["app_connections"] == 1, "the open connection counted")
        sidecar.wait_polls(10)  # 2.5 s: over twice the minimum drain, and still draining
        assert sidecar.wait_phase(event["EventId"], "draining")
        assert simulator.approvals() == []

        client.close()
        served.close()
        # the drain period is 600 s: an approval within PATIENCE can only be the early one
        wait_for(lambda: simulator.approvals_of(event["EventId"]), "the early approval")
    assert "no connections left to the app" in sidecar.process.output()
