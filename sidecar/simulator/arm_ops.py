"""ARM's operation URLs: the status of a long-running operation, and the result of a POST.

Invariants: ``Azure-AsyncOperation`` (``.../locations/{l}/operations/{id}``) always answers 200
with ``{"status"}`` (a failure is in the body) and ``Retry-After`` while running;
``Location`` (``.../locations/{l}/operationResults/{id}``) answers 202 with ``Location`` and
``Retry-After`` while running, then 200 with the operation's result. Both count as a client's
poll, both are checked like any ARM read (``locations/operations/read``,
``locations/operationResults/read``), and both take the ``slow`` and ``failed`` faults aimed at
``arm-operation``.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from sidecar.simulator.armchecks import api_version, authorize, check_scope
from sidecar.simulator.endpoints import RECORD
from sidecar.simulator.errors import ArmError
from sidecar.simulator.identity import Token
from sidecar.simulator.lro import FAILED, IN_PROGRESS, Operation
from sidecar.simulator.responses import arm_headers, arm_json, seconds_text
from sidecar.simulator.versions import NETWORK_NEWEST
from sidecar.simulator.world import World

OPERATIONS_READ = "Microsoft.Network/locations/operations/read"
RESULTS_READ = "Microsoft.Network/locations/operationResults/read"


def _polled(
    world: World, request: web.Request, params: Mapping[str, str], token: Token, action: str
) -> Operation:
    """The checks, the operation's faults, and the poll itself."""
    api_version(request, NETWORK_NEWEST)
    check_scope(world, params)
    authorize(world, token, action, request.path)
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
    return operation


def operation_status(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    operation = _polled(world, request, params, token, OPERATIONS_READ)
    headers = {}
    if operation.status == IN_PROGRESS:
        headers["Retry-After"] = seconds_text(world.settings.arm_retry_after)
    # A failed operation is still answered with 200: the failure is in the body.
    return arm_json(operation.body(), 200, headers)


def operation_result(
    world: World, request: web.Request, params: Mapping[str, str], token: Token
) -> web.Response:
    operation = _polled(world, request, params, token, RESULTS_READ)
    if operation.status == IN_PROGRESS:
        headers = {
            "Location": str(request.url),
            "Retry-After": seconds_text(world.settings.arm_retry_after),
        }
        return web.Response(status=202, headers=arm_headers(headers))
    if operation.status == FAILED:
        raise ArmError(500, operation.error_code, operation.error_message)
    if operation.result is None:
        return web.Response(status=204, headers=arm_headers())
    return arm_json(operation.result)
