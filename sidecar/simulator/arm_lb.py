"""ARM for load balancers: read them and their pools, rules and probes; ask a rule's health.

Invariants: the checks run in ARM's order (``armchecks``), the role check naming the action of
the resource type read (``loadBalancers/read``, ``loadBalancers/backendAddressPools/read``, ...)
over the request's scope; a pool's ``backendIPConfigurations`` are computed from the NICs at the
moment of the request; ``POST .../loadBalancingRules/{rule}/health`` is long-running as Azure
serves it: 202 with ``Location`` (``operationResults``, where the result is read) and
``Azure-AsyncOperation``, its result the rule's health as the prober sees it when the POST
arrives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from aiohttp import web

from sidecar.simulator import backends, ids, routing
from sidecar.simulator.armchecks import api_version, authorize, check_scope, not_found
from sidecar.simulator.errors import ArmError
from sidecar.simulator.identity import Token
from sidecar.simulator.lb import (
    LoadBalancer,
    lb_document,
    membership,
    pool_document,
    probe_document,
    rule_document,
)
from sidecar.simulator.responses import arm_headers, arm_json
from sidecar.simulator.versions import NETWORK_NEWEST
from sidecar.simulator.world import World

LB_READ = "Microsoft.Network/loadBalancers/read"
CHILD_READ = {
    "backendaddresspools": "Microsoft.Network/loadBalancers/backendAddressPools/read",
    "loadbalancingrules": "Microsoft.Network/loadBalancers/loadBalancingRules/read",
    "probes": "Microsoft.Network/loadBalancers/probes/read",
}
RULE_HEALTH = "Microsoft.Network/loadBalancers/loadBalancingRules/health/action"
LB_KIND = "Microsoft.Network/loadBalancers"


async def dispatch(
    world: World, request: web.Request, route: routing.ArmRoute, token: Token
) -> web.Response:
    method, name, params = request.method, route.name, route.params
    if name == "lb-rule-health" and method == "POST":
        return _rule_health(world, request, params, token)
    if method != "GET":
        raise ArmError(
            405,
            "MethodNotAllowed",
            f"The simulator does not implement '{method}' on '{request.path}'.",
        )
    if name == "lb-list-all":
        return _list(world, request, params, token, None)
    if name == "lb-list":
        return _list(world, request, params, token, params["rg"])
    if name == "lb":
        return _get(world, request, params, token)
    if name == "lb-child-list":
        return _children(world, request, params, token)
    if name == "lb-child":
        return _child(world, request, params, token)
    raise ArmError(404, "NotFound", f"The simulator serves no '{method} {request.path}'.")


def _load_balancer(world: World, params: Mapping[str, str]) -> LoadBalancer:
    lb = world.lbs.get(ids.lb_id(params["sub"], params["rg"], params["lb"]))
    if lb is None:
        raise not_found(LB_KIND, params["lb"], params["rg"])
    return lb


def _list(
    world: World,
    request: web.Request,
    params: Mapping[str, str],
    token: Token,
    resource_group: str | None,
) -> web.Response:
    api_version(request, NETWORK_NEWEST)
    check_scope(world, params)
    authorize(world, token, LB_READ, request.path)
    lbs = world.lbs.all() if resource_group is None else world.lbs.in_resource_group(resource_group)
    nics = world.nics.all()
    return arm_json({"value": [lb_document(lb, nics) for lb in lbs]})


def _get(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    api_version(request, NETWORK_NEWEST)
    check_scope(world, params)
    authorize(world, token, LB_READ, request.path)
    return arm_json(lb_document(_load_balancer(world, params), world.nics.all()))


def _documents(world: World, lb: LoadBalancer, child: str) -> dict[str, dict[str, object]]:
    """The children of one kind, by casefolded name."""
    if child == "backendaddresspools":
        members = membership(world.nics.all())
        docs = [pool_document(lb, pool, members) for pool in lb.pools]
    elif child == "loadbalancingrules":
        docs = [rule_document(lb, rule) for rule in lb.rules]
    else:
        docs = [probe_document(lb, probe) for probe in lb.probes]
    return {str(doc["name"]).casefold(): doc for doc in docs}


def _children(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    child = params["child"].casefold()
    api_version(request, NETWORK_NEWEST)
    check_scope(world, params)
    authorize(world, token, CHILD_READ[child], request.path)
    lb = _load_balancer(world, params)
    return arm_json({"value": list(_documents(world, lb, child).values())})


def _child(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    child = params["child"].casefold()
    api_version(request, NETWORK_NEWEST)
    check_scope(world, params)
    authorize(world, token, CHILD_READ[child], request.path)
    lb = _load_balancer(world, params)
    doc = _documents(world, lb, child).get(params["name"].casefold())
    if doc is None:
        raise ArmError(404, "NotFound", f"Resource {request.path} not found.")
    return arm_json(doc)


def _rule_health(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    version = api_version(request, NETWORK_NEWEST)
    check_scope(world, params)
    rule_path = request.path.rstrip("/").rsplit("/", 1)[0]  # the action's scope is the rule
    authorize(world, token, RULE_HEALTH, rule_path)
    lb = _load_balancer(world, params)
    rule = lb.rule(params["name"])
    if rule is None:
        raise ArmError(404, "NotFound", f"Resource {rule_path} not found.")
    backends.sync(world, time.time())
    result = backends.rule_health(world, lb, rule)
    operation = world.operations.create(
        lb.child_id("loadBalancingRules", rule.name), settle=world.operation_settle(), result=result
    )
    location = lb.location.replace(" ", "").lower()
    base = f"{request.scheme}://{request.host}"
    query = f"?api-version={version}"
    headers = {
        "Location": base
        + ids.operation_result_path(params["sub"], location, operation.operation_id)
        + query,
        "Azure-AsyncOperation": base
        + ids.operation_path(params["sub"], location, operation.operation_id)
        + query,
        # Whole seconds: azure-mgmt-network parses this header as an int (the polls that
        # follow may carry fractions).
        "Retry-After": str(math.ceil(world.settings.arm_retry_after)),
    }
    return web.Response(status=202, headers=arm_headers(headers))
