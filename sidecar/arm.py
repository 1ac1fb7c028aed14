"""Azure Resource Manager: this VM's NICs and their backend pools, through the real SDK.

Invariants:
- a NIC is only ever changed by read-modify-write guarded by its etag (`If-Match`), so a
  concurrent change is never overwritten; only backend-pool references (load balancer and
  Application Gateway) and our own record tags move, every other property travels back
  unchanged (the SDK's models keep even fields they do not know);
- the PUT that removes pools also records them in the NIC's tags, and the PUT that restores
  them clears that record (`pool_record`);
- the token comes from the same IMDS the sidecar polls, without any proxy;
- whatever ARM (or a proxy in front of it) answers, errors come out as `ArmError`: marked
  permanent when retrying cannot help, with the permission to grant when that is the cause;
  an answer the SDK cannot make sense of is a transient `ArmError` naming what it was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar

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
    ApplicationGatewayBackendAddressPool,
    BackendAddressPool,
    NetworkInterface,
    NetworkInterfaceIPConfigurationPropertiesFormat,
)

from sidecar import pool_record
from sidecar.arm_model import (
    APPGW_JOIN_PERMISSION,
    HEALTH_PERMISSION,
    JOIN_PERMISSION,
    POOL_READ_PERMISSION,
    READ_PERMISSION,
    WRITE_PERMISSION,
    ArmError,
    Backend,
    NicRef,
    Recorded,
    RuleHealth,
    folded,
    is_appgw_pool,
    merged,
)
from sidecar.imds import Compute
from sidecar.pool_record import PoolsByIpConfig
from sidecar.settings import Settings

T = TypeVar("T")
log = logging.getLogger(__name__)

CONFLICT_RETRIES = 5
"""Fresh read-modify-write rounds after a 412 before giving the round back to the caller."""
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 409})
IN_FLIGHT = frozenset({"updating", "creating", "deleting"})
"""A NIC's provisioningState while a change is still being applied."""
FAILED = "failed"
RETRYABLE_CODES = frozenset({"AnotherOperationInProgress", "RetryableError"})
"""409s that ARM means as "try again shortly", not as a refusal."""
_ACTION_IN_MESSAGE = re.compile(
    r"does not have (?:authorization|permission) to perform action(?:\(s\))? '([^']+)'"
)
"""The action missing, in AuthorizationFailed and in LinkedAuthorizationFailed (whose message
first names the write the caller may do, then the join it may not)."""


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

    async def recorded(self, nic: NicRef) -> Recorded:
        """The removal record in the NIC's tags (left by a sidecar that lost its state)."""
        current = await self._get(nic)
        removed, unreadable = pool_record.decode(nic.id, current.tags)
        return Recorded(removed, unreadable, self._checked(pools_by_ip_config, current))

    async def planned_removal(self, nic: NicRef, pool_filter: Collection[str]) -> PoolsByIpConfig:
        """What `remove_pools` would take out now (a dry run reads, never writes)."""
        current = await self._get(nic)
        return self._checked(_leaving, current, pool_filter)

    async def remove_pools(
        self,
        nic: NicRef,
        pool_filter: Collection[str],
        before_write: Callable[[PoolsByIpConfig], Awaitable[None]],
    ) -> PoolsByIpConfig:
        """Takes the NIC out of its pools (those of `pool_filter`, when it names any);
        `before_write` must persist the plan first."""

        def plan(current: NetworkInterface) -> PoolsByIpConfig | None:
            return _leaving(current, pool_filter) or None

        def apply(current: NetworkInterface, change: PoolsByIpConfig) -> None:
            without(current, change)
            recorded, _ = pool_record.decode(current.id or nic.id, current.tags)
            _record(current, nic.id, merged(recorded, change))

        return await self._update(nic, plan, apply, before_write, WRITE_PERMISSION)

    async def restore_pools(self, nic: NicRef, removed: Mapping[str, list[str]]) -> PoolsByIpConfig:
        """Puts back what is missing of `removed` (and of the NIC's own record), clears the
        record; returns what it added."""

        def plan(current: NetworkInterface) -> PoolsByIpConfig | None:
            recorded, _ = pool_record.decode(nic.id, current.tags)
            present = pools_by_ip_config(current)
            wanted = merged(removed, recorded)  # the state file keeps the NIC's own order
            missing = {
                name: [p for p in pools if p.casefold() not in folded(present.get(name, []))]
                for name, pools in wanted.items()
                if name in present
            }
            missing = {name: pools for name, pools in missing.items() if pools}
            has_record = any(pool_record.is_ours(tag) for tag in current.tags or {})
            return missing if missing or has_record else None

        def apply(current: NetworkInterface, change: PoolsByIpConfig) -> None:
            with_pools(current, change)
            _record(current, nic.id, {})

        needed = JOIN_PERMISSION
        if any(is_appgw_pool(p) for pools in removed.values() for p in pools):
            needed = APPGW_JOIN_PERMISSION
        return await self._update(nic, plan, apply, None, needed)

    async def rules_of_pools(self, pool_ids: Iterable[str]) -> list[str]:
        """The load-balancing rules that use these load-balancer pools (read from each pool)."""
        rules: dict[str, str] = {}
        operations = self.client.load_balancer_backend_address_pools
        for pool_id in pool_ids:
            if is_appgw_pool(pool_id):
                continue  # an Application Gateway has no load-balancing rules
            parts = parse_resource_id(pool_id)
            pool = await self._call(
                operations.get(
                    str(parts["resource_group"]), str(parts["name"]), str(parts["child_name_1"])
                ),
                POOL_READ_PERMISSION,
            )
            props = pool.properties
            for rule in (props.load_balancing_rules if props else None) or []:
                if rule.id:
                    rules.setdefault(rule.id.casefold(), rule.id)
        return list(rules.values())

    async def rule_health(self, rule_id: str) -> RuleHealth:
        """Up and down counts and each backend's state (a long-running POST in ARM)."""
        parts = parse_resource_id(rule_id)
        group, balancer, rule = (
            str(parts["resource_group"]),
            str(parts["name"]),
            str(parts["child_name_1"]),
        )

        async def health() -> Any:
            operations = self.client.load_balancer_load_balancing_rules
            poller = await operations.begin_health(group, balancer, rule)
            return await poller.result()

        result = await self._call(health(), HEALTH_PERMISSION)
        try:
            backends = tuple(
                Backend(
                    ipconfig_id=str(entry.network_interface_ip_configuration_id or ""),
                    address=str(entry.ip_address or ""),
                    up=str(entry.state or "").casefold() == "up",
                )
                for entry in result.load_balancer_backend_addresses or []
            )
            return RuleHealth(rule_id, int(result.up or 0), int(result.down or 0), backends)
        except (AttributeError, TypeError, ValueError) as error:
            raise ArmError(f"rule health cannot be read ({error})", permanent=False) from None

    async def vm_names(self, resource_group: str) -> dict[str, str]:
        """IP configuration id (folded) -> the VM name its NIC belongs to, for one group."""
        names: dict[str, str] = {}

        async def walk() -> None:
            async for nic in self.client.network_interfaces.list(resource_group):
                props = nic.properties
                vm = props.virtual_machine if props else None
                if vm is None or not vm.id:
                    continue
                name = vm.id.rstrip("/").rsplit("/", 1)[-1]
                for config in (props.ip_configurations if props else None) or []:
                    if config.id:
                        names[config.id.casefold()] = name

        await self._call(walk(), READ_PERMISSION)
        return names

    async def _get(self, nic: NicRef) -> NetworkInterface:
        operations = self.client.network_interfaces
        nic_model = await self._call(operations.get(nic.resource_group, nic.name), READ_PERMISSION)
        if not isinstance(nic_model, NetworkInterface):
            raise ArmError(
                f"ARM answered {type(nic_model).__name__} for {nic.name}, not a NIC",
                permanent=False,
            )
        return nic_model

    async def _update(
        self,
        nic: NicRef,
        plan: Callable[[NetworkInterface], PoolsByIpConfig | None],
        apply: Callable[[NetworkInterface, PoolsByIpConfig], None],
        before_write: Callable[[PoolsByIpConfig], Awaitable[None]] | None,
        permission: str,
    ) -> PoolsByIpConfig:
        """Read, plan, persist, write with If-Match; a 412 starts over from a fresh read."""
        for _ in range(CONFLICT_RETRIES):
            current = await self._get(nic)
            state = self._checked(_provisioning, current)
            if state in IN_FLIGHT:  # an earlier change (ours, before a restart?) is not done
                raise ArmError(
                    f"{nic.name} is {state}: waiting for an earlier change to finish",
                    permanent=False,
                )
            change = self._checked(plan, current)
            if change is None and state == FAILED:
                change = {}  # the last change failed: apply the NIC as it should be again
            if change is None:
                return {}
            if before_write is not None:
                await before_write(change)
            self._checked(apply, current, change)
            try:
                await self._call(self._put(nic, current), permission)
            except _Conflict:
                continue
            return change
        raise ArmError(
            f"{nic.name} kept changing under us ({CONFLICT_RETRIES} etag conflicts)",
            permanent=False,
        )

    @staticmethod
    def _checked(step: Callable[..., T], *args: Any) -> T:
        """A NIC whose shape we cannot read (a half-broken answer) is ARM's fault, not a crash."""
        try:
            return step(*args)
        except (AttributeError, TypeError, KeyError, ValueError) as error:
            raise ArmError(
                f"the NIC ARM returned cannot be read ({type(error).__name__}: {error})",
                permanent=False,
            ) from None

    async def _put(self, nic: NicRef, body: NetworkInterface) -> None:
        headers = {"If-Match": body.etag} if body.etag else {}
        poller = await self.client.network_interfaces.begin_create_or_update(
            nic.resource_group, nic.name, body, headers=headers
        )
        await poller.result()

    async def _call(self, call: Awaitable[T], permission: str) -> T:
        """Bounds a call by SIDECAR_ARM_TIMEOUT and translates whatever goes wrong."""
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
        except ArmError:
            raise
        except Exception as error:  # an answer the SDK cannot parse: a list, a string, garbage
            raise ArmError(
                f"unexpected answer ({type(error).__name__}: {error})"[:500], permanent=False
            ) from None


