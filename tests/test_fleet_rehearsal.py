"""The fleet rehearsal in CI, small: `benchmarks/fleet.py --quick` (10 VMs, each a real
`sidecar run`, behind the simulator's load balancer with ARM throttling on), two scenarios.

The 100-VM run and its figures are in BENCHMARKS.md. What is asserted here does not depend on the
machine's speed: every wait in the rehearsal is event-driven and bounded, the drain covers the
balancer's reaction with room, and the invariants hold or not whatever the timing.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.fleet import QUICK, SCENARIOS, run_scenario


def test_update_domain_walk_loses_nothing_and_keeps_capacity(tmp_path: Path) -> None:
    result = run_scenario(tmp_path, QUICK, SCENARIOS["ud-walk"], seed=1)
    shown = json.dumps({k: v for k, v in result.items() if k != "healthy_over_time"}, indent=1)
    assert result["events"] == 5 and result["reboots"] == QUICK.vms, shown
    assert result["failed_requests"] == 0, f"users saw the walk:\n{shown}"
    assert result["min_healthy_backends_overall"] >= result["min_healthy_goal"] > 0, shown
    assert result["nics_left_out"] == 0, shown
    assert result["double_approvals"] == 0 and result["approvals_after_not_before"] == 0, shown
    assert len(result["approvals"]) == 5, f"each event approved once, early:\n{shown}"
    assert not result["sidecars_died_by_themselves"] and not result["errors"], shown


def test_mass_event_with_sidecars_killed_at_random_keeps_every_invariant(
    tmp_path: Path,
) -> None:
    result = run_scenario(tmp_path, QUICK, SCENARIOS["mass-restarts"], seed=2)
    shown = json.dumps({k: v for k, v in result.items() if k != "healthy_over_time"}, indent=1)
    assert result["sidecar_kills"] > 0, f"nothing was killed: the scenario proves nothing\n{shown}"
    assert result["failed_requests"] == 0, shown
    assert result["min_healthy_backends_overall"] >= result["min_healthy_goal"] > 0, shown
    assert result["nics_left_out"] == 0, shown
    assert result["double_approvals"] == 0 and result["approvals_after_not_before"] == 0, shown
    assert not result["sidecars_died_by_themselves"] and not result["errors"], shown
