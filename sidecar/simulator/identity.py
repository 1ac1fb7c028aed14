"""Managed-identity tokens and the role assignments ARM checks them against.

Invariants: ARM accepts only tokens this simulator issued, unexpired, for an ARM audience; a
token remembers which VM (and which identity) asked for it, so ARM's answers can name the
caller; a denial always wins; without role assignments everything else is allowed (the
deny-list mode), with them only what an assignment covers (the allow-list mode, as ARM).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.simulator import ids
from sidecar.simulator.errors import ControlError
from sidecar.simulator.roles import Assignment
from sidecar.simulator.times import Clock
from sidecar.simulator.vms import Vm, stable_uuid

TOKEN_LIFETIME = 3599
ARM_AUDIENCES = frozenset(
    {
        "https://management.azure.com",
        "https://management.azure.com/",
        "https://management.core.windows.net",
        "https://management.core.windows.net/",
    }
)
TENANT_ID = "72f988bf-0000-4000-8000-51a51a51a51a"
_KEEP_TOKENS = 10_000


@dataclass(frozen=True)
class Token:
    value: str
    vm: str
    resource: str
    client_id: str
    principal_id: str
    issued_at: float
    expires_at: float

    def answer(self) -> dict[str, str]:
        """The IMDS token response; every value a string, as IMDS sends them."""
        return {
            "access_token": self.value,
            "refresh_token": "",
            "expires_in": str(int(self.expires_at - self.issued_at)),
            "expires_on": str(int(self.expires_at)),
            "ext_expires_in": str(int(self.expires_at - self.issued_at)),
            "not_before": str(int(self.issued_at)),
            "resource": self.resource,
            "token_type": "Bearer",
            "client_id": self.client_id,
        }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenBook:
    """Issued tokens, remembered (boundedly) so ARM can recognise them."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._tokens: OrderedDict[str, Token] = OrderedDict()

    def issue(self, vm: Vm, resource: str, client_id: str | None = None) -> Token:
        """A JWT-shaped token (random signature) whose claims a client may decode."""
        now = self._clock()
        chosen_client = client_id or vm.client_id
        principal = stable_uuid("principal", chosen_client) if client_id else vm.principal_id
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{TENANT_ID}/",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + TOKEN_LIFETIME,
            "appid": chosen_client,
            "oid": principal,
            "sub": principal,
            "tid": TENANT_ID,
            "xms_mirid": vm.resource_id,
            "jti": secrets.token_hex(8),
        }
        header = {"typ": "JWT", "alg": "RS256", "kid": "simulator"}
        value = ".".join(
            (
                _b64(json.dumps(header).encode()),
                _b64(json.dumps(claims).encode()),
                _b64(secrets.token_bytes(32)),
            )
        )
        token = Token(value, vm.name, resource, chosen_client, principal, now, now + TOKEN_LIFETIME)
        self._tokens[value] = token
        while len(self._tokens) > _KEEP_TOKENS:
            self._tokens.popitem(last=False)
        return token

    def find(self, value: str) -> Token | None:
        return self._tokens.get(value)

    def expired(self, token: Token) -> bool:
        return self._clock() >= token.expires_at


@dataclass(frozen=True)
class Denial:
    """A missing role assignment: ``action`` (glob) is denied on ``scope`` (and below)."""

    action: str
    scope: str = ""
    vm: str = ""

    def covers(self, action: str, scope: str, vm: str) -> bool:
        if not fnmatch.fnmatchcase(action.casefold(), self.action.casefold()):
            return False
        if self.scope and not ids.within(scope, self.scope):
            return False
        return not self.vm or self.vm.casefold() == vm.casefold()

    def to_json(self) -> dict[str, str]:
        return {"action": self.action, "scope": self.scope, "vm": self.vm}


class Permissions:
    """Role assignments: denials over allow-everything, or allow-listing role assignments."""

    def __init__(self) -> None:
        self._denials: list[Denial] = []
        self._assignments: list[Assignment] = []

    def allowed(self, action: str, scope: str, vm: str) -> bool:
        if any(denial.covers(action, scope, vm) for denial in self._denials):
            return False
        if not self._assignments:
            return True
        return any(assignment.covers(action, scope, vm) for assignment in self._assignments)

    def replace(self, denials: list[Denial], assignments: list[Assignment] | None = None) -> None:
        self._denials = list(denials)
        self._assignments = list(assignments or [])

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"deny": [denial.to_json() for denial in self._denials]}
        if self._assignments:
            found["assignments"] = [a.to_json() for a in self._assignments]
        return found


def parse_denials(body: object) -> list[Denial]:
    """``{"deny": [{"action", "scope"?, "vm"?}, ...]}`` from the control API."""
    if not isinstance(body, dict) or not isinstance(body.get("deny"), list):
        raise ControlError(400, 'expected {"deny": [{"action": ..., "scope": ..., "vm": ...}]}')
    denials = []
    for item in body["deny"]:
        if not isinstance(item, Mapping) or not isinstance(item.get("action"), str):
            raise ControlError(400, "each denial needs an 'action' string")
        scope, vm = item.get("scope", ""), item.get("vm", "")
        if not isinstance(scope, str) or not isinstance(vm, str):
            raise ControlError(400, "'scope' and 'vm' must be strings")
        denials.append(Denial(item["action"], scope, vm))
    return denials
