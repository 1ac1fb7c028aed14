"""Application gateways, as far as NICs see them: named backend pools an IP configuration joins.

Invariants: a gateway and its pools are found by name case-insensitively; a pool's members are
never stored, only derived from the NIC IP configurations whose
``applicationGatewayBackendAddressPools`` reference it (as Azure derives
``backendIPConfigurations``); the simulator serves no ARM route for gateways themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.simulator import ids
from sidecar.simulator.errors import ControlError
from sidecar.simulator.network import APPGW_POOLS, Nic


@dataclass
class ApplicationGateway:
    name: str
    subscription: str
    resource_group: str
    location: str
    pools: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return ids.network_id(
            self.subscription, self.resource_group, "applicationGateways", self.name
        )

    def pool_id(self, pool: str) -> str:
        return ids.appgw_pool_id(self.subscription, self.resource_group, self.name, pool)

    def describe(self, nics: Iterable[Nic]) -> dict[str, Any]:
        """The control view: each pool with the IP configurations in it."""
        members = pool_members(nics)
        return {
            "name": self.name,
            "id": self.id,
            "resource_group": self.resource_group,
            "pools": [
                {
                    "name": pool,
                    "id": self.pool_id(pool),
                    "members": members.get(self.pool_id(pool).casefold(), []),
                }
                for pool in self.pools
            ],
        }


def pool_members(nics: Iterable[Nic]) -> dict[str, list[str]]:
    """Application-gateway pool id (casefolded) -> ipconfig ids that reference it."""
    members: dict[str, list[str]] = {}
    for nic in nics:
        for ipconfig in nic.ip_configurations:
            for ref in ipconfig.get("properties", {}).get(APPGW_POOLS) or []:
                if isinstance(ref, dict) and isinstance(ref.get("id"), str):
                    ipconfig_id = f"{nic.id}/ipConfigurations/{ipconfig.get('name')}"
                    members.setdefault(ref["id"].casefold(), []).append(ipconfig_id)
    return members


class GatewayStore:
    """The world's application gateways, keyed by id."""

    def __init__(self) -> None:
        self._gateways: dict[str, ApplicationGateway] = {}

    def add(self, gateway: ApplicationGateway) -> ApplicationGateway:
        if gateway.id.casefold() in self._gateways:
            raise ControlError(409, f"application gateway {gateway.name} already exists")
        self._gateways[gateway.id.casefold()] = gateway
        return gateway

    def all(self) -> list[ApplicationGateway]:
        return list(self._gateways.values())

    def find(self, name: str) -> ApplicationGateway | None:
        return next((g for g in self.all() if g.name.casefold() == name.casefold()), None)


def parse_gateway(
    body: object, *, subscription: str, resource_group: str, location: str
) -> ApplicationGateway:
    """``{"name", "resource_group"?, "pools": [names]}`` from the control API."""
    if not isinstance(body, Mapping):
        raise ControlError(400, "an application gateway must be a JSON object")
    unknown = sorted(set(body) - {"name", "resource_group", "pools"})
    if unknown:
        raise ControlError(400, f"unknown application gateway fields: {', '.join(unknown)}")
    name, rg, pools = (
        body.get("name"),
        body.get("resource_group", resource_group),
        body.get("pools", []),
    )
    if not isinstance(name, str) or not name or "/" in name:
        raise ControlError(400, "'name' is required and cannot contain '/'")
    if not isinstance(rg, str) or not rg:
        raise ControlError(400, "'resource_group' must be a string")
    if not isinstance(pools, list) or not all(isinstance(p, str) and p for p in pools):
        raise ControlError(400, "'pools' must be a list of pool names")
    if len({p.casefold() for p in pools}) != len(pools):
        raise ControlError(400, "duplicate pool names")
    return ApplicationGateway(name, subscription, rg, location, list(pools))
