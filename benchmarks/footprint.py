"""Footprint: what the sidecar costs the VM it protects.

- start-up: from spawning `python -m sidecar run` to its first answer on the probe (503
  `starting`) and to its first 200 (after the first successful poll), ARM off and on, `--runs`
  times each; with ARM on also until NIC discovery is done (`/status` pools mode `active`);
- idle: sidecars left alone against the simulator for `--idle` seconds: RSS (and PSS) after
  start-up and at the end, CPU seconds (user + system from /proc/PID/stat) scaled to an hour, and
  IMDS requests per second as the simulator counted them, per VM. ARM off and on at the default
  1 s poll, and ARM off at 0.25 s (the smallest SIDECAR_POLL_INTERVAL allowed);
  IMDS allows 5 requests/s per VM. With ARM on, once the ARM helper (the child that carries the
  Azure SDKs while ARM is needed) has stopped, and once more after a maintenance with pool
  removal; the helper's own RSS while it ran is recorded too.

Targets: idle RSS < 60 MiB with ARM off, < 100 MiB with ARM on; start-up to first answer
< 1.5 s with ARM off; idle CPU < 1 % of a core at 1 s polling.
`python -m benchmarks.footprint [--quick]` writes benchmarks/results/footprint.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lab import (
    MIB,
    Sidecar,
    Simulator,
    children,
    cpu_seconds,
    distribution,
    machine,
    pss_bytes,
    rss_bytes,
    table,
    wait_for,
    write_results,
)

SETTLE_SECONDS = 5.0
"""Idle time before the first reading: start-up work (imports, first polls) is over by then."""


def arm_settings(simulator: Simulator) -> dict[str, str]:
    assert simulator.arm_url and simulator.ca_file
    return {
        "SIDECAR_ARM_ENABLED": "true",
        "SIDECAR_ARM_URL": simulator.arm_url.replace("127.0.0.1", "localhost"),
        "SIDECAR_ARM_CA_BUNDLE": simulator.ca_file,
    }


def pools_active(sidecar: Sidecar) -> bool:
    with contextlib.suppress(OSError):
        pools = sidecar.status()["pools"] or {}
        return pools.get("mode") == "active"
    return False


def start_up(workdir: Path, simulator: Simulator, arm: bool, runs: int) -> dict[str, Any]:
    first_answer: list[float] = []
    first_200: list[float] = []
    discovered: list[float] = []
    for index in range(runs):
        vm = f"start-{'arm' if arm else 'plain'}-{index}"
        settings = {"SIDECAR_IMDS_URL": simulator.view(vm), "SIDECAR_LOG_LEVEL": "WARNING"}
        if arm:
            settings |= arm_settings(simulator)
        else:
            settings["SIDECAR_VM_NAME"] = vm
        sidecar = Sidecar(workdir, vm, settings)
        try:
            spawned = sidecar.child.started
            wait_for(sidecar.probe_code, "a first answer", every=0.002)
            first_answer.append(time.monotonic() - spawned)
            sidecar.wait_probe(200)
            first_200.append(time.monotonic() - spawned)
            if arm:
                wait_for(functools.partial(pools_active, sidecar), "NIC discovery", every=0.005)
                discovered.append(time.monotonic() - spawned)
        finally:
            sidecar.close()
    result = {
        "arm": arm,
        "runs": runs,
        "first_answer_s": distribution(first_answer),
        "first_200_s": distribution(first_200),
    }
    if arm:
        result["nic_discovered_s"] = distribution(discovered)
    return result


IDLE_SIDECARS: tuple[tuple[str, bool, float], ...] = (
    ("arm-off-1s", False, 1.0),
    ("arm-on-1s", True, 1.0),
    ("arm-on-after-drain", True, 1.0),
    ("arm-off-0.25s", False, 0.25),
)
"""`arm-on-after-drain` goes through a maintenance (its NIC out of its pools and back) before
the idle window: what a sidecar weighs between maintenances."""
HELPER_PATIENCE = 120.0
"""The ARM helper stops after SIDECAR_ARM_IDLE_SECONDS (60) without a call."""


def maintain(simulator: Simulator, sidecar: Sidecar, vm: str) -> None:
    """One maintenance with pool removal: out of the pools, then back."""
    event = simulator.add_event(type="Reboot", resources=[vm], not_before_in=900)

    def removed() -> bool:
        return bool((sidecar.status()["pools"] or {}).get("removal_done"))

    wait_for(removed, f"{vm}'s NIC out of its pools")
    simulator.control("DELETE", f"/events/{event['EventId']}")
    sidecar.wait_probe(200)


def helpers_done(sidecars: dict[str, Sidecar], peak: dict[str, int]) -> bool:
    """True once no sidecar has an ARM helper; meanwhile the helpers' largest RSS, per VM."""
    running = False
    for name, sidecar in sidecars.items():
        for pid in children(sidecar.child.pid):
            running = True
            with contextlib.suppress(OSError, RuntimeError):
                peak[name] = max(peak.get(name, 0), rss_bytes(pid))
    return not running


