"""The stand-in for the user's web app behind the load balancer (not our product).

It answers every GET at once with its name, in the body and in `X-Backend`, so the load
generator can tell which backend served a request. `python -m benchmarks.webapp --port P --name N`.
"""

from __future__ import annotations

import argparse

from aiohttp import web


def make_app(name: str) -> web.Application:
    body = f"hello from {name}\n"
    headers = {"X-Backend": name}

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text=body, headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.name), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
