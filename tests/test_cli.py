"""The command line as a user meets it: versions, configuration errors, the state file."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import __version__
from tests.conftest import SidecarFactory
from tests.support import Simulator, child_env, wait_for


def sidecar_cli(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = child_env({f"SIDECAR_{key.upper()}": value for key, value in settings.items()})
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    result = sidecar_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"sidecar {__version__}")


BAD_SETTINGS = [
    ({"port": "70000"}, "SIDECAR_PORT='70000': Input should be less than or equal to 65535"),
    ({"event_types": "Reboot,Nap"}, "SIDECAR_EVENT_TYPES='Reboot,Nap': unknown event type Nap"),
    ({"approve": "sometimes"}, "SIDECAR_APPROVE='sometimes': Input should be 'leader'"),
    ({"imds_url": "169.254.169.254"}, "SIDECAR_IMDS_URL='169.254.169.254': must be an http"),
    ({"poll_interval": "0.01"}, "SIDECAR_POLL_INTERVAL='0.01': Input should be greater"),
    ({"health_path": "/status"}, "SIDECAR_HEALTH_PATH='/status': must not be one of"),
    ({"drain_seconds": "soon"}, "SIDECAR_DRAIN_SECONDS='soon': Input should be a valid number"),
    ({"drain_second": "5"}, "SIDECAR_DRAIN_SECOND: unknown setting (did you mean"),
]


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize(
    ("settings", "message"), BAD_SETTINGS, ids=[next(iter(s[0])) for s in BAD_SETTINGS]
)
def test_bad_setting_stops_start_up_with_one_line(
    command: str, settings: dict[str, str], message: str
) -> None:
    result = sidecar_cli(command, **settings)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"sidecar: configuration error: {message}")


def test_check_config_prints_the_effective_settings() -> None:
    result = sidecar_cli("check-config", event_types="reboot, Freeze", drain_seconds="12")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "SIDECAR_EVENT_TYPES=Freeze,Reboot" in lines
    assert "SIDECAR_DRAIN_SECONDS=12" in lines
    assert "SIDECAR_IMDS_URL=http://169.254.169.254" in lines
    assert "SIDECAR_APPROVE=leader" in lines


def test_state_file_that_cannot_be_written_stops_start_up(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = sidecar_cli("run", state_file=str(blocker / "state.json"), port="1")
    assert result.returncode == 2
    assert f"SIDECAR_STATE_FILE={blocker}/state.json: cannot write in {blocker}" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_state_file_is_kept_aside_and_reported(
    simulator: Simulator, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    (tmp_path / "state.json").write_text('{"version": 1, "drain": {"appr')
    sidecar = start_sidecar()
    sidecar.wait_probe(200)
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_text() == '{"version": 1, "drain": {"appr'
    assert "kept a copy as" in sidecar.process.output()
    report = sidecar.status()["state_file"]
    assert report["problem"].startswith("is not JSON")
    assert report["copied_to"] == str(aside[0])


def test_damaged_state_file_is_rewritten_whole_even_when_nothing_changes(
    simulator: Simulator, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """Found by the crash campaign: a file torn mid-line was salvaged, but left torn on disk
    while no section changed, so every later start found it damaged again."""
    state = tmp_path / "state.json"
    torn = (
        '{\n"version": 1,\n"drain": {"approved": {}, "draining": {}},\n"pools": {"removed": {"/sub'
    )
    state.write_text(torn)
    sidecar = start_sidecar()
    sidecar.wait_probe(200)
    wait_for(lambda: _parses(state), "the salvaged sections written back as a whole file")
    assert json.loads(state.read_text())["drain"] == {"approved": {}, "draining": {}}
    assert sidecar.status()["state_file"]["lost"] == ["pools"]

    sidecar.restart()  # the next start finds a sound file
    sidecar.wait_probe(200)
    assert sidecar.status()["state_file"] is None
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 1


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except ValueError:
        return False
    return True


def test_vm_name_comes_from_instance_metadata(
    simulator: Simulator, start_sidecar: SidecarFactory
) -> None:
    sidecar = start_sidecar(vm_name="")
    sidecar.wait_probe(200)
    assert sidecar.status()["vm_name"] == "web-1"
    assert "compute.name" in sidecar.process.output()


def test_probe_port_in_use_stops_start_up(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = sidecar_cli(
            "run", host="127.0.0.1", port=str(port), state_file=str(tmp_path / "state.json")
        )
    assert result.returncode == 2
    assert f"SIDECAR_HOST=127.0.0.1 SIDECAR_PORT={port}: cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


HEAVY_MODULES = ("pydantic", "aiohttp", "asyncio", "azure", "sidecar.simulator", "sidecar.settings")


def imported_modules(*args: str, **settings: str) -> set[str]:
    """The modules a CLI command imports, read from `python -X importtime`."""
    env = child_env({f"SIDECAR_{key.upper()}": value for key, value in settings.items()})
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sidecar", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


LIGHT_COMMANDS = [("--version",), ("healthcheck",), ("healthcheck", "--url", "http://127.0.0.1:1/")]


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=["version", "healthcheck", "healthcheck-url"])
def test_light_commands_import_only_what_they_use(args: tuple[str, ...]) -> None:
    """Found by review: the container's HEALTHCHECK cost 0.34 s of CPU every 10 s, because
    building the parser imported the simulator and the settings model."""
    modules = imported_modules(*args, port="1")
    assert "sidecar.cli" in modules, "importtime output not understood"
    heavy = sorted(
        m for m in modules if any(m == h or m.startswith(f"{h}.") for h in HEAVY_MODULES)
    )
    assert not heavy, f"{args[0]} imports {heavy[:10]}"


def test_simulate_help_lists_its_flags() -> None:
    result = sidecar_cli("simulate", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sidecar simulate")
    assert "--started-seconds" in result.stdout


def test_healthcheck_url_checks_another_service(simulator: Simulator) -> None:
    """The rehearsal's simulator has no /status: compose checks it with `--url .../control`."""
    assert sidecar_cli("healthcheck", "--url", simulator.control_url).returncode == 0
    missing = sidecar_cli("healthcheck", "--url", f"{simulator.imds_url}/no-such-path")
    assert missing.returncode == 1
    assert missing.stderr.strip().endswith("answered 404")
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    refused = sidecar_cli("healthcheck", "--url", f"http://127.0.0.1:{port}/control")
    assert refused.returncode == 1
    assert f"127.0.0.1:{port}/control: " in refused.stderr


@pytest.mark.parametrize(
    "url", ["127.0.0.1:8169", "ftp://127.0.0.1/", "http://h:99999/", "http:///"]
)
def test_healthcheck_url_that_is_not_http_is_refused(url: str) -> None:
    result = sidecar_cli("healthcheck", "--url", url)
    assert result.returncode == 1  # 0 or 1 only: Docker reserves 2 in health checks
    assert "is not an http(s) URL" in result.stderr
