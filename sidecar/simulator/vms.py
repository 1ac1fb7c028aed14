"""Virtual machines the simulator knows, and the instance metadata IMDS shows for them.

Invariants: a VM is found by name case-insensitively; its identities (vmId, principal and
client ids, resource id) are pure functions of subscription, resource group and name, so a
restart or a reset answers the same; a compute field appears only from the api-version that
introduced it; in JSON every primitive is a string, as IMDS documents.
"""

from __future__ import annotations

import hashlib
import ipaddress
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.simulator import ids
from sidecar.simulator.errors import ControlError

UNIFORM = "Uniform"
FLEXIBLE = "Flexible"

_NAMESPACE = uuid.UUID("6f1c2a52-5c5e-4f0b-9b7a-51d0ca7e0001")


def stable_uuid(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(part.casefold() for part in parts)))


@dataclass
class Vm:
    """A VM (or scale-set instance) as compute metadata describes it."""

    name: str
    subscription_id: str
    resource_group: str
    location: str
    scale_set: str = ""
    instance_id: str = ""
    orchestration: str = ""
    vm_size: str = "Standard_D2s_v5"
    zone: str = ""
    identities: tuple[str, ...] | None = None
    tags: dict[str, str] = field(default_factory=lambda: {"env": "sim", "role": "web"})

    @property
    def key(self) -> str:
        return self.name.casefold()

    @property
    def vm_id(self) -> str:
        return stable_uuid("vm", self.subscription_id, self.resource_group, self.name)

    @property
    def principal_id(self) -> str:
        """Object id of the system-assigned identity (named in ARM's 403 messages)."""
        return stable_uuid("principal", self.subscription_id, self.resource_group, self.name)

    @property
    def client_id(self) -> str:
        return stable_uuid("client", self.subscription_id, self.resource_group, self.name)

    @property
    def resource_id(self) -> str:
        if self.orchestration == UNIFORM:
            return ids.vmss_vm_id(
                self.subscription_id, self.resource_group, self.scale_set, self.instance_id
            )
        return ids.vm_id(self.subscription_id, self.resource_group, self.name)

    @property
    def computer_name(self) -> str:
        if self.orchestration == UNIFORM and self.instance_id.isdigit():
            return f"{self.scale_set}{int(self.instance_id):06x}"
        return self.name

    @property
    def fault_domain(self) -> int:
        return _spread(self.key, "fd", 3)

    @property
    def update_domain(self) -> int:
        return _spread(self.key, "ud", 5)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "resource_group": self.resource_group,
            "resource_id": self.resource_id,
            "vm_id": self.vm_id,
            "principal_id": self.principal_id,
            "client_id": self.client_id,
            "scale_set": self.scale_set,
            "instance_id": self.instance_id,
            "orchestration": self.orchestration,
            "vm_size": self.vm_size,
            "zone": self.zone,
            "identities": list(self.identities) if self.identities is not None else None,
            "tags": dict(self.tags),
        }


def _spread(key: str, salt: str, modulus: int) -> int:
    """A stable, name-derived domain number, so VMs spread over fault and update domains."""
    return hashlib.sha256(f"{salt}:{key}".encode()).digest()[0] % modulus


def compute_metadata(vm: Vm, api_version: str) -> dict[str, Any]:
    """``/metadata/instance/compute`` for ``vm`` as of ``api_version``."""
    version = max(api_version, "2017-04-02")  # the instance endpoint began in 2017-04-02
    flexible_id = ""
    if vm.orchestration == FLEXIBLE:
        flexible_id = ids.vmss_id(vm.subscription_id, vm.resource_group, vm.scale_set)
    placement = stable_uuid("placement", vm.scale_set) if vm.scale_set else ""
    fields: list[tuple[str, str, Any]] = [
        ("2018-10-01", "azEnvironment", "AzurePublicCloud"),
        ("2021-11-01", "additionalCapabilities", {"hibernationEnabled": "false"}),
        ("2020-12-01", "evictionPolicy", ""),
        ("2021-03-01", "extendedLocation", {"type": "", "name": ""}),
        ("2021-11-15", "host", {"id": ""}),
        ("2021-11-15", "hostGroup", {"id": ""}),
        ("2020-06-01", "isHostCompatibilityLayerVm", "false"),
        ("2020-09-01", "licenseType", ""),
        ("2017-04-02", "location", vm.location),
        ("2017-04-02", "name", vm.name),
        ("2017-04-02", "offer", "0001-com-ubuntu-server-jammy"),
        (
            "2020-07-15",
            "osProfile",
            {
                "adminUsername": "azureuser",
                "computerName": vm.computer_name,
                "disablePasswordAuthentication": "true",
            },
        ),
        ("2017-04-02", "osType", "Linux"),
        ("2017-08-01", "placementGroupId", placement),
        ("2018-04-02", "plan", {"name": "", "product": "", "publisher": ""}),
        ("2017-04-02", "platformFaultDomain", str(vm.fault_domain)),
        ("2021-10-01", "platformSubFaultDomain", ""),
        ("2017-04-02", "platformUpdateDomain", str(vm.update_domain)),
        ("2020-12-01", "priority", "Regular"),
        ("2018-10-01", "provider", "Microsoft.Compute"),
        (
            "2018-04-02",
            "publicKeys",
            [
                {
                    "keyData": "ssh-ed25519 AAAAsimulated",
                    "path": "/home/azureuser/.ssh/authorized_keys",
                }
            ],
        ),
        ("2017-04-02", "publisher", "canonical"),
        ("2017-08-01", "resourceGroupName", vm.resource_group),
        ("2019-03-11", "resourceId", vm.resource_id),
        (
            "2020-06-01",
            "securityProfile",
            {"secureBootEnabled": "true", "virtualTpmEnabled": "true"},
        ),
        ("2017-04-02", "sku", "22_04-lts-gen2"),
        ("2019-06-01", "storageProfile", _storage_profile(vm)),
        ("2017-08-01", "subscriptionId", vm.subscription_id),
        ("2017-08-01", "tags", ";".join(f"{k}:{v}" for k, v in vm.tags.items())),
        ("2019-06-04", "tagsList", [{"name": k, "value": v} for k, v in vm.tags.items()]),
        ("2021-01-01", "userData", ""),
        ("2017-04-02", "version", "22.04.202501010"),
        ("2021-03-01", "virtualMachineScaleSet", {"id": flexible_id}),
        ("2017-04-02", "vmId", vm.vm_id),
        ("2017-12-01", "vmScaleSetName", vm.scale_set),
        ("2017-04-02", "vmSize", vm.vm_size),
        ("2017-12-01", "zone", vm.zone),
    ]
    return {name: value for since, name, value in fields if version >= since}


