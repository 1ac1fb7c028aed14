"""The IMDS side: Scheduled Events, instance metadata, managed-identity tokens, 2016 preview.

Invariants: every IMDS answer is checked in IMDS's order (known path, method, no
``X-Forwarded-For``, ``Metadata: true``, no duplicate query parameter, a valid api-version for
*that* endpoint, then Scheduled Events' warm-up) before anything changes, except the 2016
preview's endpoints (``legacy``), which checked nothing but path and method; the same endpoints
are served at the root (the default VM) and under ``/vms/{vm}`` (another VM's view, created on
first use); all views share one Scheduled Events document and differ only in instance
metadata, tokens and who approved.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sidecar.simulator import legacy, routing
from sidecar.simulator.endpoints import WORLD
from sidecar.simulator.events import UnknownEventError
from sidecar.simulator.responses import dotnet_json, identity_error, imds_error, imds_json
from sidecar.simulator.versions import (
    IDENTITY_VERSIONS,
    INSTANCE_VERSIONS,
    SCHEDULED_EVENTS_VERSIONS,
    newest,
)
from sidecar.simulator.vms import compute_metadata, network_metadata, stable_uuid
from sidecar.simulator.world import World

BAD_VERSION = (
    "Bad request. api-version is invalid or was not specified in the request. "
    "For more information refer to aka.ms/azureimds"
)
NO_METADATA_HEADER = "Bad request. Required metadata header not specified"

_METHODS: Mapping[str, tuple[str, ...]] = {
    "scheduledevents": ("GET", "POST"),
    "instance": ("GET",),
    "token": ("GET",),
    "versions": ("GET",),
    "maintenance": ("GET",),
    "instanceinfo": ("GET",),
}
_PREVIEW_2016 = ("maintenance", "instanceinfo")
"""The 2016 preview took no Metadata header (enforced from 2017-08-01) and no api-version."""
_IDENTITY_SELECTORS = ("client_id", "object_id", "msi_res_id", "mi_res_id")


def add_imds_routes(app: web.Application) -> None:
    """Catch-all, added after the control routes: IMDS routing is done by ``routing``."""
    app.router.add_route("*", "/{tail:.*}", handle_imds)


async def handle_imds(request: web.Request) -> web.StreamResponse:
    world = request.app[WORLD]
    route = routing.match_imds(request.path)
    if route is None or route.endpoint == "unknown":
        return imds_error(404, "Not found")
    allowed = _METHODS[route.endpoint]
    if request.method not in allowed:
        return imds_error(405, "Method not allowed", {"Allow": ", ".join(allowed)})
    vm_name = route.vm or world.config.default_vm
    if route.endpoint in _PREVIEW_2016:
        return _preview_2016(world, route.endpoint, vm_name)
    refusal = _refuse(request, route.endpoint)
    if refusal is not None:
        return refusal
    if route.endpoint == "scheduledevents":
        if request.method == "POST":
            return await _approve(world, request, vm_name)
        return _scheduled_events(world, request, vm_name)
    if route.endpoint == "instance":
        return _instance(world, request, vm_name, route.subpath)
    if route.endpoint == "token":
        return _token(world, request, vm_name)
    return imds_json({"apiVersions": list(INSTANCE_VERSIONS)})


def _preview_2016(world: World, endpoint: str, vm_name: str) -> web.Response:
    vm = world.ensure_vm(vm_name)
    if endpoint == "maintenance":
        return dotnet_json(legacy.maintenance_document(world.events.events(), vm.name))
    return dotnet_json(legacy.instance_info(vm))


def _refuse(request: web.Request, endpoint: str) -> web.Response | None:
    """IMDS's request hygiene checks; the token endpoint answers in OAuth's error shape."""
    problem = None
    if "X-Forwarded-For" in request.headers:
        problem = "Bad request. Proxied requests (X-Forwarded-For) are not allowed"
    elif request.headers.get("Metadata", "").casefold() != "true":
        problem = NO_METADATA_HEADER
    elif len(request.query) != len(set(request.query.keys())):
        problem = "Bad request. Duplicate query parameter"
    if problem is None:
        return None
    if endpoint == "token":
        return identity_error(400, "invalid_request", problem)
    return imds_error(400, problem)


def _version(request: web.Request, accepted: tuple[str, ...]) -> str | None:
    version = request.query.get("api-version")
    return version if version in accepted else None


def _bad_version(accepted: tuple[str, ...]) -> web.Response:
    return imds_json({"error": BAD_VERSION, "newest-versions": newest(accepted)}, 400)


def _warming_up(world: World, vm_name: str) -> web.Response | None:
    """The answer while this VM's Scheduled Events service is being enabled (see ``warmup``)."""
    settings = world.settings
    if not world.warmup.warming(vm_name, world.now(), settings.warmup_seconds):
        return None
    status = settings.warmup_status
    return imds_error(status, "Not found" if status == 404 else "Gone")


