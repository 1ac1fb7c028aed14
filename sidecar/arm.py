"""Azure Resource Manager: this VM's NICs and their backend pools, through the real SDK.

Invariants: a NIC is only ever changed by read-modify-write guarded by its etag (`If-Match`), so
a concurrent change is never overwritten; only backend-pool references move, every other property
of the NIC travels back unchanged (the SDK's models keep even fields they do not know); the token
comes from the same IMDS the sidecar polls, without any proxy; errors come out as `ArmError`,
marked permanent when retrying cannot help, with the permission to grant when that is the cause.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity.aio import ManagedIdentityCredential
from azure.mgmt.core.tools import parse_resource_id
from azure.mgmt.network.aio import NetworkManagementClient
from azure.mgmt.network.models import (
    BackendAddressPool,
    NetworkInterface,
    NetworkInterfaceIPConfigurationPropertiesFormat,
)

from sidecar.imds import Compute
from sidecar.settings import Settings

T = TypeVar("T")
PoolsByIpConfig = dict[str, list[str]]
"""IP configuration name -> backend pool resource ids."""

READ_PERMISSION = "Microsoft.Network/networkInterfaces/read"
WRITE_PERMISSION = "Microsoft.Network/networkInterfaces/write"
JOIN_PERMISSION = "Microsoft.Network/loadBalancers/backendAddressPools/join/action"
CONFLICT_RETRIES = 5
"""Fresh read-modify-write rounds after a 412 before giving the round back to the caller."""
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 409})
_ACTION_IN_MESSAGE = re.compile(r"perform action '([^']+)'")


class ArmError(Exception):
    def __init__(self, message: str, *, permanent: bool, permission: str | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.permission = permission


@dataclass(frozen=True)
class NicRef:
    id: str
    subscription: str
    resource_group: str
    name: str

    @classmethod
    def parse(cls, resource_id: str) -> NicRef:
        parts = parse_resource_id(resource_id)
        return cls(
            resource_id,
            str(parts["subscription"]),
            str(parts["resource_group"]),
            str(parts["name"]),
        )


def is_uniform_scale_set(compute: Compute) -> bool:
    """Uniform instances have `…/virtualMachineScaleSets/S/virtualMachines/N` ids (Flexible
    instances are plain VMs); their NICs can only be written through the Compute API."""
    return bool(compute.scale_set) and "/virtualmachinescalesets/" in compute.resource_id.lower()


class ArmNetwork:
    """The NIC operations the pool action needs, with bounded retries and timeouts."""

    def __init__(self, settings: Settings, subscription_id: str) -> None:
        # azure-identity reads this on every token request: tokens come from SIDECAR_IMDS_URL,
        # which is Azure's IMDS in production and the simulator in a rehearsal.
        os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = settings.imds_url
        self.credential = ManagedIdentityCredential(
            client_id=settings.managed_identity_client_id,
            use_env_settings=False,  # no proxy between us and IMDS
        )
        verify: str | bool = str(settings.arm_ca_bundle) if settings.arm_ca_bundle else True
        self.client = NetworkManagementClient(
            self.credential,
            subscription_id,
            base_url=settings.arm_url,
            credential_scopes=[f"{settings.arm_audience}/.default"],
            connection_verify=verify,
            connection_timeout=min(10.0, settings.arm_timeout),
            read_timeout=settings.arm_timeout,
            retry_total=2,
            retry_backoff_factor=0.5,
            retry_backoff_max=4,
            polling_interval=1,
        )
        self.timeout = settings.arm_timeout

    async def close(self) -> None:
        await self.client.close()
        await self.credential.close()

    async def find_nics(self, compute: Compute) -> list[NicRef]:
        """The NICs in this VM's resource group whose `virtualMachine.id` is this VM."""
        wanted = compute.resource_id.casefold()
        found: list[NicRef] = []

        async def search() -> None:
            async for nic in self.client.network_interfaces.list(compute.resource_group):
                props = nic.properties
                vm = props.virtual_machine if props else None
                if vm is not None and (vm.id or "").casefold() == wanted and nic.id:
                    found.append(NicRef.parse(nic.id))

        await self._call(search(), READ_PERMISSION)
        return found

    async def remove_pools(
        self,
        nic: NicRef,
        chosen: Callable[[str], bool],
        before_write: Callable[[PoolsByIpConfig], Awaitable[None]],
    ) -> PoolsByIpConfig:
        """Takes the NIC out of the chosen pools; `before_write` must persist the plan first."""

        def plan(current: NetworkInterface) -> PoolsByIpConfig:
            return {
                name: [pool for pool in pools if chosen(pool)]
                for name, pools in pools_by_ip_config(current).items()
                if any(chosen(pool) for pool in pools)
            }

        return await self._update(nic, plan, without, before_write, WRITE_PERMISSION)

    async def restore_pools(self, nic: NicRef, removed: Mapping[str, list[str]]) -> PoolsByIpConfig:
        """Puts back what is missing of `removed`; returns what it added."""

        def plan(current: NetworkInterface) -> PoolsByIpConfig:
            present = pools_by_ip_config(current)
            missing = {
                name: [p for p in pools if p.casefold() not in _folded(present.get(name, []))]
                for name, pools in removed.items()
                if name in present
            }
            return {name: pools for name, pools in missing.items() if pools}

        return await self._update(nic, plan, with_pools, None, JOIN_PERMISSION)

    async def _update(
        self,
        nic: NicRef,
        plan: Callable[[NetworkInterface], PoolsByIpConfig],
        apply: Callable[[NetworkInterface, PoolsByIpConfig], None],
        before_write: Callable[[PoolsByIpConfig], Awaitable[None]] | None,
        permission: str,
    ) -> PoolsByIpConfig:
        """Read, plan, persist, write with If-Match; a 412 starts over from a fresh read."""
        operations = self.client.network_interfaces
        for _ in range(CONFLICT_RETRIES):
            current = await self._call(
                operations.get(nic.resource_group, nic.name), READ_PERMISSION
            )
            change = plan(current)
            if not change:
                return {}
            if before_write is not None:
                await before_write(change)
            apply(current, change)
            try:
                await self._call(self._put(nic, current), permission)
            except _Conflict:
                continue
            return change
        raise ArmError(
            f"{nic.name} kept changing under us ({CONFLICT_RETRIES} etag conflicts)",
            permanent=False,
        )

    async def _put(self, nic: NicRef, body: NetworkInterface) -> None:
        headers = {"If-Match": body.etag} if body.etag else {}
        poller = await self.client.network_interfaces.begin_create_or_update(
            nic.resource_group, nic.name, body, headers=headers
        )
        await poller.result()

    async def _call(self, call: Awaitable[T], permission: str) -> T:
        """Bounds a call by SIDECAR_ARM_TIMEOUT and translates the SDK's errors."""
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except TimeoutError:
            raise ArmError(f"no answer within {self.timeout:g}s", permanent=False) from None
        except ClientAuthenticationError as error:
            if error.status_code is None:  # the token request to IMDS failed, not ARM
                raise ArmError(f"no token: {error.message}", permanent=False) from None
            raise _translate(error, permission) from None
        except HttpResponseError as error:
            raise _translate(error, permission) from None
        except (ServiceRequestError, ServiceResponseError) as error:
            raise ArmError(f"cannot reach ARM: {error.message}", permanent=False) from None


