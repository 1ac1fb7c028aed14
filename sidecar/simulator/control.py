"""The control API under ``/control``: how tests and the demo drive and inspect the world.

Invariants: it speaks JSON in and out, needs no Metadata header, and is never counted nor
faulted; every change goes through the same model methods the platform uses (so a control
``start`` bumps DocumentIncarnation exactly like an automatic start); errors are
``{"error": message}`` with 400 (bad input), 404 (unknown thing) or 409 (conflict).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sidecar.simulator import ids
from sidecar.simulator.endpoints import URLS, WORLD, SimulatorUrls
from sidecar.simulator.errors import ArmError, ControlError
from sidecar.simulator.events import (
    parse_event_spec,
    parse_not_before,
    parse_resources,
    parse_start_when,
)
from sidecar.simulator.faults import FAULT_KINDS, TARGETS, VARIANTS, parse_fault
from sidecar.simulator.identity import parse_denials
from sidecar.simulator.impact import seconds_field
from sidecar.simulator.loopback import parse_ports
from sidecar.simulator.network import APPGW_POOLS, Nic, custom_nic
from sidecar.simulator.responses import control_error, control_json
from sidecar.simulator.roles import parse_assignments
from sidecar.simulator.vms import Vm, parse_vm
from sidecar.simulator.world import World

ControlHandler = Callable[[web.Request], Awaitable[web.Response]]

ENDPOINTS: tuple[tuple[str, str, str], ...] = (
    ("GET", "/control", "this index"),
    (
        "GET",
        "/control/settings",
        "runtime settings (started_seconds, arm_retry_after, arm_page_size, start_when, ...)",
    ),
    ("PATCH", "/control/settings", "change runtime settings"),
    ("GET", "/control/events", "the Scheduled Events document plus internals and approvals"),
    ("POST", "/control/events", "add events: one object or a list (201)"),
    ("DELETE", "/control/events", "cancel all events"),
    (
        "PATCH",
        "/control/events/{id}",
        "change not_before(_in) / resources / started_for / linger / impact_* / start_when",
    ),
    ("DELETE", "/control/events/{id}", "cancel one event (it leaves the document)"),
    ("POST", "/control/events/{id}/start", "start an event now, as the platform would"),
    ("POST", "/control/events/{id}/impact", "the impact begins now (starts the event first)"),
    ("POST", "/control/events/{id}/impact/end", "the impact is over now"),
    ("GET", "/control/approvals", "StartRequests received, in order"),
    ("DELETE", "/control/approvals", "forget the approvals"),
    ("GET", "/control/requests", "request counts by 'METHOD kind' plus a log (?limit=N)"),
    ("DELETE", "/control/requests", "reset the counts and the log"),
    ("GET", "/control/faults", "faults, with hit counts"),
    ("POST", "/control/faults", "add a fault (201)"),
    ("DELETE", "/control/faults", "clear all faults (releases hanging requests)"),
    ("DELETE", "/control/faults/{id}", "clear one fault"),
    ("GET", "/control/vms", "known VMs"),
    ("POST", "/control/vms", "add a VM (and its NIC), or a list of them (201); 'ports' optional"),
    ("PUT", "/control/vms/{name}/ports", 'loopback port map: {"8080": 41234, "80": 41235}'),
    ("GET", "/control/nics", "NICs: id, VM, etag and per IP configuration pools/NAT rules/ASGs"),
    ("POST", "/control/nics", "add a NIC from full ARM JSON (201)"),
    ("GET", "/control/nics/{name}", "one NIC's full ARM JSON (?resource_group=)"),
    ("PUT", "/control/nics/{name}/pools", "set pool membership directly (new etag)"),
    ("PUT", "/control/nics/{name}/appgw-pools", "set application-gateway pools directly"),
    ("GET", "/control/load-balancers", "load balancers: rules with per-backend probe state"),
    ("POST", "/control/load-balancers", "add a load balancer (201)"),
    ("POST", "/control/load-balancers/probe", "probe every probed backend once, now"),
    ("GET", "/control/load-balancers/{lb}", "one load balancer (?resource_group=)"),
    ("GET", "/control/load-balancers/{lb}/history", "probe-state changes (?since=T)"),
    ("POST", "/control/load-balancers/{lb}/pools", 'add a backend pool: {"name"}'),
    ("POST", "/control/load-balancers/{lb}/probes", "add a health probe"),
    ("PATCH", "/control/load-balancers/{lb}/probes/{probe}", "change a probe"),
    ("POST", "/control/load-balancers/{lb}/rules", "add a load-balancing rule"),
    ("PATCH", "/control/load-balancers/{lb}/rules/{rule}", "change a rule ('listen': frontend)"),
    ("GET", "/control/application-gateways", "application gateways and their pools"),
    ("POST", "/control/application-gateways", "add an application gateway (201)"),
    ("GET", "/control/operations", "ARM long-running operations"),
    ("GET", "/control/permissions", "denied actions and role assignments"),
    (
        "PUT",
        "/control/permissions",
        'replace them: {"deny": [{"action","scope","vm"}]} and/or {"role": <role JSON>}',
    ),
    ("DELETE", "/control/permissions", "allow everything again"),
    ("POST", "/control/reset", "back to the initial world"),
)


def endpoint(handler: ControlHandler) -> ControlHandler:
    """Turn the model's ControlError/ArmError into the control API's error answer."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except ControlError as error:
            return control_error(error.status, error.message)
        except ArmError as error:
            return control_error(error.status, f"{error.code}: {error.message}")

    return wrapped


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise ControlError(400, "a JSON body is required")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ControlError(400, f"the body is not JSON: {exc}") from exc


