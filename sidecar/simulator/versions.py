"""The api-versions each simulated endpoint accepts.

Invariant: Scheduled Events, instance metadata and managed identity are versioned separately
(as in IMDS), so a version valid for one endpoint can be refused by another; version strings
are ISO dates and compare correctly as strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

SCHEDULED_EVENTS_VERSIONS: tuple[str, ...] = (
    "2017-03-01",  # preview: Resources of IaaS VMs carried a leading underscore
    "2017-08-01",  # Metadata header enforced, underscore removed
    "2017-11-01",  # + Preempt
    "2019-01-01",  # + Terminate
    "2019-04-01",  # + Description
    "2019-08-01",  # + EventSource
    "2020-07-01",  # + DurationInSeconds
)

EVENT_TYPES_SINCE: Mapping[str, str] = {"Preempt": "2017-11-01", "Terminate": "2019-01-01"}
"""The Scheduled Events version that introduced each later event type (Microsoft's version
table); Reboot, Redeploy and Freeze date from the start, and unknown types are always shown."""

INSTANCE_VERSIONS: tuple[str, ...] = (
    "2017-03-01",
    "2017-04-02",
    "2017-08-01",
    "2017-10-01",
    "2017-12-01",
    "2018-02-01",
    "2018-04-02",
    "2018-10-01",
    "2019-02-01",
    "2019-03-11",
    "2019-04-30",
    "2019-06-01",
    "2019-06-04",
    "2019-08-01",
    "2019-08-15",
    "2019-11-01",
    "2020-06-01",
    "2020-07-15",
    "2020-09-01",
    "2020-10-01",
    "2020-12-01",
    "2021-01-01",
    "2021-02-01",
    "2021-03-01",
    "2021-05-01",
    "2021-08-01",
    "2021-10-01",
    "2021-11-01",
    "2021-11-15",
    "2021-12-13",
    "2022-02-01",
    "2022-03-01",
    "2022-05-01",
    "2022-07-29",
    "2022-08-01",
    "2022-11-01",
    "2023-07-01",
    "2023-11-15",
    "2024-03-15",
    "2024-07-17",
    "2025-04-07",
)

IDENTITY_VERSIONS: tuple[str, ...] = ("2018-02-01", "2019-08-01")
"""What the managed-identity token endpoint accepts; azure-identity sends 2018-02-01."""

NETWORK_NEWEST = "2026-03-01"
"""What azure-mgmt-network 33.1 pins for every network-interface operation."""

VMSS_NETWORK_NEWEST = "2018-10-01"
"""What azure-mgmt-network 33.1 pins for the scale-set network-interface operations."""

NETWORK_OLDEST = "2015-06-15"

_DATE_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")


def event_type_known(event_type: str, api_version: str) -> bool:
    """Whether ``api_version`` of Scheduled Events knows events of ``event_type``."""
    return api_version >= EVENT_TYPES_SINCE.get(event_type, "")


def newest(versions: tuple[str, ...], count: int = 3) -> list[str]:
    """The ``newest-versions`` list IMDS puts in a 400 answer."""
    return sorted(versions, reverse=True)[:count]


def network_version_ok(version: str, newest_allowed: str) -> bool:
    """ARM knows many Network versions; we accept any date-shaped one up to what the SDK sends.

    A full list would be guesswork; rejecting future or malformed versions is what catches
    client bugs.
    """
    if not _DATE_VERSION.match(version):
        return False
    return NETWORK_OLDEST <= version[:10] <= newest_allowed
