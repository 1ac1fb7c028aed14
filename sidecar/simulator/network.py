"""Network interfaces as ARM stores them, and what a PUT does to one.

Invariants:
- a NIC is keyed by its id, compared case-insensitively;
- every write gives a NIC a new etag, and its IP configurations always carry the NIC's etag;
- a PUT replaces the NIC's writable properties with the body's (what the body leaves out is
  gone, as in ARM), while read-only properties (etag, provisioningState, resourceGuid,
  macAddress, virtualMachine, ...) are never taken from a client's body;
- every resource a NIC document links (subnet, public IP, NSG, ASGs, load-balancer pools and
  NAT rules, application-gateway pools) is listed by ``references``: ARM's linked access check
  covers all of them on every PUT, not only the ones the PUT adds;
- a Uniform scale-set instance NIC is owned by Compute and is never written through here.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.simulator import ids
from sidecar.simulator.errors import ArmError, ControlError

NIC_TYPE = "Microsoft.Network/networkInterfaces"
IPCONFIG_TYPE = "Microsoft.Network/networkInterfaces/ipConfigurations"

READ_ONLY_TOP = frozenset({"id", "name", "type", "etag"})
READ_ONLY_PROPS = (
    "provisioningState",
    "resourceGuid",
    "macAddress",
    "virtualMachine",
    "primary",
    "hostedWorkloads",
    "tapConfigurations",
    "vnetEncryptionSupported",
    "dscpConfiguration",
    "privateEndpoint",
    "defaultOutboundConnectivityEnabled",
)
READ_ONLY_DNS = ("appliedDnsServers", "internalFqdn", "internalDomainNameSuffix")
READ_ONLY_IPCONFIG = frozenset({"id", "etag", "type"})
READ_ONLY_IPCONFIG_PROPS = ("provisioningState", "privateLinkConnectionProperties")

LB_POOLS = "loadBalancerBackendAddressPools"
APPGW_POOLS = "applicationGatewayBackendAddressPools"
_SINGLE_REFERENCES = ("subnet", "publicIPAddress")
_LIST_REFERENCES = (
    "loadBalancerBackendAddressPools",
    "loadBalancerInboundNatRules",
    "applicationSecurityGroups",
    "applicationGatewayBackendAddressPools",
)


def new_etag() -> str:
    return f'W/"{uuid.uuid4()}"'


def mac_for(name: str) -> str:
    """A stable MAC in Microsoft's 00-0D-3A range, in ARM's dashed form."""
    tail = hashlib.sha256(name.casefold().encode()).digest()[:3]
    return "00-0D-3A-" + "-".join(f"{byte:02X}" for byte in tail)


@dataclass
class Nic:
    """One stored NIC: its full ARM document and who owns it."""

    doc: dict[str, Any]
    uniform: bool = False
    pending_operation: str | None = None

    @property
    def id(self) -> str:
        return str(self.doc["id"])

    @property
    def name(self) -> str:
        return str(self.doc["name"])

    @property
    def etag(self) -> str:
        return str(self.doc["etag"])

    @property
    def location(self) -> str:
        return str(self.doc.get("location", ""))

    @property
    def resource_group(self) -> str:
        return ids.resource_group_of(self.id) or ""

    @property
    def vm_reference(self) -> str | None:
        vm = self.doc.get("properties", {}).get("virtualMachine")
        return str(vm["id"]) if isinstance(vm, dict) and "id" in vm else None

    @property
    def primary(self) -> bool:
        return bool(self.doc.get("properties", {}).get("primary", False))

    @property
    def ip_configurations(self) -> list[dict[str, Any]]:
        configs = self.doc.get("properties", {}).get("ipConfigurations", [])
        return [c for c in configs if isinstance(c, dict)]

    def document(self) -> dict[str, Any]:
        """A copy for answering: callers may not alias stored state."""
        return copy.deepcopy(self.doc)

    def summary(self) -> dict[str, Any]:
        """What tests and the demo read: ids, etag and per ipconfig its links."""
        configs = []
        for ipconfig in self.ip_configurations:
            props = ipconfig.get("properties", {})
            configs.append(
                {
                    "name": ipconfig.get("name"),
                    "primary": bool(props.get("primary", False)),
                    "private_ip": props.get("privateIPAddress", ""),
                    "pools": _ref_ids(props.get("loadBalancerBackendAddressPools")),
                    "appgw_pools": _ref_ids(props.get(APPGW_POOLS)),
                    "nat_rules": _ref_ids(props.get("loadBalancerInboundNatRules")),
                    "asgs": _ref_ids(props.get("applicationSecurityGroups")),
                }
            )
        return {
            "name": self.name,
            "id": self.id,
            "resource_group": self.resource_group,
            "vm_id": self.vm_reference,
            "etag": self.etag,
            "provisioning_state": self.doc.get("properties", {}).get("provisioningState"),
            "uniform": self.uniform,
            "ip_configurations": configs,
        }


def _ref_ids(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [str(item["id"]) for item in value if isinstance(item, dict) and "id" in item]


def stamp(doc: dict[str, Any], nic_id: str, etag: str, state: str) -> dict[str, Any]:
    """Give ``doc`` its server-set fields, keys in ARM's usual order."""
    props: dict[str, Any] = dict(doc.get("properties") or {})
    props["provisioningState"] = state
    configs = []
    for ipconfig in props.get("ipConfigurations") or []:
        name = str(ipconfig["name"])
        ip_props = dict(ipconfig.get("properties") or {})
        ip_props["provisioningState"] = state
        rest = {
            k: v
            for k, v in ipconfig.items()
            if k not in {"name", "properties"} | READ_ONLY_IPCONFIG
        }
        configs.append(
            {
                "name": name,
                "id": f"{nic_id}/ipConfigurations/{name}",
                "etag": etag,
                "type": IPCONFIG_TYPE,
                **rest,
                "properties": ip_props,
            }
        )
    props["ipConfigurations"] = configs
    rest = {k: v for k, v in doc.items() if k not in READ_ONLY_TOP and k != "properties"}
    return {
        "name": ids.last_segment(nic_id),
        "id": nic_id,
        "etag": etag,
        "type": NIC_TYPE,
        **rest,
        "properties": props,
    }


