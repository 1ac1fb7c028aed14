"""The initial world: the default VM with a richly configured NIC, and decoys around it.

Invariant: the default NIC carries every kind of property a careless PUT could drop (two IP
configurations, two backend pools, an inbound NAT rule, an application security group, a
network security group, a public IP, accelerated networking, DNS servers, tags), and the
decoys sit in the same resource group and pool, so a client that picks NICs by name or
compares ids case-sensitively is caught.
"""

from __future__ import annotations

from typing import Any

from sidecar.simulator import ids
from sidecar.simulator.appgw import ApplicationGateway
from sidecar.simulator.lb import LoadBalancer, Probe, Rule
from sidecar.simulator.network import mac_for
from sidecar.simulator.vms import UNIFORM, Vm

LOAD_BALANCER = "lb-web"
HTTP_POOL = "pool-http"
ADMIN_POOL = "pool-admin"
APP_GATEWAY = "agw-web"
APP_POOL = "pool-app"
VNET = "vnet-sim"
SUBNET = "snet-web"
OTHER_VM = "other-vm"


def load_balancer(subscription: str, resource_group: str, location: str) -> LoadBalancer:
    """lb-web: a rule per pool, each probed over HTTP on the sidecar's port (8080 /health)."""
    probes = [
        Probe("probe-http", port=8080, path="/health", interval=5, threshold=2),
        Probe("probe-admin", port=8080, path="/health", interval=5, threshold=2),
    ]
    rules = [
        Rule("rule-http", "frontend", 80, 80, HTTP_POOL, "probe-http"),
        Rule("rule-admin", "frontend", 8443, 8443, ADMIN_POOL, "probe-admin"),
    ]
    return LoadBalancer(
        LOAD_BALANCER,
        subscription,
        resource_group,
        location,
        frontends=["frontend"],
        pools=[HTTP_POOL, ADMIN_POOL],
        probes=probes,
        rules=rules,
    )


def application_gateway(
    subscription: str, resource_group: str, location: str
) -> ApplicationGateway:
    """agw-web with pool-app, which no NIC joins until a test puts one in."""
    return ApplicationGateway(APP_GATEWAY, subscription, resource_group, location, [APP_POOL])


def nic_name(vm: Vm) -> str:
    """Uniform instances share their scale set's NIC name; other VMs get ``{name}-nic``."""
    return f"{vm.scale_set}-nic" if vm.orchestration == UNIFORM else f"{vm.name}-nic"


def nic_resource_id(vm: Vm) -> str:
    if vm.orchestration == UNIFORM:
        return ids.vmss_nic_id(
            vm.subscription_id, vm.resource_group, vm.scale_set, vm.instance_id, nic_name(vm)
        )
    return ids.nic_id(vm.subscription_id, vm.resource_group, nic_name(vm))


def ipconfig(
    name: str,
    *,
    subscription: str,
    resource_group: str,
    address: str,
    primary: bool,
    pools: list[str],
    static: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    props: dict[str, Any] = {
        "privateIPAddress": address,
        "privateIPAllocationMethod": "Static" if static else "Dynamic",
        "privateIPAddressVersion": "IPv4",
        "primary": primary,
        "subnet": {"id": ids.subnet_id(subscription, resource_group, VNET, SUBNET)},
        "loadBalancerBackendAddressPools": [{"id": pool} for pool in pools],
    }
    props.update(extra or {})
    return {"name": name, "properties": props}


def nic_document(
    *,
    name: str,
    location: str,
    vm_reference: str | None,
    ipconfigs: list[dict[str, Any]],
    tags: dict[str, str] | None = None,
    extra_properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    props: dict[str, Any] = {
        "ipConfigurations": ipconfigs,
        "dnsSettings": {"dnsServers": [], "appliedDnsServers": []},
        "macAddress": mac_for(name) if vm_reference else "",
        "enableAcceleratedNetworking": False,
        "enableIPForwarding": False,
        "disableTcpStateTracking": False,
        "vnetEncryptionSupported": False,
        "hostedWorkloads": [],
        "tapConfigurations": [],
        "nicType": "Standard",
        "auxiliaryMode": "None",
        "auxiliarySku": "None",
    }
    if vm_reference:
        props["primary"] = True
        props["virtualMachine"] = {"id": vm_reference}
    props.update(extra_properties or {})
    return {
        "name": name,
        "location": location,
        "tags": dict(tags or {}),
        "kind": "Regular",
        "properties": props,
    }


def default_nic(vm: Vm) -> dict[str, Any]:
    """The default VM's NIC: everything a PUT must keep while it drops one pool."""
    sub, rg = vm.subscription_id, vm.resource_group
    http = ids.pool_id(sub, rg, LOAD_BALANCER, HTTP_POOL)
    admin = ids.pool_id(sub, rg, LOAD_BALANCER, ADMIN_POOL)
    primary = ipconfig(
        "ipconfig1",
        subscription=sub,
        resource_group=rg,
        address="10.0.1.4",
        primary=True,
        pools=[http, admin],
        extra={
            "loadBalancerInboundNatRules": [
                {"id": ids.nat_rule_id(sub, rg, LOAD_BALANCER, f"ssh-{vm.name}")}
            ],
            "applicationSecurityGroups": [
                {"id": ids.network_id(sub, rg, "applicationSecurityGroups", "asg-web")}
            ],
            "publicIPAddress": {
                "id": ids.network_id(sub, rg, "publicIPAddresses", f"{vm.name}-pip")
            },
        },
    )
    secondary = ipconfig(
        "ipconfig2",
        subscription=sub,
        resource_group=rg,
        address="10.0.1.5",
        primary=False,
        pools=[http],
        static=True,
    )
    return nic_document(
        name=nic_name(vm),
        location=vm.location,
        vm_reference=ids.reference_form(vm.resource_id),
        ipconfigs=[primary, secondary],
        tags={"env": "sim", "role": "web", "owner": "platform-team"},
        extra_properties={
            "enableAcceleratedNetworking": True,
            "networkSecurityGroup": {
                "id": ids.network_id(sub, rg, "networkSecurityGroups", "nsg-web")
            },
            "dnsSettings": {
                "dnsServers": ["10.0.0.4", "10.0.0.5"],
                "appliedDnsServers": ["10.0.0.4", "10.0.0.5"],
                "internalDomainNameSuffix": "sim0123456789.ax.internal.cloudapp.net",
            },
        },
    )


def simple_nic(
    *,
    name: str,
    subscription: str,
    resource_group: str,
    location: str,
    vm_reference: str | None,
    address: str,
    pools: list[str],
) -> dict[str, Any]:
    """A one-ipconfig NIC (later VMs, decoys); ``vm_reference=None`` makes an orphan."""
    config = ipconfig(
        "ipconfig1",
        subscription=subscription,
        resource_group=resource_group,
        address=address,
        primary=True,
        pools=pools,
    )
    return nic_document(
        name=name,
        location=location,
        vm_reference=vm_reference,
        ipconfigs=[config],
        tags={"env": "sim"},
    )