def _storage_profile(vm: Vm) -> dict[str, Any]:
    disk = f"{vm.name}_OsDisk_1"
    return {
        "dataDisks": [],
        "imageReference": {
            "id": "",
            "offer": "0001-com-ubuntu-server-jammy",
            "publisher": "canonical",
            "sku": "22_04-lts-gen2",
            "version": "latest",
        },
        "osDisk": {
            "caching": "ReadWrite",
            "createOption": "FromImage",
            "diskSizeGB": "30",
            "managedDisk": {
                "id": f"{ids.rg_id(vm.subscription_id, vm.resource_group)}"
                f"/providers/Microsoft.Compute/disks/{disk}",
                "storageAccountType": "Premium_LRS",
            },
            "name": disk,
            "osType": "Linux",
            "writeAcceleratorEnabled": "false",
        },
        "resourceDisk": {"size": "16384"},
    }


def network_metadata(nics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``/metadata/instance/network`` built from the VM's NICs as ARM stores them."""
    interfaces: list[dict[str, Any]] = []
    for nic in nics:
        props = nic.get("properties", {})
        addresses: list[dict[str, str]] = []
        subnets: list[dict[str, str]] = []
        for ipconfig in props.get("ipConfigurations", []):
            address = str(ipconfig.get("properties", {}).get("privateIPAddress", ""))
            if not address:
                continue
            addresses.append({"privateIpAddress": address, "publicIpAddress": ""})
            network = ipaddress.ip_network(f"{address}/24", strict=False)
            subnet = {"address": str(network.network_address), "prefix": "24"}
            if subnet not in subnets:
                subnets.append(subnet)
        interfaces.append(
            {
                "ipv4": {"ipAddress": addresses, "subnet": subnets},
                "ipv6": {"ipAddress": []},
                "macAddress": str(props.get("macAddress", "")).replace("-", ""),
            }
        )
    return {"interface": interfaces}


_VM_KEYS = frozenset(
    {
        "name",
        "resource_group",
        "scale_set",
        "instance_id",
        "orchestration",
        "vm_size",
        "zone",
        "identities",
        "tags",
        "nic",
        "pools",
    }
)


def parse_vm(body: object, *, subscription_id: str, resource_group: str, location: str) -> Vm:
    """Validate a control-API VM object (``nic``/``pools`` are read by the caller)."""
    if not isinstance(body, dict):
        raise ControlError(400, "a VM must be a JSON object")
    unknown = sorted(set(body) - _VM_KEYS)
    if unknown:
        raise ControlError(400, f"unknown VM fields: {', '.join(unknown)}")
    scale_set = _string(body, "scale_set", "")
    instance_id = _string(body, "instance_id", "")
    orchestration = _string(body, "orchestration", UNIFORM if scale_set else "")
    if scale_set:
        if orchestration not in (UNIFORM, FLEXIBLE):
            raise ControlError(400, "'orchestration' must be 'Uniform' or 'Flexible'")
        if not instance_id:
            raise ControlError(400, "a scale-set VM needs 'instance_id'")
        derived = f"{scale_set}_{instance_id}"
        name = _string(body, "name", derived)
        if name.casefold() != derived.casefold():
            raise ControlError(400, f"a scale-set instance is named {derived!r} in IMDS")
    else:
        if orchestration or instance_id:
            raise ControlError(400, "'orchestration'/'instance_id' need 'scale_set'")
        name = _string(body, "name", "")
    if not name or "/" in name:
        raise ControlError(400, "'name' is required and cannot contain '/'")
    identities = body.get("identities")
    if identities is not None and (
        not isinstance(identities, list) or not all(isinstance(i, str) for i in identities)
    ):
        raise ControlError(400, "'identities' must be a list of client ids or null")
    tags = body.get("tags", {"env": "sim", "role": "web"})
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise ControlError(400, "'tags' must map names to strings")
    return Vm(
        name=name,
        subscription_id=subscription_id,
        resource_group=_string(body, "resource_group", resource_group),
        location=location,
        scale_set=scale_set,
        instance_id=instance_id,
        orchestration=orchestration,
        vm_size=_string(body, "vm_size", "Standard_D2s_v5"),
        zone=_string(body, "zone", ""),
        identities=tuple(identities) if identities is not None else None,
        tags=dict(tags),
    )


def _string(body: Mapping[str, Any], key: str, default: str) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise ControlError(400, f"'{key}' must be a string")
    return value
