"""The load balancer's prober: probe results as Azure counts them, the threshold state machine,
and the real prober against real apps on loopback whose answers a test flips."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.simulator import health
from sidecar.simulator.health import BackendHealth
from sidecar.simulator.prober import probe_once
from tests.lb_helpers import Backend, free_port
from tests.simulator_helpers import RunningSimulator, quick_options, wait_for

W1 = "web-1-nic/ipConfigurations/ipconfig1"
W2 = "web-1-nic/ipConfigurations/ipconfig2"


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with RunningSimulator(quick_options(arm=False)) as running:
        yield running


def fast_probe(sim: RunningSimulator, probe: str = "probe-http", **fields: Any) -> None:
    body = {"interval": 0.1, "threshold": 2, **fields}
    assert sim.control("PATCH", f"/load-balancers/lb-web/probes/{probe}", body).status == 200


def backend(sim: RunningSimulator, suffix: str, rule: str = "rule-http") -> dict[str, Any]:
    lb = sim.control("GET", "/load-balancers/lb-web").json()
    view = next(r for r in lb["rules"] if r["name"] == rule)
    found: dict[str, Any] = next(b for b in view["backends"] if b["backend"].endswith(suffix))
    return found


def history(sim: RunningSimulator) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = sim.control("GET", "/load-balancers/lb-web/history").json()[
        "entries"
    ]
    return entries


# One probe -----------------------------------------------------------------------------------


def test_one_probe_counts_only_200() -> None:
    async def main(app: Backend) -> list[tuple[bool, str]]:
        results = []
        for status in (200, 503, 301):
            app.status = status
            result = await probe_once(app.port, protocol="Http", path="/health", timeout=5)
            results.append((result.ok, result.reason))
        app.hang(True)
        hung = await probe_once(app.port, protocol="Http", path="/health", timeout=0.3)
        app.hang(False)
        closed = await probe_once(free_port(), protocol="Http", path="/health", timeout=5)
        tcp = await probe_once(app.port, protocol="Tcp", path=None, timeout=5)
        return [*results, (hung.ok, hung.reason), (closed.ok, closed.reason), (tcp.ok, tcp.reason)]

    with Backend("one") as app:
        outcomes = asyncio.run(main(app))
    assert outcomes == [
        (True, health.SUCCESS),
        (False, health.HTTP_STATUS_ERROR),
        (False, health.HTTP_STATUS_ERROR),
        (False, health.NO_RESPONSE),
        (False, health.ENDPOINT_UNREACHABLE),
        (True, health.SUCCESS),
    ]


# The state machine ---------------------------------------------------------------------------

OK, FAIL = True, False


@pytest.mark.parametrize(
    ("results", "threshold", "states"),
    [
        # A new backend is down until its first success, which marks it up at once.
        ([OK], 3, ["Up"]),
        ([FAIL, FAIL, OK], 3, ["Down", "Down", "Up"]),
        # Then `threshold` consecutive opposite results flip it, either way.
        ([OK, FAIL, FAIL, FAIL], 3, ["Up", "Up", "Up", "Down"]),
        ([OK, FAIL, OK, FAIL, FAIL], 2, ["Up", "Up", "Up", "Up", "Down"]),
        ([OK, FAIL, FAIL, OK, OK], 2, ["Up", "Up", "Down", "Down", "Up"]),
        ([OK, FAIL], 1, ["Up", "Down"]),
    ],
)
def test_threshold(results: list[bool], threshold: int, states: list[str]) -> None:
    state = BackendHealth.new(probed=True, now=0.0)
    assert (state.state, state.reason) == ("Down", health.NOT_PROBED_YET)
    seen = []
    for tick, ok in enumerate(results):
        state.observe(ok, health.HTTP_STATUS_ERROR, "", threshold, float(tick))
        seen.append(state.state)
    assert seen == states


def test_reasons_say_when_a_flip_is_coming() -> None:
    state = BackendHealth.new(probed=True, now=0.0)
    state.observe(OK, "", "", 2, 1.0)
    state.observe(FAIL, health.HTTP_STATUS_ERROR, "HTTP 503", 2, 2.0)
    assert (state.state, state.reason) == ("Up", health.APPROACHING_UNHEALTHY)
    state.observe(FAIL, health.HTTP_STATUS_ERROR, "HTTP 503", 2, 3.0)
    assert (state.state, state.reason, state.changed_at) == ("Down", health.HTTP_STATUS_ERROR, 3.0)
    state.observe(OK, "", "", 2, 4.0)
    assert (state.state, state.reason) == ("Down", health.APPROACHING_HEALTHY)
    unprobed = BackendHealth.new(probed=False, now=0.0)
    assert (unprobed.state, unprobed.reason) == ("Up", health.SUCCESS)


# The running prober --------------------------------------------------------------------------


def test_prober_flips_with_the_threshold_and_logs_every_change(sim: RunningSimulator) -> None:
    fast_probe(sim, threshold=3)
    with Backend("web-1") as app:
        reply = sim.control("PUT", "/vms/web-1/ports", {"8080": app.port})
        assert reply.json()["ports"] == {"8080": app.port}
        wait_for(lambda: backend(sim, W1)["state"] == "Up")
        app.status = 503
        wait_for(lambda: backend(sim, W1)["state"] == "Down")
        down = backend(sim, W1)
        assert down["reason"] == health.HTTP_STATUS_ERROR
        assert down["probe"]["failures"] >= 3 and down["probe"]["detail"] == "HTTP 503"
        app.status = 200
        wait_for(lambda: backend(sim, W1)["state"] == "Up")

    mine = [
        e
        for e in history(sim)
        if e["probe"] == "probe-http"
        and e["backend"].endswith("web-1-nic/ipConfigurations/ipconfig1")
    ]
    assert [e["event"] for e in mine] == ["joined", "probed", "up", "down", "up"]
    assert (mine[1]["state"], mine[1]["reason"]) == ("Down", "NA")
    times = [e["t"] for e in mine]
    assert times == sorted(times)
    # Every entry carries the rule's counts after the change, so the log alone can be plotted.
    assert (
        mine[3]["rules"]["rule-http"]["probed_up"] == mine[2]["rules"]["rule-http"]["probed_up"] - 1
    )
    assert mine[3]["rules"]["rule-http"]["members"] == 3
    since = times[2]
    later = sim.control("GET", f"/load-balancers/lb-web/history?since={since}").json()["entries"]
    assert all(e["t"] > since for e in later) and len(later) < len(history(sim))


def test_no_port_map_means_no_probe_traffic(sim: RunningSimulator) -> None:
    fast_probe(sim)
    with Backend("web-1") as app:
        assert sim.control("POST", "/load-balancers/probe").json() == {"probed": 0}
        assert backend(sim, W1)["probe"]["probed"] is False
        assert backend(sim, W1)["state"] == "Up"  # not simulated: counts as healthy
        sim.control("PUT", "/vms/web-1/ports", {"8080": app.port})
        assert sim.control("POST", "/load-balancers/probe").json()["probed"] == 3
        assert app.health_requests >= 3
        sim.control("PUT", "/vms/web-1/ports", {})
        assert sim.control("POST", "/load-balancers/probe").json() == {"probed": 0}
        assert backend(sim, W1)["probe"]["probed"] is False


def test_a_slow_answer_is_a_timeout(sim: RunningSimulator) -> None:
    fast_probe(sim, interval=0.2, threshold=1)
    with Backend("web-1") as app:
        sim.control("PUT", "/vms/web-1/ports", {"8080": app.port})
        wait_for(lambda: backend(sim, W1)["state"] == "Up")
        app.hang(True)  # no answer within min(interval, 30 s) = 0.2 s
        wait_for(lambda: backend(sim, W1)["state"] == "Down")
        assert backend(sim, W1)["reason"] == health.NO_RESPONSE


def test_leaving_the_pool_forgets_the_backend(sim: RunningSimulator) -> None:
    fast_probe(sim)
    with Backend("web-1") as app:
        sim.control("PUT", "/vms/web-1/ports", {"8080": app.port})
        wait_for(lambda: backend(sim, W2)["state"] == "Up")
        sim.control("PUT", "/nics/web-1-nic/pools", {"ip_configurations": {"ipconfig2": []}})
        wait_for(
            lambda: any(
                e["event"] == "left" and e["backend"].endswith("ipconfig2") for e in history(sim)
            )
        )
        app.status = 503  # it comes back to a failing app: down, never up since it rejoined
        sim.control(
            "PUT", "/nics/web-1-nic/pools", {"ip_configurations": {"ipconfig2": ["pool-http"]}}
        )
        wait_for(lambda: backend(sim, W2)["probe"]["probes"] >= 2)
        assert backend(sim, W2)["state"] == "Down"
        assert backend(sim, W2)["probe"]["changed_at"] > 0


def test_a_hundred_backends_probed_every_second_leave_the_simulator_responsive() -> None:
    with RunningSimulator(quick_options(arm=False)) as sim, Backend("fleet") as app:
        fast_probe(sim, interval=1.0)
        fleet = [
            {"name": f"vm-{i:03}", "ports": {"8080": app.port}, "pools": ["pool-http"]}
            for i in range(120)
        ]
        created = sim.control("POST", "/vms", fleet)
        assert created.status == 201 and len(created.json()) == 120

        def counts() -> dict[str, int]:
            lb = sim.control("GET", "/load-balancers/lb-web").json()
            found: dict[str, int] = lb["rules"][0]["counts"]
            return found

        wait_for(lambda: counts()["probed_up"] == 120, timeout=30)
        first = app.health_requests
        worst = 0.0
        for _ in range(20):
            started = time.monotonic()
            assert sim.control("GET", "/vms").status == 200
            worst = max(worst, time.monotonic() - started)
        wait_for(lambda: app.health_requests >= first + 240, timeout=30)  # ~120 probes per second
        assert worst < 2.0, f"a control request took {worst:.2f} s while probing"
