"""The fleet decisions, pure: who may leave under the capacity guard, who is still in rotation.

The property that makes the guard safe without sidecars talking to each other: VMs that read
the same rule health never let more of themselves go than the rule can spare.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.arm_model import Backend, RuleHealth
from sidecar.fleet import Minimum, guard_verdict, peers_out

NETWORK = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network"
RULE = f"{NETWORK}/loadBalancers/lb/loadBalancingRules/http"


def config(name: str) -> str:
    return f"{NETWORK}/networkInterfaces/{name}-nic/ipConfigurations/ipconfig1"


def rule(up: dict[str, bool]) -> RuleHealth:
    backends = tuple(Backend(config(vm), "10.0.0.1", state) for vm, state in up.items())
    return RuleHealth(RULE, sum(up.values()), len(up) - sum(up.values()), backends)


NAMES = {config(f"vm-{i}").casefold(): f"vm-{i}" for i in range(20)}


def may_leave(health: RuleHealth, me: str, named: list[str], minimum: Minimum) -> bool:
    verdicts = guard_verdict([health], NAMES, me, [config(me)], named, minimum)
    return all(v.allows for v in verdicts)


def test_the_first_named_vms_take_the_free_places() -> None:
    health = rule({f"vm-{i}": True for i in range(5)})
    named = ["vm-0", "vm-1", "vm-2"]
    allowed = [vm for vm in named if may_leave(health, vm, named, Minimum(count=3))]
    assert allowed == ["vm-0", "vm-1"]  # 5 up, minimum 3: two places, by name


def test_a_vm_already_down_costs_nothing_to_leave() -> None:
    health = rule({"vm-0": False, "vm-1": True, "vm-2": True})
    assert may_leave(health, "vm-0", ["vm-0"], Minimum(count=2))


def test_a_percentage_minimum_rounds_up() -> None:
    health = rule({f"vm-{i}": True for i in range(4)})
    assert Minimum(percent=50).of(4) == 2 and Minimum(percent=51).of(4) == 3
    assert [
        vm
        for vm in ("vm-0", "vm-1", "vm-2")
        if may_leave(health, vm, ["vm-0", "vm-1", "vm-2"], Minimum(percent=51))
    ] == ["vm-0"]


def test_a_stale_read_only_makes_vms_wait() -> None:
    """vm-0 and vm-1 left, but the health still shows them up: vm-2 must not go too."""
    stale = rule({f"vm-{i}": True for i in range(5)})
    assert not may_leave(stale, "vm-2", ["vm-0", "vm-1", "vm-2"], Minimum(count=3))


def test_peers_out_lists_who_is_still_in_rotation() -> None:
    health = rule({"vm-0": False, "vm-1": True, "vm-2": False})
    assert peers_out([health], NAMES, ["vm-0", "vm-1"]) == ["vm-1"]
    assert peers_out([health], NAMES, ["vm-0", "vm-2", "vm-9"]) == [], "unknown VMs are not in"


@settings(max_examples=500, deadline=None)
@given(
    states=st.lists(st.booleans(), min_size=1, max_size=12),
    named_mask=st.lists(st.booleans(), min_size=12, max_size=12),
    minimum=st.one_of(
        st.integers(0, 12).map(lambda n: Minimum(count=n)),
        st.integers(0, 100).map(lambda p: Minimum(percent=p)),
    ),
)
def test_vms_reading_the_same_health_never_take_more_than_the_spare(
    states: list[bool], named_mask: list[bool], minimum: Minimum
) -> None:
    vms = [f"vm-{i}" for i in range(len(states))]
    health = rule(dict(zip(vms, states, strict=True)))
    named = [vm for vm, chosen in zip(vms, named_mask, strict=False) if chosen]
    leaving_up = [
        vm
        for vm, up in zip(vms, states, strict=True)
        if up and vm in named and may_leave(health, vm, named, minimum)
    ]
    spare = max(0, health.up - minimum.of(len(vms)))
    assert len(leaving_up) <= spare
    if spare > 0:  # and the guard is not stingier than it must be
        named_up = [vm for vm in named if states[vms.index(vm)]]
        assert len(leaving_up) == min(spare, len(named_up))
