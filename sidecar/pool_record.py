"""The record of removed pools kept on the NIC itself, as tags: pure encoding and decoding.

Why: the state file can be lost with the disk, or damaged; the NIC cannot. The PUT that takes the
NIC out of its pools also writes which pools it left into the NIC's tags, and the PUT that puts
it back clears them, so a sidecar that starts with no state at all still finds, on its own NIC,
any removal that was never undone.

Invariants: `decode(nic_id, encode(nic_id, removed).tags)` gives back `removed` (ids compared
case-insensitively); every tag value fits Azure's 256-character limit, and a membership that
cannot fit is reported (`Encoded.unrecorded`), never silently dropped; tags that are not ours
are never read or written; an entry that does not decode is reported and skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TAG = "drain-sidecar-removed"
"""The first tag; more memberships than fit in one value go on in `-2`, `-3`, ..."""
MAX_VALUE = 256
_OURS = re.compile(rf"^{re.escape(TAG)}(-\d+)?$", re.IGNORECASE)
_POOL = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Network/"
    r"(?P<kind>loadBalancers|applicationGateways)/(?P<parent>[^/]+)/backendAddressPools/"
    r"(?P<pool>[^/]+)$",
    re.IGNORECASE,
)
_NIC = re.compile(r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/", re.IGNORECASE)
_KIND_PREFIX = {"loadbalancers": "lb", "applicationgateways": "agw"}
_PREFIX_KIND = {"lb": "loadBalancers", "agw": "applicationGateways"}

PoolsByIpConfig = dict[str, list[str]]


@dataclass(frozen=True)
class Encoded:
    tags: dict[str, str]
    unrecorded: list[str]
    """Memberships too long for a tag value: only the state file records them."""


def is_ours(tag_name: str) -> bool:
    return bool(_OURS.match(tag_name))


def encode(nic_id: str, removed: Mapping[str, Iterable[str]]) -> Encoded:
    """`removed` (IP configuration -> pool ids) as tags named `TAG`, `TAG-2`, ..."""
    items: list[str] = []
    unrecorded: list[str] = []
    for config, pools in sorted(removed.items()):
        for pool in dict.fromkeys(pools):  # the NIC's own order, so it comes back the same
            item = f"{config}={_short(nic_id, pool)}"
            (items if len(item) <= MAX_VALUE else unrecorded).append(item)
    values: list[str] = []
    for item in items:
        if values and len(values[-1]) + 1 + len(item) <= MAX_VALUE:
            values[-1] += ";" + item
        else:
            values.append(item)
    names = [TAG if n == 1 else f"{TAG}-{n}" for n in range(1, len(values) + 1)]
    return Encoded(dict(zip(names, values, strict=True)), unrecorded)


def decode(nic_id: str, tags: Mapping[str, str] | None) -> tuple[PoolsByIpConfig, list[str]]:
    """Our tags back into memberships, and the entries that could not be read."""
    removed: PoolsByIpConfig = {}
    unreadable: list[str] = []
    for name, value in sorted((tags or {}).items()):
        if not is_ours(name):
            continue
        for item in str(value).split(";"):
            config, sep, short = item.partition("=")
            pool = _long(nic_id, short) if sep and config else None
            if pool is None:
                unreadable.append(item)
                continue
            known = {p.casefold() for p in removed.setdefault(config, [])}
            if pool.casefold() not in known:
                removed[config].append(pool)
    return removed, unreadable


def without_ours(tags: Mapping[str, str] | None) -> dict[str, str]:
    return {name: value for name, value in (tags or {}).items() if not is_ours(name)}


def _short(nic_id: str, pool_id: str) -> str:
    """`lb:LB/POOL` in the NIC's resource group, `lb:RG/LB/POOL` elsewhere in its
    subscription, the whole id otherwise."""
    pool, nic = _POOL.match(pool_id), _NIC.match(nic_id)
    if pool is None or nic is None or pool["sub"].casefold() != nic["sub"].casefold():
        return pool_id
    prefix = _KIND_PREFIX[pool["kind"].casefold()]
    where = "" if pool["rg"].casefold() == nic["rg"].casefold() else f"{pool['rg']}/"
    return f"{prefix}:{where}{pool['parent']}/{pool['pool']}"


def _long(nic_id: str, short: str) -> str | None:
    if short.startswith("/"):
        return short if _POOL.match(short) else None
    prefix, sep, path = short.partition(":")
    nic = _NIC.match(nic_id)
    parts = path.split("/")
    if not sep or prefix not in _PREFIX_KIND or nic is None or len(parts) not in (2, 3):
        return None
    group = parts[0] if len(parts) == 3 else nic["rg"]
    parent, pool = parts[-2:]
    if not (group and parent and pool):
        return None
    return (
        f"/subscriptions/{nic['sub']}/resourceGroups/{group}/providers/Microsoft.Network/"
        f"{_PREFIX_KIND[prefix]}/{parent}/backendAddressPools/{pool}"
    )
