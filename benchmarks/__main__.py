"""`python -m benchmarks [--quick]`: every benchmark, one after the other (never two at once:
they pin processes to the machine's CPUs and would disturb each other's numbers)."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    "rehearsal",
    "rotation",
    "detection",
    "probe",
    "footprint",
    "crash_campaign",
    "fleet",
)


def main() -> int:
    extra = sys.argv[1:]
    for name in BENCHMARKS:
        print(f"== benchmarks.{name} {' '.join(extra)}", flush=True)
        code = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *extra], check=False)
        if code.returncode != 0:
            return code.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
