"""The admin surface: take the VM out of rotation and back by hand, and see /status in full,
for callers holding SIDECAR_ADMIN_TOKEN.

Invariants: without the setting the routes do not exist (404); with it, a request without the
exact bearer token gets 401 and changes nothing; the token is compared in constant time and
never logged nor echoed; a drain by hand is in the state file before the answer says it is on.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from aiohttp import web
from pydantic import SecretStr

from sidecar.drainer import Drainer

log = logging.getLogger(__name__)

TOKEN = web.AppKey("admin_token", SecretStr)
DRAINER = web.AppKey("admin_drainer", Drainer)
MAX_REASON = 200


def authorized(request: web.Request) -> bool:
    token = request.app.get(TOKEN)
    if token is None:
        return False
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    return scheme.casefold() == "bearer" and hmac.compare_digest(value.strip().encode(), expected)


def add_admin_routes(app: web.Application, drainer: Drainer, token: SecretStr) -> None:
    app[TOKEN] = token
    app[DRAINER] = drainer
    app.router.add_post("/drain", drain)
    app.router.add_post("/undrain", undrain)


async def drain(request: web.Request) -> web.Response:
    return await _by_hand(request, drain=True)


async def undrain(request: web.Request) -> web.Response:
    return await _by_hand(request, drain=False)


async def _by_hand(request: web.Request, *, drain: bool) -> web.Response:
    if not authorized(request):
        log.warning(
            "refused %s %s from %s: no valid token", request.method, request.path, request.remote
        )
        return web.json_response(
            {"error": "a valid bearer token (SIDECAR_ADMIN_TOKEN) is required"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="azure-drain-sidecar"'},
        )
    reason = await _reason(request)
    if reason is None:
        return web.json_response({"error": 'expected {"reason": "..."} or no body'}, status=400)
    drainer = request.app[DRAINER]
    await drainer.change_by_hand(drain, reason or ("drain by hand" if drain else "undrain by hand"))
    manual = drainer.state.manual
    body: dict[str, Any] = {
        "state": drainer.verdict(),
        "manual": None if manual is None else {"reason": manual.reason},
    }
    return web.json_response(body)


async def _reason(request: web.Request) -> str | None:
    """The optional reason: a JSON body's `reason`, or `?reason=`; None when malformed."""
    raw = await request.read()
    if not raw:
        return request.query.get("reason", "")[:MAX_REASON]
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("reason", ""), str):
        return None
    return str(body.get("reason", ""))[:MAX_REASON]
