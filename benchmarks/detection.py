"""Detection latency: from a Reboot appearing in IMDS to the probe answering 503.

For each poll interval, one `sidecar run` (pinned to one CPU) polls a `sidecar simulate` (pinned
to the other, with this script). Per event: wait a random fraction of the interval (so events
land at every phase of the poll cycle), add the event through the control API, then GET the
probe every 2 ms on one keep-alive connection until it answers 503. Latency is from the
simulator's `created_at` (when the event entered the document, clamped to the control request's
own span) to the arrival of the first 503; so it is an upper bound, at most ~2 ms high. Then,
after another random pause, the event is cancelled and the time until the probe answers 200
again is taken the same way.

The floor is one poll interval (an event that lands just after a poll waits a whole interval),
so latencies spread uniformly over [0, interval]; the target is p99 <= interval + 50 ms.

`python -m benchmarks.detection [--quick] [--events N] [--interval S]...`
writes benchmarks/results/detection.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.lab import (
    PATIENCE,
    Sidecar,
    Simulator,
    cpus_available,
    distribution,
    machine,
    table,
    wall_time,
    write_results,
)

PROBE_EVERY = 0.002
TARGET_SLACK = 0.050


class Prober:
    """GETs the probe on one keep-alive connection, as fast as `PROBE_EVERY` allows."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def status(self) -> int:
        try:
            self.connection.request("GET", "/health")
            response = self.connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            return 0

    def until(self, code: int, timeout: float = PATIENCE) -> float:
        """Wall-clock time of the first answer with `code`."""
        deadline = time.monotonic() + timeout
        while True:
            if self.status() == code:
                return time.time()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the probe never answered {code}")
            time.sleep(PROBE_EVERY)

    def close(self) -> None:
        self.connection.close()


def measure(workdir: Path, interval: float, events: int, cpus: list[int]) -> dict[str, Any]:
    sidecar_cpu = cpus[0] if len(cpus) > 1 else None
    other_cpu = cpus[1] if len(cpus) > 1 else None
    detections: list[float] = []
    recoveries: list[float] = []
    with contextlib.ExitStack() as stack:
        simulator = Simulator(workdir, "--no-arm", cpu=other_cpu, name=f"simulator-{interval:g}")
        stack.callback(simulator.close)
        sidecar = Sidecar(
            workdir,
            f"web-1-{interval:g}",
            {
                "SIDECAR_IMDS_URL": simulator.imds_url,
                "SIDECAR_VM_NAME": "web-1",
                "SIDECAR_POLL_INTERVAL": str(interval),
                "SIDECAR_APPROVE": "never",  # the probe stays 503 until the event is cancelled
                "SIDECAR_LOG_LEVEL": "WARNING",
            },
            cpu=sidecar_cpu,
        )
        stack.callback(sidecar.close)
        sidecar.wait_probe(200)
        prober = Prober(sidecar.port)
        stack.callback(prober.close)
        for _ in range(events):
            time.sleep(random.uniform(0, interval))
            before = time.time()
            event = simulator.add_event(type="Reboot", resources=["web-1"], not_before_in=900)
            after = time.time()
            appeared = min(max(wall_time(event["created_at"]), before), after)
            detections.append(prober.until(503) - appeared)
            time.sleep(random.uniform(0, interval))  # the 503 came right after a poll
            cancelled = time.time()
            simulator.cancel_event(event["EventId"])
            recoveries.append(prober.until(200) - cancelled)
        polls = sidecar.status()["imds"]["successful_polls"]
    detect = {k: v * 1000 if k != "count" else v for k, v in distribution(detections).items()}
    recover = {k: v * 1000 if k != "count" else v for k, v in distribution(recoveries).items()}
    return {
        "poll_interval_s": interval,
        "events": events,
        "successful_polls": polls,
        "detection_ms": detect,
        "detection_ratio_to_interval": {
            key: detect[key] / (interval * 1000) for key in ("p50", "p95", "p99", "max")
        },
        "recovery_ms": recover,
        "target_p99_ms": interval * 1000 + TARGET_SLACK * 1000,
        "target_met": detect["p99"] <= interval * 1000 + TARGET_SLACK * 1000,
    }


def render(results: dict[str, Any]) -> str:
    rows = []
    for run in results["runs"]:
        d, r, ratio = run["detection_ms"], run["recovery_ms"], run["detection_ratio_to_interval"]
        rows.append(
            (
                f"{run['poll_interval_s']:g} s",
                run["events"],
                d["p50"],
                d["p95"],
                d["p99"],
                d["max"],
                f"{ratio['p50']:.2f} / {ratio['p99']:.2f} / {ratio['max']:.2f}",
                f"<= {run['target_p99_ms']:.0f}: {'met' if run['target_met'] else 'MISSED'}",
                f"{r['p50']:.1f} / {r['p99']:.1f}",
            )
        )
    return table(
        (
            "poll interval",
            "events",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "/ interval (p50/p99/max)",
            "target p99",
            "back to 200 p50/p99 ms",
        ),
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 events per interval")
    parser.add_argument("--events", type=int, help="events per interval (default 200)")
    parser.add_argument(
        "--interval", type=float, action="append", help="poll intervals (default 1 and 0.25)"
    )
    args = parser.parse_args()
    events = args.events or (20 if args.quick else 200)
    intervals = args.interval or [1.0, 0.25]
    cpus = cpus_available()
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[1]})  # this script shares the simulator's CPU
    results: dict[str, Any] = {
        "benchmark": "detection",
        "quick": args.quick,
        "machine": machine(),
        "probe_every_ms": PROBE_EVERY * 1000,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="detection-") as workdir:
        for interval in intervals:
            print(f"poll interval {interval:g} s: {events} events ...", flush=True)
            results["runs"].append(measure(Path(workdir), interval, events, cpus))
    print()
    print(render(results))
    print(f"wrote {write_results('detection.quick' if args.quick else 'detection', results)}")


if __name__ == "__main__":
    main()