class _Conflict(ArmError):
    """412: the NIC changed since we read it."""


def _translate(error: HttpResponseError, permission: str) -> ArmError:
    status = error.status_code or 0
    code = error.error.code if error.error else None
    message = (error.error.message if error.error else None) or error.reason or str(error)
    if status == 412:
        return _Conflict(f"etag changed: {message}", permanent=False)
    named = _ACTION_IN_MESSAGE.search(message or "")
    needed = named.group(1) if named else permission
    return ArmError(
        f"HTTP {status} {code or ''}: {message}".replace("  ", " "),
        permanent=status in PERMANENT_STATUSES,
        permission=needed if status == 403 else None,
    )


def pools_by_ip_config(nic: NetworkInterface) -> PoolsByIpConfig:
    props = nic.properties
    result: PoolsByIpConfig = {}
    for config in (props.ip_configurations if props else None) or []:
        config_props = config.properties
        pools = (config_props.load_balancer_backend_address_pools if config_props else None) or []
        result[config.name or ""] = [pool.id for pool in pools if pool.id]
    return result


def without(nic: NetworkInterface, change: PoolsByIpConfig) -> None:
    for config, props in _ip_configs(nic, change):
        leaving = _folded(change[config])
        current = props.load_balancer_backend_address_pools or []
        props.load_balancer_backend_address_pools = [
            pool for pool in current if (pool.id or "").casefold() not in leaving
        ]


def with_pools(nic: NetworkInterface, change: PoolsByIpConfig) -> None:
    for config, props in _ip_configs(nic, change):
        current = props.load_balancer_backend_address_pools or []
        props.load_balancer_backend_address_pools = [
            *current,
            *(BackendAddressPool(id=pool) for pool in change[config]),
        ]


def _ip_configs(
    nic: NetworkInterface, change: PoolsByIpConfig
) -> Iterable[tuple[str, NetworkInterfaceIPConfigurationPropertiesFormat]]:
    props = nic.properties
    for config in (props.ip_configurations if props else None) or []:
        if config.name in change and config.properties is not None:
            yield config.name, config.properties


def _folded(ids: Iterable[str]) -> set[str]:
    return {item.casefold() for item in ids}
