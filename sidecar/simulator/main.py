"""CLI glue for ``sidecar simulate`` (and ``python -m sidecar.simulator``).

Invariant: this module only maps flags to ``SimulatorOptions``, prints where things are, and
serves until SIGINT or SIGTERM, then stops cleanly and exits 0; all behaviour lives elsewhere.
The main CLI imports it only for `sidecar simulate`, and it loads the servers (TLS and
`cryptography` included) only once the flags have parsed, so `--help` stays quick.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.simulator.options import DEFAULT_SUBSCRIPTION, ScheduleSpec, SimulatorOptions

if TYPE_CHECKING:
    from sidecar.simulator.endpoints import SimulatorUrls


def _schedule(text: str) -> ScheduleSpec:
    try:
        return ScheduleSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is 0 (ephemeral) to 65535")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from exc
    if value < 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError("seconds must be a non-negative number")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``sidecar simulate`` flags to ``parser``."""
    defaults = SimulatorOptions()
    parser.add_argument("--host", default=defaults.host, help="address to listen on (%(default)s)")
    parser.add_argument(
        "--port",
        type=_port,
        default=defaults.port,
        help="IMDS + control HTTP port; 0 = ephemeral (%(default)s)",
    )
    parser.add_argument("--vm-name", default=defaults.vm_name, help="the default VM (%(default)s)")
    parser.add_argument("--resource-group", default=defaults.resource_group, help="(%(default)s)")
    parser.add_argument("--subscription-id", default=DEFAULT_SUBSCRIPTION, help="(%(default)s)")
    parser.add_argument("--location", default=defaults.location, help="(%(default)s)")
    parser.add_argument(
        "--arm-port",
        type=_port,
        default=defaults.arm_port,
        help="ARM HTTPS port; 0 = ephemeral (%(default)s)",
    )
    parser.add_argument("--no-arm", action="store_true", help="serve no ARM endpoint")
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="where to write the ARM CA PEM (default: a fresh temp dir)",
    )
    parser.add_argument(
        "--started-seconds",
        type=float,
        default=defaults.started_seconds,
        help="how long a Started event stays in the document (%(default)s)",
    )
    parser.add_argument(
        "--arm-retry-after",
        type=float,
        default=defaults.arm_retry_after,
        help="Retry-After seconds on ARM long-running operations (%(default)s; 0 makes the "
        "Azure SDK wait 30 s per poll)",
    )
    parser.add_argument(
        "--arm-page-size",
        type=int,
        default=defaults.arm_page_size,
        help="NICs per ARM list page, with nextLink paging; 0 = one page (%(default)s)",
    )
    parser.add_argument(
        "--start-when",
        choices=("any-approval", "all-approvals"),
        default=defaults.start_when,
        help="when approvals start an event: at the first, or once every VM it names has "
        "approved (or at NotBefore) (%(default)s)",
    )
    parser.add_argument(
        "--warmup-seconds",
        type=_seconds,
        default=defaults.warmup_seconds,
        help="answer each VM's Scheduled Events calls 410 Gone for this long after its first "
        "one, as while Azure enables the service; 0 = off (%(default)s)",
    )
    parser.add_argument(
        "--arm-throttle",
        action="store_true",
        help="throttle ARM like Azure: token buckets per subscription and principal (reads "
        "250 + 25/s, writes 200 + 10/s), 429 with Retry-After when empty; sizes and rates in "
        "PATCH /control/settings",
    )
    parser.add_argument(
        "--ready-file", type=Path, default=None, help="once listening, write the URLs here as JSON"
    )
    parser.add_argument(
        "--schedule",
        type=_schedule,
        action="append",
        default=[],
        metavar="TYPE[:SECONDS]",
        help="add an event for the default VM at start-up (repeatable)",
    )


def options_from_args(args: argparse.Namespace) -> SimulatorOptions:
    return SimulatorOptions(
        host=args.host,
        port=args.port,
        vm_name=args.vm_name,
        resource_group=args.resource_group,
        subscription_id=args.subscription_id,
        location=args.location,
        arm=not args.no_arm,
        arm_port=args.arm_port,
        ca_file=args.ca_file,
        started_seconds=args.started_seconds,
        arm_retry_after=args.arm_retry_after,
        arm_page_size=args.arm_page_size,
        arm_throttle=args.arm_throttle,
        ready_file=args.ready_file,
        schedule=tuple(args.schedule),
        start_when=args.start_when,
        warmup_seconds=args.warmup_seconds,
    )


def describe(urls: SimulatorUrls, options: SimulatorOptions) -> list[str]:
    """The human lines printed at start-up."""
    lines = [
        f"simulator: IMDS {urls.imds_url}  (set SIDECAR_IMDS_URL to this)",
        f"simulator: managed identity {urls.imds_url}  (set AZURE_POD_IDENTITY_AUTHORITY_HOST)",
        f"simulator: control {urls.control_url}  (GET it for help)",
        f"simulator: other VMs' views {urls.vm_url('<vm-name>')}",
    ]
    if urls.arm_url is not None:
        lines.append(f"simulator: ARM {urls.arm_url}  (set SIDECAR_ARM_URL to this)")
        lines.append(f"simulator: ARM CA {urls.ca_file}  (set SIDECAR_ARM_CA_BUNDLE to this)")
    else:
        lines.append("simulator: ARM not served (--no-arm)")
    lines.append(
        f"simulator: default VM {options.vm_name} in {options.resource_group}, "
        f"subscription {options.subscription_id}, {options.location}; Ctrl-C to stop"
    )
    return lines


async def serve(options: SimulatorOptions) -> int:
    """Run until SIGINT/SIGTERM."""
    from sidecar.simulator.server import Simulator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows' default loop
            loop.add_signal_handler(signum, stop.set)
    simulator = Simulator(options)
    try:
        urls = await simulator.start()
    except OSError as exc:
        print(f"simulator: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        for line in describe(urls, options):
            print(line, flush=True)
        await stop.wait()
        print("simulator: stopping", flush=True)
    finally:
        await simulator.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve(options_from_args(args)))


def main(argv: Sequence[str] | None = None, prog: str = "python -m sidecar.simulator") -> int:
    """Entry point of ``sidecar simulate`` and ``python -m sidecar.simulator``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A local fake of Azure IMDS (Scheduled Events, instance metadata, managed "
        "identity) and of ARM network interfaces.",
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))
