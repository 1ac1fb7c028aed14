"""The operators' side end to end: webhooks and syslog, drains by hand behind the admin token,
dry runs, the CLI views, and the 2016 preview; all against the running `sidecar run` and
`sidecar simulate`, over loopback."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.receiver import Receiver
from tests.support import PATIENCE, Sidecar, SidecarFactory, Simulator, request, wait_for
from tests.test_cli import sidecar_cli

TOKEN = "t0ken-for-tests-0123456789abcdef"  # noqa: S105 - a test token
SECRET_PATH = "/services/T000/B000/XXXXSECRETXXXX"  # noqa: S105 - a fake webhook secret
PHASES = ["detected", "out-of-rotation", "approved", "back-in-rotation"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def start(start_sidecar: SidecarFactory) -> SidecarFactory:
    """Webhooks honour proxy variables (they leave the VM); these receivers are local."""

    def started(**settings: str) -> Sidecar:
        return start_sidecar(env={"NO_PROXY": "127.0.0.1,localhost"}, **settings)

    return started


def delivered(sidecar: Sidecar) -> int:
    """Notices the sidecar's one webhook accepted and the state file records (a restart will
    not send them again; one accepted in the instant of a kill may be, with its key)."""
    webhooks = sidecar.status()["notify"]["webhooks"]
    return int(webhooks[0]["delivered"])


# --- tell people


def test_webhook_gets_each_phase_once_in_order_with_retries(
    simulator: Simulator, start: SidecarFactory, receiver: Receiver
) -> None:
    receiver.fail_next(2)  # the first delivery is refused twice, then accepted
    sidecar = start(
        drain_seconds="1", min_drain_seconds="0", webhook_urls=receiver.url(SECRET_PATH)
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: len({c.body["phase"] for c in receiver.calls()}) == 4, "four phases")

    calls = receiver.calls()
    keys = [c.headers["Idempotency-Key"] for c in calls]
    assert keys[0] == keys[1] == keys[2] == f"{event['EventId']}:detected", "no retries seen"
    distinct = list(dict.fromkeys(keys))
    assert [key.rsplit(":", 1)[1] for key in distinct] == PHASES
    assert len(keys) == 2 + len(PHASES), f"a phase was sent twice: {keys}"
    first = calls[-1].body
    assert first["phase"] == "back-in-rotation" and first["detail"]["how"] == "completed"
    assert calls[0].body["text"].startswith("web-1: Reboot")
    assert calls[0].body["event"]["id"] == event["EventId"]
    assert "XXXXSECRETXXXX" not in sidecar.process.output()
    assert "XXXXSECRETXXXX" not in json.dumps(sidecar.status())


def test_a_restart_does_not_send_a_phase_twice(
    simulator: Simulator, start: SidecarFactory, receiver: Receiver
) -> None:
    sidecar = start(drain_seconds="600", webhook_urls=receiver.url("/hook"))
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: delivered(sidecar) == 2, "detected and out-of-rotation, recorded")
    assert len(receiver.calls()) == 2
    sidecar.process.kill()
    sidecar.restart()
    sidecar.wait_phase(event["EventId"], "draining")
    sidecar.wait_polls(8)
    simulator.control("DELETE", f"/events/{event['EventId']}")
    wait_for(lambda: len(receiver.calls()) == 3, "back-in-rotation")
    sidecar.wait_polls(8)
    keys = [c.headers["Idempotency-Key"] for c in receiver.calls()]
    assert len(keys) == len(set(keys)) == 3, keys
    assert receiver.calls()[-1].body["detail"]["how"] == "cancelled"


def test_syslog_gets_an_rfc5424_line_per_state_change(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(PATIENCE)
        port = listener.getsockname()[1]
        sidecar = start_sidecar(
            drain_seconds="1", min_drain_seconds="0", syslog_address=f"udp://127.0.0.1:{port}"
        )
        sidecar.wait_probe(200)
        event = simulator.add_event(type="Reboot", not_before_in=900)
        lines = [listener.recv(4096).decode() for _ in PHASES]
    pattern = re.compile(
        r"^<(\d+)>1 \d{4}-\d\d-\d\dT[\d:.]+Z \S+ azure-drain-sidecar \d+ (\S+) "
        r'\[drain@32473 key="([^"]+)" vm="web-1" event="([^"]+)" type="Reboot"\] (.+)$'
    )
    parsed = [pattern.match(line) for line in lines]
    assert all(parsed), lines
    assert [m.group(2) for m in parsed if m] == PHASES
    assert {m.group(4) for m in parsed if m} == {event["EventId"]}
    assert all(int(m.group(1)) == 3 * 8 + 5 for m in parsed if m), "daemon.notice"


# --- let them steer


def test_admin_endpoints_do_not_exist_without_a_token(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar()
    sidecar.wait_probe(200)
    answer = request(f"{sidecar.url}/drain", "POST", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 404
    assert sidecar.probe().status == 200


def test_drain_by_hand_needs_the_token_and_survives_a_restart(
    simulator: Simulator, start: SidecarFactory, receiver: Receiver
) -> None:
    sidecar = start(admin_token=TOKEN, webhook_urls=receiver.url("/hook"))
    sidecar.wait_probe(200)
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": TOKEN},
    ):
        refused = request(f"{sidecar.url}/drain", "POST", body={"reason": "x"}, headers=headers)
        assert refused.status == 401, headers
    assert sidecar.probe().status == 200, "a refused request changed something"

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    done = request(f"{sidecar.url}/drain", "POST", body={"reason": "deploy v42"}, headers=bearer)
    assert done.status == 200
    assert done.json() == {"state": "drained by hand", "manual": {"reason": "deploy v42"}}
    assert sidecar.probe().body == b"drained by hand\n" and sidecar.probe().status == 503
    wait_for(lambda: delivered(sidecar) == 1, "out-of-rotation, recorded")

    sidecar.process.kill()
    sidecar.restart()
    sidecar.wait_probe(503)
    sidecar.wait_polls(4)
    assert sidecar.probe().body == b"drained by hand\n"
    assert sidecar.status()["manual"]["reason"] == "deploy v42"

    back = request(f"{sidecar.url}/undrain", "POST", headers=bearer)
    assert back.status == 200 and back.json()["state"] == "serving"
    sidecar.wait_probe(200)
    wait_for(lambda: len(receiver.calls()) == 2, "out of rotation and back, told")
    assert [c.body["phase"] for c in receiver.calls()] == ["out-of-rotation", "back-in-rotation"]
    assert receiver.calls()[1].body["detail"]["how"] == "by hand"
    assert TOKEN not in sidecar.process.output()


def test_an_event_during_a_drain_by_hand_is_handled_as_usual(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(admin_token=TOKEN, drain_seconds="3", min_drain_seconds="0")
    sidecar.wait_probe(200)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert request(f"{sidecar.url}/drain", "POST", headers=bearer).status == 200
    event = simulator.add_event(type="Reboot", not_before_in=900, started_for=600)
    wait_for(lambda: simulator.approvals_of(event["EventId"]), "the approval")
    assert request(f"{sidecar.url}/undrain", "POST", headers=bearer).status == 200
    sidecar.wait_polls(4)
    assert sidecar.probe().status == 503, "the event still holds the VM out"


# --- try it safely first


def test_a_dry_run_writes_nothing_anywhere(
    simulator: Simulator, start: SidecarFactory, receiver: Receiver, tmp_path: Path
) -> None:
    sidecar = start(
        dry_run="true",
        drain_seconds="1",
        min_drain_seconds="0",
        drain_hook_url=receiver.url("/drain-hook"),
        webhook_urls=receiver.url("/webhook"),
    )
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900, started_for=600)
    codes = set()

    def approved_in_theory() -> bool:
        codes.add(sidecar.probe().status)
        return any(e["phase"] == "approved" for e in sidecar.status()["events"])

    wait_for(approved_in_theory, "the dry run to reach 'approved'")
    assert codes == {200}, "the probe flipped"
    assert simulator.approvals() == []
    assert receiver.calls("/drain-hook") == []
    assert not (tmp_path / "state.json").exists()
    status = sidecar.status()
    assert status["dry_run"] is True and status["state"] == "draining"
    assert status["probe"].startswith("serving (dry run: would answer 503")
    webhooks = receiver.calls("/webhook")
    assert webhooks and all(c.body["dry_run"] for c in webhooks)
    assert all(c.body["text"].startswith("[dry run]") for c in webhooks)
    assert event["EventId"] in sidecar.process.output()
    assert "dry run: would approve" in sidecar.process.output()


# --- the CLI view


def test_status_and_events_commands(simulator: Simulator, start_sidecar: SidecarFactory) -> None:
    sidecar = start_sidecar(approve="never")
    sidecar.wait_probe(200)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    sidecar.wait_phase(event["EventId"], "waiting")
    settings = {k.removeprefix("SIDECAR_").lower(): v for k, v in sidecar.settings.items()}
    status = sidecar_cli("status", **settings)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^state\s+draining", status.stdout, re.MULTILINE)
    assert event["EventId"] in status.stdout and "waiting" in status.stdout
    events = sidecar_cli("events", **settings)
    assert events.returncode == 0, events.stderr
    assert event["EventId"] in events.stdout and "Reboot" in events.stdout


# --- the 2016 preview


def test_legacy_mode_drains_on_a_2016_document(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(api_version="legacy-2016", vm_name="", drain_seconds="0")
    sidecar.wait_probe(200)
    info = sidecar.status()["source"]["instance_info"]
    assert info["ID"].lstrip("_") == "web-1" and {"UD", "FD"} <= info.keys()
    event = simulator.add_event(type="Reboot", not_before_in=900)
    sidecar.wait_probe(503)
    waiting = sidecar.wait_phase(event["EventId"], "waiting")
    assert "2016 preview has no approval" in waiting["reason"]
    sidecar.wait_polls(8)
    assert simulator.approvals() == []
    simulator.control("DELETE", f"/events/{event['EventId']}")
    sidecar.wait_probe(200)
