"""The stand-in for the user's web app behind the load balancer (not our product).

It answers every GET with its name, in the body and in `X-Backend`, so the load generator can
tell which backend served a request; `?delay=S` answers after S seconds (a request in flight).

It is also the README's "app endpoint" recipe for SIDECAR_DRAIN_HOOK_URL:
- `POST /drain`: from now on every answer carries `Connection: close`; idle keep-alive
  connections are closed at once, busy ones right after their answer; 200 once that is done
  (a request still running after 10 s is cut). Requests in flight are answered normally.
- `POST /undrain` (SIDECAR_UNDRAIN_HOOK_URL): keep-alive again.

`python -m benchmarks.webapp --port P --name N`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from dataclasses import dataclass

from aiohttp import web

DRAIN_WAIT_SECONDS = 10.0


@dataclass
class Drain:
    draining: bool = False
    server: web.Server | None = None
    """The runner's server: its `connections` are the open client connections."""


DRAIN = web.AppKey("drain", Drain)


def make_app(name: str) -> web.Application:
    body = f"hello from {name}\n"

    async def hello(request: web.Request) -> web.Response:
        delay = float(request.query.get("delay", "0") or 0)
        if delay > 0:
            await asyncio.sleep(min(delay, 60.0))
        return _answer(request, body)

    async def drain(request: web.Request) -> web.Response:
        state = request.app[DRAIN]
        state.draining = True
        # aiohttp's own graceful shutdown (Server.pre_shutdown, then shutdown), connection by
        # connection: idle ones are closed now, busy ones once their answer is out
        others = _others(request)
        for connection in others:
            connection.close()
        await asyncio.gather(*(c.shutdown(DRAIN_WAIT_SECONDS) for c in others))
        left = len(_others(request))
        text = "drained\n" if not left else f"{left} connections still open\n"
        return _answer(request, text)

    async def undrain(request: web.Request) -> web.Response:
        request.app[DRAIN].draining = False
        return _answer(request, "serving\n")

    def _answer(request: web.Request, text: str) -> web.Response:
        response = web.Response(text=text, headers={"X-Backend": name})
        if request.app[DRAIN].draining:
            response.force_close()  # `Connection: close`, and the connection ends after it
        return response

    def _others(request: web.Request) -> list[web.RequestHandler]:
        server = request.app[DRAIN].server
        if server is None:
            return []
        return [c for c in server.connections if c is not request.protocol]

    app = web.Application()
    app[DRAIN] = Drain()
    app.router.add_post("/drain", drain)
    app.router.add_post("/undrain", undrain)
    app.router.add_get("/{tail:.*}", hello)
    return app


async def serve(name: str, port: int) -> None:
    app = make_app(name)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    app[DRAIN].server = runner.server
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt, web.GracefulExit):
        asyncio.run(serve(args.name, args.port))


if __name__ == "__main__":
    main()