routes = web.RouteTableDef()


@routes.get("/control")
@routes.get("/control/")
@endpoint
async def index(request: web.Request) -> web.Response:
    urls, world = request.app[URLS], request.app[WORLD]
    return control_json(
        {
            "simulator": "Azure IMDS + ARM (NICs, load balancers) fake for rehearsing maintenance",
            "urls": urls.to_json(),
            "environment": {
                "SIDECAR_IMDS_URL": urls.imds_url,
                "AZURE_POD_IDENTITY_AUTHORITY_HOST": urls.imds_url,
                "SIDECAR_ARM_URL": urls.arm_url,
                "SIDECAR_ARM_CA_BUNDLE": urls.to_json()["ca_file"],
            },
            "default_vm": world.config.default_vm,
            "subscription_id": world.config.subscription_id,
            "resource_group": world.config.resource_group,
            "location": world.config.location,
            "endpoints": [
                {"method": method, "path": path, "description": text}
                for method, path, text in ENDPOINTS
            ],
            "fault_targets": list(TARGETS),
            "fault_kinds": list(FAULT_KINDS),
            "malformed_variants": list(VARIANTS),
        }
    )


@routes.get("/control/settings")
@endpoint
async def get_settings(request: web.Request) -> web.Response:
    return control_json(request.app[WORLD].settings.to_json())


