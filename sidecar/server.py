"""The HTTP surface: the load-balancer probe, /status and /metrics.

Invariant: handlers only read in-memory state; nothing here awaits IMDS, ARM or the disk, so the
probe answers in well under a millisecond of work whatever the drain loop is waiting for.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar import __version__
from sidecar.drainer import Drainer
from sidecar.metrics import Metrics

DRAINER = web.AppKey("drainer", Drainer)
METRICS = web.AppKey("metrics", Metrics)


async def probe(request: web.Request) -> web.Response:
    verdict = request.app[DRAINER].verdict()
    return web.Response(status=200 if verdict == "serving" else 503, text=f"{verdict}\n")


async def status(request: web.Request) -> web.Response:
    body = {"version": __version__, **request.app[DRAINER].status()}
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def make_app(drainer: Drainer, health_path: str) -> web.Application:
    app = web.Application()
    app[DRAINER] = drainer
    app[METRICS] = drainer.metrics
    app.router.add_get(health_path, probe)  # GET and HEAD
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app
