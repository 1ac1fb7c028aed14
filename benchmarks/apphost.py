"""Many stand-in web apps in one process, one per simulated VM, each on its own port.

A fleet rehearsal needs a web app on every VM; a hundred processes of `benchmarks/webapp.py`
would cost a hundred Python interpreters (~3 GB) on the one machine that runs them all. Here each
VM's app is the same `webapp.make_app` (its answers, `X-Backend`, and its `POST /drain` hook),
served from one event loop, and the rehearsal drives each VM's life through a control port:

- `POST /vms/{name}?port=P`: the VM's app starts listening on 127.0.0.1:P;
- `POST /vms/{name}/freeze`: the VM goes silent, as during a reboot's impact: its listener
  still accepts (the kernel would complete handshakes), nothing is answered, nothing is reset;
- `POST /vms/{name}/boot`: the VM has booted again: every connection it had is reset (what a
  fresh kernel answers to an old flow), and a fresh app (not draining) listens on the same port.

`python -m benchmarks.apphost --control-port P` serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from benchmarks.webapp import DRAIN, make_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Vm:
    name: str
    port: int
    awake: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        awake = self.awake

        @web.middleware
        async def silent_while_frozen(request: web.Request, handler: Handler) -> Any:
            await awake.wait()
            return await handler(request)

        app = make_app(self.name)
        app.middlewares.append(silent_while_frozen)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        app[DRAIN].server = runner.server
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.runner = runner
        self.awake.set()

    def freeze(self) -> None:
        self.awake.clear()

    async def boot(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            server = runner.server
            for connection in list(server.connections if server is not None else []):
                transport = connection.transport
                if transport is not None:
                    transport.abort()  # a reset, not a graceful close
            await runner.cleanup()
        self.awake = asyncio.Event()
        await self.start()


async def serve(control_port: int) -> None:
    vms: dict[str, Vm] = {}

    async def add(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        port = int(request.query["port"])
        if name in vms:
            raise web.HTTPConflict(text=f"{name} exists\n")
        vms[name] = Vm(name, port)
        await vms[name].start()
        return web.Response(text="listening\n")

    async def freeze(request: web.Request) -> web.Response:
        vms[request.match_info["name"]].freeze()
        return web.Response(text="frozen\n")

    async def boot(request: web.Request) -> web.Response:
        await vms[request.match_info["name"]].boot()
        return web.Response(text="booted\n")

    control = web.Application()
    control.router.add_post("/vms/{name}", add)
    control.router.add_post("/vms/{name}/freeze", freeze)
    control.router.add_post("/vms/{name}/boot", boot)
    runner = web.AppRunner(control, access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    try:
        await asyncio.Event().wait()
    finally:
        for vm in vms.values():
            vm.awake.set()
            if vm.runner is not None:
                await vm.runner.cleanup()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control-port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt, web.GracefulExit):
        asyncio.run(serve(args.control_port))


if __name__ == "__main__":
    main()
