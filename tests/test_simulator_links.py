"""What a NIC PUT links and what ARM checks for it: every linked resource in the body needs its
join action (not only the links the PUT adds), and application-gateway backend pools are links
like load-balancer pools. Driven with the real SDK a sidecar uses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.mgmt.network.aio import NetworkManagementClient

from tests.lb_helpers import CLEAN_ENV, RG, SUB, run_with_client
from tests.simulator_helpers import RunningSimulator, quick_options

NETWORK = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network"
SUBNET = f"{NETWORK}/virtualNetworks/vnet-sim/subnets/snet-web"
PIP = f"{NETWORK}/publicIPAddresses/web-1-pip"
APP_POOL = f"{NETWORK}/applicationGateways/agw-web/backendAddressPools/pool-app"
SUBNET_JOIN = "Microsoft.Network/virtualNetworks/subnets/join/action"
PIP_JOIN = "Microsoft.Network/publicIPAddresses/join/action"
APPGW_JOIN = "Microsoft.Network/applicationGateways/backendAddressPools/join/action"


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningSimulator]:
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    with RunningSimulator(quick_options()) as running:
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", running.urls.imds_url)
        running.control("PATCH", "/settings", {"arm_retry_after": 0.1})
        yield running


def put_nic(
    sim: RunningSimulator, change: Any = None
) -> tuple[HttpResponseError | None, list[str]]:
    """GET web-1-nic, let ``change`` edit it, PUT it back: (the error, or None; its pools)."""

    async def scenario(client: NetworkManagementClient) -> tuple[HttpResponseError | None, Any]:
        nic = await client.network_interfaces.get(RG, "web-1-nic")
        if change is not None:
            change(nic)
        try:
            poller = await client.network_interfaces.begin_create_or_update(RG, "web-1-nic", nic)
            await poller.result()
        except HttpResponseError as error:
            return error, None
        return None, None

    error, _ = run_with_client(sim.urls.arm_url, sim.urls.ca_file, scenario)
    nic = next(n for n in sim.control("GET", "/nics").json() if n["name"] == "web-1-nic")
    return error, nic["ip_configurations"][0]["pools"]


def drop_admin_pool(nic: Any) -> None:
    config = nic.ip_configurations[0]
    config.load_balancer_backend_address_pools = [
        p for p in config.load_balancer_backend_address_pools if not p.id.endswith("/pool-admin")
    ]


def test_every_linked_resource_is_checked_not_only_new_ones(sim: RunningSimulator) -> None:
    sim.control("PUT", "/permissions", {"deny": [{"action": SUBNET_JOIN}]})
    error, pools = put_nic(sim, drop_admin_pool)  # the subnet does not change
    assert error is not None and error.status_code == 403
    assert error.error is not None and error.error.code == "LinkedAuthorizationFailed"
    assert (
        f"has permission to perform action 'Microsoft.Network/networkInterfaces/write' on scope "
        f"'{NETWORK}/networkInterfaces/web-1-nic'; however, it does not have permission to "
        f"perform action(s) '{SUBNET_JOIN}' on the linked scope(s) '{SUBNET}' (respectively) or "
        "the linked scope(s) are invalid."
    ) in error.message
    assert len(pools) == 2  # nothing was written

    sim.control("PUT", "/permissions", {"deny": [{"action": SUBNET_JOIN}, {"action": PIP_JOIN}]})
    error, _ = put_nic(sim)
    assert error is not None
    # One action per linked scope, in the order the body links them.
    assert f"action(s) '{SUBNET_JOIN},{PIP_JOIN}' on the linked scope(s) '{SUBNET},{PIP}'" in (
        error.message
    )

    sim.control("DELETE", "/permissions")
    error, pools = put_nic(sim, drop_admin_pool)
    assert error is None and [p.rsplit("/", 1)[1] for p in pools] == ["pool-http"]


def test_application_gateway_pools_are_links(sim: RunningSimulator) -> None:
    reply = sim.control("PUT", "/nics/web-1-nic/appgw-pools", {"pools": ["pool-app"]})
    assert reply.status == 200, reply.text
    assert reply.json()["ip_configurations"][0]["appgw_pools"] == [APP_POOL]
    gateways = sim.control("GET", "/application-gateways").json()
    assert gateways[0]["name"] == "agw-web"
    assert gateways[0]["pools"][0]["members"] == [
        f"{NETWORK}/networkInterfaces/web-1-nic/ipConfigurations/ipconfig1"
    ]

    sim.control("PUT", "/permissions", {"deny": [{"action": APPGW_JOIN, "scope": APP_POOL}]})
    error, _ = put_nic(sim)
    assert error is not None and error.status_code == 403
    assert f"action(s) '{APPGW_JOIN}' on the linked scope(s) '{APP_POOL}'" in error.message

    def leave_gateway(nic: Any) -> None:
        nic.ip_configurations[0].application_gateway_backend_address_pools = []

    error, _ = put_nic(sim, leave_gateway)  # what the body no longer links is not checked
    assert error is None
    summary = next(n for n in sim.control("GET", "/nics").json() if n["name"] == "web-1-nic")
    assert summary["ip_configurations"][0]["appgw_pools"] == []


def test_application_gateway_pool_references_must_be_gateway_pools(sim: RunningSimulator) -> None:
    def wrong_kind(nic: Any) -> None:
        lb_pool = nic.ip_configurations[0].load_balancer_backend_address_pools[0].id
        nic.ip_configurations[0].application_gateway_backend_address_pools = [{"id": lb_pool}]

    error, _ = put_nic(sim, wrong_kind)
    assert error is not None and error.status_code == 400
    assert error.error is not None and error.error.code == "InvalidResourceReference"
    assert "is not an application gateway backend address pool" in error.message

    created = sim.control("POST", "/application-gateways", {"name": "agw-2", "pools": ["a", "b"]})
    assert created.status == 201
    assert sim.control("POST", "/application-gateways", {"name": "agw-2"}).status == 409
    reply = sim.control(
        "PUT", "/nics/web-1-nic/appgw-pools", {"ip_configurations": {"ipconfig2": ["agw-2/b"]}}
    )
    assert reply.json()["ip_configurations"][1]["appgw_pools"] == [
        f"{NETWORK}/applicationGateways/agw-2/backendAddressPools/b"
    ]
