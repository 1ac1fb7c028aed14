"""ARM throttling as Azure documents it: token buckets per subscription and principal (and a
global one for the subscription), 429 with Retry-After when empty, and the remaining-requests
headers on every ARM answer. Time is the world's hand-driven clock, so refills are exact."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator

import pytest

from sidecar.simulator import main as simulator_main
from tests.simulator_helpers import FakeClock, RunningSimulator, quick_options

SUB = "11111111-2222-4333-8444-555555555555"
NICS = f"/subscriptions/{SUB}/resourceGroups/rg-sim/providers/Microsoft.Network/networkInterfaces"
VERSION = "api-version=2026-03-01"
READS = "x-ms-ratelimit-remaining-subscription-reads"
WRITES = "x-ms-ratelimit-remaining-subscription-writes"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[RunningSimulator]:
    with RunningSimulator(quick_options(), clock=clock) as running:
        yield running


def throttle(sim: RunningSimulator, **settings: object) -> None:
    reply = sim.control("PATCH", "/settings", {"arm_throttle": settings})
    assert reply.status == 200, reply.text


def test_every_arm_answer_says_what_remains(sim: RunningSimulator) -> None:
    token = sim.token()
    first = sim.arm("GET", f"{NICS}?{VERSION}", token=token)
    second = sim.arm("GET", f"{NICS}/web-1-nic?{VERSION}", token=token)
    assert (first.headers[READS], second.headers[READS]) == ("249", "248")  # Azure's 250 bucket
    missing = sim.arm("GET", f"{NICS}/nope?{VERSION}", token=token)
    assert missing.status == 404 and missing.headers[READS] == "247"  # errors count too
    nic = sim.control("GET", "/nics/web-1-nic").json()
    put = sim.arm("PUT", f"{NICS}/web-1-nic?{VERSION}", token=token, body=nic)
    assert put.headers[WRITES] == "199" and READS not in put.headers
    settings = sim.control("GET", "/settings").json()["arm_throttle"]
    assert settings == {
        "enabled": False,
        "read_bucket": 250.0,
        "read_refill": 25.0,
        "write_bucket": 200.0,
        "write_refill": 10.0,
        "delete_bucket": 200.0,
        "delete_refill": 10.0,
        "global_factor": 15.0,
    }


def test_off_by_default_counts_but_never_refuses(sim: RunningSimulator) -> None:
    throttle(sim, read_bucket=2, read_refill=1)
    token = sim.token()
    statuses = [sim.arm("GET", f"{NICS}?{VERSION}", token=token) for _ in range(4)]
    assert [r.status for r in statuses] == [200] * 4
    assert statuses[-1].headers[READS] == "0"


def test_an_empty_bucket_answers_429_until_it_refills(
    sim: RunningSimulator, clock: FakeClock
) -> None:
    throttle(sim, enabled=True, read_bucket=2, read_refill=0.4)
    token = sim.token()
    assert [sim.arm("GET", f"{NICS}?{VERSION}", token=token).status for _ in range(2)] == [200, 200]
    refused = sim.arm("GET", f"{NICS}?{VERSION}", token=token)
    assert refused.status == 429
    assert refused.headers["Retry-After"] == str(math.ceil(1 / 0.4))
    error = refused.json()["error"]
    principal = next(v for v in sim.control("GET", "/vms").json() if v["name"] == "web-1")[
        "principal_id"
    ]
    assert error["code"] == "SubscriptionRequestsThrottled"
    assert error["message"] == (
        f"Number of 'read' requests for subscription '{SUB}' actor '{principal}' exceeded. "
        "Please try again after '3' seconds."
    )
    # Writes have their own bucket.
    nic = sim.control("GET", "/nics/web-1-nic").json()
    assert sim.arm("PUT", f"{NICS}/web-1-nic?{VERSION}", token=token, body=nic).status == 200
    clock.advance(2.4)  # 0.96 of a token: not yet
    assert sim.arm("GET", f"{NICS}?{VERSION}", token=token).status == 429
    clock.advance(0.2)
    assert sim.arm("GET", f"{NICS}?{VERSION}", token=token).status == 200
    requests = sim.control("GET", "/requests").json()
    assert requests["throttled"] == {"total": 2, "counts": {"GET arm-list": 2}}
    assert [e["throttled"] for e in requests["log"] if e["kind"] == "arm-list"] == [
        False,
        False,
        True,
        True,
        False,
    ]


def test_each_principal_has_a_bucket_and_the_subscription_a_global_one(
    sim: RunningSimulator,
) -> None:
    throttle(sim, enabled=True, read_bucket=2, read_refill=0.1)
    web1, web2 = sim.token(), sim.token(vm="web-2")
    for token in (web1, web1, web2, web2):
        assert sim.arm("GET", f"{NICS}?{VERSION}", token=token).status == 200
    assert sim.arm("GET", f"{NICS}?{VERSION}", token=web2).status == 429
    # With a global bucket as big as one principal's (it shrinks to 2 tokens), web-3 empties
    # it and web-4, whose own bucket is full, is refused.
    throttle(sim, global_factor=1)
    web3, web4 = sim.token(vm="web-3"), sim.token(vm="web-4")
    assert [sim.arm("GET", f"{NICS}?{VERSION}", token=web3).status for _ in range(2)] == [200, 200]
    assert sim.arm("GET", f"{NICS}?{VERSION}", token=web4).status == 429


def test_throttling_survives_a_reset_but_the_setting_does_not(sim: RunningSimulator) -> None:
    throttle(sim, enabled=True, read_bucket=1, read_refill=0.01)
    token = sim.token()
    assert sim.arm("GET", f"{NICS}?{VERSION}", token=token).status == 200
    sim.control("POST", "/reset")
    assert sim.control("GET", "/settings").json()["arm_throttle"]["enabled"] is False
    assert sim.arm("GET", f"{NICS}?{VERSION}", token=token).headers[READS] == "0"


def test_bad_throttle_settings_are_refused(sim: RunningSimulator) -> None:
    for bad in ({"read_bucket": 0}, {"nope": 1}, {"enabled": "yes"}, "on"):
        assert sim.control("PATCH", "/settings", {"arm_throttle": bad}).status == 400
    assert sim.control("PATCH", "/settings", {"arm_throttle": True}).json()["arm_throttle"][
        "enabled"
    ]


def test_flag_turns_it_on() -> None:
    parser = argparse.ArgumentParser()
    simulator_main.configure_parser(parser)
    assert simulator_main.options_from_args(parser.parse_args(["--arm-throttle"])).arm_throttle
    assert not simulator_main.options_from_args(parser.parse_args([])).arm_throttle
    with RunningSimulator(quick_options(arm_throttle=True)) as sim:
        assert sim.control("GET", "/settings").json()["arm_throttle"]["enabled"] is True
