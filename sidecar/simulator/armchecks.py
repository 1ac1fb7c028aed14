"""The checks every ARM request passes, in ARM's order, before a resource provider acts.

Invariants: the order is ARM's: bearer token (401), api-version (400), subscription and
resource group (404), role assignment (403); then the resource (404). Each check raises the
``ArmError`` ARM would answer, with ARM's code and wording; names and ids compare
case-insensitively.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from sidecar.simulator import ids
from sidecar.simulator.errors import ArmError
from sidecar.simulator.identity import ARM_AUDIENCES, TENANT_ID, Token
from sidecar.simulator.times import iso8601
from sidecar.simulator.versions import network_version_ok
from sidecar.simulator.world import World

_AUDIENCES_TEXT = ",".join(
    f"'{a}'"
    for a in (
        "https://management.core.windows.net/",
        "https://management.core.windows.net",
        "https://management.azure.com/",
        "https://management.azure.com",
    )
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


def api_version(request: web.Request, newest_allowed: str) -> str:
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


def check_scope(world: World, params: Mapping[str, str]) -> None:
    if not ids.same(params["sub"], world.config.subscription_id):
        raise ArmError(
            404, "SubscriptionNotFound", f"The subscription '{params['sub']}' could not be found."
        )
    rg = params.get("rg")
    if rg is not None and not world.resource_group_exists(rg):
        raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")


def authorize(world: World, token: Token, action: str, scope: str) -> None:
    if not world.permissions.allowed(action, scope, token.vm):
        raise ArmError(
            403,
            "AuthorizationFailed",
            f"The client '{token.principal_id}' with object id '{token.principal_id}' does not "
            f"have authorization to perform action '{action}' over scope '{scope}' or the scope "
            "is invalid. If access was recently granted, please refresh your credentials.",
        )


def not_found(kind: str, name: str, resource_group: str) -> ArmError:
    return ArmError(
        404,
        "ResourceNotFound",
        f"The Resource '{kind}/{name}' under resource group '{resource_group}' was not found. "
        "For more details please go to https://aka.ms/ARMResourceNotFoundFix",
    )