def references(doc: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Every linked resource id in a NIC document, with its JSON path (for error messages)."""
    props = doc.get("properties") or {}
    nsg = props.get("networkSecurityGroup")
    if isinstance(nsg, dict) and isinstance(nsg.get("id"), str):
        yield "properties.networkSecurityGroup.id", nsg["id"]
    for index, ipconfig in enumerate(props.get("ipConfigurations") or []):
        ip_props = ipconfig.get("properties") or {}
        base = f"properties.ipConfigurations[{index}].properties"
        for key in _SINGLE_REFERENCES:
            ref = ip_props.get(key)
            if isinstance(ref, dict) and isinstance(ref.get("id"), str):
                yield f"{base}.{key}.id", ref["id"]
        for key in _LIST_REFERENCES:
            for position, ref in enumerate(ip_props.get(key) or []):
                if isinstance(ref, dict) and isinstance(ref.get("id"), str):
                    yield f"{base}.{key}[{position}].id", ref["id"]


def linked_references(doc: Mapping[str, Any]) -> list[str]:
    """Each linked resource id once (first spelling kept): what ARM checks join actions on."""
    seen: set[str] = set()
    linked = []
    for _, rid in references(doc):
        if rid.casefold() not in seen:
            seen.add(rid.casefold())
            linked.append(rid)
    return linked


def merge_put(
    stored: Mapping[str, Any] | None,
    body: object,
    *,
    nic_id: str,
    allocate_ip: Callable[[], str],
) -> dict[str, Any]:
    """The NIC document a PUT of ``body`` produces (before stamping); raises ArmError 400."""
    if not isinstance(body, dict):
        raise ArmError(400, "InvalidRequestFormat", "Cannot parse the request.")
    location = body.get("location")
    if not isinstance(location, str) or not location:
        raise ArmError(
            400, "LocationRequired", "The location property is required for this definition."
        )
    if stored is not None and str(stored.get("location", "")).casefold() != location.casefold():
        raise ArmError(
            400,
            "InvalidResourceLocation",
            f"The resource '{ids.last_segment(nic_id)}' already exists in location "
            f"'{stored.get('location')}' in resource group '{ids.resource_group_of(nic_id)}'. "
            f"A resource with the same name cannot be created in location '{location}'. "
            "Please select a new resource name.",
        )
    raw_props = body.get("properties", {})
    if not isinstance(raw_props, dict):
        raise ArmError(400, "InvalidRequestFormat", "Cannot parse the request.")
    props = {k: copy.deepcopy(v) for k, v in raw_props.items() if k not in READ_ONLY_PROPS}
    old_props: Mapping[str, Any] = (stored or {}).get("properties", {})
    for key in READ_ONLY_PROPS:
        if key in old_props:
            props[key] = copy.deepcopy(old_props[key])
    _merge_dns(props, old_props)
    props["ipConfigurations"] = _merge_ipconfigs(
        raw_props.get("ipConfigurations"), old_props.get("ipConfigurations") or [], allocate_ip
    )
    if stored is None:
        props.setdefault("resourceGuid", str(uuid.uuid4()))
    merged = {k: copy.deepcopy(v) for k, v in body.items() if k not in READ_ONLY_TOP}
    merged["properties"] = props
    _check_reference_ids(merged)
    return merged


def custom_nic(body: object, *, nic_id: str, allocate_ip: Callable[[], str]) -> dict[str, Any]:
    """A NIC the control API adds: validated like a PUT, but server-owned fields are kept."""
    if not isinstance(body, dict):
        raise ArmError(400, "InvalidRequestFormat", "Cannot parse the request.")
    merged = merge_put(None, body, nic_id=nic_id, allocate_ip=allocate_ip)
    given = body.get("properties") or {}
    for key in READ_ONLY_PROPS:
        if key in given and key != "provisioningState":
            merged["properties"][key] = copy.deepcopy(given[key])
    if isinstance(given.get("dnsSettings"), dict):
        merged["properties"]["dnsSettings"] = copy.deepcopy(given["dnsSettings"])
    return merged


def _merge_dns(props: dict[str, Any], old_props: Mapping[str, Any]) -> None:
    dns = props.get("dnsSettings")
    old_dns = old_props.get("dnsSettings")
    if dns is None and not isinstance(old_dns, dict):
        return
    merged = {k: v for k, v in (dns or {}).items() if k not in READ_ONLY_DNS}
    if isinstance(old_dns, dict):
        for key in READ_ONLY_DNS:
            if key in old_dns:
                merged[key] = copy.deepcopy(old_dns[key])
    props["dnsSettings"] = merged


def _merge_ipconfigs(
    raw: object, old: Sequence[Mapping[str, Any]], allocate_ip: Callable[[], str]
) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ArmError(
            400,
            "NetworkInterfaceMustHaveAtLeastOneIpConfiguration",
            "A network interface must have at least one IP configuration.",
        )
    old_by_name = {str(c.get("name", "")).casefold(): c for c in old}
    merged: list[dict[str, Any]] = []
    names: set[str] = set()
    for index, ipconfig in enumerate(raw):
        if not isinstance(ipconfig, dict) or not isinstance(ipconfig.get("name"), str):
            raise ArmError(
                400,
                "InvalidRequestFormat",
                f"Cannot parse the request: properties.ipConfigurations[{index}] needs a name.",
            )
        name = ipconfig["name"]
        if name.casefold() in names:
            raise ArmError(
                400, "InvalidRequestFormat", f"Duplicate IP configuration name '{name}'."
            )
        names.add(name.casefold())
        ip_props = ipconfig.get("properties", {})
        if not isinstance(ip_props, dict):
            raise ArmError(400, "InvalidRequestFormat", "Cannot parse the request.")
        ip_props = {
            k: copy.deepcopy(v) for k, v in ip_props.items() if k not in READ_ONLY_IPCONFIG_PROPS
        }
        previous = old_by_name.get(name.casefold(), {}).get("properties", {})
        if not ip_props.get("privateIPAddress"):
            # A dynamic address survives a PUT that does not restate it.
            ip_props["privateIPAddress"] = previous.get("privateIPAddress") or allocate_ip()
        ip_props.setdefault("privateIPAllocationMethod", "Dynamic")
        ip_props.setdefault("privateIPAddressVersion", "IPv4")
        rest = {k: copy.deepcopy(v) for k, v in ipconfig.items() if k not in READ_ONLY_IPCONFIG}
        rest["properties"] = ip_props
        merged.append(rest)
    return merged


def _check_reference_ids(doc: Mapping[str, Any]) -> None:
    for path, rid in references(doc):
        if not rid.casefold().startswith("/subscriptions/"):
            raise ArmError(
                400,
                "LinkedInvalidPropertyId",
                f"Property id '{rid}' at path '{path}' is invalid. Expect fully qualified "
                "resource Id that start with '/subscriptions/{subscriptionId}' or "
                "'/providers/{resourceProviderNamespace}/'.",
            )
        if f".{LB_POOLS}[" in path and not ids.is_pool_id(rid):
            raise ArmError(
                400,
                "InvalidResourceReference",
                f"Resource {rid} referenced by resource at path '{path}' is not a load "
                "balancer backend address pool.",
            )
        if f".{APPGW_POOLS}[" in path and not ids.is_appgw_pool_id(rid):
            raise ArmError(
                400,
                "InvalidResourceReference",
                f"Resource {rid} referenced by resource at path '{path}' is not an application "
                "gateway backend address pool.",
            )


class NicStore:
    """All NICs of the world, keyed by id."""

    def __init__(self) -> None:
        self._nics: dict[str, Nic] = {}

    def get(self, nic_id: str) -> Nic | None:
        return self._nics.get(nic_id.casefold())

    def all(self) -> list[Nic]:
        return sorted(self._nics.values(), key=lambda nic: nic.id.casefold())

    def in_resource_group(self, resource_group: str) -> list[Nic]:
        """What the Network API lists for a resource group: no Uniform scale-set NICs."""
        return [
            nic
            for nic in self.all()
            if not nic.uniform and nic.resource_group.casefold() == resource_group.casefold()
        ]

    def under(self, parent_id: str) -> list[Nic]:
        return [nic for nic in self.all() if ids.within(nic.id, parent_id) and nic.id != parent_id]

    def of_vm(self, vm_resource_id: str) -> list[Nic]:
        """The VM's NICs, primary first, matched on virtualMachine.id case-insensitively."""
        nics = [
            nic
            for nic in self.all()
            if nic.vm_reference is not None and ids.same(nic.vm_reference, vm_resource_id)
        ]
        return sorted(nics, key=lambda nic: (not nic.primary, nic.name.casefold()))

    def find_by_name(self, name: str, resource_group: str | None = None) -> Nic | None:
        for nic in self.all():
            if nic.name.casefold() != name.casefold():
                continue
            if resource_group is None or nic.resource_group.casefold() == resource_group.casefold():
                return nic
        return None

    def add(self, doc: Mapping[str, Any], *, nic_id: str, uniform: bool = False) -> Nic:
        if nic_id.casefold() in self._nics:
            raise ControlError(409, f"NIC {nic_id} already exists")
        nic = Nic(stamp(dict(doc), nic_id, new_etag(), "Succeeded"), uniform=uniform)
        self._nics[nic_id.casefold()] = nic
        return nic

    def write(self, nic_id: str, doc: Mapping[str, Any], *, state: str) -> tuple[Nic, bool]:
        """Store a PUT's result under a new etag; returns the NIC and whether it is new."""
        existing = self.get(nic_id)
        stored_id = existing.id if existing is not None else nic_id
        stamped = stamp(dict(doc), stored_id, new_etag(), state)
        if existing is not None:
            existing.doc = stamped
            return existing, False
        nic = Nic(stamped)
        self._nics[nic_id.casefold()] = nic
        return nic, True

    def set_pools(
        self, nic: Nic, pools: Mapping[str, Sequence[str]], *, key: str = LB_POOLS
    ) -> Nic:
        """Rewrite pool membership by IP configuration name (a change made by 'someone else').

        ``key`` is the ipconfig property: load-balancer pools, or application-gateway pools.
        """
        by_name = {str(c.get("name", "")).casefold(): c for c in nic.ip_configurations}
        for name in pools:
            if name.casefold() not in by_name:
                raise ControlError(404, f"NIC {nic.name} has no IP configuration {name}")
        doc = nic.document()
        for ipconfig in doc["properties"]["ipConfigurations"]:
            wanted = pools.get(ipconfig["name"])
            if wanted is None:
                wanted = next(
                    (v for k, v in pools.items() if k.casefold() == ipconfig["name"].casefold()),
                    None,
                )
            if wanted is not None:
                ipconfig.setdefault("properties", {})[key] = [{"id": pool} for pool in wanted]
        state = str(doc["properties"].get("provisioningState", "Succeeded"))
        nic.doc = stamp(doc, nic.id, new_etag(), state)
        return nic

    def set_state(self, nic: Nic, state: str) -> None:
        nic.doc["properties"]["provisioningState"] = state
        for ipconfig in nic.doc["properties"].get("ipConfigurations", []):
            ipconfig.setdefault("properties", {})["provisioningState"] = state

    def used_ips(self) -> set[str]:
        used = set()
        for nic in self._nics.values():
            for ipconfig in nic.ip_configurations:
                address = ipconfig.get("properties", {}).get("privateIPAddress")
                if address:
                    used.add(str(address))
        return used

    def next_ip(self) -> str:
        """The first free address of the simulated 10.0.0.0/16 VNet, from 10.0.1.4 on."""
        used = self.used_ips()
        first = ipaddress.IPv4Address("10.0.1.4")
        for address in ipaddress.IPv4Network("10.0.0.0/16").hosts():
            if address < first or int(address) % 256 < 4:
                continue
            if str(address) not in used:
                return str(address)
        raise ArmError(400, "SubnetIsFull", "The simulated VNet has no free address left.")