class _Conflict(ArmError):
    """412: the NIC changed since we read it."""


def _translate(error: HttpResponseError, permission: str) -> ArmError:
    status = error.status_code or 0
    detail = error.error
    code = getattr(detail, "code", None) if detail is not None else None
    text = getattr(detail, "message", None) if detail is not None else None
    message = str(text or error.reason or error)[:500]
    if status == 412:
        return _Conflict(f"etag changed: {message}", permanent=False)
    named = _ACTION_IN_MESSAGE.search(message)
    needed = named.group(1).split(",")[0] if named else permission
    return ArmError(
        f"HTTP {status} {code or ''}: {message}".replace("  ", " "),
        permanent=status in PERMANENT_STATUSES and code not in RETRYABLE_CODES,
        permission=needed if status == 403 else None,
        retry_after=_retry_after(error),
    )


def _retry_after(error: HttpResponseError) -> float:
    headers = getattr(error.response, "headers", None) or {}
    value = str(headers.get("Retry-After", ""))
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


def pools_by_ip_config(nic: NetworkInterface) -> PoolsByIpConfig:
    """Load-balancer and Application Gateway pool ids, per IP configuration name."""
    props = nic.properties
    result: PoolsByIpConfig = {}
    for config in (props.ip_configurations if props else None) or []:
        config_props = config.properties
        lb = (config_props.load_balancer_backend_address_pools if config_props else None) or []
        agw = (
            config_props.application_gateway_backend_address_pools if config_props else None
        ) or []
        result[config.name or ""] = [pool.id for pool in (*lb, *agw) if pool.id]
    return result


