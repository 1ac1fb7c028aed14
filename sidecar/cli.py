"""The `sidecar` command: run, status, events, simulate, demo, check-config, healthcheck.

Exit codes: 0 success (including a clean SIGTERM), 2 configuration refused, 1 anything else.
Configuration errors are printed as one line per problem, never as a traceback.

Invariant: building the parser imports nothing but the standard library; each command imports
what it uses when it runs. `sidecar healthcheck` runs every few seconds in a container and
`--version` in scripts: they must not pay for pydantic, aiohttp or the simulator.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sidecar import __version__

if TYPE_CHECKING:
    from sidecar.settings import Settings

EXIT_CONFIG = 2
SIMULATE = "simulate"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [SIMULATE]:  # the simulator parses its own flags
        from sidecar.simulator import main as simulator

        return simulator.main(args[1:], prog=f"sidecar {SIMULATE}")
    parser = _parser()
    parsed = parser.parse_args(args)
    handler: Callable[[argparse.Namespace], int] | None = getattr(parsed, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_CONFIG
    return handler(parsed)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Drains an Azure VM from its load balancer before scheduled maintenance.",
        epilog="Settings come from SIDECAR_* environment variables; see `sidecar check-config`.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    commands.add_parser("run", help="run the sidecar (probe server and drain loop)").set_defaults(
        handler=_run
    )
    commands.add_parser(
        "check-config", help="validate SIDECAR_* settings and print the effective values"
    ).set_defaults(handler=_check_config)
    healthcheck = commands.add_parser(
        "healthcheck",
        help="exit 0 if the sidecar configured here answers on /status (container HEALTHCHECK)",
    )
    healthcheck.add_argument(
        "--url",
        help="check this http(s) URL instead: exit 0 on a 2xx (e.g. the simulator's /control)",
    )
    healthcheck.set_defaults(handler=_healthcheck)
    status = commands.add_parser("status", help="print the running sidecar's /status as a table")
    status.add_argument("--json", action="store_true", help="print the JSON as served instead")
    status.set_defaults(handler=_status)
    commands.add_parser(
        "events", help="print this VM's Scheduled Events document as IMDS serves it right now"
    ).set_defaults(handler=_events)
    commands.add_parser(
        SIMULATE,
        help="serve a simulated IMDS (and ARM) on loopback to rehearse maintenance "
        f"(`sidecar {SIMULATE} --help` for its flags)",
        add_help=False,
    )
    commands.add_parser(
        "demo", help="run the simulator and the sidecar together through one maintenance"
    ).set_defaults(handler=_demo)
    return parser


def _settings_or_none() -> Settings | None:
    """Prints every configuration problem, one line each, instead of a traceback."""
    from sidecar.settings import ConfigError, load_settings

    try:
        return load_settings()
    except ConfigError as error:
        for line in error.lines:
            print(f"sidecar: configuration error: {line}", file=sys.stderr)
        return None


def _run(_: argparse.Namespace) -> int:
    import asyncio

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
    from sidecar.settings import describe_settings

    settings = _settings_or_none()
    if settings is None:
        return EXIT_CONFIG
    for line in describe_settings(settings):
        print(line)
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    """Liveness, not readiness: a draining sidecar (probe 503) is healthy and must not be killed.

    Reads SIDECAR_HOST and SIDECAR_PORT itself: validating every setting costs pydantic's import
    (a tenth of a second of CPU), every ten seconds, for the life of the container.
    """
    if args.url is not None:
        return _healthcheck_url(args.url)
    import http.client

    port_text = os.environ.get("SIDECAR_PORT") or "8080"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        print(f"sidecar: healthcheck: SIDECAR_PORT={port_text!r} is not a port", file=sys.stderr)
        return 1
    host = os.environ.get("SIDECAR_HOST") or "0.0.0.0"  # noqa: S104 - the default we reach
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    connection = http.client.HTTPConnection(host, int(port_text), timeout=3)
    try:
        connection.request("GET", "/status")
        status = connection.getresponse().status
    except OSError as error:
        print(f"sidecar: healthcheck: {host}:{port_text}: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    return 0 if status == 200 else 1


def _status(args: argparse.Namespace) -> int:
    import json

    from sidecar import view

    try:
        status = view.fetch_status()
    except (OSError, ValueError) as error:
        print(f"sidecar: status: {error}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else view.render_status(status))
    return 0


def _events(_: argparse.Namespace) -> int:
    from sidecar import view

    try:
        document = view.fetch_events()
    except (OSError, ValueError) as error:
        print(f"sidecar: events: {error}", file=sys.stderr)
        return 1
    print(view.render_events(document))
    return 0


def _healthcheck_url(url: str) -> int:
    """The same check for another service (the rehearsal's simulator): any 2xx is healthy.

    http.client, not urllib.request: a health check on loopback must never go through a proxy.
    """
    import http.client
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when not a number or out of range
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(url)
    except ValueError:
        print(f"sidecar: healthcheck: --url {url!r} is not an http(s) URL", file=sys.stderr)
        return 1
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, port, timeout=3)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", path)
        status = connection.getresponse().status
    except OSError as error:
        print(f"sidecar: healthcheck: {url}: {error}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if not 200 <= status < 300:
        print(f"sidecar: healthcheck: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


def _demo(_: argparse.Namespace) -> int:
    from sidecar import demo

    return demo.main()
