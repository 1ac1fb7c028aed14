"""The defects a review found, one regression test each, named after what it found.

Run as a user runs the sidecar: `sidecar run` and `sidecar simulate` as processes, configured
through SIDECAR_* variables, spoken to over loopback HTTP. The classes these defects belong to
are tested wider elsewhere: generated ARM answers (test_arm_answers_e2e), the crash campaign
(test_crash_campaign), clock steps (test_machine).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.arm_support import (
    EMPTY,
    ORIGINAL,
    arm_simulator,
    drain_with_the_nic_out,
    nic,
    pool_status,
    pools,
    seen,
)
from tests.support import (
    PATIENCE,
    Sidecar,
    SidecarFactory,
    Simulator,
    free_port,
    wait_for,
)

RECORD_TAG = "drain-sidecar-removed"


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    """Overrides conftest's: these regressions need ARM too."""
    sim = arm_simulator(tmp_path)
    yield sim
    sim.close()


# --- 1. an odd ARM answer killed the whole sidecar (and crash-looped it at start-up)


def test_odd_arm_answer_at_start_up_is_retried_not_fatal(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    # a proxy answering 200 with a JSON list, where a NIC list and a NIC are expected
    simulator.fault(target="arm-list", kind="malformed", variant="not-object", count=2)
    simulator.fault(target="arm-get", kind="malformed", variant="not-object", count=2)
    sidecar = start_arm_sidecar(drain_seconds="1")
    sidecar.wait_probe(200)
    wait_for(lambda: pool_status(sidecar)["failures"] >= 1, "a failed discovery")
    assert sidecar.process.alive()
    assert "discover failed: " in sidecar.process.output()
    wait_for(lambda: pool_status(sidecar)["mode"] == "active", "discovery once ARM behaves")

    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    sidecar.wait_probe(200)
    assert pools(simulator) == ORIGINAL
    assert sidecar.status()["tasks"]["drain-loop"]["failures"] == 0


def test_odd_arm_answer_mid_drain_keeps_the_probe_and_the_loop(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    sidecar = start_arm_sidecar(drain_seconds="600")
    sidecar.wait_probe(200)
    simulator.fault(target="arm-get", kind="malformed", variant="not-object", count=3)
    simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: pool_status(sidecar)["removal_done"], "the removal after three odd answers")
    assert pool_status(sidecar)["failures"] >= 1
    assert pools(simulator) == EMPTY
    assert sidecar.probe(timeout=2).status == 503
    assert sidecar.process.alive()


# --- 2. a lost or unreadable state file forgot removed pools, silently


@pytest.mark.parametrize(
    "damage",
    ["deleted", "torn", "not JSON"],
)
def test_lost_or_damaged_state_file_still_puts_the_nic_back(
    simulator: Simulator, start_arm_sidecar: SidecarFactory, tmp_path: Path, damage: str
) -> None:
    sidecar, event = drain_with_the_nic_out(simulator, start_arm_sidecar)
    assert RECORD_TAG in nic(simulator)["tags"], "the removal is not recorded on the NIC"
    sidecar.process.kill()
    state = tmp_path / "state.json"
    if damage == "deleted":
        state.unlink()
    elif damage == "torn":
        state.write_bytes(state.read_bytes()[: len(state.read_bytes()) // 3])
    else:
        state.write_text("\x00\x00garbage")
    simulator.control("DELETE", f"/events/{event['EventId']}")

    sidecar.restart()
    sidecar.wait_probe(200)
    assert pools(simulator) == ORIGINAL
    assert RECORD_TAG not in nic(simulator)["tags"], "the record outlived the restore"
    assert "tags say it left backend pools" in sidecar.process.output()
    if damage != "deleted":
        assert sidecar.status()["state_file"]["problem"]


def test_state_file_from_a_newer_version_stops_start_up_and_is_kept(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    text = '{"version": 99, "drain": {"future": true}}\n'
    state.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")} | {
        "SIDECAR_STATE_FILE": str(state),
        "SIDECAR_PORT": str(free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"SIDECAR_STATE_FILE={state}: written by a newer sidecar" in result.stderr
    assert state.read_text() == text
    assert list(tmp_path.iterdir()) == [state]


# --- 3. after a crash mid-removal, approval stopped waiting for the removal


def test_restart_mid_removal_still_waits_for_the_removal(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    sidecar = start_arm_sidecar(drain_seconds="1")
    sidecar.wait_probe(200)
    simulator.fault(target="arm-put", kind="hang")
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: seen(simulator, "arm-put"), "the removal PUT in flight")
    sidecar.process.kill()

    sidecar.restart()  # the removal hangs again: approval must keep waiting for it
    sidecar.wait_phase(event["EventId"], "draining")
    sidecar.wait_polls(12)  # 3 s: three drain periods
    assert simulator.approvals() == []
    assert sidecar.status()["approval_waits_for"] == ["pools"]

    simulator.clear_faults()
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval after the removal")
    assert pools(simulator) == EMPTY or simulator.events() == []


# --- 4. the sidecar's own keep-alive connection to the app was counted as app traffic


def test_own_app_health_connection_does_not_hold_the_drain(
    simulator: Simulator, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    port = free_port()
    app = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.webapp", "--port", str(port), "--name", "app"]
    )
    try:
        wait_for(lambda: _listening(port), "the app")
        sidecar = start_sidecar(
            drain_seconds="600",
            min_drain_seconds="1",
            app_ports=str(port),
            app_health_url=f"http://127.0.0.1:{port}/healthz",
            app_health_interval="0.25",
        )
        sidecar.wait_probe(200)
        event = simulator.add_event(type="Reboot", not_before_in=900)
        # the drain period is 600 s: an approval within PATIENCE is the early one
        wait_for(lambda: simulator.approvals_of(event["EventId"]), "the early approval")
        assert sidecar.status()["app_connections"] in (0, None)
    finally:
        app.kill()
        app.wait()


# --- 5. a connection storm on the probe port silenced the probe


def test_connection_storm_does_not_silence_the_probe(simulator: Simulator, tmp_path: Path) -> None:
    def low_limit() -> None:  # the usual default: 1,024 descriptors, and no way up
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048 <= hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    sidecar = Sidecar(
        tmp_path,
        {
            "SIDECAR_IMDS_URL": simulator.imds_url,
            "SIDECAR_VM_NAME": "web-1",
            "SIDECAR_DRAIN_SECONDS": "1",
            "SIDECAR_MIN_DRAIN_SECONDS": "0",
        },
        preexec=low_limit,
    )
    storm: list[socket.socket] = []
    try:
        sidecar.wait_probe(200)
        for _ in range(1100):  # more than the sidecar has descriptors, all idle
            with contextlib.suppress(OSError):
                storm.append(socket.create_connection(("127.0.0.1", sidecar.port), timeout=5))
        for _ in range(20):  # well inside the idle timeout: the storm is still there
            answer = sidecar.probe(timeout=5)
            assert answer.status == 200
            assert answer.seconds < 1.0, f"the probe took {answer.seconds:.2f}s in the storm"
        event = simulator.add_event(type="Reboot", not_before_in=900)
        wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")

        def recorded() -> bool:
            saved = json.loads((tmp_path / "state.json").read_text())
            return event["EventId"] in saved["drain"]["approved"]

        wait_for(recorded, "the approval in the state file")
        assert len(sidecar.process.output()) < 100_000, "the log was flooded"
        assert "Traceback" not in sidecar.process.output()
    finally:
        for connection in storm:
            connection.close()
        sidecar.close()


# --- 6. an approval answered late could be sent twice


def test_approval_answered_late_is_not_sent_again_blindly(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(drain_seconds="1", min_drain_seconds="0", imds_timeout="1")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900, started_for=600)
    sidecar.wait_phase(event["EventId"], "draining")
    # IMDS takes the approval but answers after the sidecar's timeout, then stops answering
    # polls for a while: nothing tells the sidecar whether its approval went through
    simulator.fault(target="approve", kind="late", seconds=3, count=1)
    simulator.fault(target="scheduledevents", kind="status", status=500)
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval to arrive")
    entry = wait_for(
        lambda: _unknown_outcome(sidecar, event["EventId"]), "the sidecar to give up waiting"
    )
    assert entry["phase"] == "approving"
    time.sleep(4)  # four retry periods without a readable document: nothing may be re-sent
    assert len(simulator.approvals_of(event["EventId"])) == 1

    simulator.clear_faults()  # the document shows the event Started: nothing more to send
    sidecar.wait_phase(event["EventId"], "started")
    sidecar.wait_polls(8)
    assert len(simulator.approvals_of(event["EventId"])) == 1


# --- 8. /status on 0.0.0.0 told anyone the subscription, resource ids and other VMs' names


def test_status_shows_no_identifiers_to_clients_off_loopback(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    remote = os.environ.get("TESTS_REMOTE_ADDRESS")
    if not remote:
        if os.environ.get("CI_REQUIRE_ALL"):
            pytest.fail("TESTS_REMOTE_ADDRESS is not set: run through scripts/check")
        pytest.skip("needs a non-loopback address on this host (scripts/check adds one)")
    simulator.control(
        "PUT",
        "/permissions",
        {"deny": [{"action": "Microsoft.Network/networkInterfaces/write"}]},
    )
    sidecar = start_arm_sidecar(host="0.0.0.0", drain_seconds="600")
    sidecar.wait_probe(200)
    simulator.add_event(type="Reboot", resources=["web-0", "web-1"], not_before_in=900)
    simulator.add_event(type="Reboot", resources=["web-1"], not_before_in=900)
    wait_for(lambda: "403" in str(pool_status(sidecar).get("last_error") or ""), "the 403")

    local = json.dumps(sidecar.status())
    public = _get(remote, sidecar.port, "/status")
    secrets = [
        "11111111-2222-4333-8444-555555555555",  # the subscription
        "/subscriptions/",
        "web-0",
        "web-1",
        "rg-sim",
        "object id",
    ]
    assert all(secret.lower() in local.lower() for secret in secrets[:4])
    leaked = [secret for secret in secrets if secret.lower() in public.lower()]
    assert not leaked, f"/status showed {leaked} to {remote}: {public}"
    body = json.loads(public)
    assert body["state"] == "draining"
    assert {e["phase"] for e in body["events"]} == {"waiting", "draining"}
    assert _get(remote, sidecar.port, "/health") == "draining\n"


# --- 9. an EventId with a line break forged a log line


def test_event_id_with_a_line_break_cannot_forge_a_log_line(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    forged = "2026-11-22T00:00:00.000Z INFO sidecar.drainer: event approved by nobody"
    sidecar = start_sidecar(approve="never")
    sidecar.wait_probe(200)
    simulator.add_event(type="Reboot", event_id=f"e1\n{forged}", not_before_in=900)
    sidecar.wait_probe(503)
    wait_for(lambda: "e1\\n" in sidecar.process.output(), "the escaped id in the log")
    lines = sidecar.process.output().splitlines()
    assert not any(line.startswith(forged) for line in lines), "a forged line got through"


def _unknown_outcome(sidecar: Sidecar, event_id: str) -> dict[str, Any] | None:
    for entry in sidecar.status()["events"]:
        if entry["id"] == event_id and entry["approval_outcome_unknown"]:
            return dict(entry)
    return None


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _get(source: str, port: int, path: str) -> str:
    """A GET to this host's address from `source`, which is not a loopback address."""
    connection = http.client.HTTPConnection(source, port, timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()
