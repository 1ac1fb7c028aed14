"""Whatever ARM answers, the sidecar lives, its probe answers, and once ARM behaves again the
NIC ends in exactly its pools, with no record of a removal left on it or in the state file.

Hypothesis generates what ARM (or a proxy in front of it) answers to the list, get, PUT and
operation requests of a drain: any status, bodies of every JSON shape, truncated or not JSON at
all, wrong content types, slow and hanging answers, failed long-running operations. The
simulator serves them through its `answer`, `slow`, `hang` and `failed` faults, to one real
`sidecar run` process that lives through every example (a process per example would cost more
than the examples). `ARM_ANSWER_EXAMPLES` sets how many (CI: 12; the long run in
BENCHMARKS.md: more).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.arm_support import ORIGINAL, arm_settings, arm_simulator, nic, pool_status, pools
from tests.support import PATIENCE, Sidecar, wait_for

EXAMPLES = int(os.environ.get("ARM_ANSWER_EXAMPLES", "12"))
TARGETS = ("arm-list", "arm-get", "arm-put", "arm-operation")
STATUSES = (200, 200, 201, 202, 204, 400, 401, 403, 404, 409, 412, 429, 500, 502, 503, 504)
CONTENT_TYPES = ("application/json", "application/json; charset=utf-8", "text/html", "text/plain")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["id", "name", "properties", "value", "status", "etag", "error", "x"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
bodies = st.one_of(
    json_values.map(json.dumps),
    json_values.map(json.dumps).flatmap(
        lambda text: st.integers(0, max(0, len(text) - 1)).map(lambda cut: text[:cut])
    ),  # truncated
    st.sampled_from(
        [
            "",
            "<html><body>502 Bad Gateway</body></html>",
            '{"error": {"code": "Busy"}}',
            '{"status": "Failed"}',
            '{"status": "InProgress"}',
            '{"value": "not a list"}',
            '{"properties": {"ipConfigurations": "ipconfig1"}}',
        ]
    ),
)
answers = st.fixed_dictionaries(
    {
        "kind": st.just("answer"),
        "target": st.sampled_from(TARGETS),
        "status": st.sampled_from(STATUSES),
        "body": bodies,
        "content_type": st.sampled_from(CONTENT_TYPES),
        "apply": st.booleans(),
        "count": st.integers(1, 3),
    }
)
delays = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["slow", "hang"]),
        "target": st.sampled_from(TARGETS),
        "seconds": st.floats(0.1, 3.0),
        "count": st.just(1),
    }
)
failed_operations = st.fixed_dictionaries(
    {"kind": st.just("failed"), "target": st.just("arm-operation"), "count": st.integers(1, 2)}
)
faults = st.lists(st.one_of(answers, answers, delays, failed_operations), min_size=1, max_size=4)


class Bench:
    """One ARM simulator and one sidecar with pool removal, for every example."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.simulator = arm_simulator(workdir)
        variables = {
            "NO_PROXY": "localhost",  # ARM honours proxy variables; the simulator is local
            "SIDECAR_IMDS_URL": self.simulator.imds_url,
            "SIDECAR_DRAIN_SECONDS": "600",
            "SIDECAR_ARM_TIMEOUT": "5",  # a hanging answer costs an attempt 5 s, not 20
            **{f"SIDECAR_{k.upper()}": v for k, v in arm_settings(self.simulator).items() if v},
        }
        self.sidecar = Sidecar(workdir, variables)

    def close(self) -> None:
        self.sidecar.close()
        self.simulator.close()


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    bench = Bench(tmp_path_factory.mktemp("arm-answers"))
    bench.sidecar.wait_probe(200)
    yield bench
    bench.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(injected=faults)
def test_whatever_arm_answers_the_nic_ends_in_exactly_its_pools(
    bench: Bench, injected: list[dict[str, Any]]
) -> None:
    simulator, sidecar = bench.simulator, bench.sidecar
    for fault in injected:
        simulator.fault(**fault)
    event = simulator.add_event(type="Reboot", not_before_in=900)
    sidecar.wait_probe(503)

    # ARM misbehaves for a while: the process lives and the probe answers at once throughout
    until = time.monotonic() + 3
    while time.monotonic() < until:
        answer = sidecar.probe(timeout=5)
        assert answer.status == 503, answer.body
        assert answer.seconds < 1.0, f"the probe took {answer.seconds:.2f}s"
        time.sleep(0.2)
    assert sidecar.process.alive(), sidecar.process.output()[-3000:]

    # ARM behaves again: the drain ends, and the NIC must end exactly as it began
    simulator.clear_faults()
    simulator.control("DELETE", f"/events/{event['EventId']}")
    wait_for(lambda: _settled(bench), "the NIC back in exactly its pools", PATIENCE * 2)
    tasks = sidecar.status()["tasks"]
    assert all(task["failures"] == 0 for task in tasks.values()), tasks


def _settled(bench: Bench) -> bool:
    """Serving, the NIC in its original pools, and no record of a removal anywhere."""
    simulator, sidecar = bench.simulator, bench.sidecar
    if sidecar.probe_code() != 200 or pools(simulator) != ORIGINAL:
        return False
    if any(tag.startswith("drain-sidecar-removed") for tag in nic(simulator).get("tags", {})):
        return False
    return not pool_status(sidecar)["removed"]
