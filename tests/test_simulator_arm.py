"""The simulator's ARM side, driven by the real Azure SDK clients a sidecar uses:
``azure.identity.aio.ManagedIdentityCredential`` (pointed at the simulator's IMDS with
``AZURE_POD_IDENTITY_AUTHORITY_HOST``) and ``azure.mgmt.network.aio.NetworkManagementClient``
(over TLS with the simulator's CA). Raw HTTPS covers what the SDK cannot send."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.identity.aio import ManagedIdentityCredential
from azure.mgmt.network.aio import NetworkManagementClient

from tests.lb_helpers import CLEAN_ENV
from tests.simulator_helpers import RunningSimulator, quick_options

SUB = "11111111-2222-4333-8444-555555555555"
RG = "rg-sim"
NIC_PATH = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/networkInterfaces"
ARM_VERSION = "api-version=2026-03-01"
POOL_ADMIN = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/loadBalancers/lb-web"
    "/backendAddressPools/pool-admin"
)
T = TypeVar("T")


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningSimulator]:
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    with RunningSimulator(quick_options(arm_page_size=2, arm_retry_after=1.0)) as running:
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", running.urls.imds_url)
        yield running


def run_with_client(
    sim: RunningSimulator, scenario: Callable[[NetworkManagementClient], Awaitable[T]]
) -> T:
    """Run ``scenario`` with a real credential and client on a fresh event loop."""

    async def main() -> T:
        async with (
            ManagedIdentityCredential() as credential,
            NetworkManagementClient(
                credential,
                SUB,
                base_url=sim.urls.arm_url,
                connection_verify=str(sim.urls.ca_file),
            ) as client,
        ):
            return await scenario(client)

    return asyncio.run(main())


def request_log(sim: RunningSimulator) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = sim.control("GET", "/requests").json()["log"]
    return log


def pools_of(sim: RunningSimulator, nic: str = "web-1-nic") -> list[list[str]]:
    found = next(n for n in sim.control("GET", "/nics").json() if n["name"] == nic)
    return [[p.rsplit("/", 1)[1] for p in c["pools"]] for c in found["ip_configurations"]]


# Identity ------------------------------------------------------------------------------------


def test_managed_identity_credential_gets_a_token_from_the_simulator(
    sim: RunningSimulator,
) -> None:
    async def main() -> str:
        async with ManagedIdentityCredential() as credential:
            token = await credential.get_token("https://management.azure.com/.default")
            assert token.expires_on > time.time() + 3000
            return token.token

    token = asyncio.run(main())
    (entry,) = [e for e in request_log(sim) if e["kind"] == "token"]
    # What azure-identity 1.27 requests: host + fixed path, resource without "/.default".
    assert entry["path"] == (
        "/metadata/identity/oauth2/token?api-version=2018-02-01"
        "&resource=https://management.azure.com"
    )
    assert entry["vm"] == "web-1" and entry["status"] == 200
    assert sim.arm("GET", f"{NIC_PATH}?{ARM_VERSION}", token=token).status == 200


def test_authority_host_with_a_path_selects_another_vm(
    sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", sim.urls.vm_url("web-2") + "/")

    async def scenario(client: NetworkManagementClient) -> None:
        await client.network_interfaces.get(RG, "web-2-nic")

    run_with_client(sim, scenario)
    kinds = {e["kind"]: e for e in request_log(sim)}
    assert kinds["token"]["path"].startswith("/vms/web-2/metadata/identity/oauth2/token?")
    assert kinds["arm-get"]["vm"] == "web-2"  # ARM knows the caller from its token


# Reads ---------------------------------------------------------------------------------------


def test_list_pages_through_next_link_and_hides_uniform_nics(sim: RunningSimulator) -> None:
    sim.control("POST", "/vms", {"name": "web-2"})
    sim.control("POST", "/vms", {"scale_set": "ss", "instance_id": "0", "orchestration": "Uniform"})

    async def scenario(client: NetworkManagementClient) -> tuple[list[str], list[str]]:
        in_group = [nic.name async for nic in client.network_interfaces.list(RG)]
        in_subscription = [nic.name async for nic in client.network_interfaces.list_all()]
        return in_group, in_subscription

    names, everywhere = run_with_client(sim, scenario)
    assert sorted(names) == ["other-vm-nic", "web-1-nic", "web-1-nic-orphan", "web-2-nic"]
    assert sorted(everywhere) == sorted(names)
    lists = [e for e in request_log(sim) if e["kind"] == "arm-list"][:2]
    assert len(lists) == 2  # page size 2
    assert "$skiptoken=2" in lists[1]["path"] or "%24skiptoken=2" in lists[1]["path"]


def test_get_compares_names_case_insensitively(sim: RunningSimulator) -> None:
    async def scenario(client: NetworkManagementClient) -> Any:
        return await client.network_interfaces.get("RG-SIM", "WEB-1-NIC")

    nic = run_with_client(sim, scenario)
    assert nic.name == "web-1-nic"
    assert nic.etag.startswith('W/"') and nic.etag.endswith('"')
    assert nic.ip_configurations[0].etag == nic.etag
    compute = sim.imds("/metadata/instance/compute?api-version=2021-02-01").json()
    # ARM upper-cases the resource group in references: equal only case-insensitively.
    assert nic.virtual_machine.id != compute["resourceId"]
    assert nic.virtual_machine.id.lower() == compute["resourceId"].lower()


def test_scale_set_nics_are_read_through_their_own_operations(sim: RunningSimulator) -> None:
    sim.control("POST", "/vms", {"scale_set": "ss", "instance_id": "0", "orchestration": "Uniform"})

    async def scenario(client: NetworkManagementClient) -> tuple[list[str], Any]:
        ops = client.network_interfaces
        listed = [
            n.name
            async for n in ops.list_virtual_machine_scale_set_vm_network_interfaces(RG, "ss", "0")
        ]
        one = await ops.get_virtual_machine_scale_set_network_interface(RG, "ss", "0", "ss-nic")
        return listed, one

    listed, nic = run_with_client(sim, scenario)
    assert listed == ["ss-nic"]
    assert "/virtualMachineScaleSets/ss/virtualMachines/0/networkInterfaces/ss-nic" in nic.id


# Writes --------------------------------------------------------------------------------------


def test_removing_a_pool_keeps_everything_else_and_finishes_quickly(
    sim: RunningSimulator,
) -> None:
    async def scenario(client: NetworkManagementClient) -> tuple[Any, Any, float]:
        ops = client.network_interfaces
        before = await ops.get(RG, "web-1-nic")
        config = before.ip_configurations[0]
        config.load_balancer_backend_address_pools = [
            p
            for p in config.load_balancer_backend_address_pools
            if not p.id.endswith("/pool-admin")
        ]
        started = time.monotonic()
        poller = await ops.begin_create_or_update(RG, "web-1-nic", before)
        result = await poller.result()
        elapsed = time.monotonic() - started
        after = await ops.get(RG, "web-1-nic")
        return result, after, elapsed

    original = sim.control("GET", "/nics/web-1-nic").json()
    result, after, elapsed = run_with_client(sim, scenario)
    # azure-core polls once at once (InProgress), then waits Retry-After (1 s) for the next.
    assert 0.9 <= elapsed < 10, "the LRO did not follow Retry-After"
    assert result.provisioning_state == "Succeeded"
    assert pools_of(sim) == [["pool-http"], ["pool-http"]]
    stored = sim.control("GET", "/nics/web-1-nic").json()
    assert stored["etag"] != original["etag"]

    def comparable(doc: dict[str, Any]) -> dict[str, Any]:
        doc = dict(doc, etag=None)
        doc["properties"] = dict(doc["properties"], provisioningState=None)
        doc["properties"]["ipConfigurations"] = [
            dict(
                c,
                etag=None,
                properties={
                    **c["properties"],
                    "provisioningState": None,
                    "loadBalancerBackendAddressPools": None,
                },
            )
            for c in doc["properties"]["ipConfigurations"]
        ]
        return doc

    assert comparable(stored) == comparable(original)
    (operation,) = sim.control("GET", "/operations").json()
    assert operation["status"] == "Succeeded" and operation["polls"] == 2
    puts = [e for e in request_log(sim) if e["kind"] == "arm-put"]
    assert [e["status"] for e in puts] == [200]
    assert after.etag == stored["etag"]


def test_put_answers_with_an_async_operation(sim: RunningSimulator) -> None:
    token = sim.token()
    nic = sim.control("GET", "/nics/web-1-nic").json()
    reply = sim.arm("PUT", f"{NIC_PATH}/web-1-nic?{ARM_VERSION}", token=token, body=nic)
    assert reply.status == 200
    assert reply.json()["properties"]["provisioningState"] == "Updating"
    assert reply.headers["Retry-After"] == "1"
    operation = reply.headers["Azure-AsyncOperation"]
    assert operation.startswith(
        f"{sim.urls.arm_url}/subscriptions/{SUB}/providers/Microsoft.Network/"
    )
    assert "/locations/westeurope/operations/" in operation and operation.endswith(ARM_VERSION)
    path = operation[len(str(sim.urls.arm_url)) :]
    first = sim.arm("GET", path, token=token)
    assert first.json() == {"status": "InProgress"} and first.headers["Retry-After"] == "1"
    assert sim.arm("GET", path, token=token).json() == {"status": "Succeeded"}
    stored = sim.control("GET", "/nics/web-1-nic").json()
    assert stored["properties"]["provisioningState"] == "Succeeded"


def test_if_match(sim: RunningSimulator) -> None:
    async def scenario(client: NetworkManagementClient) -> list[Any]:
        ops = client.network_interfaces
        nic = await ops.get(RG, "web-1-nic")
        sim.control("PUT", "/nics/web-1-nic/pools", {"pools": ["pool-http"]})  # someone else
        outcomes: list[Any] = []
        for etag in (nic.etag, "*"):
            try:
                poller = await ops.begin_create_or_update(
                    RG, "web-1-nic", nic, headers={"If-Match": etag}
                )
                outcomes.append((await poller.result()).provisioning_state)
            except HttpResponseError as error:
                outcomes.append((error.status_code, error.error.code if error.error else None))
        return outcomes

    stale, star = run_with_client(sim, scenario)
    assert stale == (412, "PreconditionFailed")
    assert star == "Succeeded"
    assert pools_of(sim)[0] == ["pool-http", "pool-admin"]  # the '*' write restored ours


def test_missing_write_permission_is_named_like_arm(sim: RunningSimulator) -> None:
    sim.control(
        "PUT", "/permissions", {"deny": [{"action": "Microsoft.Network/networkInterfaces/write"}]}
    )

    async def scenario(client: NetworkManagementClient) -> HttpResponseError:
        nic = await client.network_interfaces.get(RG, "web-1-nic")
        with pytest.raises(HttpResponseError) as caught:
            await client.network_interfaces.begin_create_or_update(RG, "web-1-nic", nic)
        return caught.value

    error = run_with_client(sim, scenario)
    assert error.status_code == 403
    assert error.error is not None and error.error.code == "AuthorizationFailed"
    principal = next(
        v["principal_id"] for v in sim.control("GET", "/vms").json() if v["name"] == "web-1"
    )
    assert (
        f"The client '{principal}' with object id '{principal}' does not have authorization to "
        "perform action 'Microsoft.Network/networkInterfaces/write' over scope "
        f"'{NIC_PATH}/web-1-nic' or the scope is invalid."
    ) in error.message


def test_joining_a_pool_needs_the_join_action(sim: RunningSimulator) -> None:
    sim.control("PUT", "/nics/web-1-nic/pools", {"pools": ["pool-http"]})
    deny = [
        {
            "action": "Microsoft.Network/loadBalancers/backendAddressPools/join/action",
            "scope": POOL_ADMIN,
        }
    ]
    sim.control("PUT", "/permissions", {"deny": deny})

    async def scenario(client: NetworkManagementClient) -> tuple[HttpResponseError, str | None]:
        ops = client.network_interfaces
        nic = await ops.get(RG, "web-1-nic")
        pools = nic.ip_configurations[0].load_balancer_backend_address_pools
        pools.append({"id": POOL_ADMIN})
        with pytest.raises(HttpResponseError) as caught:
            await ops.begin_create_or_update(RG, "web-1-nic", nic)
        # removing (or keeping) pools needs no join permission
        nic = await ops.get(RG, "web-1-nic")
        nic.ip_configurations[0].load_balancer_backend_address_pools = []
        done = await (await ops.begin_create_or_update(RG, "web-1-nic", nic)).result()
        return caught.value, done.provisioning_state

    error, state = run_with_client(sim, scenario)
    assert error.status_code == 403
    assert error.error is not None and error.error.code == "LinkedAuthorizationFailed"
    assert "'Microsoft.Network/loadBalancers/backendAddressPools/join/action'" in error.message
    assert f"linked scope(s) '{POOL_ADMIN}'" in error.message
    assert state == "Succeeded"


def test_uniform_scale_set_nics_cannot_be_written(sim: RunningSimulator) -> None:
    sim.control("POST", "/vms", {"scale_set": "ss", "instance_id": "0", "orchestration": "Uniform"})
    path = (
        f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/"
        "virtualMachineScaleSets/ss/virtualMachines/0/networkInterfaces/ss-nic"
    )

    async def scenario(client: NetworkManagementClient) -> tuple[int, Any, int]:
        ops = client.network_interfaces
        nic = await ops.get_virtual_machine_scale_set_network_interface(RG, "ss", "0", "ss-nic")
        # The Network API has no operation for this path: send the PUT through the client.
        put = HttpRequest("PUT", f"{sim.urls.arm_url}{path}?{ARM_VERSION}", json=nic.as_dict())
        answer = await client.send_request(put)
        await answer.read()
        missing = await client.send_request(
            HttpRequest("GET", f"{sim.urls.arm_url}{NIC_PATH}/ss-nic?{ARM_VERSION}")
        )
        return answer.status_code, answer.json(), missing.status_code

    status, body, missing = run_with_client(sim, scenario)
    assert status == 409
    assert body["error"]["message"] == (
        "The operation 'write' on resource type "
        "'virtualMachineScaleSets/virtualMachines/networkInterfaces' is disallowed."
    )
    assert missing == 404  # through the Network API the Uniform NIC does not exist at all


# Refusals ------------------------------------------------------------------------------------


def test_requests_without_a_valid_token_get_401(sim: RunningSimulator) -> None:
    url = f"{NIC_PATH}/web-1-nic?{ARM_VERSION}"
    missing = sim.arm("GET", url)
    assert missing.status == 401
    assert missing.json()["error"]["code"] == "AuthenticationFailed"
    assert "WWW-Authenticate" in missing.headers
    forged = sim.arm("GET", url, token=sim.token()[::-1])  # well-formed, never issued
    assert forged.status == 401
    assert forged.json()["error"]["code"] == "InvalidAuthenticationToken"
    wrong_audience = sim.arm("GET", url, token=sim.token(resource="https://vault.azure.net"))
    assert wrong_audience.json()["error"]["code"] == "InvalidAuthenticationTokenAudience"


def test_arm_request_checks(sim: RunningSimulator) -> None:
    token = sim.token()
    missing = sim.arm("GET", f"{NIC_PATH}/web-1-nic", token=token)
    assert missing.status == 400
    assert missing.json()["error"]["code"] == "MissingApiVersionParameter"
    future = sim.arm("GET", f"{NIC_PATH}/web-1-nic?api-version=2099-01-01", token=token)
    assert future.status == 400
    other_rg = NIC_PATH.replace(RG, "rg-missing")
    assert sim.arm("GET", f"{other_rg}?{ARM_VERSION}", token=token).json()["error"]["code"] == (
        "ResourceGroupNotFound"
    )
    unknown = sim.arm("GET", f"{NIC_PATH}/nope?{ARM_VERSION}", token=token)
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "ResourceNotFound"
    no_location = sim.arm("PUT", f"{NIC_PATH}/web-1-nic?{ARM_VERSION}", token=token, body={})
    assert no_location.json()["error"]["code"] == "LocationRequired"


def test_operation_faults(sim: RunningSimulator) -> None:
    sim.control("POST", "/faults", {"target": "arm-operation", "kind": "failed", "count": 1})

    async def scenario(client: NetworkManagementClient) -> HttpResponseError:
        nic = await client.network_interfaces.get(RG, "web-1-nic")
        poller = await client.network_interfaces.begin_create_or_update(RG, "web-1-nic", nic)
        with pytest.raises(HttpResponseError) as caught:
            await poller.result()
        return caught.value

    error = run_with_client(sim, scenario)
    assert "Simulated failure" in str(error)
    assert (
        sim.control("GET", "/nics/web-1-nic").json()["properties"]["provisioningState"] == "Failed"
    )


def test_slow_operation_stays_in_progress(sim: RunningSimulator) -> None:
    sim.control("POST", "/faults", {"target": "arm-operation", "kind": "slow", "seconds": 2})

    async def scenario(client: NetworkManagementClient) -> float:
        nic = await client.network_interfaces.get(RG, "web-1-nic")
        started = time.monotonic()
        poller = await client.network_interfaces.begin_create_or_update(RG, "web-1-nic", nic)
        await poller.result()
        return time.monotonic() - started

    assert run_with_client(sim, scenario) >= 2.0
    statuses = [e["status"] for e in request_log(sim) if e["kind"] == "arm-operation"]
    assert len(statuses) >= 3
