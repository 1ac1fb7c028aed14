"""The ARM side: network interfaces (list, get, PUT) and the operations PUTs start.

Invariants: checks run in ARM's order: bearer token (401), api-version (400), subscription and
resource group (404), role assignment (403), resource (404), then the resource provider's own
checks (If-Match 412, body 400, linked access 403); names and ids compare case-insensitively;
a PUT answers 200/201 with ``Azure-AsyncOperation`` and ``Retry-After`` and leaves the NIC
``Updating`` until its operation succeeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sidecar.simulator import ids, routing
from sidecar.simulator.endpoints import RECORD, WORLD
from sidecar.simulator.errors import ArmError
from sidecar.simulator.identity import ARM_AUDIENCES, TENANT_ID, Token
from sidecar.simulator.lro import IN_PROGRESS
from sidecar.simulator.network import Nic, added_references, merge_put
from sidecar.simulator.responses import arm_error, arm_json, seconds_text
from sidecar.simulator.times import iso8601
from sidecar.simulator.versions import NETWORK_NEWEST, VMSS_NETWORK_NEWEST, network_version_ok
from sidecar.simulator.world import World

READ = "Microsoft.Network/networkInterfaces/read"
WRITE = "Microsoft.Network/networkInterfaces/write"
_AUDIENCES_TEXT = ",".join(
    f"'{a}'"
    for a in (
        "https://management.core.windows.net/",
        "https://management.core.windows.net",
        "https://management.azure.com/",
        "https://management.azure.com",
    )
)


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
        return _operation(world, request, params, token)
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
        _api_version(request, NETWORK_NEWEST)
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


def authenticate(world: World, request: web.Request) -> Token:
    challenge = {
        "WWW-Authenticate": f'Bearer authorization_uri="https://login.microsoftonline.com/'
        f'{TENANT_ID}", error="invalid_token", error_description="The authentication failed '
        "because of missing 'Authorization' header.\""
    }
    header = request.headers.get("Authorization")
    if not header:
        raise ArmError(
            401,
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
            challenge,
        )
    scheme, _, value = header.partition(" ")
    if scheme.casefold() != "bearer" or not value.strip():
        raise ArmError(
            401,
            "AuthenticationFailedInvalidHeader",
            "Authentication failed. The 'Authorization' header is provided in an invalid format.",
        )
    token = world.tokens.find(value.strip())
    if token is None:
        raise ArmError(401, "InvalidAuthenticationToken", "The access token is invalid.")
    if world.tokens.expired(token):
        raise ArmError(
            401,
            "ExpiredAuthenticationToken",
            f"The access token expiry UTC time '{iso8601(token.expires_at)}' is earlier than "
            f"current UTC time '{iso8601(world.now())}'.",
        )
    if token.resource not in ARM_AUDIENCES:
        raise ArmError(
            401,
            "InvalidAuthenticationTokenAudience",
            f"The access token has been obtained for wrong audience or resource "
            f"'{token.resource}'. It should exactly match with one of the allowed audiences "
            f"{_AUDIENCES_TEXT}.",
        )
    return token


def _api_version(request: web.Request, newest_allowed: str) -> str:
    versions = request.query.getall("api-version", [])
    if not versions:
        raise ArmError(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    version = versions[0]
    if not network_version_ok(version, newest_allowed):
        raise ArmError(
            400,
            "InvalidApiVersionParameter",
            f"The api-version '{version}' is invalid. The supported versions are dates up to "
            f"'{newest_allowed}'.",
        )
    return version


def _scope(world: World, params: Mapping[str, str]) -> None:
    if not ids.same(params["sub"], world.config.subscription_id):
        raise ArmError(
            404, "SubscriptionNotFound", f"The subscription '{params['sub']}' could not be found."
        )
    rg = params.get("rg")
    if rg is not None and not world.resource_group_exists(rg):
        raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")


def _authorize(world: World, token: Token, action: str, scope: str) -> None:
    if not world.permissions.allowed(action, scope, token.vm):
        raise ArmError(
            403,
            "AuthorizationFailed",
            f"The client '{token.principal_id}' with object id '{token.principal_id}' does not "
            f"have authorization to perform action '{action}' over scope '{scope}' or the scope "
            "is invalid. If access was recently granted, please refresh your credentials.",
        )


def _not_found(kind: str, name: str, resource_group: str) -> ArmError:
    return ArmError(
        404,
        "ResourceNotFound",
        f"The Resource '{kind}/{name}' under resource group '{resource_group}' was not found. "
        "For more details please go to https://aka.ms/ARMResourceNotFoundFix",
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
    version = _api_version(request, NETWORK_NEWEST)
    _scope(world, params)
    _authorize(world, token, READ, request.path)
    world.refresh_nics()
    if resource_group is None:
        nics = [nic for nic in world.nics.all() if not nic.uniform]
    else:
        nics = world.nics.in_resource_group(resource_group)
    return _page(world, request, version, nics)


def _get(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    _api_version(request, NETWORK_NEWEST)
    _scope(world, params)
    _authorize(world, token, READ, request.path)
    nic = world.nics.get(ids.nic_id(params["sub"], params["rg"], params["nic"]))
    if nic is None:
        raise _not_found("Microsoft.Network/networkInterfaces", params["nic"], params["rg"])
    return arm_json(world.refresh_nic(nic).document())


def _vmss_parent(world: World, params: Mapping[str, str]) -> str:
    parent = ids.vmss_vm_id(params["sub"], params["rg"], params["vmss"], params["instance"])
    if not any(ids.same(vm.resource_id, parent) for vm in world.vms.values()):
        raise _not_found(
            "Microsoft.Compute/virtualMachineScaleSets",
            f"{params['vmss']}/virtualMachines/{params['instance']}",
            params["rg"],
        )
    return parent


def _vmss_list(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    version = _api_version(request, VMSS_NETWORK_NEWEST)
    _scope(world, params)
    _authorize(world, token, READ, request.path)
    parent = _vmss_parent(world, params)
    return _page(world, request, version, [nic for nic in world.nics.under(parent) if nic.uniform])


def _vmss_get(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    _api_version(request, VMSS_NETWORK_NEWEST)
    _scope(world, params)
    _authorize(world, token, READ, request.path)
    parent = _vmss_parent(world, params)
    nic = world.nics.get(f"{parent}/networkInterfaces/{params['nic']}")
    if nic is None:
        raise _not_found("Microsoft.Network/networkInterfaces", params["nic"], params["rg"])
    return arm_json(nic.document())


async def _put(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    version = _api_version(request, NETWORK_NEWEST)
    _scope(world, params)
    nic_id = ids.nic_id(params["sub"], params["rg"], params["nic"])
    _authorize(world, token, WRITE, request.path)
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
    _authorize_links(world, token, request.path, added_references(stored, doc))
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
    """ARM's linked access check: join permission on every resource the PUT newly links."""
    missing: list[tuple[str, str]] = []
    for resource_id in linked:
        action = ids.join_action(resource_id)
        if action is not None and not world.permissions.allowed(action, resource_id, token.vm):
            missing.append((action, resource_id))
    if missing:
        actions = ",".join(dict.fromkeys(action for action, _ in missing))
        scopes = ",".join(resource_id for _, resource_id in missing)
        raise ArmError(
            403,
            "LinkedAuthorizationFailed",
            f"The client '{token.principal_id}' with object id '{token.principal_id}' has "
            f"permission to perform action '{WRITE}' on scope '{scope}'; however, it does not "
            f"have permission to perform action(s) '{actions}' on the linked scope(s) "
            f"'{scopes}' (respectively) or the linked scope(s) are invalid.",
        )


def _operation(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    _api_version(request, NETWORK_NEWEST)
    _scope(world, params)
    operation = world.operations.get(params["operation"])
    if operation is None:
        raise ArmError(404, "NotFound", f"Operation '{params['operation']}' was not found.")
    age = world.operations.age(operation)
    fault = world.faults.take(
        "arm-operation",
        token.vm,
        accept=lambda f: f.kind == "failed" or (f.kind == "slow" and age < f.seconds),
    )
    record = request.get(RECORD)
    if fault is not None and record is not None:
        record.fault = fault.fault_id
    if fault is not None and fault.kind == "slow":
        world.operations.hold(operation, operation.created_at + fault.seconds)
    if fault is not None and fault.kind == "failed":
        world.operations.fail(
            operation,
            fault.code or "InternalServerError",
            fault.message or f"Simulated failure ({fault.fault_id}) of the operation.",
        )
    world.operations.poll(operation)
    nic = world.nics.get(operation.resource_id)
    if nic is not None:
        world.refresh_nic(nic)
    headers = {}
    if operation.status == IN_PROGRESS:
        headers["Retry-After"] = seconds_text(world.settings.arm_retry_after)
    # A failed operation is still answered with 200: the failure is in the body.
    return arm_json(operation.body(), 200, headers)
