"""Which endpoint a request path names, and the request *kind* used for counting and faults.

Invariant: one function per side maps a path to a route and one maps (route, method) to a
kind, so request counts, fault targets and handlers agree on names. ARM paths match
case-insensitively (ARM does); IMDS paths are matched exactly as documented, except the 2016
preview's ``v1/maintenance`` and ``v1/InstanceInfo``, which old scripts spell either way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

CONTROL_PREFIX = "/control"

_IMDS = re.compile(r"^(?:/vms/(?P<vm>[^/]+))?/metadata(?P<rest>/.*)?$")


@dataclass(frozen=True)
class ImdsRoute:
    vm: str | None
    endpoint: str
    subpath: tuple[str, ...] = ()


def match_imds(path: str) -> ImdsRoute | None:
    """``None`` when the path is not under ``[/vms/{vm}]/metadata`` at all."""
    match = _IMDS.match(path)
    if match is None:
        return None
    vm = match.group("vm")
    rest = [part for part in (match.group("rest") or "").split("/") if part]
    if rest == ["scheduledevents"]:
        return ImdsRoute(vm, "scheduledevents")
    if rest and rest[0] == "instance":
        return ImdsRoute(vm, "instance", tuple(rest[1:]))
    if rest == ["identity", "oauth2", "token"]:
        return ImdsRoute(vm, "token")
    if rest == ["versions"]:
        return ImdsRoute(vm, "versions")
    legacy = [part.casefold() for part in rest]
    if legacy in (["v1", "maintenance"], ["v1", "instanceinfo"]):
        return ImdsRoute(vm, legacy[1])
    return ImdsRoute(vm, "unknown", tuple(rest))


def imds_kind(route: ImdsRoute | None, method: str) -> str:
    if route is None:
        return "imds-unknown"
    if route.endpoint == "scheduledevents":
        return "approve" if method == "POST" else "scheduledevents"
    if route.endpoint == "instance":
        return "compute" if route.subpath[:1] == ("compute",) else "instance"
    if route.endpoint in ("token", "versions", "maintenance", "instanceinfo"):
        return route.endpoint
    return "imds-unknown"


_RG = r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)"
_VMSS_VM = (
    _RG + r"/providers/Microsoft\.Compute/virtualMachineScaleSets/(?P<vmss>[^/]+)"
    r"/virtualMachines/(?P<instance>[^/]+)/networkInterfaces"
)
_LB = _RG + r"/providers/Microsoft\.Network/loadBalancers/(?P<lb>[^/]+)"
_LB_CHILD = r"/(?P<child>backendAddressPools|loadBalancingRules|probes)"
_ARM_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE))
    for name, pattern in (
        ("nic-list", _RG + r"/providers/Microsoft\.Network/networkInterfaces/?$"),
        ("nic", _RG + r"/providers/Microsoft\.Network/networkInterfaces/(?P<nic>[^/]+)/?$"),
        (
            "nic-list-all",
            r"^/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Network/networkInterfaces/?$",
        ),
        ("vmss-nic-list", _VMSS_VM + r"/?$"),
        ("vmss-nic", _VMSS_VM + r"/(?P<nic>[^/]+)/?$"),
        (
            "operation",
            r"^/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Network/locations/"
            r"(?P<location>[^/]+)/operations/(?P<operation>[^/]+)/?$",
        ),
        (
            "operation-result",
            r"^/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Network/locations/"
            r"(?P<location>[^/]+)/operationResults/(?P<operation>[^/]+)/?$",
        ),
        ("lb-list", _RG + r"/providers/Microsoft\.Network/loadBalancers/?$"),
        (
            "lb-list-all",
            r"^/subscriptions/(?P<sub>[^/]+)/providers/Microsoft\.Network/loadBalancers/?$",
        ),
        ("lb", _LB + r"/?$"),
        ("lb-child-list", _LB + _LB_CHILD + r"/?$"),
        ("lb-child", _LB + _LB_CHILD + r"/(?P<name>[^/]+)/?$"),
        ("lb-rule-health", _LB + r"/loadBalancingRules/(?P<name>[^/]+)/health/?$"),
    )
)


@dataclass(frozen=True)
class ArmRoute:
    name: str
    params: Mapping[str, str] = field(default_factory=dict)


def match_arm(path: str) -> ArmRoute | None:
    for name, pattern in _ARM_PATTERNS:
        match = pattern.match(path)
        if match:
            return ArmRoute(name, match.groupdict())
    return None


def arm_kind(route: ArmRoute | None, method: str) -> str:
    if route is None:
        return "arm-unknown"
    if route.name in ("nic-list", "nic-list-all", "vmss-nic-list"):
        return "arm-list"
    if route.name in ("nic", "vmss-nic"):
        return "arm-put" if method == "PUT" else "arm-get"
    if route.name == "lb-rule-health":
        return "arm-lb-health"
    if route.name.startswith("lb"):
        return "arm-lb-get"
    return "arm-operation"
