"""The control API for load balancers, application gateways and VMs' loopback ports.

Invariants: the same conventions as ``control`` (JSON in and out, ``{"error"}`` with 400, 404,
409); every change goes through the model's own functions and bumps the load balancer's etag;
a change that needs the running parts (a rule's loopback frontend, a new port map) is carried
out before the answer, so the answer shows the port a frontend really listens on.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from sidecar.simulator import backends
from sidecar.simulator.appgw import parse_gateway
from sidecar.simulator.control import endpoint, read_json
from sidecar.simulator.endpoints import WORLD
from sidecar.simulator.errors import ControlError
from sidecar.simulator.lb import (
    LoadBalancer,
    add_pool,
    add_probe,
    add_rule,
    apply_probe,
    apply_rule,
    membership,
    parse_load_balancer,
    parse_probe,
    parse_rule,
)
from sidecar.simulator.lbruntime import LB_RUNTIME, LbRuntime
from sidecar.simulator.loopback import LOOPBACK, parse_ports
from sidecar.simulator.responses import control_json
from sidecar.simulator.world import World

routes = web.RouteTableDef()


def lb_view(world: World, runtime: LbRuntime, lb: LoadBalancer) -> dict[str, Any]:
    """A load balancer as tests and benchmarks read it: rules with per-backend probe state."""
    members = membership(world.nics.all())
    rules = []
    for rule in lb.rules:
        view = backends.rule_view(world, lb, rule, members)
        port = runtime.frontends.port_of(lb, rule)
        view["frontend_listener"] = {"host": LOOPBACK, "port": port} if port is not None else None
        view["frontend_error"] = runtime.frontends.error_of(lb, rule)
        view["flows"] = runtime.frontends.stats_of(lb, rule).to_json()
        rules.append(view)
    return {
        "name": lb.name,
        "id": lb.id,
        "resource_group": lb.resource_group,
        "location": lb.location,
        "etag": lb.etag,
        "frontends": list(lb.frontends),
        "pools": [
            {
                "name": pool,
                "id": lb.pool_id(pool),
                "members": [m.ipconfig_id for m in members.get(lb.pool_id(pool).casefold(), [])],
            }
            for pool in lb.pools
        ],
        "probes": [{**p.to_json(), "id": lb.child_id("probes", p.name)} for p in lb.probes],
        "rules": rules,
    }


def _lb(world: World, request: web.Request) -> LoadBalancer:
    name = request.match_info["lb"]
    lb = world.lbs.find(name, request.query.get("resource_group"))
    if lb is None:
        raise ControlError(404, f"no load balancer {name}")
    return lb


async def _settled(request: web.Request, lb: LoadBalancer) -> web.Response:
    """Carry a change out (health book, listeners), then show the load balancer."""
    world, runtime = request.app[WORLD], request.app[LB_RUNTIME]
    await runtime.reconcile()
    return control_json(lb_view(world, runtime, lb))


@routes.get("/control/load-balancers")
@endpoint
async def get_load_balancers(request: web.Request) -> web.Response:
    world, runtime = request.app[WORLD], request.app[LB_RUNTIME]
    backends.sync(world, time.time())
    return control_json([lb_view(world, runtime, lb) for lb in world.lbs.all()])


@routes.post("/control/load-balancers")
@endpoint
async def post_load_balancer(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    config = world.config
    lb = parse_load_balancer(
        await read_json(request),
        subscription=config.subscription_id,
        resource_group=config.resource_group,
        location=config.location,
    )
    world.lbs.add(lb)
    answer = await _settled(request, lb)
    answer.set_status(201)
    return answer


@routes.post("/control/load-balancers/probe")
@endpoint
async def probe_now(request: web.Request) -> web.Response:
    """Probe every probed backend once, now, and wait for the answers."""
    runtime = request.app[LB_RUNTIME]
    probed = await runtime.prober.probe_all_once()
    return control_json({"probed": probed})


@routes.get("/control/load-balancers/{lb}")
@endpoint
async def get_load_balancer(request: web.Request) -> web.Response:
    world, runtime = request.app[WORLD], request.app[LB_RUNTIME]
    lb = _lb(world, request)
    backends.sync(world, time.time())
    return control_json(lb_view(world, runtime, lb))


@routes.get("/control/load-balancers/{lb}/history")
@endpoint
async def get_history(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    lb = _lb(world, request)
    since_text = request.query.get("since")
    try:
        since = float(since_text) if since_text is not None else None
    except ValueError:
        raise ControlError(400, "'since' must be POSIX seconds (the 't' of an entry)") from None
    backends.sync(world, time.time())
    entries = [e for e in world.lb_health.history(since) if e.get("lb") == lb.name]
    return control_json({"now": time.time(), "entries": entries})


@routes.post("/control/load-balancers/{lb}/pools")
@endpoint
async def post_pool(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    lb = _lb(world, request)
    body = await read_json(request)
    if not isinstance(body, dict) or set(body) != {"name"} or not isinstance(body["name"], str):
        raise ControlError(400, 'expected {"name": "pool-name"}')
    add_pool(lb, body["name"])
    return await _settled(request, lb)


@routes.post("/control/load-balancers/{lb}/probes")
@endpoint
async def post_probe(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    lb = _lb(world, request)
    add_probe(lb, parse_probe(await read_json(request)))
    return await _settled(request, lb)


@routes.patch("/control/load-balancers/{lb}/probes/{probe}")
@endpoint
async def patch_probe(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    lb = _lb(world, request)
    probe = lb.probe(request.match_info["probe"])
    if probe is None:
        raise ControlError(404, f"{lb.name} has no probe {request.match_info['probe']}")
    body = await read_json(request)
    if not isinstance(body, dict) or "name" in body:
        raise ControlError(400, "expected an object of probe fields (the name cannot change)")
    apply_probe(probe, body)
    lb.touch()
    return await _settled(request, lb)


@routes.post("/control/load-balancers/{lb}/rules")
@endpoint
async def post_rule(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    lb = _lb(world, request)
    add_rule(lb, parse_rule(lb, await read_json(request)))
    return await _settled(request, lb)


@routes.patch("/control/load-balancers/{lb}/rules/{rule}")
@endpoint
async def patch_rule(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    lb = _lb(world, request)
    rule = lb.rule(request.match_info["rule"])
    if rule is None:
        raise ControlError(404, f"{lb.name} has no rule {request.match_info['rule']}")
    body = await read_json(request)
    if not isinstance(body, dict) or "name" in body:
        raise ControlError(400, "expected an object of rule fields (the name cannot change)")
    apply_rule(lb, rule, body)
    lb.touch()
    return await _settled(request, lb)


@routes.put("/control/vms/{name}/ports")
@endpoint
async def put_ports(request: web.Request) -> web.Response:
    world, runtime = request.app[WORLD], request.app[LB_RUNTIME]
    vm = world.vm(request.match_info["name"])
    if vm is None:
        raise ControlError(404, f"no VM {request.match_info['name']}")
    world.ports.set(vm.name, parse_ports(await read_json(request)))
    await runtime.reconcile()
    return control_json({"vm": vm.name, "address": LOOPBACK, "ports": world.ports.to_json(vm.name)})


@routes.get("/control/application-gateways")
@endpoint
async def get_gateways(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    nics = world.nics.all()
    return control_json([gateway.describe(nics) for gateway in world.appgws.all()])


@routes.post("/control/application-gateways")
@endpoint
async def post_gateway(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    config = world.config
    gateway = world.appgws.add(
        parse_gateway(
            await read_json(request),
            subscription=config.subscription_id,
            resource_group=config.resource_group,
            location=config.location,
        )
    )
    return control_json(gateway.describe(world.nics.all()), 201)
