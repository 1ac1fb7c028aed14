"""Load balancers as ARM stores them: frontends, backend pools, health probes, rules.

Invariants: names compare case-insensitively; a pool's members (its read-only
``backendIPConfigurations``) are never stored, only derived from the NIC IP configurations whose
``loadBalancerBackendAddressPools`` reference it, as Azure derives them; a rule names a pool, a
frontend and (optionally) a probe of its own load balancer; every change gives the load
balancer a new etag, which all its children carry, as ARM does.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.simulator import ids
from sidecar.simulator.errors import ControlError
from sidecar.simulator.network import LB_POOLS, Nic, new_etag

LB_TYPE = "Microsoft.Network/loadBalancers"
PROBE_PROTOCOLS = ("Http", "Https", "Tcp")
ALL_PROBED_DOWN = "AllProbedDown"
ALL_PROBED_UP = "AllProbedUp"
NO_HEALTHY_BEHAVIORS = (ALL_PROBED_DOWN, ALL_PROBED_UP)
MIN_INTERVAL = 0.05
"""The smallest probe interval the control API takes (Azure's minimum is 5 s; tests go faster)."""


@dataclass
class Probe:
    name: str
    port: int
    protocol: str = "Http"
    path: str | None = "/"
    interval: float = 5.0
    threshold: int = 2
    no_healthy_backends_behavior: str = ALL_PROBED_DOWN

    @property
    def timeout(self) -> float:
        """An HTTP probe fails without an answer within min(interval, 30 s)."""
        return min(self.interval, 30.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "port": self.port,
            "path": self.path,
            "interval": self.interval,
            "threshold": self.threshold,
            "no_healthy_backends_behavior": self.no_healthy_backends_behavior,
        }


@dataclass
class Rule:
    name: str
    frontend: str
    frontend_port: int
    backend_port: int
    pool: str
    probe: str | None
    protocol: str = "Tcp"
    idle_timeout_minutes: int = 4
    listen: int | None = None
    """Loopback frontend: None = none, 0 = an ephemeral port, N = port N on 127.0.0.1."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "frontend": self.frontend,
            "frontend_port": self.frontend_port,
            "backend_port": self.backend_port,
            "pool": self.pool,
            "probe": self.probe,
            "protocol": self.protocol,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "listen": self.listen,
        }


@dataclass(frozen=True)
class Member:
    """One NIC IP configuration in a pool."""

    ipconfig_id: str
    nic_id: str
    nic_name: str
    ipconfig: str
    address: str
    vm_reference: str | None


@dataclass
class LoadBalancer:
    name: str
    subscription: str
    resource_group: str
    location: str
    frontends: list[str] = field(default_factory=lambda: ["frontend"])
    pools: list[str] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    etag: str = field(default_factory=new_etag)
    resource_guid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def id(self) -> str:
        return ids.lb_id(self.subscription, self.resource_group, self.name)

    def child_id(self, kind: str, name: str) -> str:
        return f"{self.id}/{kind}/{name}"

    def pool_id(self, pool: str) -> str:
        return self.child_id("backendAddressPools", pool)

    def touch(self) -> None:
        self.etag = new_etag()

    def pool(self, name: str) -> str | None:
        return next((p for p in self.pools if p.casefold() == name.casefold()), None)

    def probe(self, name: str) -> Probe | None:
        return next((p for p in self.probes if p.name.casefold() == name.casefold()), None)

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name.casefold() == name.casefold()), None)

    def frontend(self, name: str) -> str | None:
        return next((f for f in self.frontends if f.casefold() == name.casefold()), None)

    def rules_using_probe(self, probe: str) -> list[Rule]:
        return [
            r for r in self.rules if r.probe is not None and r.probe.casefold() == probe.casefold()
        ]


def membership(nics: Iterable[Nic]) -> dict[str, list[Member]]:
    """Load-balancer pool id (casefolded) -> the IP configurations that reference it."""
    members: dict[str, list[Member]] = {}
    for nic in nics:
        for ipconfig in nic.ip_configurations:
            props = ipconfig.get("properties", {})
            name = str(ipconfig.get("name", ""))
            member = Member(
                ipconfig_id=f"{nic.id}/ipConfigurations/{name}",
                nic_id=nic.id,
                nic_name=nic.name,
                ipconfig=name,
                address=str(props.get("privateIPAddress", "")),
                vm_reference=nic.vm_reference,
            )
            seen: set[str] = set()
            for ref in props.get(LB_POOLS) or []:
                if isinstance(ref, dict) and isinstance(ref.get("id"), str):
                    key = ref["id"].casefold()
                    if key not in seen:
                        seen.add(key)
                        members.setdefault(key, []).append(member)
    return members


class LoadBalancerStore:
    """The world's load balancers, keyed by id."""

    def __init__(self) -> None:
        self._lbs: dict[str, LoadBalancer] = {}

    def add(self, lb: LoadBalancer) -> LoadBalancer:
        if lb.id.casefold() in self._lbs:
            raise ControlError(409, f"load balancer {lb.name} already exists")
        self._lbs[lb.id.casefold()] = lb
        return lb

    def get(self, lb_id: str) -> LoadBalancer | None:
        return self._lbs.get(lb_id.casefold())

    def all(self) -> list[LoadBalancer]:
        return sorted(self._lbs.values(), key=lambda lb: lb.id.casefold())

    def find(self, name: str, resource_group: str | None = None) -> LoadBalancer | None:
        for lb in self.all():
            if lb.name.casefold() != name.casefold():
                continue
            if resource_group is None or lb.resource_group.casefold() == resource_group.casefold():
                return lb
        return None

    def in_resource_group(self, resource_group: str) -> list[LoadBalancer]:
        return [
            lb for lb in self.all() if lb.resource_group.casefold() == resource_group.casefold()
        ]


# ARM documents -------------------------------------------------------------------------------


def _ref(resource_id: str) -> dict[str, str]:
    return {"id": resource_id}


def _child(lb: LoadBalancer, kind: str, name: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "id": lb.child_id(kind, name),
        "etag": lb.etag,
        "type": f"{LB_TYPE}/{kind}",
        "properties": {"provisioningState": "Succeeded", **props},
    }


def frontend_document(lb: LoadBalancer, frontend: str) -> dict[str, Any]:
    rules = [
        lb.child_id("loadBalancingRules", r.name)
        for r in lb.rules
        if ids.same(r.frontend, frontend)
    ]
    pip = ids.network_id(
        lb.subscription, lb.resource_group, "publicIPAddresses", f"{lb.name}-{frontend}-pip"
    )
    return _child(
        lb,
        "frontendIPConfigurations",
        frontend,
        {
            "privateIPAllocationMethod": "Dynamic",
            "publicIPAddress": _ref(pip),
            "loadBalancingRules": [_ref(r) for r in rules],
        },
    )


def pool_document(
    lb: LoadBalancer, pool: str, members: Mapping[str, list[Member]]
) -> dict[str, Any]:
    """With the read-only ``backendIPConfigurations`` and ``loadBalancingRules`` references."""
    in_pool = members.get(lb.pool_id(pool).casefold(), [])
    rules = [lb.child_id("loadBalancingRules", r.name) for r in lb.rules if ids.same(r.pool, pool)]
    return _child(
        lb,
        "backendAddressPools",
        pool,
        {
            "backendIPConfigurations": [_ref(m.ipconfig_id) for m in in_pool],
            "loadBalancingRules": [_ref(r) for r in rules],
        },
    )


def rule_document(lb: LoadBalancer, rule: Rule) -> dict[str, Any]:
    pool = _ref(lb.pool_id(rule.pool))
    props: dict[str, Any] = {
        "frontendIPConfiguration": _ref(lb.child_id("frontendIPConfigurations", rule.frontend)),
        "frontendPort": rule.frontend_port,
        "backendPort": rule.backend_port,
        "enableFloatingIP": False,
        "idleTimeoutInMinutes": rule.idle_timeout_minutes,
        "protocol": rule.protocol,
        "enableTcpReset": False,
        "loadDistribution": "Default",
        "disableOutboundSnat": False,
        "backendAddressPool": pool,
        "backendAddressPools": [pool],
    }
    if rule.probe is not None:
        props["probe"] = _ref(lb.child_id("probes", rule.probe))
    return _child(lb, "loadBalancingRules", rule.name, props)


def probe_document(lb: LoadBalancer, probe: Probe) -> dict[str, Any]:
    props: dict[str, Any] = {
        "protocol": probe.protocol,
        "port": probe.port,
        # ARM holds whole seconds; a fractional test interval is shown rounded up.
        "intervalInSeconds": max(1, math.ceil(probe.interval)),
        "numberOfProbes": probe.threshold,
        "probeThreshold": probe.threshold,
        "noHealthyBackendsBehavior": probe.no_healthy_backends_behavior,
        "loadBalancingRules": [
            _ref(lb.child_id("loadBalancingRules", r.name))
            for r in lb.rules_using_probe(probe.name)
        ],
    }
    if probe.protocol != "Tcp" and probe.path is not None:
        props["requestPath"] = probe.path
    return _child(lb, "probes", probe.name, props)


def nat_rule_documents(lb: LoadBalancer, nics: Iterable[Nic]) -> list[dict[str, Any]]:
    """Inbound NAT rules, derived from the NICs that reference them (SSH to each VM)."""
    prefix = (lb.id + "/inboundNatRules/").casefold()
    found: dict[str, tuple[str, str]] = {}
    for nic in nics:
        for ipconfig in nic.ip_configurations:
            for ref in ipconfig.get("properties", {}).get("loadBalancerInboundNatRules") or []:
                rid = ref.get("id") if isinstance(ref, dict) else None
                if isinstance(rid, str) and rid.casefold().startswith(prefix):
                    name = ids.last_segment(rid)
                    found.setdefault(
                        name.casefold(), (name, f"{nic.id}/ipConfigurations/{ipconfig.get('name')}")
                    )
    documents = []
    for index, (name, ipconfig_id) in enumerate(sorted(found.values())):
        frontend = lb.frontends[0] if lb.frontends else "frontend"
        documents.append(
            _child(
                lb,
                "inboundNatRules",
                name,
                {
                    "frontendIPConfiguration": _ref(
                        lb.child_id("frontendIPConfigurations", frontend)
                    ),
                    "frontendPort": 50000 + index,
                    "backendPort": 22,
                    "protocol": "Tcp",
                    "enableFloatingIP": False,
                    "idleTimeoutInMinutes": 4,
                    "enableTcpReset": False,
                    "backendIPConfiguration": _ref(ipconfig_id),
                },
            )
        )
    return documents


def lb_document(lb: LoadBalancer, nics: list[Nic]) -> dict[str, Any]:
    members = membership(nics)
    return {
        "name": lb.name,
        "id": lb.id,
        "etag": lb.etag,
        "type": LB_TYPE,
        "location": lb.location,
        "tags": {},
        "sku": {"name": "Standard", "tier": "Regional"},
        "properties": {
            "provisioningState": "Succeeded",
            "resourceGuid": lb.resource_guid,
            "frontendIPConfigurations": [frontend_document(lb, f) for f in lb.frontends],
            "backendAddressPools": [pool_document(lb, p, members) for p in lb.pools],
            "loadBalancingRules": [rule_document(lb, r) for r in lb.rules],
            "probes": [probe_document(lb, p) for p in lb.probes],
            "inboundNatRules": nat_rule_documents(lb, nics),
            "outboundRules": [],
            "inboundNatPools": [],
        },
    }


# Control-API specs -----------------------------------------------------------------------------


def _name(body: Mapping[str, Any], what: str) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ControlError(400, f"a {what} needs a 'name' without '/'")
    return name


def _int(body: Mapping[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ControlError(400, f"'{key}' must be an integer from {low} to {high}")
    return value


def _check_keys(body: object, allowed: frozenset[str], what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ControlError(400, f"a {what} must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ControlError(400, f"unknown {what} fields: {', '.join(unknown)}")
    return body


_PROBE_KEYS = frozenset(
    {"name", "protocol", "port", "path", "interval", "threshold", "no_healthy_backends_behavior"}
)


def apply_probe(probe: Probe, body: Mapping[str, Any]) -> Probe:
    """Change ``probe`` by the given fields (all validated before any is applied)."""
    protocol = body.get("protocol", probe.protocol)
    if protocol not in PROBE_PROTOCOLS:
        raise ControlError(400, f"'protocol' must be one of {', '.join(PROBE_PROTOCOLS)}")
    port = _int(body, "port", 1, 65535, probe.port)
    path = body.get("path", probe.path if protocol != "Tcp" else None)
    if protocol != "Tcp" and (not isinstance(path, str) or not path.startswith("/")):
        raise ControlError(400, "an Http(s) probe needs a 'path' starting with '/'")
    interval = body.get("interval", probe.interval)
    valid = isinstance(interval, int | float) and not isinstance(interval, bool)
    if not valid or not math.isfinite(interval) or interval < MIN_INTERVAL:
        raise ControlError(400, f"'interval' must be a number of seconds, at least {MIN_INTERVAL}")
    threshold = _int(body, "threshold", 1, 100, probe.threshold)
    behavior = body.get("no_healthy_backends_behavior", probe.no_healthy_backends_behavior)
    if behavior not in NO_HEALTHY_BEHAVIORS:
        raise ControlError(
            400, f"'no_healthy_backends_behavior' must be one of {', '.join(NO_HEALTHY_BEHAVIORS)}"
        )
    probe.protocol, probe.port, probe.path = protocol, port, path if protocol != "Tcp" else None
    probe.interval, probe.threshold = float(interval), threshold
    probe.no_healthy_backends_behavior = behavior
    return probe


def parse_probe(body: object) -> Probe:
    spec = _check_keys(body, _PROBE_KEYS, "probe")
    if "port" not in spec:
        raise ControlError(400, "a probe needs a 'port'")
    return apply_probe(Probe(_name(spec, "probe"), port=1), spec)


_RULE_KEYS = frozenset(
    {"name", "frontend", "frontend_port", "backend_port", "pool", "probe", "protocol", "listen"}
)


def apply_rule(lb: LoadBalancer, rule: Rule, body: Mapping[str, Any]) -> Rule:
    """Change ``rule`` by the given fields; pool, probe and frontend must exist in ``lb``."""
    frontend_port = _int(body, "frontend_port", 1, 65535, rule.frontend_port)
    backend_port = _int(body, "backend_port", 1, 65535, rule.backend_port)
    pool = body.get("pool", rule.pool)
    if not isinstance(pool, str) or lb.pool(pool) is None:
        raise ControlError(400, f"'pool' must name a backend pool of {lb.name}")
    probe = body.get("probe", rule.probe)
    if probe is not None and (not isinstance(probe, str) or lb.probe(probe) is None):
        raise ControlError(400, f"'probe' must name a probe of {lb.name}, or be null")
    frontend = body.get("frontend", rule.frontend)
    if not isinstance(frontend, str) or lb.frontend(frontend) is None:
        raise ControlError(400, f"'frontend' must name a frontend of {lb.name}")
    protocol = body.get("protocol", rule.protocol)
    if protocol != "Tcp":
        raise ControlError(400, "only 'Tcp' rules are simulated")
    listen = body.get("listen", rule.listen)
    if listen is not None:
        listen = _int(body, "listen", 0, 65535, listen)
    rule.frontend_port, rule.backend_port = frontend_port, backend_port
    rule.pool = lb.pool(pool) or pool
    found = lb.probe(probe) if probe is not None else None
    rule.probe = found.name if found is not None else None
    rule.frontend = lb.frontend(frontend) or frontend
    rule.protocol, rule.listen = protocol, listen
    return rule


def parse_rule(lb: LoadBalancer, body: object) -> Rule:
    spec = _check_keys(body, _RULE_KEYS, "rule")
    if "frontend_port" not in spec or "pool" not in spec:
        raise ControlError(400, "a rule needs 'frontend_port' and 'pool'")
    port = spec["frontend_port"]
    first = lb.frontends[0] if lb.frontends else ""
    draft = Rule(_name(spec, "rule"), first, 1, 1, "", None)
    if isinstance(port, int) and "backend_port" not in spec:
        spec = {**spec, "backend_port": port}
    return apply_rule(lb, draft, spec)


_LB_KEYS = frozenset({"name", "resource_group", "frontends", "pools", "probes", "rules"})


def _names(body: Mapping[str, Any], key: str, default: list[str]) -> list[str]:
    value = body.get(key, default)
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v and "/" not in v for v in value
    ):
        raise ControlError(400, f"'{key}' must be a list of names")
    if len({v.casefold() for v in value}) != len(value):
        raise ControlError(400, f"duplicate names in '{key}'")
    return list(value)


def parse_load_balancer(
    body: object, *, subscription: str, resource_group: str, location: str
) -> LoadBalancer:
    """``{"name", "resource_group"?, "frontends"?, "pools"?, "probes"?, "rules"?}``."""
    spec = _check_keys(body, _LB_KEYS, "load balancer")
    rg = spec.get("resource_group", resource_group)
    if not isinstance(rg, str) or not rg:
        raise ControlError(400, "'resource_group' must be a string")
    lb = LoadBalancer(
        _name(spec, "load balancer"),
        subscription,
        rg,
        location,
        frontends=_names(spec, "frontends", ["frontend"]),
        pools=_names(spec, "pools", []),
    )
    if not lb.frontends:
        raise ControlError(400, "a load balancer needs at least one frontend")
    for key, parse in (("probes", parse_probe), ("rules", None)):
        items = spec.get(key, [])
        if not isinstance(items, list):
            raise ControlError(400, f"'{key}' must be a list")
        for item in items:
            if parse is not None:
                add_probe(lb, parse(item))
            else:
                add_rule(lb, parse_rule(lb, item))
    return lb


def add_pool(lb: LoadBalancer, name: str) -> str:
    if not name or "/" in name:
        raise ControlError(400, "a pool needs a 'name' without '/'")
    if lb.pool(name) is not None:
        raise ControlError(409, f"{lb.name} already has a pool {name}")
    lb.pools.append(name)
    lb.touch()
    return name


def add_probe(lb: LoadBalancer, probe: Probe) -> Probe:
    if lb.probe(probe.name) is not None:
        raise ControlError(409, f"{lb.name} already has a probe {probe.name}")
    lb.probes.append(probe)
    lb.touch()
    return probe


def add_rule(lb: LoadBalancer, rule: Rule) -> Rule:
    if lb.rule(rule.name) is not None:
        raise ControlError(409, f"{lb.name} already has a rule {rule.name}")
    lb.rules.append(rule)
    lb.touch()
    return rule