@routes.patch("/control/settings")
@endpoint
async def patch_settings(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    body = await read_json(request)
    world.settings.update(body)
    if "warmup_seconds" in body:
        world.warmup.disable_all()  # so each VM's next call warms up under the new setting
    return control_json(world.settings.to_json())


def _events_view(world: World) -> dict[str, Any]:
    return {
        "DocumentIncarnation": world.events.incarnation,
        "events": [world.events.describe(event) for event in world.events.events()],
        "approvals": [approval.to_json() for approval in world.events.approvals],
    }


@routes.get("/control/events")
@endpoint
async def get_events(request: web.Request) -> web.Response:
    return control_json(_events_view(request.app[WORLD]))


@routes.post("/control/events")
@endpoint
async def post_events(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    body = await read_json(request)
    items = body if isinstance(body, list) else [body]
    if not items:
        raise ControlError(400, "no events given")
    now = world.now()
    specs = [
        parse_event_spec(
            item,
            now=now,
            default_vm=world.config.default_vm,
            started_seconds=world.settings.started_seconds,
            start_when=world.settings.start_when,
        )
        for item in items
    ]
    created = world.add_events(specs)
    return control_json([world.events.describe(event) for event in created], 201)


@routes.delete("/control/events")
@endpoint
async def delete_events(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    return control_json({"cancelled": world.events.clear()})


_TIMING_KEYS = ("linger", "impact_after", "impact_seconds")
_PATCH_KEYS = frozenset(
    {"not_before", "not_before_in", "resources", "started_for", "start_when", *_TIMING_KEYS}
)


@routes.patch("/control/events/{event_id}")
@endpoint
async def patch_event(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    event_id = request.match_info["event_id"]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ControlError(400, "expected a JSON object")
    unknown = sorted(set(body) - _PATCH_KEYS)
    if unknown:
        raise ControlError(400, f"cannot change: {', '.join(unknown)}")
    event = world.events.get(event_id)
    if event is None:
        raise ControlError(404, f"no event {event_id}")
    not_before = None
    if "not_before" in body or "not_before_in" in body:
        not_before = parse_not_before(body, now=world.now(), event_type=event.event_type)
    resources = parse_resources(body["resources"]) if "resources" in body else None
    started_for = body.get("started_for")
    if started_for is not None and (
        not isinstance(started_for, int | float) or isinstance(started_for, bool) or started_for < 0
    ):
        raise ControlError(400, "'started_for' must be a non-negative number or null")
    timing = {
        key: seconds_field(body, key, None, nullable=key != "impact_after")
        for key in _TIMING_KEYS
        if key in body
    }
    event = world.events.update(
        event_id,
        not_before=not_before,
        resources=resources,
        started_for=float(started_for) if started_for is not None else None,
        change_started_for="started_for" in body,
        timing=timing,
        start_when=parse_start_when(body["start_when"]) if "start_when" in body else None,
    )
    return control_json(world.events.describe(event))


@routes.delete("/control/events/{event_id}")
@endpoint
async def delete_event(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    event = world.events.cancel(request.match_info["event_id"])
    return control_json({"cancelled": event.event_id})


@routes.post("/control/events/{event_id}/start")
@endpoint
async def start_event(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    event = world.events.start(request.match_info["event_id"])
    return control_json(world.events.describe(event))


@routes.post("/control/events/{event_id}/impact")
@endpoint
async def begin_impact(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    event = world.events.begin_impact(request.match_info["event_id"])
    return control_json(world.events.describe(event))


@routes.post("/control/events/{event_id}/impact/end")
@endpoint
async def end_impact(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    event = world.events.end_impact(request.match_info["event_id"])
    return control_json(world.events.describe(event))


@routes.get("/control/approvals")
@endpoint
async def get_approvals(request: web.Request) -> web.Response:
    return control_json([a.to_json() for a in request.app[WORLD].events.approvals])


@routes.delete("/control/approvals")
@endpoint
async def delete_approvals(request: web.Request) -> web.Response:
    request.app[WORLD].events.clear_approvals()
    return control_json({"cleared": True})


@routes.get("/control/requests")
@endpoint
async def get_requests(request: web.Request) -> web.Response:
    limit_text = request.query.get("limit")
    if limit_text is not None and not limit_text.isdigit():
        raise ControlError(400, "'limit' must be a non-negative integer")
    limit = int(limit_text) if limit_text is not None else None
    return control_json(request.app[WORLD].requests.to_json(limit))


@routes.delete("/control/requests")
@endpoint
async def delete_requests(request: web.Request) -> web.Response:
    request.app[WORLD].requests.reset()
    return control_json({"reset": True})


@routes.get("/control/faults")
@endpoint
async def get_faults(request: web.Request) -> web.Response:
    return control_json(request.app[WORLD].faults.to_json())


@routes.post("/control/faults")
@endpoint
async def post_fault(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    fault = world.faults.add(parse_fault(await read_json(request)))
    return control_json(fault.to_json(), 201)


@routes.delete("/control/faults")
@endpoint
async def delete_faults(request: web.Request) -> web.Response:
    request.app[WORLD].faults.clear()
    return control_json({"cleared": True})


@routes.delete("/control/faults/{fault_id}")
@endpoint
async def delete_fault(request: web.Request) -> web.Response:
    fault_id = request.match_info["fault_id"]
    if not request.app[WORLD].faults.remove(fault_id):
        raise ControlError(404, f"no fault {fault_id}")
    return control_json({"cleared": fault_id})


def _vm_view(world: World, urls: SimulatorUrls, vm: Vm) -> dict[str, Any]:
    is_default = vm.key == world.config.default_vm.casefold()
    return {
        **vm.describe(),
        "nics": [nic.id for nic in world.nics.of_vm(vm.resource_id)],
        "view": urls.imds_url if is_default else urls.vm_url(vm.name),
        "ports": world.ports.to_json(vm.name),
    }


@routes.get("/control/vms")
@endpoint
async def get_vms(request: web.Request) -> web.Response:
    world, urls = request.app[WORLD], request.app[URLS]
    return control_json([_vm_view(world, urls, vm) for vm in world.vms.values()])


@routes.post("/control/vms")
@endpoint
async def post_vm(request: web.Request) -> web.Response:
    world, urls = request.app[WORLD], request.app[URLS]
    body = await read_json(request)
    items = body if isinstance(body, list) else [body]
    if not items:
        raise ControlError(400, "no VMs given")
    specs = [_vm_spec(world, item) for item in items]
    names = [vm.key for vm, *_ in specs]
    if len(set(names)) != len(names):
        raise ControlError(409, "duplicate VM names in one request")
    for vm, *_ in specs:
        if world.vm(vm.name) is not None:
            raise ControlError(409, f"VM {vm.name} already exists")
    views = []
    for vm, with_nic, pools, ports in specs:
        world.add_vm(vm, nic=with_nic, pools=pools)
        world.ports.set(vm.name, ports)
        views.append(_vm_view(world, urls, vm))
    return control_json(views if isinstance(body, list) else views[0], 201)


def _vm_spec(world: World, item: object) -> tuple[Vm, bool, list[str] | None, dict[int, int]]:
    if not isinstance(item, dict):
        raise ControlError(400, "a VM must be a JSON object")
    fields = {k: v for k, v in item.items() if k != "ports"}
    vm = parse_vm(
        fields,
        subscription_id=world.config.subscription_id,
        resource_group=world.config.resource_group,
        location=world.config.location,
    )
    with_nic = item.get("nic", True)
    pools = item.get("pools")
    if not isinstance(with_nic, bool):
        raise ControlError(400, "'nic' must be true or false")
    if pools is not None and (
        not isinstance(pools, list) or not all(isinstance(p, str) for p in pools)
    ):
        raise ControlError(400, "'pools' must be a list of pool ids or names")
    ports = parse_ports(item["ports"]) if "ports" in item else {}
    return vm, with_nic, pools, ports


@routes.get("/control/nics")
@endpoint
async def get_nics(request: web.Request) -> web.Response:
    return control_json(request.app[WORLD].nic_summaries())


@routes.post("/control/nics")
@endpoint
async def post_nic(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ControlError(400, "a NIC must be full ARM JSON (an object)")
    nic_id = body.get("id")
    if not isinstance(nic_id, str):
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ControlError(400, "give the NIC an 'id' or a 'name'")
        rg = body.get("resourceGroup", world.config.resource_group)
        nic_id = ids.nic_id(world.config.subscription_id, str(rg), name)
    body = {k: v for k, v in body.items() if k != "resourceGroup"}
    body.setdefault("location", world.config.location)
    uniform = "/virtualmachinescalesets/" in nic_id.casefold()
    doc = custom_nic(body, nic_id=nic_id, allocate_ip=world.nics.next_ip)
    nic = world.nics.add(doc, nic_id=nic_id, uniform=uniform)
    return control_json(nic.document(), 201)


def _find_nic(world: World, request: web.Request) -> Nic:
    name = request.match_info["name"]
    nic = world.nics.find_by_name(name, request.query.get("resource_group"))
    if nic is None:
        raise ControlError(404, f"no NIC {name}")
    return world.refresh_nic(nic)


@routes.get("/control/nics/{name}")
@endpoint
async def get_nic(request: web.Request) -> web.Response:
    return control_json(_find_nic(request.app[WORLD], request).document())


def _wanted_pools(nic: Nic, body: object) -> dict[str, list[str]]:
    """``{"pools": [...]}`` (primary ipconfig) or ``{"ip_configurations": {name: [...]}}``."""
    if isinstance(body, dict) and set(body) == {"pools"}:
        primary = next(
            (c for c in nic.ip_configurations if c.get("properties", {}).get("primary")),
            nic.ip_configurations[0],
        )
        wanted = {str(primary["name"]): body["pools"]}
    elif isinstance(body, dict) and set(body) == {"ip_configurations"}:
        wanted = body["ip_configurations"]
    else:
        raise ControlError(
            400, 'expected {"pools": [...]} or {"ip_configurations": {"ipconfig1": [...]}}'
        )
    if not isinstance(wanted, dict) or not all(
        isinstance(v, list) and all(isinstance(p, str) for p in v) for v in wanted.values()
    ):
        raise ControlError(400, "pools must be lists of pool ids, 'lb/pool' or pool names")
    return wanted


@routes.put("/control/nics/{name}/pools")
@endpoint
async def put_pools(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    nic = _find_nic(world, request)
    wanted = _wanted_pools(nic, await read_json(request))
    expanded = {
        name: [world.expand_pool(p, nic.resource_group) for p in pools]
        for name, pools in wanted.items()
    }
    world.nics.set_pools(nic, expanded)
    return control_json(nic.summary())


@routes.put("/control/nics/{name}/appgw-pools")
@endpoint
async def put_appgw_pools(request: web.Request) -> web.Response:
    """Like ``pools``, for ``applicationGatewayBackendAddressPools`` (names of agw-web,
    ``gateway/pool`` or full ids)."""
    world = request.app[WORLD]
    nic = _find_nic(world, request)
    wanted = _wanted_pools(nic, await read_json(request))
    expanded = {
        name: [world.expand_appgw_pool(p, nic.resource_group) for p in pools]
        for name, pools in wanted.items()
    }
    world.nics.set_pools(nic, expanded, key=APPGW_POOLS)
    return control_json(nic.summary())


@routes.get("/control/operations")
@endpoint
async def get_operations(request: web.Request) -> web.Response:
    return control_json([op.describe() for op in request.app[WORLD].operations.all()])


@routes.get("/control/permissions")
@endpoint
async def get_permissions(request: web.Request) -> web.Response:
    return control_json(request.app[WORLD].permissions.to_json())


@routes.put("/control/permissions")
@endpoint
async def put_permissions(request: web.Request) -> web.Response:
    """Denials (``deny``) and/or role assignments (``role`` + ``scope``/``vm``, or
    ``assignments``): all of it replaced at once."""
    world = request.app[WORLD]
    body = await read_json(request)
    if not isinstance(body, dict) or not {"deny", "role", "assignments"} & set(body):
        raise ControlError(400, 'expected {"deny": [...]} and/or {"role": <Azure role definition>}')
    denials = parse_denials({"deny": body.get("deny", [])})
    world.permissions.replace(denials, parse_assignments(body))
    return control_json(world.permissions.to_json())


@routes.delete("/control/permissions")
@endpoint
async def delete_permissions(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    world.permissions.replace([])
    return control_json(world.permissions.to_json())


@routes.post("/control/reset")
@endpoint
async def reset(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    world.reset()
    return control_json({"reset": True, "incarnation": world.events.incarnation})


def _methods_for(path: str) -> list[str]:
    """Methods the index lists for ``path`` (a ``{...}`` placeholder matches one segment)."""
    methods = []
    for method, pattern, _ in ENDPOINTS:
        regex = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(pattern)) + "/?$"
        if re.match(regex, path):
            methods.append(method)
    return methods


@routes.route("*", "/control/{tail:.*}")
@endpoint
async def unknown(request: web.Request) -> web.Response:
    allowed = _methods_for(request.path)
    if allowed:
        raise ControlError(405, f"{request.path} takes {', '.join(allowed)}; see GET /control")
    raise ControlError(
        404, f"no control endpoint {request.method} {request.path}; see GET /control"
    )
