"""Who is behind each load-balancing rule, where they listen on loopback, how their probes stand.

It joins the world's parts: pool members (from the NICs), the VM behind each NIC, the VM's
loopback port map and the probe state of each (probe, IP configuration).

Invariants: a backend is a pool member whose NIC is attached to a VM the world knows (an
orphan NIC, like a stopped VM, has no health); every backend of a probed rule has a state in
the health book after ``sync``; a rule's health counts its pool's backends by the rule's probe,
and with ``AllProbedUp`` a pool whose backends are all down counts them all up, reason
``Up_Probe_AllDownIsUp``, as Azure reports it; every change lands in the history with the
counts of every rule the probe serves, so the log alone can be plotted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.simulator import health, ids
from sidecar.simulator.errors import ArmError
from sidecar.simulator.health import BackendKey
from sidecar.simulator.lb import ALL_PROBED_UP, LoadBalancer, Member, Probe, Rule, membership
from sidecar.simulator.times import iso8601
from sidecar.simulator.world import World


@dataclass(frozen=True)
class Target:
    """One backend as one probe sees it."""

    key: BackendKey
    lb: LoadBalancer
    probe: Probe
    member: Member
    vm: str
    port: int | None
    """The loopback port of the probe's port on the backend's VM; None: not probed."""


def key_of(lb: LoadBalancer, probe: str, member: Member) -> BackendKey:
    return (lb.child_id("probes", probe).casefold(), member.ipconfig_id.casefold())


def _vm_names(world: World) -> dict[str, str]:
    return {vm.resource_id.casefold(): vm.name for vm in world.vms.values()}


def backends(
    world: World, lb: LoadBalancer, pool: str, members: dict[str, list[Member]]
) -> list[tuple[Member, str]]:
    """(member, VM name) for each member of ``pool`` attached to a known VM."""
    names = _vm_names(world)
    found = []
    for member in members.get(lb.pool_id(pool).casefold(), []):
        vm = names.get((member.vm_reference or "").casefold())
        if vm is not None:
            found.append((member, vm))
    return found


def targets(world: World) -> dict[BackendKey, Target]:
    """Every (probe, backend) pair the load balancers probe."""
    members = membership(world.nics.all())
    found: dict[BackendKey, Target] = {}
    for lb in world.lbs.all():
        for rule in lb.rules:
            probe = lb.probe(rule.probe) if rule.probe is not None else None
            if probe is None:
                continue
            for member, vm in backends(world, lb, rule.pool, members):
                key = key_of(lb, probe.name, member)
                port = world.ports.lookup(vm, probe.port)
                found[key] = Target(key, lb, probe, member, vm, port)
    return found


def _label(target: Target) -> dict[str, Any]:
    return {
        "lb_id": target.lb.id,
        "lb": target.lb.name,
        "probe": target.probe.name,
        "backend": target.member.ipconfig_id,
        "vm": target.vm,
        "ip": target.member.address,
    }


def sync(world: World, now: float) -> dict[BackendKey, Target]:
    """Bring the health book in line with pools and port maps; log who came and went."""
    current = targets(world)
    book = world.lb_health
    wanted = ((key, t.port is not None, _label(t)) for key, t in current.items())
    fresh, gone = book.sync(wanted, now)
    for key, tracked_before in fresh:
        target = current[key]
        event = "joined" if not tracked_before else ("probed" if target.port else "unprobed")
        _log(world, _label(target), event, now)
    for label in gone:
        _log(world, label, "left", now)
    return current


def record(world: World, target: Target, ok: bool, reason: str, detail: str, now: float) -> None:
    """One probe result for ``target``; a flip is logged with every rule's counts."""
    state = world.lb_health.get(target.key)
    if state is None or not state.probed:
        return  # the backend left (or lost its port) while the probe was out
    if state.observe(ok, reason, detail, target.probe.threshold, now):
        _log(world, _label(target), state.state.lower(), now)


def _log(world: World, label: dict[str, Any], event: str, now: float) -> None:
    lb = world.lbs.get(str(label.get("lb_id", "")))
    probe_name = str(label.get("probe", ""))
    counts: dict[str, dict[str, int]] = {}
    if lb is not None:
        members = membership(world.nics.all())
        counts = {
            rule.name: rule_counts(world, lb, rule, members)
            for rule in lb.rules_using_probe(probe_name)
        }
    key = (
        (lb.child_id("probes", probe_name).casefold(), str(label.get("backend", "")).casefold())
        if lb is not None
        else None
    )
    state = world.lb_health.get(key) if key is not None else None
    world.lb_health.log(
        {
            "t": now,
            "at": iso8601(now),
            "event": event,
            **{k: v for k, v in label.items() if k != "lb_id"},
            "state": state.state if state is not None else None,
            "reason": state.reason if state is not None else None,
            "rules": counts,
        }
    )


