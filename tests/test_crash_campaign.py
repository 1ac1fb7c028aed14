"""The crash campaign in CI: a few maintenances with pool removal on, the sidecar SIGKILLed at
random and at chosen moments, its state file sometimes damaged, every invariant checked after
each run (benchmarks/crash_campaign.py; the long campaign's figures are in BENCHMARKS.md).

Nothing here depends on the machine's speed: the campaign waits for what it reads (the
simulator, /status, the probe) with generous deadlines; half the runs kill at the first sight
of chosen phases, so kills land in several phases however fast the machine is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.crash_campaign import Config, run_campaign
from tests.arm_support import EMPTY, arm_simulator, pools
from tests.conftest import SidecarFactory
from tests.support import Simulator, wait_for

CONFIG = Config(runs=5, seed=20261122, kills=(1, 3), targeted_share=0.5)


def test_crash_campaign_keeps_every_invariant(tmp_path: Path) -> None:
    results = run_campaign(tmp_path, CONFIG)
    shown = json.dumps(
        {key: results[key] for key in ("kills", "kill_points", "damages", "faults", "violations")},
        indent=1,
    )
    assert not results["violations"], shown
    assert results["kills"] >= CONFIG.runs, f"a campaign that never kills proves nothing\n{shown}"
    assert len(results["kill_points"]) >= 3, f"kills landed in too few phases\n{shown}"
    assert results["approved_runs"] == CONFIG.runs, shown


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    """Overrides conftest's: pool removal needs ARM."""
    sim = arm_simulator(tmp_path)
    yield sim
    sim.close()


def test_restart_while_the_removal_operation_runs_still_waits_for_it(
    simulator: Simulator, start_arm_sidecar: SidecarFactory
) -> None:
    """Found by the crash campaign (python -m benchmarks.crash_campaign --run-seed 1823296038,
    one kill at `removing`): the restarted sidecar found the NIC already out of its pools and
    approved while the removal's operation was still running."""
    sidecar = start_arm_sidecar(drain_seconds="1")
    sidecar.wait_probe(200)
    simulator.fault(target="arm-operation", kind="slow", seconds=600)  # ARM takes its time
    event = simulator.add_event(type="Reboot", not_before_in=900)
    wait_for(lambda: pools(simulator) == EMPTY, "the removal PUT to be applied")
    sidecar.process.kill()  # while the PUT's operation runs

    sidecar.restart()
    sidecar.wait_phase(event["EventId"], "draining")
    sidecar.wait_polls(12)  # 3 s: three drain periods
    operation = simulator.control("GET", "/operations")[0]
    assert operation["status"] == "InProgress"
    assert simulator.approvals() == [], "approved while the removal was still in progress"
