"""Where a running simulator can be reached, and the typed keys its web apps share.

Invariant: the URLs are known before any app is built (sockets are bound first), so every
answer that names a URL (the control index, the ready file) names the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.simulator.traffic import RequestRecord
from sidecar.simulator.world import World


@dataclass(frozen=True)
class SimulatorUrls:
    """``imds_url`` is what SIDECAR_IMDS_URL (and AZURE_POD_IDENTITY_AUTHORITY_HOST) take."""

    imds_url: str
    control_url: str
    arm_url: str | None
    ca_file: Path | None

    def vm_url(self, vm_name: str) -> str:
        """The IMDS root of another VM's view."""
        return f"{self.imds_url}/vms/{vm_name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "imds_url": self.imds_url,
            "control_url": self.control_url,
            "arm_url": self.arm_url,
            "ca_file": str(self.ca_file) if self.ca_file is not None else None,
        }


WORLD = web.AppKey("world", World)
URLS = web.AppKey("urls", SimulatorUrls)
RECORD = web.RequestKey("record", RequestRecord)
"""The request-log entry of the request being answered (set by the middleware)."""
