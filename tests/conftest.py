"""Fixtures: a fresh simulator per test, and sidecars started against it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.arm_support import arm_settings
from tests.simulator_helpers import FakeClock, RunningSimulator, quick_options
from tests.support import Sidecar, SidecarFactory, Simulator


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    sim = Simulator(tmp_path, "--no-arm", "--started-seconds", "2")
    yield sim
    sim.close()


@pytest.fixture
def start_sidecar(tmp_path: Path, simulator: Simulator) -> Iterator[SidecarFactory]:
    """Starts `sidecar run` against the simulator, with SIDECAR_* overrides as keywords."""
    started: list[Sidecar] = []

    def start(env: dict[str, str] | None = None, **settings: str) -> Sidecar:
        """`env` adds other environment variables (NO_PROXY, PYTHON*)."""
        variables = {"SIDECAR_IMDS_URL": simulator.imds_url, "SIDECAR_VM_NAME": "web-1"}
        variables.update({f"SIDECAR_{key.upper()}": value for key, value in settings.items()})
        variables.update(env or {})
        sidecar = Sidecar(tmp_path, {k: v for k, v in variables.items() if v != ""})
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.close()


@pytest.fixture
def start_arm_sidecar(start_sidecar: SidecarFactory, simulator: Simulator) -> SidecarFactory:
    """`start_sidecar` with pool removal on; the module must provide an ARM `simulator`
    (tests.arm_support.arm_simulator)."""

    def start(env: dict[str, str] | None = None, **settings: str) -> Sidecar:
        return start_sidecar(
            env={"NO_PROXY": "localhost", **(env or {})}, **arm_settings(simulator, **settings)
        )

    return start


@pytest.fixture
def clock() -> FakeClock:
    """The in-process simulator's clock, moved by hand in the simulator's own tests."""
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[RunningSimulator]:
    """An in-process simulator (IMDS and control API, no ARM) on a hand-driven clock."""
    with RunningSimulator(quick_options(arm=False), clock=clock) as running:
        yield running
