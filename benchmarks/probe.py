"""The probe endpoint under load: requests/s and latency of `GET /health`, with wrk.

`sidecar run` is pinned to one CPU (taskset), wrk (one thread) and the simulator to another, so
the sidecar has exactly one core. Two loads, each in two conditions:

- loads: `max` (wrk's closed loop with 16 connections: the most the probe serves on one core)
  and `~1000/s` (11 connections that each wait 10 ms between requests, via wrk's Lua `delay()`:
  a little over 1,000 requests/s; latency is measured per request, waits excluded);
- conditions: `polling` (IMDS answers, the poller runs every 0.25 s, more often than the default
  1 s, so the poller's work is in the measurement) and `IMDS hangs` (the simulator holds every
  IMDS request: the sidecar has a request outstanding, times out after SIDECAR_IMDS_TIMEOUT,
  backs off and tries again, while the probe keeps its last answer, 200).

Target: p99 < 2 ms at 1,000 requests/s. `python -m benchmarks.probe [--quick]` writes
benchmarks/results/probe.json. Needs wrk (Debian: apt-get install -y wrk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.lab import (
    Sidecar,
    Simulator,
    cpus_available,
    machine,
    pin,
    table,
    wait_for,
    write_results,
)

WRK_SCRIPT = """
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "0")
if delay_ms > 0 then
  function delay() return delay_ms end
end
function done(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,'
    .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,'
    .. '"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""

LOADS = {
    "max": {"connections": 16, "delay_ms": 0},
    "~1000/s": {"connections": 11, "delay_ms": 10},
}
TARGET_P99_MS = 2.0


def wrk(
    url: str, script: Path, *, connections: int, delay_ms: int, seconds: float, cpu: int | None
) -> dict[str, Any]:
    command = pin(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            url,
        ],
        cpu,
    )
    env = {"WRK_DELAY_MS": str(delay_ms), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, env=env, check=True
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("WRKJSON "))
    raw: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    seconds_run = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in raw if k.endswith("_errors")) + raw["timeouts"]
    return {
        "connections": connections,
        "delay_ms": delay_ms,
        "seconds": seconds_run,
        "requests": raw["requests"],
        "requests_per_s": raw["requests"] / seconds_run,
        "errors": errors,
        "latency_ms": {
            key.removesuffix("_us"): raw[key] / 1000
            for key in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us")
        },
    }


def run(seconds: float) -> dict[str, Any]:
    cpus = cpus_available()
    sidecar_cpu = cpus[0] if len(cpus) > 1 else None
    load_cpu = cpus[1] if len(cpus) > 1 else None
    runs = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="probe-")))
        script = workdir / "report.lua"
        script.write_text(WRK_SCRIPT)
        simulator = Simulator(workdir, "--no-arm", cpu=load_cpu)
        stack.callback(simulator.close)
        sidecar = Sidecar(
            workdir,
            "web-1",
            {
                "SIDECAR_IMDS_URL": simulator.imds_url,
                "SIDECAR_VM_NAME": "web-1",
                "SIDECAR_POLL_INTERVAL": "0.25",
                "SIDECAR_LOG_LEVEL": "WARNING",
            },
            cpu=sidecar_cpu,
        )
        stack.callback(sidecar.close)
        sidecar.wait_probe(200)
        url = f"{sidecar.url}/health"
        for condition in ("polling", "IMDS hangs"):
            if condition == "IMDS hangs":
                simulator.control("POST", "/faults", {"target": "imds", "kind": "hang"})
                wait_for(
                    lambda: sidecar.status()["imds"]["consecutive_failures"] >= 1,
                    "a poll to time out against the hanging IMDS",
                )
            for load, shape in LOADS.items():
                print(f"  {condition}, {load} ...", flush=True)
                measured = wrk(url, script, seconds=seconds, cpu=load_cpu, **shape)
                status = sidecar.status()
                runs.append(
                    {
                        "condition": condition,
                        "load": load,
                        **measured,
                        "probe_state": status["state"],
                        "imds_consecutive_failures": status["imds"]["consecutive_failures"],
                    }
                )
        simulator.control("DELETE", "/faults")
    return {"sidecar_cpu": sidecar_cpu, "load_cpu": load_cpu, "runs": runs}


def render(results: dict[str, Any]) -> str:
    rows = [
        (
            r["condition"],
            r["load"],
            round(r["requests_per_s"]),
            r["latency_ms"]["p50"],
            r["latency_ms"]["p99"],
            r["latency_ms"]["p999"],
            r["latency_ms"]["max"],
            r["errors"],
            r["probe_state"],
        )
        for r in results["runs"]
    ]
    return table(
        ("condition", "load", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors", "probe"),
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per run instead of 15 s")
    parser.add_argument("--seconds", type=float, help="seconds per run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("benchmarks.probe needs wrk: apt-get install -y wrk")
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    results: dict[str, Any] = {
        "benchmark": "probe",
        "quick": args.quick,
        "machine": machine(),
        "seconds_per_run": seconds,
        **run(seconds),
    }
    for r in results["runs"]:
        if r["load"] == "~1000/s":
            r["target_p99_ms"] = TARGET_P99_MS
            r["target_met"] = r["requests_per_s"] >= 1000 and r["latency_ms"]["p99"] < 2.0
    print()
    print(render(results))
    print(f"wrote {write_results('probe.quick' if args.quick else 'probe', results)}")


if __name__ == "__main__":
    main()
