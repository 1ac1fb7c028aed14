"""Drain hooks end to end: `sidecar run` calls a real HTTP endpoint and a real command on
loopback, once per drain, when the load balancer has stopped sending new flows; approval waits
for them, and a failing or slow hook means no early approval."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.receiver import Receiver
from tests.support import SidecarFactory, Simulator, wait_for
from tests.test_drain_e2e import epoch


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def test_drain_hook_is_called_once_after_the_minimum_drain_and_approval_waits_for_it(
    simulator: Simulator, start_sidecar: SidecarFactory, receiver: Receiver
) -> None:
    receiver.answer(200, delay=2)  # the app takes 2 s to close its connections
    sidecar = start_sidecar(
        drain_seconds="1",
        min_drain_seconds="1",
        drain_hook_url=receiver.url("/drain"),
        undrain_hook_url=receiver.url("/undrain"),
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    sidecar.wait_probe(503)
    down_at = time.monotonic()

    approval = wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    calls = receiver.calls("/drain")
    assert len(calls) == 1
    assert calls[0].at - down_at >= 0.9, "called before the minimum drain was over"
    assert epoch(approval[0]["at"]) >= calls[0].wall + 2, "approved before the hook finished"
    body = calls[0].body
    assert (body["phase"], body["id"], body["type"]) == ("drain", event["EventId"], "Reboot")
    assert body["resources"] == ["web-1"] and body["vm"] == "web-1"
    assert body["not_before"] and body["events"][0]["id"] == event["EventId"]

    wait_for(lambda: receiver.calls("/undrain"), "the undrain hook once serving again")
    sidecar.wait_probe(200)
    sidecar.wait_polls(4)
    assert len(receiver.calls("/drain")) == 1 and len(receiver.calls("/undrain")) == 1
    assert receiver.calls("/undrain")[0].body["phase"] == "undrain"


@pytest.mark.parametrize(("status", "delay"), [(500, 0.0), (200, 5.0)], ids=["fails", "too slow"])
def test_a_failing_hook_means_no_early_approval(
    simulator: Simulator,
    start_sidecar: SidecarFactory,
    receiver: Receiver,
    status: int,
    delay: float,
) -> None:
    receiver.answer(status, delay=delay)
    sidecar = start_sidecar(
        drain_seconds="1",
        min_drain_seconds="0",
        drain_hook_url=receiver.url("/drain"),
        hook_timeout="1",
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=12, started_for=600)
    wait_for(lambda: sidecar.status()["hooks"]["drain"] == "failed", "the hook to fail", timeout=20)
    assert sidecar.status()["approval_blocked_by"] == ["hooks"]
    assert "drain hook failed" in sidecar.process.output()
    # the platform starts it at NotBefore, without our approval
    sidecar.wait_phase(event["EventId"], "started", timeout=30)
    assert simulator.approvals_of(event["EventId"]) == []
    assert len(receiver.calls("/drain")) == 1


def test_drain_command_gets_the_event_in_its_environment(
    simulator: Simulator, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    out = tmp_path / "hook.json"
    script = tmp_path / "hook.py"
    script.write_text(
        "import json, os, sys\n"
        f"json.dump({{k: v for k, v in os.environ.items() if k.startswith('SIDECAR_EVENT_')}},"
        f" open({str(out)!r}, 'w'))\n"
        "sys.exit(int(os.environ.get('HOOK_EXIT', '0')))\n"
    )
    sidecar = start_sidecar(
        drain_seconds="0.5",
        min_drain_seconds="0",
        drain_command=f"{sys.executable} {script}",
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Redeploy", not_before_in=900)
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval after the command")
    seen = json.loads(out.read_text())
    assert seen["SIDECAR_EVENT_ID"] == event["EventId"]
    assert seen["SIDECAR_EVENT_TYPE"] == "Redeploy"
    assert seen["SIDECAR_EVENT_PHASE"] == "drain"
    assert seen["SIDECAR_EVENT_RESOURCES"] == "web-1"
    assert seen["SIDECAR_EVENT_NOT_BEFORE"]


def test_failing_command_blocks_the_approval(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(
        drain_seconds="0.5", min_drain_seconds="0", drain_command=f"{sys.executable} -c 'exit(3)'"
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: sidecar.status()["hooks"]["drain"] == "failed", "the command to fail")
    sidecar.wait_polls(8)
    assert simulator.approvals_of(event["EventId"]) == []
    assert "exited with 3" in sidecar.process.output()


def test_restart_keeps_the_hooks_outcome(
    simulator: Simulator, start_sidecar: SidecarFactory, receiver: Receiver
) -> None:
    receiver.answer(500)
    sidecar = start_sidecar(
        drain_seconds="0.5", min_drain_seconds="0", drain_hook_url=receiver.url("/drain")
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: sidecar.status()["hooks"]["drain"] == "failed", "the hook to fail")
    sidecar.process.kill()
    receiver.answer(200)

    sidecar.restart()  # the same drain: the failure is remembered, the hook not called again
    sidecar.wait_phase(event["EventId"], "draining")
    sidecar.wait_polls(8)
    assert sidecar.status()["hooks"]["drain"] == "failed"
    assert simulator.approvals_of(event["EventId"]) == []
    assert len(receiver.calls("/drain")) == 1
