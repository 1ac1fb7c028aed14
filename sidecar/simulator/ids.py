"""ARM resource ids: how they are built, compared and mapped to the actions that link them.

Invariant: every id the simulator hands out is built here, and ids are compared
case-insensitively everywhere (ARM does; it also upper-cases resource groups in references).
"""

from __future__ import annotations

import re

NETWORK = "Microsoft.Network"
COMPUTE = "Microsoft.Compute"


def rg_id(subscription: str, resource_group: str) -> str:
    return f"/subscriptions/{subscription}/resourceGroups/{resource_group}"


def vm_id(subscription: str, resource_group: str, name: str) -> str:
    return f"{rg_id(subscription, resource_group)}/providers/{COMPUTE}/virtualMachines/{name}"


def vmss_id(subscription: str, resource_group: str, scale_set: str) -> str:
    prefix = rg_id(subscription, resource_group)
    return f"{prefix}/providers/{COMPUTE}/virtualMachineScaleSets/{scale_set}"


def vmss_vm_id(subscription: str, resource_group: str, scale_set: str, instance: str) -> str:
    return f"{vmss_id(subscription, resource_group, scale_set)}/virtualMachines/{instance}"


def nic_id(subscription: str, resource_group: str, name: str) -> str:
    return network_id(subscription, resource_group, "networkInterfaces", name)


def vmss_nic_id(
    subscription: str, resource_group: str, scale_set: str, instance: str, name: str
) -> str:
    parent = vmss_vm_id(subscription, resource_group, scale_set, instance)
    return f"{parent}/networkInterfaces/{name}"


def network_id(subscription: str, resource_group: str, kind: str, name: str) -> str:
    return f"{rg_id(subscription, resource_group)}/providers/{NETWORK}/{kind}/{name}"


def pool_id(subscription: str, resource_group: str, load_balancer: str, pool: str) -> str:
    lb = network_id(subscription, resource_group, "loadBalancers", load_balancer)
    return f"{lb}/backendAddressPools/{pool}"


def nat_rule_id(subscription: str, resource_group: str, load_balancer: str, rule: str) -> str:
    lb = network_id(subscription, resource_group, "loadBalancers", load_balancer)
    return f"{lb}/inboundNatRules/{rule}"


def lb_id(subscription: str, resource_group: str, load_balancer: str) -> str:
    return network_id(subscription, resource_group, "loadBalancers", load_balancer)


def appgw_pool_id(subscription: str, resource_group: str, gateway: str, pool: str) -> str:
    appgw = network_id(subscription, resource_group, "applicationGateways", gateway)
    return f"{appgw}/backendAddressPools/{pool}"


def subnet_id(subscription: str, resource_group: str, vnet: str, subnet: str) -> str:
    return f"{network_id(subscription, resource_group, 'virtualNetworks', vnet)}/subnets/{subnet}"


def operation_path(subscription: str, location: str, operation: str) -> str:
    return (
        f"/subscriptions/{subscription}/providers/{NETWORK}/locations/{location}"
        f"/operations/{operation}"
    )


def operation_result_path(subscription: str, location: str, operation: str) -> str:
    """The ``Location`` of a long-running POST: where its result is read once it is done."""
    return (
        f"/subscriptions/{subscription}/providers/{NETWORK}/locations/{location}"
        f"/operationResults/{operation}"
    )


def reference_form(resource_id: str) -> str:
    """The id as ARM writes it into references: resource group upper-cased."""
    return re.sub(
        r"(/resourceGroups/)([^/]+)",
        lambda m: m.group(1) + m.group(2).upper(),
        resource_id,
        count=1,
        flags=re.IGNORECASE,
    )


def same(left: str, right: str) -> bool:
    return left.casefold() == right.casefold()


def within(resource_id: str, scope: str) -> bool:
    """Whether ``resource_id`` is ``scope`` or lies below it (RBAC scope inheritance)."""
    rid, prefix = resource_id.casefold().rstrip("/"), scope.casefold().rstrip("/")
    return rid == prefix or rid.startswith(prefix + "/")


def resource_group_of(resource_id: str) -> str | None:
    match = re.search(r"/resourceGroups/([^/]+)", resource_id, flags=re.IGNORECASE)
    return match.group(1) if match else None


def last_segment(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]


_JOIN_ACTIONS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), action)
    for pattern, action in (
        (
            r"/loadBalancers/[^/]+/backendAddressPools/[^/]+$",
            "Microsoft.Network/loadBalancers/backendAddressPools/join/action",
        ),
        (
            r"/loadBalancers/[^/]+/inboundNatRules/[^/]+$",
            "Microsoft.Network/loadBalancers/inboundNatRules/join/action",
        ),
        (
            r"/applicationSecurityGroups/[^/]+$",
            "Microsoft.Network/applicationSecurityGroups/joinIpConfiguration/action",
        ),
        (
            r"/virtualNetworks/[^/]+/subnets/[^/]+$",
            "Microsoft.Network/virtualNetworks/subnets/join/action",
        ),
        (r"/networkSecurityGroups/[^/]+$", "Microsoft.Network/networkSecurityGroups/join/action"),
        (r"/publicIPAddresses/[^/]+$", "Microsoft.Network/publicIPAddresses/join/action"),
        (
            r"/applicationGateways/[^/]+/backendAddressPools/[^/]+$",
            "Microsoft.Network/applicationGateways/backendAddressPools/join/action",
        ),
    )
)


def join_action(resource_id: str) -> str | None:
    """The action a caller needs on ``resource_id`` to link a NIC to it (None: no check)."""
    for pattern, action in _JOIN_ACTIONS:
        if pattern.search(resource_id):
            return action
    return None


_POOL = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network/loadBalancers/"
    r"[^/]+/backendAddressPools/[^/]+$",
    re.IGNORECASE,
)


_APPGW_POOL = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network/"
    r"applicationGateways/[^/]+/backendAddressPools/[^/]+$",
    re.IGNORECASE,
)


def is_pool_id(resource_id: str) -> bool:
    return bool(_POOL.match(resource_id))


def is_appgw_pool_id(resource_id: str) -> bool:
    return bool(_APPGW_POOL.match(resource_id))
