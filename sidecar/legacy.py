"""The 2016 In-VM Metadata preview, for `SIDECAR_API_VERSION=legacy-2016`.

The preview is retired in Azure. It stays readable here for old images whose scripts still call
it, and so that the simulator (which serves it) is checked against a client. What it offered:
`GET /metadata/v1/maintenance` answers `{}`, or `{"EventID", "EventCreationTime"}` when this VM
is about to be impacted; `GET /metadata/v1/InstanceInfo` answers `{"ID", "UD", "FD"}`.

Invariants: any EventID is a maintenance of this VM, drained like a Reboot of unknown
NotBefore; the preview had no approval, so none is ever sent; the document's incarnation
changes whenever the answer does, as Scheduled Events' does.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from sidecar.events import EventsDocument, ScheduledEvent
from sidecar.imds import Compute, ImdsError, request_json

MAINTENANCE_TYPE = "Reboot"
"""The preview announced planned maintenance reboots; it named no type."""


class LegacyClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, vm_name: str | None) -> None:
        self._session = session
        self._maintenance_url = f"{base_url}/metadata/v1/maintenance"
        self._info_url = f"{base_url}/metadata/v1/InstanceInfo"
        self.vm_name = vm_name
        self.instance_info: dict[str, str] | None = None
        self._last: dict[str, Any] | None = None
        self._incarnation = 0

    async def scheduled_events(self, timeout: float) -> EventsDocument:
        payload = await request_json(self._session, "GET", self._maintenance_url, None, timeout)
        if not isinstance(payload, dict):
            raise ImdsError("the 2016 maintenance answer is not a JSON object", transient=True)
        if payload != self._last:
            self._last = payload
            self._incarnation += 1
        event_id = payload.get("EventID")
        if not event_id:
            return EventsDocument(incarnation=self._incarnation, events=())
        event = ScheduledEvent(
            event_id=str(event_id),
            event_type=MAINTENANCE_TYPE,
            resources=(self.vm_name or "this-vm",),
            status="Scheduled",
            resource_type="VirtualMachine",
            description=f"2016 preview maintenance, created {payload.get('EventCreationTime')}",
            source="Platform",
        )
        return EventsDocument(incarnation=self._incarnation, events=(event,))

    async def approve(self, event_id: str, timeout: float) -> None:
        raise ImdsError("the 2016 preview has no approval", transient=False)

    async def compute(self, timeout: float) -> Compute:
        """The VM's name from InstanceInfo (its `ID`, with the preview's leading `_` dropped)."""
        payload = await request_json(self._session, "GET", self._info_url, None, timeout)
        if not isinstance(payload, dict) or not isinstance(payload.get("ID"), str):
            raise ImdsError("InstanceInfo has no ID", transient=True)
        self.instance_info = {key: str(value) for key, value in payload.items()}
        name = self.vm_name or payload["ID"].removeprefix("_")
        self.vm_name = name
        return Compute(
            name=name, resource_id="", resource_group="", subscription_id="", scale_set=""
        )

    def describe(self) -> dict[str, Any] | None:
        return {"api": "legacy-2016 (retired preview)", "instance_info": self.instance_info}