def _scheduled_events(world: World, request: web.Request, vm_name: str) -> web.Response:
    version = _version(request, SCHEDULED_EVENTS_VERSIONS)
    if version is None:
        return _bad_version(SCHEDULED_EVENTS_VERSIONS)
    warming = _warming_up(world, vm_name)
    if warming is not None:
        return warming
    world.ensure_vm(vm_name)
    return imds_json(world.events.document(version))


async def _approve(world: World, request: web.Request, vm_name: str) -> web.Response:
    version = _version(request, SCHEDULED_EVENTS_VERSIONS)
    if version is None:
        return _bad_version(SCHEDULED_EVENTS_VERSIONS)
    warming = _warming_up(world, vm_name)
    if warming is not None:
        return warming
    event_ids = _start_requests(await request.read())
    if event_ids is None:
        return imds_error(400, 'Bad request. Expected {"StartRequests": [{"EventId": "..."}]}')
    vm = world.ensure_vm(vm_name)
    try:
        world.events.approve(event_ids, vm.name, request.remote or "", version)
    except UnknownEventError as exc:
        return imds_error(400, f"Bad request. Unknown EventId: {', '.join(exc.event_ids)}")
    return web.Response(status=200)


def _start_requests(raw: bytes) -> list[str] | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("StartRequests"), list):
        return None
    event_ids = []
    for item in body["StartRequests"]:
        if not isinstance(item, dict) or not isinstance(item.get("EventId"), str):
            return None
        event_ids.append(item["EventId"])
    return event_ids


def _instance(
    world: World, request: web.Request, vm_name: str, subpath: tuple[str, ...]
) -> web.Response:
    version = _version(request, INSTANCE_VERSIONS)
    if version is None:
        return _bad_version(INSTANCE_VERSIONS)
    vm = world.ensure_vm(vm_name)
    nics = [nic.doc for nic in world.nics.of_vm(vm.resource_id)]
    node: Any = {"compute": compute_metadata(vm, version), "network": network_metadata(nics)}
    for part in subpath:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return imds_error(404, "Not found")
    output = request.query.get("format", "json")
    if output == "text":
        return web.Response(text=_as_text(node), content_type="text/plain")
    if output != "json":
        return imds_error(400, "Bad request. format must be json or text")
    if subpath and not isinstance(node, dict | list):
        return imds_error(400, "Bad request. Leaf nodes require format=text")
    return imds_json(node)


def _as_text(node: Any) -> str:
    """IMDS's text form: a leaf's value, or the keys of an object (``/`` marks a branch)."""
    if isinstance(node, dict):
        return "\n".join(k + ("/" if isinstance(v, dict | list) else "") for k, v in node.items())
    if isinstance(node, list):
        return "\n".join(f"{i}/" for i in range(len(node)))
    return str(node)


def _token(world: World, request: web.Request, vm_name: str) -> web.Response:
    if _version(request, IDENTITY_VERSIONS) is None:
        return identity_error(400, "invalid_request", "Invalid or missing api-version")
    resource = request.query.get("resource", "")
    if not resource:
        return identity_error(400, "invalid_request", "Required audience parameter not specified")
    selectors = [key for key in _IDENTITY_SELECTORS if key in request.query]
    if len(selectors) > 1:
        return identity_error(
            400, "invalid_request", "Only one of client_id, object_id or msi_res_id may be given"
        )
    vm = world.ensure_vm(vm_name)
    client_id = None
    if selectors:
        value = request.query[selectors[0]]
        client_id = value if selectors[0] == "client_id" else stable_uuid("client", value)
    if client_id is not None and vm.identities is not None and client_id not in vm.identities:
        return identity_error(400, "invalid_request", "Identity not found")
    return imds_json(world.tokens.issue(vm, resource, client_id).answer())
