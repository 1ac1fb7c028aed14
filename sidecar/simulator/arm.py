"""The ARM side: routing every ARM request, and network interfaces (list, get, PUT).

Invariants: checks run in ARM's order (``armchecks``): bearer token (401), api-version (400),
subscription and resource group (404), role assignment (403), resource (404), then the resource
provider's own checks (If-Match 412, body 400, linked access 403); names and ids compare
case-insensitively; a PUT answers 200/201 with ``Azure-AsyncOperation`` and ``Retry-After`` and
leaves the NIC ``Updating`` until its operation succeeds. Load balancers live in ``arm_lb``,
operation URLs in ``arm_ops``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sidecar.simulator import arm_lb, arm_ops, ids, routing
from sidecar.simulator.armchecks import (
    api_version,
    authenticate,
    authorize,
    check_scope,
    not_found,
)
from sidecar.simulator.endpoints import WORLD
from sidecar.simulator.errors import ArmError
from sidecar.simulator.identity import Token
from sidecar.simulator.network import Nic, linked_references, merge_put
from sidecar.simulator.responses import arm_error, arm_json, seconds_text
from sidecar.simulator.versions import NETWORK_NEWEST, VMSS_NETWORK_NEWEST
from sidecar.simulator.world import World

READ = "Microsoft.Network/networkInterfaces/read"
WRITE = "Microsoft.Network/networkInterfaces/write"


def add_arm_routes(app: web.Application) -> None:
    """Catch-all: ARM paths are case-insensitive, so ``routing`` matches them, not aiohttp."""
    app.router.add_route("*", "/{tail:.*}", handle_arm)


async def handle_arm(request: web.Request) -> web.StreamResponse:
    world = request.app[WORLD]
    try:
        token = authenticate(world, request)
        route = routing.match_arm(request.path)
        if route is None:
            raise ArmError(
                404, "NotFound", f"The simulator serves no '{request.method} {request.path}'."
            )
        return await _dispatch(world, request, route, token)
    except ArmError as error:
        return arm_error(error)


async def _dispatch(
    world: World, request: web.Request, route: routing.ArmRoute, token: Token
) -> web.Response:
    method, name, params = request.method, route.name, route.params
    if name == "operation" and method == "GET":
        return arm_ops.operation_status(world, request, params, token)
    if name == "operation-result" and method == "GET":
        return arm_ops.operation_result(world, request, params, token)
    if name == "lb" or name.startswith("lb-"):
        return await arm_lb.dispatch(world, request, route, token)
    if name == "nic-list-all" and method == "GET":
        return _list(world, request, params, token, resource_group=None)
    if name == "nic-list" and method == "GET":
        return _list(world, request, params, token, resource_group=params["rg"])
    if name == "nic" and method == "GET":
        return _get(world, request, params, token)
    if name == "nic" and method == "PUT":
        return await _put(world, request, params, token)
    if name == "vmss-nic-list" and method == "GET":
        return _vmss_list(world, request, params, token)
    if name == "vmss-nic" and method == "GET":
        return _vmss_get(world, request, params, token)
    if name == "vmss-nic" and method == "PUT":
        api_version(request, NETWORK_NEWEST)
        raise ArmError(
            409,
            "OperationNotAllowed",
            "The operation 'write' on resource type "
            "'virtualMachineScaleSets/virtualMachines/networkInterfaces' is disallowed.",
        )
    raise ArmError(
        405,
        "MethodNotAllowed",
        f"The simulator does not implement '{method}' on '{request.path}'.",
    )


def _page(world: World, request: web.Request, version: str, nics: list[Nic]) -> web.Response:
    """``{"value": [...]}`` with a ``nextLink`` when the page size setting asks for paging."""
    size = world.settings.arm_page_size
    token = request.query.get("$skiptoken", "0")
    if not token.isdigit():
        raise ArmError(400, "InvalidSkipToken", f"The skip token '{token}' is invalid.")
    start = int(token)
    chosen = nics[start : start + size] if size else nics[start:]
    body: dict[str, Any] = {"value": [nic.document() for nic in chosen]}
    if size and start + size < len(nics):
        next_url = request.url.with_query({"api-version": version, "$skiptoken": str(start + size)})
        body["nextLink"] = str(next_url)
    return arm_json(body)


def _list(
    world: World,
    request: web.Request,
    params: Mapping[str, str],
    token: Token,
    *,
    resource_group: str | None,
) -> web.Response:
    version = api_version(request, NETWORK_NEWEST)
    check_scope(world, params)
    authorize(world, token, READ, request.path)
    world.refresh_nics()
    if resource_group is None:
        nics = [nic for nic in world.nics.all() if not nic.uniform]
    else:
        nics = world.nics.in_resource_group(resource_group)
    return _page(world, request, version, nics)


def _get(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    api_version(request, NETWORK_NEWEST)
    check_scope(world, params)
    authorize(world, token, READ, request.path)
    nic = world.nics.get(ids.nic_id(params["sub"], params["rg"], params["nic"]))
    if nic is None:
        raise not_found("Microsoft.Network/networkInterfaces", params["nic"], params["rg"])
    return arm_json(world.refresh_nic(nic).document())


def _vmss_parent(world: World, params: Mapping[str, str]) -> str:
    parent = ids.vmss_vm_id(params["sub"], params["rg"], params["vmss"], params["instance"])
    if not any(ids.same(vm.resource_id, parent) for vm in world.vms.values()):
        raise not_found(
            "Microsoft.Compute/virtualMachineScaleSets",
            f"{params['vmss']}/virtualMachines/{params['instance']}",
            params["rg"],
        )
    return parent


def _vmss_list(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    version = api_version(request, VMSS_NETWORK_NEWEST)
    check_scope(world, params)
    authorize(world, token, READ, request.path)
    parent = _vmss_parent(world, params)
    return _page(world, request, version, [nic for nic in world.nics.under(parent) if nic.uniform])


def _vmss_get(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    api_version(request, VMSS_NETWORK_NEWEST)
    check_scope(world, params)
    authorize(world, token, READ, request.path)
    parent = _vmss_parent(world, params)
    nic = world.nics.get(f"{parent}/networkInterfaces/{params['nic']}")
    if nic is None:
        raise not_found("Microsoft.Network/networkInterfaces", params["nic"], params["rg"])
    return arm_json(nic.document())


async def _put(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    version = api_version(request, NETWORK_NEWEST)
    check_scope(world, params)
    nic_id = ids.nic_id(params["sub"], params["rg"], params["nic"])
    authorize(world, token, WRITE, request.path)
    existing = world.nics.get(nic_id)
    if existing is not None:
        world.refresh_nic(existing)
    _preconditions(request, existing, nic_id)
    try:
        body = await request.json()
    except ValueError:
        raise ArmError(400, "InvalidRequestFormat", "Cannot parse the request.") from None
    stored = existing.doc if existing is not None else None
    doc = merge_put(
        stored, body, nic_id=existing.id if existing else nic_id, allocate_ip=world.nics.next_ip
    )
    _authorize_links(world, token, request.path, linked_references(doc))
    nic, created = world.nics.write(nic_id, doc, state="Updating" if existing else "Creating")
    operation = world.operations.create(nic.id, settle=world.operation_settle())
    nic.pending_operation = operation.operation_id
    location = nic.location.replace(" ", "").lower()
    path = ids.operation_path(params["sub"], location, operation.operation_id)
    async_url = f"{request.scheme}://{request.host}{path}?api-version={version}"
    headers = {
        "Azure-AsyncOperation": async_url,
        "Retry-After": seconds_text(world.settings.arm_retry_after),
    }
    return arm_json(nic.document(), 201 if created else 200, headers)


def _preconditions(request: web.Request, existing: Nic | None, nic_id: str) -> None:
    """If-Match (``*`` or one of the listed etags) and If-None-Match: ``*``."""
    if_match = request.headers.get("If-Match")
    if if_match is not None:
        wanted = [tag.strip() for tag in if_match.split(",") if tag.strip()]
        current = existing.etag if existing is not None else None
        if current is None or ("*" not in wanted and current not in wanted):
            raise ArmError(
                412,
                "PreconditionFailed",
                f"The condition '{if_match}' in the If-Match header does not match the current "
                f"etag '{current or ''}' of resource '{nic_id}'.",
            )
    if request.headers.get("If-None-Match", "").strip() == "*" and existing is not None:
        raise ArmError(
            412,
            "PreconditionFailed",
            f"The resource '{nic_id}' already exists and If-None-Match is '*'.",
        )


def _authorize_links(world: World, token: Token, scope: str, linked: list[str]) -> None:
    """ARM's linked access check: the join action on every resource the body links.

    ARM reads the links from the request body (the resource provider registers which
    properties are links), so an unchanged subnet or pool is checked again on every PUT.
    """
    missing: list[tuple[str, str]] = []
    for resource_id in linked:
        action = ids.join_action(resource_id)
        if action is not None and not world.permissions.allowed(action, resource_id, token.vm):
            missing.append((action, resource_id))
    if missing:
        # "(respectively)": one action per linked scope, in the same order.
        actions = ",".join(action for action, _ in missing)
        scopes = ",".join(resource_id for _, resource_id in missing)
        raise ArmError(
            403,
            "LinkedAuthorizationFailed",
            f"The client '{token.principal_id}' with object id '{token.principal_id}' has "
            f"permission to perform action '{WRITE}' on scope '{scope}'; however, it does not "
            f"have permission to perform action(s) '{actions}' on the linked scope(s) "
            f"'{scopes}' (respectively) or the linked scope(s) are invalid.",
        )