def idle(workdir: Path, simulator: Simulator, seconds: float) -> list[dict[str, Any]]:
    sidecars: dict[str, Sidecar] = {}
    with contextlib.ExitStack() as stack:
        for name, arm, interval in IDLE_SIDECARS:
            settings = {
                "SIDECAR_IMDS_URL": simulator.view(name),
                "SIDECAR_POLL_INTERVAL": str(interval),
            }
            settings |= arm_settings(simulator) if arm else {"SIDECAR_VM_NAME": name}
            sidecars[name] = Sidecar(workdir, name, settings)
            stack.callback(sidecars[name].close)
        helper_peak: dict[str, int] = {}
        for name, arm, _ in IDLE_SIDECARS:
            sidecars[name].wait_probe(200)
            if arm:
                wait_for(functools.partial(pools_active, sidecars[name]), "NIC discovery")
                helpers_done(sidecars, helper_peak)
            if name == "arm-on-after-drain":
                maintain(simulator, sidecars[name], name)
        wait_for(
            lambda: helpers_done(sidecars, helper_peak),
            "the ARM helpers to stop",
            timeout=HELPER_PATIENCE,
            every=0.2,
        )
        time.sleep(SETTLE_SECONDS)
        before = {
            name: (rss_bytes(s.child.pid), pss_bytes(s.child.pid), cpu_seconds(s.child.pid))
            for name, s in sidecars.items()
        }
        simulator.control("DELETE", "/requests")
        started = time.monotonic()
        time.sleep(seconds)
        counted = simulator.control("GET", "/requests?limit=0")
        elapsed = time.monotonic() - started
        results = []
        for name, arm, interval in IDLE_SIDECARS:
            pid = sidecars[name].child.pid
            rss0, pss0, cpu0 = before[name]
            cpu = cpu_seconds(pid) - cpu0
            requests = counted["by_vm"].get(name, 0)
            results.append(
                {
                    "name": name,
                    "arm": arm,
                    "poll_interval_s": interval,
                    "idle_seconds": round(elapsed, 3),
                    "rss_mib": rss0 / MIB,
                    "pss_mib": pss0 / MIB if pss0 is not None else None,
                    "rss_mib_end": rss_bytes(pid) / MIB,
                    "cpu_seconds": cpu,
                    "cpu_seconds_per_hour": cpu / elapsed * 3600,
                    "cpu_percent_of_core": cpu / elapsed * 100,
                    "imds_requests": requests,
                    "imds_requests_per_s": requests / elapsed,
                    "arm_helper_rss_mib": helper_peak[name] / MIB if name in helper_peak else None,
                }
            )
        return results


def render(results: dict[str, Any]) -> str:
    start_rows = []
    for run in results["start_up"]:
        start_rows.append(
            (
                "on" if run["arm"] else "off",
                run["runs"],
                run["first_answer_s"]["p50"],
                run["first_answer_s"]["max"],
                run["first_200_s"]["p50"],
                run["first_200_s"]["max"],
                run["nic_discovered_s"]["p50"] if run["arm"] else None,
            )
        )
    idle_rows = [
        (
            r["name"],
            r["rss_mib"],
            r["pss_mib"],
            r["rss_mib_end"],
            r["cpu_seconds_per_hour"],
            r["cpu_percent_of_core"],
            r["imds_requests_per_s"],
            r.get("arm_helper_rss_mib"),
        )
        for r in results["idle"]
    ]
    return "\n".join(
        [
            "start-up (seconds from spawn)",
            table(
                (
                    "ARM",
                    "runs",
                    "first answer p50",
                    "first answer max",
                    "first 200 p50",
                    "first 200 max",
                    "NIC discovered p50",
                ),
                start_rows,
            ),
            "",
            f"idle, {results['idle_seconds']:g} s",
            table(
                (
                    "sidecar",
                    "RSS MiB",
                    "PSS MiB",
                    "RSS MiB at end",
                    "CPU s/hour",
                    "CPU % of a core",
                    "IMDS req/s",
                    "ARM helper RSS MiB (while it ran)",
                ),
                idle_rows,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 start-ups, 10 s idle")
    parser.add_argument("--runs", type=int, help="start-ups per ARM setting (default 10)")
    parser.add_argument("--idle", type=float, help="idle window, seconds (default 300)")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 10)
    idle_seconds = args.idle or (10.0 if args.quick else 300.0)
    results: dict[str, Any] = {
        "benchmark": "footprint",
        "quick": args.quick,
        "machine": machine(),
        "idle_seconds": idle_seconds,
    }
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="footprint-")))
        simulator = Simulator(workdir, "--arm-port", "0")
        stack.callback(simulator.close)
        print("start-up ...", flush=True)
        results["start_up"] = [start_up(workdir, simulator, arm, runs) for arm in (False, True)]
        print(f"idle for {idle_seconds:g} s ...", flush=True)
        results["idle"] = idle(workdir, simulator, idle_seconds)
    off = next(r for r in results["idle"] if r["name"] == "arm-off-1s")
    arm_on = [r for r in results["idle"] if r["arm"]]
    results["targets"] = {
        "idle_rss_below_60_mib_arm_off": off["rss_mib"] < 60,
        "idle_rss_below_100_mib_arm_on": all(r["rss_mib_end"] < 100 for r in arm_on),
        "first_answer_below_1.5_s_arm_off": results["start_up"][0]["first_answer_s"]["max"] < 1.5,
        "idle_cpu_below_1_percent_at_1_s": off["cpu_percent_of_core"] < 1.0,
    }
    print()
    print(render(results))
    print("targets:", results["targets"])
    print(f"wrote {write_results('footprint.quick' if args.quick else 'footprint', results)}")


if __name__ == "__main__":
    main()
