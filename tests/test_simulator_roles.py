"""The project's custom role, enforced as an allow-list: every ARM call the sidecar makes (and
the load-balancer reads its capacity guard makes) succeeds with ``configs/azure/role.json``,
and each action of the role is needed: without it one of those calls gets ARM's 403."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.network.aio import NetworkManagementClient

from sidecar.simulator.roles import RoleDefinition, parse_role
from tests.lb_helpers import CLEAN_ENV, RG, SUB, run_with_client
from tests.simulator_helpers import RunningSimulator, quick_options

ROLE = json.loads((Path(__file__).parent.parent / "configs/azure/role.json").read_text())


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    with pytest.MonkeyPatch.context() as patch:
        for name in CLEAN_ENV:
            patch.delenv(name, raising=False)
        with RunningSimulator(quick_options()) as running:
            patch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", running.urls.imds_url)
            yield running


def prepare(sim: RunningSimulator, role: dict[str, Any] | None) -> None:
    """A fresh world whose NIC links every kind of resource, then the role (None: allow all)."""
    assert sim.control("POST", "/reset").status == 200
    sim.control("PATCH", "/settings", {"arm_retry_after": 0.05})
    sim.control("PUT", "/nics/web-1-nic/appgw-pools", {"pools": ["pool-app"]})
    if role is None:
        sim.control("DELETE", "/permissions")
    else:
        assert sim.control("PUT", "/permissions", {"role": role}).status == 200


async def sidecar_calls(client: NetworkManagementClient) -> list[str]:
    """What the sidecar does in a drain with pool removal, and what its capacity guard reads."""
    done = []
    ours = [nic async for nic in client.network_interfaces.list(RG) if nic.name == "web-1-nic"]
    done.append("list NICs")
    nic = await client.network_interfaces.get(RG, ours[0].name)
    done.append("get NIC")

    config = nic.ip_configurations[0]
    lb_pools = list(config.load_balancer_backend_address_pools)
    appgw_pools = list(config.application_gateway_backend_address_pools)
    config.load_balancer_backend_address_pools = lb_pools[:1]  # a partial removal
    config.application_gateway_backend_address_pools = []
    poller = await client.network_interfaces.begin_create_or_update(
        RG, nic.name, nic, headers={"If-Match": nic.etag}
    )
    await poller.result()
    done.append("PUT without pools, polled")

    nic = await client.network_interfaces.get(RG, nic.name)
    nic.ip_configurations[0].load_balancer_backend_address_pools = lb_pools
    nic.ip_configurations[0].application_gateway_backend_address_pools = appgw_pools
    poller = await client.network_interfaces.begin_create_or_update(
        RG, nic.name, nic, headers={"If-Match": nic.etag}
    )
    await poller.result()
    done.append("PUT with pools back, polled")

    pool = await client.load_balancer_backend_address_pools.get(RG, "lb-web", "pool-http")
    rule = pool.load_balancing_rules[0].id.rsplit("/", 1)[1]  # the rules that use the pool
    done.append("pool and its rules")
    health = await client.load_balancer_load_balancing_rules.begin_health(RG, "lb-web", rule)
    await health.result()
    done.append("rule health")
    return done


def run(sim: RunningSimulator) -> list[str]:
    result: list[str] = run_with_client(sim.urls.arm_url, sim.urls.ca_file, sidecar_calls)
    return result


ALL_CALLS = [
    "list NICs",
    "get NIC",
    "PUT without pools, polled",
    "PUT with pools back, polled",
    "pool and its rules",
    "rule health",
]


def test_the_role_allows_every_call(sim: RunningSimulator) -> None:
    prepare(sim, ROLE)
    assert run(sim) == ALL_CALLS
    nic = next(n for n in sim.control("GET", "/nics").json() if n["name"] == "web-1-nic")
    assert len(nic["ip_configurations"][0]["pools"]) == 2
    assert len(nic["ip_configurations"][0]["appgw_pools"]) == 1
    assert (
        sim.control("GET", "/permissions").json()["assignments"][0]["role"]["Actions"]
        == ROLE["Actions"]
    )


def test_an_empty_role_refuses_even_the_first_call(sim: RunningSimulator) -> None:
    prepare(sim, {**ROLE, "Actions": []})
    with pytest.raises(HttpResponseError) as caught:
        run(sim)
    assert caught.value.status_code == 403
    assert "Microsoft.Network/networkInterfaces/read" in caught.value.message


@pytest.mark.parametrize("action", ROLE["Actions"])
def test_every_action_is_needed(sim: RunningSimulator, action: str) -> None:
    prepare(sim, {**ROLE, "Actions": [a for a in ROLE["Actions"] if a != action]})
    with pytest.raises(HttpResponseError) as caught:
        run(sim)
    error = caught.value
    assert error.status_code == 403, error
    assert error.error is not None
    assert error.error.code in ("AuthorizationFailed", "LinkedAuthorizationFailed")
    assert (
        f"'{action}'" in error.message
        or f",{action}'" in error.message
        or (f"'{action}," in error.message)
    ), error.message


def test_role_matching_is_azures() -> None:
    role = RoleDefinition(
        "r", ("Microsoft.Network/*/read", "microsoft.network/loadbalancers/*"), ("*/delete",)
    )
    assert role.allows("Microsoft.Network/networkInterfaces/read")
    assert role.allows("Microsoft.Network/virtualNetworks/subnets/read")  # '*' crosses '/'
    assert role.allows("Microsoft.Network/loadBalancers/backendAddressPools/join/action")
    assert not role.allows("Microsoft.Network/loadBalancers/delete")  # NotActions win
    assert not role.allows("Microsoft.Network/networkInterfaces/write")
    arm_form = {
        "properties": {
            "roleName": "Network Reader",
            "permissions": [{"actions": ["*/read"], "notActions": []}],
        }
    }
    assert parse_role(arm_form).allows("Microsoft.Network/loadBalancers/read")


def test_an_assignment_has_a_scope_and_may_name_a_vm(sim: RunningSimulator) -> None:
    prepare(sim, None)
    nic_scope = (
        f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/"
        "networkInterfaces/other-vm-nic"
    )
    body = {"role": {"Actions": ["*/read"]}, "scope": nic_scope, "vm": "web-1"}
    assert sim.control("PUT", "/permissions", body).status == 200

    async def reads(client: NetworkManagementClient) -> tuple[str, int]:
        other = await client.network_interfaces.get(RG, "other-vm-nic")
        try:
            await client.network_interfaces.get(RG, "web-1-nic")
        except HttpResponseError as error:
            return str(other.name), int(error.status_code or 0)
        return str(other.name), 200

    assert run_with_client(sim.urls.arm_url, sim.urls.ca_file, reads) == ("other-vm-nic", 403)
    bad = sim.control("PUT", "/permissions", {"role": {"Name": "no actions"}})
    assert bad.status == 400
