"""The `sidecar` command: run, simulate, demo, check-config.

Exit codes: 0 success (including a clean SIGTERM), 2 configuration refused, 1 anything else.
Configuration errors are printed as one line per problem, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import sys
from collections.abc import Sequence

from sidecar import __version__
from sidecar.settings import ConfigError, Settings, describe_settings, load_settings

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    code: int = args.handler(args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Drains an Azure VM from its load balancer before scheduled maintenance.",
        epilog="Settings come from SIDECAR_* environment variables; see `sidecar check-config`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the sidecar (probe server and drain loop)")
    run.set_defaults(handler=_run)

    check = commands.add_parser(
        "check-config", help="validate SIDECAR_* settings and print the effective values"
    )
    check.set_defaults(handler=_check_config)

    import sidecar.simulator.main as simulator_main

    healthcheck = commands.add_parser(
        "healthcheck",
        help="exit 0 if the sidecar configured here answers on /status (container HEALTHCHECK)",
    )
    healthcheck.set_defaults(handler=_healthcheck)

    simulate = commands.add_parser(
        "simulate", help="serve a simulated IMDS (and ARM) on loopback to rehearse maintenance"
    )
    simulator_main.configure_parser(simulate)
    simulate.set_defaults(handler=simulator_main.run)

    demo = commands.add_parser(
        "demo", help="run the simulator and the sidecar together through one maintenance"
    )
    demo.set_defaults(handler=_demo)
    return parser


def _settings_or_none() -> Settings | None:
    """Prints every configuration problem, one line each, instead of a traceback."""
    try:
        return load_settings()
    except ConfigError as error:
        for line in error.lines:
            print(f"sidecar: configuration error: {line}", file=sys.stderr)
        return None


def _run(_: argparse.Namespace) -> int:
    from sidecar import app, logs
    from sidecar.store import StateFileError

    settings = _settings_or_none()
    if settings is None:
        return EXIT_CONFIG
    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(app.run(settings))
    except (StateFileError, app.CannotListen) as error:
        print(f"sidecar: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _check_config(_: argparse.Namespace) -> int:
    settings = _settings_or_none()
    if settings is None:
        return EXIT_CONFIG
    for line in describe_settings(settings):
        print(line)
    return 0


def _healthcheck(_: argparse.Namespace) -> int:
    """Liveness, not readiness: a draining sidecar (probe 503) is healthy and must not be killed."""
    settings = _settings_or_none()
    if settings is None:
        return 1
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host  # noqa: S104
    connection = http.client.HTTPConnection(host, settings.port, timeout=3)
    try:
        connection.request("GET", "/status")
        status = connection.getresponse().status
    except OSError as error:
        print(f"sidecar: healthcheck: {host}:{settings.port}: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    return 0 if status == 200 else 1


def _demo(_: argparse.Namespace) -> int:
    from sidecar import demo

    return demo.main()
