"""The 2016 preview, the "In-VM Metadata service": ``/metadata/v1/maintenance`` and
``/metadata/v1/InstanceInfo``. Retired in Azure, still called by old images' scripts.

Microsoft's 2015 post ("What just happened to my VM?", azure.microsoft.com/blog) calls
``curl http://169.254.169.254/metadata/v1/maintenance`` with no header and no api-version and
shows ``{}`` normally, ``{"EventID": "6f0a13a3-…", "EventCreationTime": "9\\/15\\/2015 6:42:51
AM"}`` when the VM is about to reboot; the same post shows InstanceInfo as
``{"ID":"myInstanceVM1","UD":"0","FD":"0"}``. Scripts written for IaaS VMs strip a leading
``_`` from ``ID`` (the 2017-03-01 Scheduled Events preview prefixed VM names the same way).

Invariants: these answers are derived from the same event book and VMs as everything else
(nothing is stored for them); ``maintenance`` shows at most one event, the earliest to start of
those that name the VM, of a type the 2016 service knew; every value is a string.
"""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.simulator.events import STARTED, ScheduledEvent
from sidecar.simulator.times import dotnet_general
from sidecar.simulator.versions import SCHEDULED_EVENTS_VERSIONS, event_type_known
from sidecar.simulator.vms import Vm

_OLDEST = SCHEDULED_EVENTS_VERSIONS[0]
"""The 2016 service knew no more event types than the first Scheduled Events version."""


def maintenance_document(events: Iterable[ScheduledEvent], vm_name: str) -> dict[str, str]:
    """``{}``, or the event that will hit (or is hitting) this VM first."""
    wanted = vm_name.casefold()
    mine = [
        event
        for event in events
        if any(name.casefold() == wanted for name in event.resources)
        and event_type_known(event.event_type, _OLDEST)
    ]
    if not mine:
        return {}
    first = min(mine, key=_starts)
    return {"EventID": first.event_id, "EventCreationTime": dotnet_general(first.created_at)}


def _starts(event: ScheduledEvent) -> tuple[float, float]:
    """When the event starts (or started); creation breaks ties."""
    if event.status == STARTED and event.started_at is not None:
        return (event.started_at, event.created_at)
    due = event.not_before if event.not_before is not None else event.created_at
    return (due, event.created_at)


def instance_info(vm: Vm) -> dict[str, str]:
    return {"ID": f"_{vm.name}", "UD": str(vm.update_domain), "FD": str(vm.fault_domain)}