def backend_states(
    world: World, lb: LoadBalancer, rule: Rule, members: dict[str, list[Member]]
) -> list[tuple[Member, str, health.BackendHealth | None]]:
    probe = lb.probe(rule.probe) if rule.probe is not None else None
    states = []
    for member, vm in backends(world, lb, rule.pool, members):
        state = world.lb_health.get(key_of(lb, probe.name, member)) if probe else None
        states.append((member, vm, state))
    return states


def _effective(
    states: list[tuple[Member, str, health.BackendHealth | None]], behavior: str
) -> list[tuple[str, str]]:
    """(state, reason) per backend as the rule serves traffic and reports health."""
    shown = [
        (s.state, s.reason) if s is not None else (health.DOWN, health.NOT_PROBED_YET)
        for _, _, s in states
    ]
    if behavior == ALL_PROBED_UP and shown and all(st == health.DOWN for st, _ in shown):
        return [(health.UP, health.ALL_DOWN_IS_UP)] * len(shown)
    return shown


def rule_counts(
    world: World, lb: LoadBalancer, rule: Rule, members: dict[str, list[Member]]
) -> dict[str, int]:
    states = backend_states(world, lb, rule, members)
    probe = lb.probe(rule.probe) if rule.probe is not None else None
    behavior = probe.no_healthy_backends_behavior if probe else ""
    shown = _effective(states, behavior)
    up = sum(1 for st, _ in shown if st == health.UP)
    probed = [s for _, _, s in states if s is not None and s.probed]
    return {
        "members": len(states),
        "up": up,
        "down": len(states) - up,
        "probed": len(probed),
        "probed_up": sum(1 for s in probed if s.state == health.UP),
    }


def rule_health(world: World, lb: LoadBalancer, rule: Rule) -> dict[str, Any]:
    """The body of ``loadBalancingRules/{rule}/health``: LoadBalancerHealthPerRule."""
    probe = lb.probe(rule.probe) if rule.probe is not None else None
    if probe is None:
        raise ArmError(
            400,
            "HealthStatusNotSupportedForNonProbedRule",
            f"Health status is not supported for load balancing rule "
            f"'{lb.child_id('loadBalancingRules', rule.name)}' because it has no health probe.",
        )
    states = backend_states(world, lb, rule, membership(world.nics.all()))
    shown = _effective(states, probe.no_healthy_backends_behavior)
    addresses = [
        {
            "ipAddress": member.address,
            "networkInterfaceIPConfigurationId": member.ipconfig_id,
            "state": state,
            "reason": reason,
        }
        for (member, _, _), (state, reason) in zip(states, shown, strict=True)
    ]
    up = sum(1 for a in addresses if a["state"] == health.UP)
    return {"up": up, "down": len(addresses) - up, "loadBalancerBackendAddresses": addresses}


def rule_view(
    world: World, lb: LoadBalancer, rule: Rule, members: dict[str, list[Member]]
) -> dict[str, Any]:
    """The control API's view of a rule: per backend its probe state, plus counts."""
    probe = lb.probe(rule.probe) if rule.probe is not None else None
    states = backend_states(world, lb, rule, members)
    shown = _effective(states, probe.no_healthy_backends_behavior if probe else "")
    listed = []
    for (member, vm, state), (effective, reason) in zip(states, shown, strict=True):
        entry: dict[str, Any] = {
            "backend": member.ipconfig_id,
            "nic": member.nic_name,
            "ipconfig": member.ipconfig,
            "vm": vm,
            "ip": member.address,
            "state": effective,
            "reason": reason,
            "loopback": {
                "probe_port": world.ports.lookup(vm, probe.port) if probe else None,
                "backend_port": world.ports.lookup(vm, rule.backend_port),
            },
        }
        if state is not None:
            entry["probe"] = state.to_json()
        listed.append(entry)
    return {
        **rule.to_json(),
        "id": lb.child_id("loadBalancingRules", rule.name),
        "counts": rule_counts(world, lb, rule, members),
        "backends": listed,
    }


def eligible(world: World, lb: LoadBalancer, rule: Rule) -> list[tuple[Member, str, int]]:
    """Where a new flow of ``rule`` may go: (member, VM, loopback port) of backends in the pool,
    probed up (or all of them under AllProbedUp when none is), with a loopback backend port."""
    states = backend_states(world, lb, rule, membership(world.nics.all()))
    probe = lb.probe(rule.probe) if rule.probe is not None else None
    if probe is None:
        shown = [(health.UP, "")] * len(states)
    else:
        shown = _effective(states, probe.no_healthy_backends_behavior)
    found = []
    for (member, vm, _), (state, _) in zip(states, shown, strict=True):
        port = world.ports.lookup(vm, rule.backend_port)
        if state == health.UP and port is not None:
            found.append((member, vm, port))
    return found


def find_rule(
    world: World, subscription: str, resource_group: str, lb_name: str, rule_name: str
) -> tuple[LoadBalancer, Rule] | None:
    lb = world.lbs.get(ids.lb_id(subscription, resource_group, lb_name))
    rule = lb.rule(rule_name) if lb is not None else None
    return (lb, rule) if lb is not None and rule is not None else None
