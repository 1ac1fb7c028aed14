"""When a maintenance's impact on this VM is over, for `SIDECAR_RETURN_AFTER=impact`; pure.

Microsoft's Scheduled Events page: a Reboot's impact lasts seconds, yet the event stays listed as
`Started` for minutes after it; the page warns that a shorter second impact may follow while it
is listed, and names the event's removal as the signal to recover. `impact` accepts that risk,
on evidence only, never on a guess:
- Reboot, Redeploy: the boot id differs from the one recorded when we first saw the event, so
  this VM went down and came back; a restart of the sidecar alone keeps the boot id;
- Freeze: its `DurationInSeconds` (plus a margin) has passed since it began (after we last saw
  it `Scheduled`), and a margin since we saw it `Started`; an unknown duration decides nothing;
- Preempt, Terminate: the VM does not come back; nothing to decide.
"""

from __future__ import annotations

REBOOTS = frozenset({"Reboot", "Redeploy"})
FREEZE = "Freeze"


def freeze_over_at(
    event_type: str,
    duration_seconds: int,
    started_seen: float | None,
    margin: float,
    scheduled_seen: float | None = None,
) -> float | None:
    """When a Freeze of known duration is over. It began after we last saw it `Scheduled`
    (when we did) and before we first saw it `Started`: counting from the former is right
    when the freeze paused this very process (then the latter comes after the freeze); and it is
    never over sooner than a margin after we saw it started."""
    if event_type != FREEZE or duration_seconds < 0 or started_seen is None:
        return None
    began = scheduled_seen if scheduled_seen is not None else started_seen
    return max(began + duration_seconds + margin, started_seen + margin)


def impact_over(
    event_type: str,
    *,
    duration_seconds: int,
    boot_seen: str | None,
    boot_now: str | None,
    over_at: float | None,
    now: float,
) -> str | None:
    """Why the impact of a started event is over, or None while it is not known to be."""
    if event_type in REBOOTS:
        if boot_seen and boot_now and boot_seen != boot_now:
            return "impact over: this VM booted again (new boot id) while the event is listed"
        return None
    if over_at is not None and now >= over_at:
        return f"impact over: the {duration_seconds} s Freeze has passed"
    return None


def started_reason(event_type: str, duration_seconds: int, *, seen_before_start: bool) -> str:
    """What a started event waits for, in /status."""
    if event_type in REBOOTS:
        if seen_before_start:
            return "the platform started it; serving again once this VM has booted again"
        return (
            "started before this sidecar saw it (no record from before the start): serving "
            "again once it leaves the document, or after a reboot seen from here"
        )
    if event_type == FREEZE:
        if duration_seconds < 0:
            return "Freeze of unknown duration: serving again once it leaves the document"
        return f"Freeze of {duration_seconds} s: serving again once it has passed"
    return "the platform started it; this VM does not come back from it"
