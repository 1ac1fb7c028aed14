"""Counts every IMDS and ARM request, throttles ARM's, and applies the faults that cover them.

Invariants: an ARM request signed by a token the simulator issued takes a token from ARM's
throttling buckets before anything else (a throttled request is counted, answered 429, and
reaches no fault and no handler), and every answer to it says what remains of its bucket; a
``status`` fault answers instead of the handler (no side effect happens); a ``slow`` or
``hang`` fault delays the request and then lets the handler answer normally; a ``malformed``
fault lets the handler act and spoils its answer; a ``late`` fault lets the handler act first
and then delays its answer, so the side effect happens even when the client has given up
(``handler_cancellation`` ends only the wait); an ``answer`` fault sends its own reply, after
the handler acted if ``apply`` says so; the control API is never counted nor
faulted. On the ARM operation URL, ``slow`` and ``failed`` faults belong to the operation
itself and are left to its handler.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.simulator import routing
from sidecar.simulator.endpoints import RECORD, WORLD
from sidecar.simulator.errors import ArmError
from sidecar.simulator.faults import HANG_CAP_SECONDS, Fault, malform
from sidecar.simulator.identity import Token
from sidecar.simulator.responses import (
    arm_error,
    identity_error,
    imds_error,
    reason,
    seconds_text,
)
from sidecar.simulator.throttle import Verdict
from sidecar.simulator.traffic import RequestRecord
from sidecar.simulator.world import World

_HANG_POLL_SECONDS = 0.05
_IDENTITY_ERRORS = {
    400: "invalid_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    429: "too_many_requests",
    503: "service_unavailable",
}
_ARM_CODES = {
    400: "BadRequest",
    401: "AuthenticationFailed",
    403: "AuthorizationFailed",
    404: "ResourceNotFound",
    409: "Conflict",
    410: "Gone",
    412: "PreconditionFailed",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


@web.middleware
async def imds_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == routing.CONTROL_PREFIX or request.path.startswith(
        routing.CONTROL_PREFIX + "/"
    ):
        return await handler(request)
    world = request.app[WORLD]
    route = routing.match_imds(request.path)
    kind = routing.imds_kind(route, request.method)
    vm = (route.vm if route is not None else None) or world.config.default_vm
    return await _guarded(world, request, handler, kind, vm)


@web.middleware
async def arm_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ARM's front door: throttling (per caller) comes before faults and handlers."""
    world = request.app[WORLD]
    kind = routing.arm_kind(routing.match_arm(request.path), request.method)
    token = caller(world, request)
    vm = token.vm if token is not None else None
    if token is None:
        return await _guarded(world, request, handler, kind, vm)
    subscription = world.config.subscription_id
    verdict = world.throttle.take(
        world.settings.arm_throttle, subscription, token.principal_id, request.method
    )
    if not verdict.allowed:
        record = world.requests.record(
            request.method, request.path_qs, kind, vm, request.remote or ""
        )
        world.requests.throttled(record)
        return throttled_answer(verdict, subscription, token.principal_id)
    response = await _guarded(world, request, handler, kind, vm)
    if not response.prepared:
        response.headers[verdict.header] = str(verdict.remaining)
    return response


def throttled_answer(verdict: Verdict, subscription: str, principal: str) -> web.Response:
    """ARM's 429, in the words Azure uses."""
    operation = verdict.operation.removesuffix("s")
    message = (
        f"Number of '{operation}' requests for subscription '{subscription}' actor "
        f"'{principal}' exceeded. Please try again after '{verdict.retry_after}' seconds."
    )
    headers = {"Retry-After": str(verdict.retry_after), verdict.header: str(verdict.remaining)}
    return arm_error(ArmError(429, "SubscriptionRequestsThrottled", message, headers))


def caller(world: World, request: web.Request) -> Token | None:
    """The token that signed this ARM request, when the simulator issued it."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.casefold() != "bearer":
        return None
    return world.tokens.find(value.strip())


async def _guarded(
    world: World, request: web.Request, handler: Handler, kind: str, vm: str | None
) -> web.StreamResponse:
    record = world.requests.record(request.method, request.path_qs, kind, vm, request.remote or "")
    request[RECORD] = record
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        response = await _with_faults(world, request, handler, kind, vm, record)
        record.status = response.status
        return response
    except web.HTTPException as exc:
        record.status = exc.status
        raise
    except asyncio.CancelledError:
        record.status = 499  # the client went away (nginx's name for it)
        raise
    finally:
        record.duration = loop.time() - started


def _left_to_handler(kind: str, fault: Fault) -> bool:
    return kind == "arm-operation" and fault.kind in ("slow", "failed")


async def _with_faults(
    world: World,
    request: web.Request,
    handler: Handler,
    kind: str,
    vm: str | None,
    record: RequestRecord,
) -> web.StreamResponse:
    fault = world.faults.take(
        kind, vm, accept=lambda f: f.kind != "failed" and not _left_to_handler(kind, f)
    )
    if fault is None:
        return await handler(request)
    record.fault = fault.fault_id
    if fault.kind == "status":
        return fault_answer(kind, fault)
    if fault.kind == "slow":
        await asyncio.sleep(fault.seconds)
        return await handler(request)
    if fault.kind == "hang":
        await _hold(world, fault)
        return await handler(request)
    if fault.kind == "late":
        response = await handler(request)  # the side effect first: the client may leave
        await asyncio.sleep(fault.seconds)
        return response
    if fault.kind == "answer":
        if fault.apply:
            with contextlib.suppress(web.HTTPException):
                await handler(request)
        return custom_answer(fault)
    response = await handler(request)
    return _spoil(response, kind, fault.variant)


async def _hold(world: World, fault: Fault) -> None:
    """Until the fault is deleted (or the cap passes); a client leaving cancels us."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_CAP_SECONDS
    # Polling (not an asyncio.Event) keeps the fault book free of event-loop objects.
    while world.faults.present(fault.fault_id) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_HANG_POLL_SECONDS)


def fault_answer(kind: str, fault: Fault) -> web.Response:
    """The error a ``status`` fault answers, in the shape of the API it hits."""
    headers = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = seconds_text(fault.retry_after)
    status = fault.status
    if kind.startswith("arm-"):
        code = fault.code or _ARM_CODES.get(status, reason(status).replace(" ", ""))
        message = fault.message or f"Simulated fault {fault.fault_id}: {reason(status)}."
        return arm_error(ArmError(status, code, message, headers))
    if kind == "token":
        code = fault.code or _IDENTITY_ERRORS.get(status, "server_error")
        message = fault.message or f"Simulated fault {fault.fault_id}: {reason(status)}"
        return identity_error(status, code, message, headers)
    return imds_error(status, fault.message or reason(status), headers)


def custom_answer(fault: Fault) -> web.Response:
    """An ``answer`` fault's reply, byte for byte (HTTP drops the body of 1xx, 204 and 304)."""
    response = web.Response(
        body=fault.body.encode(), status=fault.status, headers=dict(fault.headers)
    )
    response.headers["Content-Type"] = fault.content_type
    return response


def _spoil(response: web.StreamResponse, kind: str, variant: str) -> web.StreamResponse:
    if not isinstance(response, web.Response):
        return response
    body = response.body if isinstance(response.body, bytes) else b""
    headers = {k: v for k, v in response.headers.items() if k.casefold() != "content-length"}
    spoiled = web.Response(
        body=malform(kind, variant, body), status=response.status, headers=headers
    )
    return spoiled
