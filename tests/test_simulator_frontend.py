"""Load-balancer frontends on loopback: new flows go to backends in the pool and probed up,
established flows stay where they are, and no healthy backend means what the probe's
``noHealthyBackendsBehavior`` says. Real TCP through the real proxy to real apps."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.simulator.server import Simulator
from tests.lb_helpers import Backend, KeptConnection, free_port, http_get
from tests.simulator_helpers import RunningSimulator, quick_options, wait_for

W1 = "web-1-nic/ipConfigurations/ipconfig1"
W2 = "web-2-nic/ipConfigurations/ipconfig1"


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with RunningSimulator(quick_options(arm=False)) as running:
        running.control(
            "PATCH", "/load-balancers/lb-web/probes/probe-http", {"interval": 0.1, "threshold": 2}
        )
        yield running


@pytest.fixture
def apps() -> Iterator[tuple[Backend, Backend]]:
    with Backend("web-1") as one, Backend("web-2") as two:
        yield one, two


def rule(sim: RunningSimulator) -> dict[str, Any]:
    lb = sim.control("GET", "/load-balancers/lb-web").json()
    found: dict[str, Any] = next(r for r in lb["rules"] if r["name"] == "rule-http")
    return found


def state(sim: RunningSimulator, suffix: str) -> str:
    return str(next(b for b in rule(sim)["backends"] if b["backend"].endswith(suffix))["state"])


def setup_two_backends(sim: RunningSimulator, one: Backend, two: Backend) -> int:
    """web-1 (its primary ipconfig only) and web-2 alone behind rule-http; the frontend's port.

    other-vm leaves the pool: it has no loopback port, so it would count as up (not probed)
    without ever taking a flow."""
    sim.control("PUT", "/nics/web-1-nic/pools", {"ip_configurations": {"ipconfig2": []}})
    sim.control("PUT", "/nics/other-vm-nic/pools", {"pools": []})
    sim.control("PUT", "/vms/web-1/ports", {"8080": one.port, "80": one.port})
    sim.control("POST", "/vms", {"name": "web-2", "ports": {"8080": two.port, "80": two.port}})
    view = sim.control("PATCH", "/load-balancers/lb-web/rules/rule-http", {"listen": 0}).json()
    listener = next(r for r in view["rules"] if r["name"] == "rule-http")["frontend_listener"]
    assert listener is not None and listener["host"] == "127.0.0.1"
    wait_for(lambda: state(sim, W1) == "Up" and state(sim, W2) == "Up")
    return int(listener["port"])


def test_new_flows_are_spread_over_healthy_backends_only(
    sim: RunningSimulator, apps: tuple[Backend, Backend]
) -> None:
    one, two = apps
    port = setup_two_backends(sim, one, two)
    answers = [http_get(port) for _ in range(6)]
    assert sorted(set(answers)) == ["web-1", "web-2"]
    assert answers.count("web-1") == answers.count("web-2") == 3  # round-robin
    one.status = 503
    wait_for(lambda: state(sim, W1) == "Down")
    assert {http_get(port) for _ in range(4)} == {"web-2"}
    flows = rule(sim)["flows"]
    assert flows["accepted"] == 10 and flows["refused"] == 0
    assert flows["by_backend"][next(k for k in flows["by_backend"] if k.endswith(W2))]["total"] == 7


def test_established_flows_stay_when_their_backend_goes_down_or_leaves(
    sim: RunningSimulator, apps: tuple[Backend, Backend]
) -> None:
    one, two = apps
    port = setup_two_backends(sim, one, two)
    kept = [KeptConnection(port) for _ in range(2)]
    try:
        where = {conn.get(): conn for conn in kept}
        assert set(where) == {"web-1", "web-2"}
        one.status = 503
        wait_for(lambda: state(sim, W1) == "Down")
        assert where["web-1"].get() == "web-1"  # a probe-down backend keeps its flows
        sim.control("PUT", "/nics/web-2-nic/pools", {"pools": []})  # web-2 leaves the pool
        wait_for(lambda: all(not b["backend"].endswith(W2) for b in rule(sim)["backends"]))
        assert where["web-2"].get() == "web-2"  # and so does a NIC that left the pool
        assert rule(sim)["flows"]["active"] == 2
    finally:
        for conn in kept:
            conn.close()
    wait_for(lambda: rule(sim)["flows"]["active"] == 0)


def test_no_healthy_backend(sim: RunningSimulator, apps: tuple[Backend, Backend]) -> None:
    one, two = apps
    port = setup_two_backends(sim, one, two)
    one.status = two.status = 503
    wait_for(lambda: state(sim, W1) == "Down" and state(sim, W2) == "Down")
    # AllProbedDown (the default): a new flow is closed at once.
    with pytest.raises(OSError):
        http_get(port)
    assert rule(sim)["flows"]["refused"] == 1
    sim.control(
        "PATCH",
        "/load-balancers/lb-web/probes/probe-http",
        {"no_healthy_backends_behavior": "AllProbedUp"},
    )
    # AllProbedUp: every member with a backend port gets new flows again.
    assert {http_get(port) for _ in range(4)} == {"web-1", "web-2"}
    assert rule(sim)["counts"]["up"] == 2  # as the health API reports it


def test_frontend_port_can_be_chosen_and_is_closed_when_asked(sim: RunningSimulator) -> None:
    wanted = free_port()
    view = sim.control("PATCH", "/load-balancers/lb-web/rules/rule-admin", {"listen": wanted})
    admin = next(r for r in view.json()["rules"] if r["name"] == "rule-admin")
    assert admin["frontend_listener"]["port"] == wanted
    with pytest.raises(OSError):
        http_get(wanted)  # nobody in pool-admin has a loopback port: refused
    sim.control("PATCH", "/load-balancers/lb-web/rules/rule-admin", {"listen": None})
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", wanted), timeout=5).close()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        busy = taken.getsockname()[1]
        view = sim.control("PATCH", "/load-balancers/lb-web/rules/rule-admin", {"listen": busy})
        admin = next(r for r in view.json()["rules"] if r["name"] == "rule-admin")
        assert admin["frontend_listener"] is None and "cannot listen" in admin["frontend_error"]
    finally:
        taken.close()


def test_stop_leaves_no_task_and_no_socket_behind() -> None:
    async def scenario() -> list[str]:
        with Backend("web-1") as app:
            simulator = Simulator(quick_options(arm=False))
            await simulator.start()
            world = simulator.world
            world.ports.set("web-1", {8080: app.port, 80: app.port})
            lb = world.lbs.find("lb-web")
            assert lb is not None
            lb.probes[0].interval = 0.1
            lb.rules[0].listen = 0
            await simulator.lb.reconcile()
            port = simulator.lb.frontends.port_of(lb, lb.rules[0])
            assert port is not None
            assert await simulator.lb.prober.probe_all_once() == 3  # web-1 is up at once
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert b"web-1" in await reader.read(4096)
            await simulator.stop()
            assert await reader.read() == b""  # the flow was closed by the stop
            writer.close()
            await writer.wait_closed()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
            current = asyncio.current_task()
            return [t.get_name() for t in asyncio.all_tasks() if t is not current]

    assert asyncio.run(scenario()) == []
