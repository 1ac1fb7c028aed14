"""What the rest of the sidecar knows of ARM, without loading the Azure SDKs.

Why a module of its own: the SDKs cost about 60 MiB of memory and half a second of CPU, and a
fleet multiplies that, so `sidecar.arm` (the SDK side) runs in a helper process while ARM is
needed (`sidecar.arm_process`). Everything the drain loop, the gates and the tests need to name
(errors, resource references, permissions, rule health, the operations) lives here instead.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from sidecar.imds import Compute
from sidecar.pool_record import PoolsByIpConfig

READ_PERMISSION = "Microsoft.Network/networkInterfaces/read"
WRITE_PERMISSION = "Microsoft.Network/networkInterfaces/write"
JOIN_PERMISSION = "Microsoft.Network/loadBalancers/backendAddressPools/join/action"
APPGW_JOIN_PERMISSION = "Microsoft.Network/applicationGateways/backendAddressPools/join/action"
POOL_READ_PERMISSION = "Microsoft.Network/loadBalancers/backendAddressPools/read"
HEALTH_PERMISSION = "Microsoft.Network/loadBalancers/loadBalancingRules/health/action"
_NIC = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.Network/networkInterfaces/(?P<name>[^/]+)$",
    re.IGNORECASE,
)
_APPGW_POOL = re.compile(r"/applicationGateways/[^/]+/backendAddressPools/[^/]+$", re.IGNORECASE)


class ArmError(Exception):
    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        permission: str | None = None,
        retry_after: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.permission = permission
        self.retry_after = retry_after
        """ARM's Retry-After (a 429 or 503): the next try waits at least this long."""


@dataclass(frozen=True)
class NicRef:
    id: str
    subscription: str
    resource_group: str
    name: str

    @classmethod
    def parse(cls, resource_id: str) -> NicRef:
        match = _NIC.match(resource_id)
        if match is None:
            raise ValueError(f"not a network interface id: {resource_id}")
        return cls(resource_id, match["sub"], match["rg"], match["name"])


@dataclass(frozen=True)
class Recorded:
    """What the NIC's own tags say was removed and not restored, and its pools now."""

    removed: PoolsByIpConfig
    unreadable: list[str]
    current: PoolsByIpConfig


def is_uniform_scale_set(compute: Compute) -> bool:
    """Uniform instances have `…/virtualMachineScaleSets/S/virtualMachines/N` ids (Flexible
    instances are plain VMs); their NICs can only be written through the Compute API."""
    return bool(compute.scale_set) and "/virtualmachinescalesets/" in compute.resource_id.lower()


def is_appgw_pool(pool_id: str) -> bool:
    return bool(_APPGW_POOL.search(pool_id))


@dataclass(frozen=True)
class Backend:
    """One backend of a load-balancing rule, as its health shows it."""

    ipconfig_id: str
    address: str
    up: bool


@dataclass(frozen=True)
class RuleHealth:
    rule_id: str
    up: int
    down: int
    backends: tuple[Backend, ...]


def merged(recorded: Mapping[str, list[str]], change: Mapping[str, list[str]]) -> PoolsByIpConfig:
    """The union of two records, per IP configuration, ids compared case-insensitively."""
    result = {config: list(pools) for config, pools in recorded.items()}
    for config, pools in change.items():
        known = folded(result.get(config, []))
        result[config] = [*result.get(config, []), *(p for p in pools if p.casefold() not in known)]
    return result


def folded(ids: Iterable[str]) -> set[str]:
    return {item.casefold() for item in ids}


class Network(Protocol):
    """The ARM operations pool removal and the fleet gates use (`sidecar.arm.ArmNetwork` does
    them with the SDKs; `sidecar.arm_process.ArmProcess` has its helper process do them)."""

    async def find_nics(self, compute: Compute) -> list[NicRef]: ...

    async def recorded(self, nic: NicRef) -> Recorded: ...

    async def planned_removal(
        self, nic: NicRef, pool_filter: Collection[str]
    ) -> PoolsByIpConfig: ...

    async def remove_pools(
        self,
        nic: NicRef,
        pool_filter: Collection[str],
        before_write: Callable[[PoolsByIpConfig], Awaitable[None]],
    ) -> PoolsByIpConfig: ...

    async def restore_pools(
        self, nic: NicRef, removed: Mapping[str, list[str]]
    ) -> PoolsByIpConfig: ...

    async def rules_of_pools(self, pool_ids: Collection[str]) -> list[str]: ...

    async def rule_health(self, rule_id: str) -> RuleHealth: ...

    async def vm_names(self, resource_group: str) -> dict[str, str]: ...
