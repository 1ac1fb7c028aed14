"""The suite runs with loopback only, so no test can reach IMDS or ARM for real by mistake."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.mark.skipif(
    not os.environ.get("TESTS_NETWORK_ISOLATED") and not os.environ.get("CI_REQUIRE_ALL"),
    reason="scripts/check runs the suite in a loopback-only network namespace",
)
def test_nothing_beyond_loopback_is_reachable() -> None:
    for address in ("169.254.169.254", "20.190.160.1"):  # IMDS, and an address of Azure's
        with pytest.raises(OSError), socket.create_connection((address, 80), timeout=2):
            pass
