"""Back in rotation when the impact is over (SIDECAR_RETURN_AFTER=impact), or when the event
leaves the document (the default), with started events lingering as they do in Azure.

The "VM" here is the sidecar process and its boot-id file (SIDECAR_BOOT_ID_FILE): when the
simulator says the impact began, the test kills the sidecar (the VM went down) and writes a new
boot id; when it says the impact is over, the test starts the sidecar again (the VM is back).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support import Sidecar, SidecarFactory, Simulator, wait_for

LINGER = 600  # as in Azure: Started for minutes after the impact


def control_view(simulator: Simulator, event_id: str) -> dict[str, Any] | None:
    return next((e for e in simulator.events() if e["EventId"] == event_id), None)


def impact(simulator: Simulator, event_id: str) -> str | None:
    view = control_view(simulator, event_id)
    return None if view is None else view["impact"]


def reboot_through(simulator: Simulator, sidecar: Sidecar, boot_id: Path, event_id: str) -> None:
    """The platform reboots the VM: down at the impact, a new boot id, up when it is over."""
    wait_for(lambda: impact(simulator, event_id) == "in-progress", "the impact to begin")
    sidecar.process.kill()
    boot_id.write_text(str(uuid.uuid4()))
    wait_for(lambda: impact(simulator, event_id) == "over", "the impact to end")
    sidecar.restart()


@pytest.fixture
def boot_id(tmp_path: Path) -> Path:
    path = tmp_path / "boot_id"
    path.write_text(str(uuid.uuid4()))
    return path


@pytest.mark.parametrize("event_type", ["Reboot", "Redeploy"])
def test_impact_mode_serves_again_after_the_reboot_while_the_event_is_listed(
    simulator: Simulator, start_sidecar: SidecarFactory, boot_id: Path, event_type: str
) -> None:
    sidecar = start_sidecar(
        return_after="impact", boot_id_file=str(boot_id), drain_seconds="1", min_drain_seconds="0"
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(
        type=event_type, not_before_in=900, impact_after=1, impact_seconds=2, started_for=LINGER
    )
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    reboot_through(simulator, sidecar, boot_id, event["EventId"])

    sidecar.wait_probe(200)
    view = control_view(simulator, event["EventId"])
    assert view is not None and view["EventStatus"] == "Started", "the event left already"
    over = sidecar.wait_phase(event["EventId"], "over")
    assert "booted again" in over["reason"]
    sidecar.wait_polls(8)  # never flaps back, never approved again
    assert sidecar.probe().status == 200
    assert len(simulator.approvals_of(event["EventId"])) == 1


def test_by_default_a_rebooted_vm_waits_for_the_event_to_leave(
    simulator: Simulator, start_sidecar: SidecarFactory, boot_id: Path
) -> None:
    sidecar = start_sidecar(boot_id_file=str(boot_id), drain_seconds="1", min_drain_seconds="0")
    sidecar.wait_probe(200)
    event = simulator.add_event(
        type="Reboot", not_before_in=900, impact_after=1, impact_seconds=2, started_for=LINGER
    )
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    reboot_through(simulator, sidecar, boot_id, event["EventId"])

    sidecar.wait_phase(event["EventId"], "started")
    sidecar.wait_polls(8)
    [started] = sidecar.status()["events"]
    assert "once it leaves the document" in started["reason"]
    assert sidecar.probe().status == 503
    simulator.control("DELETE", f"/events/{event['EventId']}")  # the platform completes it
    sidecar.wait_probe(200)


def test_a_restart_without_a_reboot_keeps_the_vm_out(
    simulator: Simulator, start_sidecar: SidecarFactory, boot_id: Path
) -> None:
    sidecar = start_sidecar(
        return_after="impact", boot_id_file=str(boot_id), drain_seconds="1", min_drain_seconds="0"
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(
        type="Reboot", not_before_in=900, impact_after=600, started_for=LINGER
    )
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    sidecar.wait_phase(event["EventId"], "started")
    sidecar.process.kill()
    sidecar.restart()  # the same boot: the reboot is still to come
    sidecar.wait_phase(event["EventId"], "started")
    sidecar.wait_polls(8)
    assert sidecar.probe().status == 503


def test_a_started_event_with_no_record_stays_conservative(
    simulator: Simulator, start_sidecar: SidecarFactory, boot_id: Path
) -> None:
    simulator.add_event(type="Reboot", status="Started", started_for=LINGER, event_id="lost")
    sidecar = start_sidecar(return_after="impact", boot_id_file=str(boot_id))
    started = sidecar.wait_phase("lost", "started")
    assert "no record from before the start" in started["reason"]
    sidecar.wait_polls(8)
    assert sidecar.probe().status == 503


def test_an_opted_in_freeze_is_over_after_its_duration(
    simulator: Simulator, start_sidecar: SidecarFactory, boot_id: Path
) -> None:
    sidecar = start_sidecar(
        return_after="impact",
        boot_id_file=str(boot_id),
        event_types="Freeze,Reboot",
        drain_seconds="1",
        min_drain_seconds="0",
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Freeze", not_before_in=900, duration=2, started_for=LINGER)
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    sidecar.wait_phase(event["EventId"], "started")
    over = sidecar.wait_phase(event["EventId"], "over", timeout=30)  # 2 s + the 5 s margin
    assert "Freeze has passed" in over["reason"]
    sidecar.wait_probe(200)
    assert control_view(simulator, event["EventId"]) is not None, "it left the document first"
