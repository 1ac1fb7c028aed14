"""Load balancers through ARM, read with the real ``azure-mgmt-network`` client a sidecar uses:
the load balancer, its pools (members derived from the NICs), rules and probes, and a rule's
health, a long-running POST whose result comes from the simulator's prober."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from azure.mgmt.network.aio import NetworkManagementClient

from tests.lb_helpers import CLEAN_ENV, RG, SUB, Backend, run_with_client
from tests.simulator_helpers import RunningSimulator, quick_options, wait_for

ARM_VERSION = "api-version=2026-03-01"
LB_PATH = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/loadBalancers"
NIC_PATH = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/networkInterfaces"


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningSimulator]:
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    with RunningSimulator(quick_options(arm_retry_after=1.0)) as running:
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", running.urls.imds_url)
        running.control("PATCH", "/settings", {"arm_retry_after": 0.1})
        yield running


def client_run(sim: RunningSimulator, scenario: Any) -> Any:
    return run_with_client(sim.urls.arm_url, sim.urls.ca_file, scenario)


def names(refs: list[Any] | None) -> list[str]:
    return [ref.id.rsplit("/", 1)[1] for ref in refs or []]


def fast_probes(sim: RunningSimulator, **fields: Any) -> None:
    for probe in ("probe-http", "probe-admin"):
        body = {"interval": 0.1, "threshold": 2, **fields}
        assert sim.control("PATCH", f"/load-balancers/lb-web/probes/{probe}", body).status == 200


def backend_state(sim: RunningSimulator, rule: str, ipconfig_suffix: str) -> dict[str, Any]:
    lb = sim.control("GET", "/load-balancers/lb-web").json()
    view = next(r for r in lb["rules"] if r["name"] == rule)
    found: dict[str, Any] = next(
        b for b in view["backends"] if b["backend"].endswith(ipconfig_suffix)
    )
    return found


# Reads ---------------------------------------------------------------------------------------


def test_load_balancer_pools_rules_and_probes_read_through_the_sdk(sim: RunningSimulator) -> None:
    async def scenario(client: NetworkManagementClient) -> tuple[Any, ...]:
        lb = await client.load_balancers.get(RG, "lb-web")
        pool = await client.load_balancer_backend_address_pools.get(RG, "lb-web", "pool-http")
        pools = [p async for p in client.load_balancer_backend_address_pools.list(RG, "lb-web")]
        rule = await client.load_balancer_load_balancing_rules.get(RG, "lb-web", "rule-http")
        probe = await client.load_balancer_probes.get(RG, "lb-web", "probe-http")
        listed = [x.name async for x in client.load_balancers.list(RG)]
        return lb, pool, pools, rule, probe, listed

    lb, pool, pools, rule, probe, listed = client_run(sim, scenario)
    assert listed == ["lb-web"]
    assert [p.name for p in lb.backend_address_pools] == ["pool-http", "pool-admin"]
    assert [r.name for r in lb.load_balancing_rules] == ["rule-http", "rule-admin"]
    # Members are the NIC IP configurations that reference the pool, as Azure computes them.
    assert sorted(
        ref.id.split("/networkInterfaces/", 1)[1] for ref in pool.backend_ip_configurations
    ) == [
        "other-vm-nic/ipConfigurations/ipconfig1",
        "web-1-nic/ipConfigurations/ipconfig1",
        "web-1-nic/ipConfigurations/ipconfig2",
    ]
    assert names(pool.load_balancing_rules) == ["rule-http"]
    assert [len(p.backend_ip_configurations) for p in pools] == [3, 1]
    assert (rule.frontend_port, rule.backend_port, rule.protocol) == (80, 80, "Tcp")
    assert rule.backend_address_pool.id == pool.id
    assert rule.probe.id == probe.id
    assert (probe.protocol, probe.port, probe.request_path) == ("Http", 8080, "/health")
    assert (probe.interval_in_seconds, probe.probe_threshold) == (5, 2)
    assert probe.no_healthy_backends_behavior == "AllProbedDown"
    assert names(probe.load_balancing_rules) == ["rule-http"]
    assert lb.etag == pool.etag and lb.etag.startswith('W/"')


def test_pool_members_follow_the_nics(sim: RunningSimulator) -> None:
    async def scenario(client: NetworkManagementClient) -> tuple[list[str], list[str]]:
        before = await client.load_balancer_backend_address_pools.get(RG, "lb-web", "pool-http")
        nic = await client.network_interfaces.get(RG, "web-1-nic")
        for config in nic.ip_configurations:
            config.load_balancer_backend_address_pools = []
        await (
            await client.network_interfaces.begin_create_or_update(RG, "web-1-nic", nic)
        ).result()
        after = await client.load_balancer_backend_address_pools.get(RG, "lb-web", "pool-http")
        return (
            [r.id for r in before.backend_ip_configurations],
            [r.id for r in after.backend_ip_configurations],
        )

    before, after = client_run(sim, scenario)
    assert len(before) == 3
    assert [ref.split("/networkInterfaces/", 1)[1] for ref in after] == [
        "other-vm-nic/ipConfigurations/ipconfig1"
    ]


def test_missing_load_balancer_parts_and_permissions(sim: RunningSimulator) -> None:
    token = sim.token()
    missing = sim.arm("GET", f"{LB_PATH}/nope?{ARM_VERSION}", token=token)
    assert missing.status == 404 and missing.json()["error"]["code"] == "ResourceNotFound"
    pool = sim.arm("GET", f"{LB_PATH}/lb-web/backendAddressPools/nope?{ARM_VERSION}", token=token)
    assert pool.status == 404 and pool.json()["error"]["code"] == "NotFound"
    case = sim.arm(
        "GET", f"{LB_PATH}/LB-WEB/backendAddressPools/POOL-HTTP?{ARM_VERSION}", token=token
    )
    assert case.status == 200 and case.json()["name"] == "pool-http"
    action = "Microsoft.Network/loadBalancers/backendAddressPools/read"
    sim.control("PUT", "/permissions", {"deny": [{"action": action}]})
    denied = sim.arm(
        "GET", f"{LB_PATH}/lb-web/backendAddressPools/pool-http?{ARM_VERSION}", token=token
    )
    assert denied.status == 403 and denied.json()["error"]["code"] == "AuthorizationFailed"
    assert f"perform action '{action}' over scope" in denied.json()["error"]["message"]
    assert sim.arm("GET", f"{LB_PATH}/lb-web?{ARM_VERSION}", token=token).status == 200


# Rule health ---------------------------------------------------------------------------------


def test_rule_health_through_the_sdk_follows_the_prober(sim: RunningSimulator) -> None:
    fast_probes(sim)
    with Backend("web-1") as app:
        sim.control("PUT", "/vms/web-1/ports", {"8080": app.port})
        wait_for(
            lambda: (
                backend_state(sim, "rule-http", "web-1-nic/ipConfigurations/ipconfig2")["state"]
                == "Up"
            )
        )

        async def health(client: NetworkManagementClient) -> Any:
            poller = await client.load_balancer_load_balancing_rules.begin_health(
                RG, "lb-web", "rule-http"
            )
            return await poller.result()

        started = time.monotonic()
        up = client_run(sim, health)
        assert time.monotonic() - started < 10, "the SDK did not follow Retry-After"
        by_ip = {a.ip_address: a for a in up.load_balancer_backend_addresses}
        assert (up.up, up.down) == (3, 0)
        assert by_ip["10.0.1.4"].state == "Up" and by_ip["10.0.1.4"].reason == "Up_Probe_Success"
        assert by_ip["10.0.1.4"].network_interface_ip_configuration_id.endswith(
            "/networkInterfaces/web-1-nic/ipConfigurations/ipconfig1"
        )

        app.status = 503
        wait_for(lambda: backend_state(sim, "rule-http", "ipconfig2")["state"] == "Down")
        wait_for(
            lambda: (
                backend_state(sim, "rule-http", "web-1-nic/ipConfigurations/ipconfig1")["state"]
                == "Down"
            )
        )
        down = client_run(sim, health)
        by_ip = {a.ip_address: a for a in down.load_balancer_backend_addresses}
        assert (down.up, down.down) == (1, 2)  # other-vm has no loopback port: not probed
        assert by_ip["10.0.1.5"].reason == "Down_Probe_HttpStatusCodeError"
        assert by_ip["10.0.1.6"].state == "Up"

    kinds = [
        (e["method"], e["kind"], e["status"]) for e in sim.control("GET", "/requests").json()["log"]
    ]
    assert ("POST", "arm-lb-health", 202) in kinds
    results = [
        e
        for e in sim.control("GET", "/requests").json()["log"]
        if "/operationResults/" in e["path"]
    ]
    assert results and all(e["status"] == 200 for e in results)


def test_rule_health_answers_like_azure(sim: RunningSimulator) -> None:
    token = sim.token()
    reply = sim.arm(
        "POST", f"{LB_PATH}/lb-web/loadBalancingRules/rule-http/health?{ARM_VERSION}", token=token
    )
    assert reply.status == 202 and reply.body == b""
    location = reply.headers["Location"]
    assert (
        f"/subscriptions/{SUB}/providers/Microsoft.Network/locations/westeurope/operationResults/"
        in location
    )
    assert "/operations/" in reply.headers["Azure-AsyncOperation"]
    assert reply.headers["Retry-After"] == "1"  # whole seconds: the SDK parses it as an int
    path = location[len(str(sim.urls.arm_url)) :]
    first = sim.arm("GET", path, token=token)
    assert first.status == 202 and first.headers["Location"] == location
    second = sim.arm("GET", path, token=token)
    assert second.status == 200
    body = second.json()
    assert set(body) == {"up", "down", "loadBalancerBackendAddresses"}
    assert {a["state"] for a in body["loadBalancerBackendAddresses"]} == {"Up"}

    sim.control(
        "POST",
        "/load-balancers/lb-web/rules",
        {"name": "raw", "frontend_port": 9000, "pool": "pool-http"},
    )
    unprobed = sim.arm(
        "POST", f"{LB_PATH}/lb-web/loadBalancingRules/raw/health?{ARM_VERSION}", token=token
    )
    assert unprobed.status == 400
    missing = sim.arm(
        "POST", f"{LB_PATH}/lb-web/loadBalancingRules/nope/health?{ARM_VERSION}", token=token
    )
    assert missing.status == 404
    action = "Microsoft.Network/loadBalancers/loadBalancingRules/health/action"
    sim.control("PUT", "/permissions", {"deny": [{"action": action}]})
    denied = sim.arm(
        "POST", f"{LB_PATH}/lb-web/loadBalancingRules/rule-http/health?{ARM_VERSION}", token=token
    )
    assert denied.status == 403
    assert (
        f"perform action '{action}' over scope '{LB_PATH}/lb-web/loadBalancingRules/rule-http'"
        in denied.json()["error"]["message"]
    )


def test_all_probed_up_reports_every_backend_up(sim: RunningSimulator) -> None:
    fast_probes(sim, no_healthy_backends_behavior="AllProbedUp")
    with Backend("web-1") as app:
        app.status = 500
        sim.control("PUT", "/vms/web-1/ports", {"8080": app.port})
        wait_for(lambda: backend_state(sim, "rule-admin", "ipconfig1")["probe"]["probes"] >= 1)
        admin = backend_state(sim, "rule-admin", "ipconfig1")
        # Never up since it joined, all probed down: under AllProbedUp it counts as up.
        assert admin["probe"]["state"] == "Down"
        assert (admin["state"], admin["reason"]) == ("Up", "Up_Probe_AllDownIsUp")
        token = sim.token()
        reply = sim.arm(
            "POST",
            f"{LB_PATH}/lb-web/loadBalancingRules/rule-admin/health?{ARM_VERSION}",
            token=token,
        )
        path = reply.headers["Location"][len(str(sim.urls.arm_url)) :]
        sim.arm("GET", path, token=token)
        body = sim.arm("GET", path, token=token).json()
        assert body["up"] == 1
        assert body["loadBalancerBackendAddresses"][0]["reason"] == "Up_Probe_AllDownIsUp"


def test_adding_a_load_balancer_with_the_control_api(sim: RunningSimulator) -> None:
    body = {
        "name": "lb-api",
        "pools": ["pool-api"],
        "probes": [{"name": "hp", "port": 9000, "path": "/ready", "interval": 0.5, "threshold": 3}],
        "rules": [
            {
                "name": "api",
                "frontend_port": 443,
                "backend_port": 9443,
                "pool": "pool-api",
                "probe": "hp",
            }
        ],
    }
    created = sim.control("POST", "/load-balancers", body)
    assert created.status == 201, created.text
    sim.control("POST", "/vms", {"name": "api-1", "pools": ["lb-api/pool-api"]})
    view = sim.control("GET", "/load-balancers/lb-api").json()
    (rule,) = view["rules"]
    assert rule["counts"]["members"] == 1 and rule["backends"][0]["vm"] == "api-1"
    assert sim.control("POST", "/load-balancers", body).status == 409
    bad = {
        "name": "x",
        "pools": ["p"],
        "rules": [{"name": "r", "frontend_port": 1, "pool": "nope"}],
    }
    assert sim.control("POST", "/load-balancers", bad).status == 400
    assert sim.control("PATCH", "/load-balancers/lb-api/probes/hp", {"interval": 0}).status == 400
    assert sim.control("PATCH", "/load-balancers/lb-api/rules/nope", {"listen": 0}).status == 404

    async def scenario(client: NetworkManagementClient) -> Any:
        return await client.load_balancer_probes.get(RG, "lb-api", "hp")

    probe = client_run(sim, scenario)
    assert (probe.port, probe.request_path, probe.interval_in_seconds, probe.probe_threshold) == (
        9000,
        "/ready",
        1,
        3,
    )


def test_a_fleet_of_150_vms_is_served_quickly(sim: RunningSimulator) -> None:
    fleet = [{"name": f"vm-{i:03}", "pools": ["pool-http"]} for i in range(150)]
    assert sim.control("POST", "/vms", fleet).status == 201

    async def scenario(client: NetworkManagementClient) -> tuple[int, tuple[int, int]]:
        listed = [nic async for nic in client.network_interfaces.list(RG)]
        pool = await client.load_balancer_backend_address_pools.get(RG, "lb-web", "pool-http")
        health = await (
            await client.load_balancer_load_balancing_rules.begin_health(RG, "lb-web", "rule-http")
        ).result()
        return len(listed), (len(pool.backend_ip_configurations), health.up)

    count, (members, up) = client_run(sim, scenario)
    assert count == 153 and members == 153 and up == 153
    slowest = max(
        e["duration_ms"]
        for e in sim.control("GET", "/requests").json()["log"]
        if e["kind"] != "token"
    )
    assert slowest < 2000, f"an ARM answer took {slowest} ms with 150 VMs"
