"""``python -m sidecar.simulator`` as a process, and the simulator's independence."""

from __future__ import annotations

import argparse
import ast
import email.utils
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sidecar.simulator.main import configure_parser, options_from_args
from sidecar.simulator.options import ScheduleSpec, SimulatorOptions
from tests.simulator_helpers import request, wait_for

SIMULATOR_DIR = Path(__file__).resolve().parent.parent / "sidecar" / "simulator"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    ready, ca_file = tmp_path / "ready.json", tmp_path / "certs" / "ca.pem"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar.simulator",
            "--port=0",
            "--arm-port=0",
            f"--ready-file={ready}",
            f"--ca-file={ca_file}",
            "--vm-name=app-7",
            "--schedule=Reboot:60",
            "--schedule=Preempt",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        text=True,
    )
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, timeout=30)
        assert process.poll() is None, process.communicate()
        urls = json.loads(ready.read_text())
        assert urls["ca_file"] == str(ca_file) and ca_file.read_text().startswith("-----BEGIN")
        assert urls["arm_url"].startswith("https://127.0.0.1:")
        reply = request(
            "GET",
            f"{urls['imds_url']}/metadata/scheduledevents?api-version=2020-07-01",
            headers={"Metadata": "true"},
        )
        events = reply.json()["Events"]
        assert [e["EventType"] for e in events] == ["Reboot", "Preempt"]
        assert all(e["Resources"] == ["app-7"] for e in events)
        preempt_at = email.utils.parsedate_to_datetime(events[1]["NotBefore"]).timestamp()
        assert 20 < preempt_at - time.time() <= 31  # Preempt's default notice: 30 s
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert f"simulator: IMDS {urls['imds_url']}  (set SIDECAR_IMDS_URL to this)" in stdout
    assert f"simulator: control {urls['control_url']}" in stdout
    assert "(set SIDECAR_ARM_URL to this)" in stdout
    assert f"simulator: ARM CA {ca_file}  (set SIDECAR_ARM_CA_BUNDLE to this)" in stdout


def test_cli_without_arm_and_sigint(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar.simulator",
            "--port=0",
            "--no-arm",
            f"--ready-file={ready}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        text=True,
    )
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, timeout=30)
        urls = json.loads(ready.read_text())
        assert urls["arm_url"] is None and urls["ca_file"] is None
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    assert "ARM not served" in stdout


def test_flags_map_to_options() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert options_from_args(parser.parse_args([])) == SimulatorOptions()
    args = parser.parse_args(
        ["--port", "0", "--no-arm", "--schedule", "Freeze:1.5", "--schedule", "Custom"]
    )
    options = options_from_args(args)
    assert options.port == 0 and not options.arm
    assert options.schedule == (ScheduleSpec("Freeze", 1.5), ScheduleSpec("Custom"))


def test_lifecycle_flags_map_to_options() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args([]).start_when == "any-approval"
    options = options_from_args(parser.parse_args(["--start-when", "all-approvals"]))
    assert options.start_when == "all-approvals"
    with pytest.raises(SystemExit):
        parser.parse_args(["--start-when", "whenever"])
    assert parser.parse_args([]).warmup_seconds == 0.0
    assert options_from_args(parser.parse_args(["--warmup-seconds", "70"])).warmup_seconds == 70
    with pytest.raises(SystemExit):
        parser.parse_args(["--warmup-seconds", "-1"])


def test_simulator_imports_nothing_else_of_the_sidecar() -> None:
    """The simulator is an independent reading of the Azure contract."""
    for path in SIMULATOR_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: use absolute imports"
                names = [node.module or ""]
            for name in names:
                if name == "sidecar" or name.startswith("sidecar."):
                    assert name.startswith("sidecar.simulator"), f"{path.name} imports {name}"
