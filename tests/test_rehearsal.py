"""The promise, rehearsed: users' traffic through a real load balancer while web-1 reboots.

HAProxy (layer 4, like the Azure Load Balancer: no retry of a failed connection for the client)
in front of two stand-in web apps, each with its own `sidecar run` and simulator view; a
closed-loop client sends traffic through it; a Reboot for web-1 is approved, and when the
simulator's impact begins web-1 goes silent (SIGSTOP), and boots (killed, started again with a
new boot id) when it ends. With the sidecar no request may fail; without it (HAProxy probing the
app, the impact at the same moment) requests must fail, or the rehearsal would prove nothing.

Keep-alive clients stay on web-1 whatever the probe says: without the drain hook some of their
requests must fail at the impact; with it (the app's `POST /drain`) none may.

The full rehearsal with numbers is `python -m benchmarks.rehearsal` (see BENCHMARKS.md). This
test asserts only what does not depend on the machine's speed: every wait is event-driven, and
the drain (5 s) is several times what HAProxy needs to take web-1 out (one poll of 0.5 s plus
two failed probes 1 s apart); the hook runs after the 3 s minimum drain, which covers those too.
Skips when haproxy is missing, unless CI_REQUIRE_ALL=1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.lab import haproxy_available
from benchmarks.rehearsal import SCENARIOS, Plan, run_phase, run_scenario

PLAN = Plan(
    rate=200.0,
    warmup=1.0,
    # well beyond the client's 2 s timeout: a keep-alive request stalled on the silent VM times
    # out (a failure) instead of racing the boot's reset (which a client retries on a new flow)
    reboot_seconds=2.0 + 3 * Plan().request_timeout,
    tail=1.0,
    poll_interval=0.5,
    drain_seconds=5.0,
    min_drain_seconds=3.0,
)


def require_haproxy() -> None:
    if haproxy_available():
        return
    reason = "haproxy is not installed (Debian: apt-get install -y haproxy)"
    if os.environ.get("CI_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason}, and CI_REQUIRE_ALL=1 forbids skipping")
    pytest.skip(reason)


def test_reboot_behind_haproxy_fails_no_request_with_the_sidecar_and_some_without(
    tmp_path: Path,
) -> None:
    require_haproxy()
    outcome = run_scenario(tmp_path, SCENARIOS["reboot"], PLAN)
    with_sidecar, without = outcome["with_sidecar"], outcome["without_sidecar"]
    summary = {
        name: {key: run[key] for key in ("requests", "failed", "failures_by_error", "timeline_s")}
        for name, run in (("with sidecar", with_sidecar), ("without", without))
    }
    shown = json.dumps(summary, indent=1)

    assert with_sidecar["requests"] > 0 and without["requests"] > 0, shown
    assert with_sidecar["failed"] == 0, f"users saw the maintenance:\n{shown}"
    assert with_sidecar["approvals"] == 1, shown
    assert with_sidecar["out_of_rotation_before_impact_s"] > 0, f"web-1 in rotation:\n{shown}"
    assert with_sidecar["served_by_target_after_back"] > 0, f"web-1 never served again:\n{shown}"

    assert without["failed"] > 0, f"the baseline lost nothing: the rehearsal is blind\n{shown}"
    assert without["served_by_target_after_back"] > 0, shown


def test_keepalive_clients_fail_without_the_drain_hook_and_not_with_it(tmp_path: Path) -> None:
    require_haproxy()
    runs = {
        name: run_phase(tmp_path / name, SCENARIOS[name], PLAN, with_sidecar=True)
        for name in ("reboot-keepalive", "reboot-keepalive-hook")
    }
    shown = json.dumps(
        {
            name: {
                key: run[key]
                for key in ("requests", "failed", "retried", "failures_by_error", "hooks")
            }
            for name, run in runs.items()
        },
        indent=1,
    )
    plain, hooked = runs["reboot-keepalive"], runs["reboot-keepalive-hook"]
    assert plain["requests"] > 0 and hooked["requests"] > 0, shown
    assert plain["failed"] > 0, f"keep-alive flows on web-1 should have seen the reboot:\n{shown}"
    assert hooked["hooks"]["drain"] == "ok", shown
    assert hooked["failed"] == 0, f"the drain hook left users to see the reboot:\n{shown}"
    assert hooked["approvals"] == 1 and hooked["out_of_rotation_before_impact_s"] > 0, shown