def _provisioning(nic: NetworkInterface) -> str:
    props = nic.properties
    state = props.provisioning_state if props else None
    return str(getattr(state, "value", state) or "").casefold()  # an enum's str is its name


def _leaving(nic: NetworkInterface, pool_filter: Collection[str]) -> PoolsByIpConfig:
    wanted = folded(pool_filter)

    def chosen(pool_id: str) -> bool:
        return not wanted or pool_id.casefold() in wanted

    return {
        name: [pool for pool in pools if chosen(pool)]
        for name, pools in pools_by_ip_config(nic).items()
        if any(chosen(pool) for pool in pools)
    }


def without(nic: NetworkInterface, change: PoolsByIpConfig) -> None:
    for config, props in _ip_configs(nic, change):
        leaving = folded(change[config])
        lb = props.load_balancer_backend_address_pools or []
        props.load_balancer_backend_address_pools = [
            pool for pool in lb if (pool.id or "").casefold() not in leaving
        ]
        agw = props.application_gateway_backend_address_pools or []
        if agw:
            props.application_gateway_backend_address_pools = [
                pool for pool in agw if (pool.id or "").casefold() not in leaving
            ]


def with_pools(nic: NetworkInterface, change: PoolsByIpConfig) -> None:
    for config, props in _ip_configs(nic, change):
        lb_pools = [p for p in change[config] if not is_appgw_pool(p)]
        agw_pools = [p for p in change[config] if is_appgw_pool(p)]
        if lb_pools:
            props.load_balancer_backend_address_pools = [
                *(props.load_balancer_backend_address_pools or []),
                *(BackendAddressPool(id=pool) for pool in lb_pools),
            ]
        if agw_pools:
            props.application_gateway_backend_address_pools = [
                *(props.application_gateway_backend_address_pools or []),
                *(ApplicationGatewayBackendAddressPool(id=pool) for pool in agw_pools),
            ]


def _record(nic: NetworkInterface, nic_id: str, removed: PoolsByIpConfig) -> None:
    """Replaces our record tags with `removed` (none when empty); others' tags stay."""
    encoded = pool_record.encode(nic_id, removed)
    for item in encoded.unrecorded:
        log.warning("cannot record %s in a NIC tag (too long): only the state file has it", item)
    tags: dict[str, Any] = pool_record.without_ours(nic.tags)
    tags.update(encoded.tags)
    if tags or nic.tags is not None:  # a NIC without tags keeps none
        nic.tags = tags


def _ip_configs(
    nic: NetworkInterface, change: PoolsByIpConfig
) -> Iterable[tuple[str, NetworkInterfaceIPConfigurationPropertiesFormat]]:
    props = nic.properties
    for config in (props.ip_configurations if props else None) or []:
        if config.name in change and config.properties is not None:
            yield config.name, config.properties
