"""The README's first command ends in `sidecar demo`: it must tell the whole story and exit 0,
including the return after the reboot while the event is still listed (SIDECAR_RETURN_AFTER=impact,
a new boot id)."""

from __future__ import annotations

import subprocess
import sys

from tests.support import child_env


def test_demo_runs_one_maintenance_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo"],
        env=child_env({}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    story = [
        "200: serving",
        "schedules a Reboot",
        "sees it: draining",
        "503: the load balancer stops sending new flows",
        "takes the NIC out of its backend pools",
        "approves the event",
        "starts the event",
        "reboots demo-vm: the sidecar goes down with it",
        "boots again: boot id",
        "impact over: this VM booted again (new boot id)",
        "puts the NIC back in exactly the pools it left",
        "200: back in rotation",
        "the event is still listed as Started",
        "1 approval",
    ]
    lines = result.stdout.splitlines()
    positions = [next(i for i, line in enumerate(lines) if step in line) for step in story]
    assert positions == sorted(positions), result.stdout
    seconds = float(lines[-1].split("s", 1)[0])
    assert seconds < 60
    boot = next(line for line in lines if "boots again: boot id" in line)
    old, new = boot.split("boot id ", 1)[1].split(" -> ")
    assert old != new, boot
