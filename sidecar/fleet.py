"""Fleet-aware gates: a capacity guard before leaving rotation, and peer-aware approval.

Every VM runs its own sidecar and no sidecar talks to another; what they share is what the load
balancer says through ARM: each load-balancing rule's health, per backend.

- The capacity guard (SIDECAR_MIN_HEALTHY_BACKENDS) keeps a VM serving while its leaving would
  drop a rule of its pools below the minimum. VMs named by one event leave in a fixed order
  (their names, sorted), each taking one of the `up - minimum` free places only if its rank
  among the named VMs still up is below that number: sidecars that read the same health agree
  without talking, and a stale read (a VM that left still counted up) only makes them wait.
  It never holds past the moment the drain can still last the minimum before NotBefore (the
  machine enforces that), and lets go when ARM cannot be read for `GUARD_PATIENCE` seconds:
  the sidecar then behaves as it would without the guard.
- Peer-aware approval (SIDECAR_PEER_AWARE_APPROVAL) makes an approval that releases several
  VMs wait (gate WAIT, so never past the deadline) until every VM the event names is out of
  rotation on this VM's rules.

Invariant: the decisions (`guard_verdict`, `peers_out`) are pure functions of one health read,
so they are table-tested; the gates only schedule reads (with back-off and jitter, so a whole
update domain does not read at once) and remember the last verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.arm_model import ArmError, Backend, Network, RuleHealth
from sidecar.backoff import Backoff
from sidecar.gates import Approval, Wanted
from sidecar.machine import Tracked
from sidecar.pools import PoolAction
from sidecar.settings import MIN_HEALTHY_PATTERN, Settings

log = logging.getLogger(__name__)

GUARD_PATIENCE = 60.0
RECHECK_BASE = 2.0
RECHECK_MAX = 30.0
RULES_REFRESH = 600.0
NAMES_REFRESH = 300.0


@dataclass(frozen=True)
class Minimum:
    count: int | None = None
    percent: int | None = None

    @classmethod
    def parse(cls, text: str) -> Minimum:
        match = MIN_HEALTHY_PATTERN.match(text.strip())
        if match is None:
            raise ValueError(text)
        number = int(match.group(1))
        return cls(percent=number) if match.group(2) else cls(count=number)

    def describe(self) -> str:
        return f"{self.percent}%" if self.percent is not None else str(self.count)

    def of(self, members: int) -> int:
        if self.percent is not None:
            return math.ceil(members * self.percent / 100)
        return self.count or 0


@dataclass(frozen=True)
class RuleVerdict:
    rule: str
    up: int
    members: int
    minimum: int
    rank: int | None
    """Our place among the named VMs still up (None: we are not up here, leaving costs nothing)."""

    @property
    def allows(self) -> bool:
        return self.rank is None or self.rank < self.up - self.minimum

    def describe(self) -> str:
        name = self.rule.rstrip("/").rsplit("/", 1)[-1]
        return f"{name}: {self.up} of {self.members} up, minimum {self.minimum}"


def guard_verdict(
    health: Sequence[RuleHealth],
    names: dict[str, str],
    me: str,
    mine: Iterable[str],
    named: Iterable[str],
    minimum: Minimum,
) -> list[RuleVerdict]:
    """Per rule: may this VM leave now? `names` maps (folded) ipconfig ids to VM names, `mine`
    are this VM's ipconfig ids, `named` the VMs the held events name (us included). Backends
    are counted per VM: a VM with two IP configurations in a rule is one backend leaving."""
    my_configs = {config.casefold() for config in mine}
    named_set = {name.casefold() for name in named} | {me.casefold()}
    verdicts = []
    for rule in health:
        # a VM counts once, however many of its IP configurations are in the rule
        def vm(backend: Backend) -> str:
            return names.get(backend.ipconfig_id.casefold(), backend.ipconfig_id).casefold()

        members = {vm(b) for b in rule.backends}
        up_names = {vm(b) for b in rule.backends if b.up}
        i_am_up = any(b.up and b.ipconfig_id.casefold() in my_configs for b in rule.backends)
        candidates = sorted(up_names & named_set)
        rank = candidates.index(me.casefold()) if i_am_up and me.casefold() in candidates else None
        count = len(members) or rule.up + rule.down
        up = len(up_names) if members else rule.up
        verdicts.append(RuleVerdict(rule.rule_id, up, count, minimum.of(count), rank))
    return verdicts


def peers_out(
    health: Sequence[RuleHealth], names: dict[str, str], named: Iterable[str]
) -> list[str]:
    """The VMs of `named` still in rotation on any of these rules (empty: all out)."""
    wanted = {name.casefold(): name for name in named}
    still = {
        names.get(b.ipconfig_id.casefold(), "").casefold()
        for rule in health
        for b in rule.backends
        if b.up
    }
    return sorted(wanted[key] for key in wanted.keys() & still)


class FleetView:
    """What the load balancer says, read through ARM, with the reads cached sensibly."""

    def __init__(self, settings: Settings, pools: PoolAction) -> None:
        self.settings = settings
        self.pools = pools
        self.network: Network | None = None
        self._rules: list[str] = sorted(settings.lb_rule_ids)
        self._rules_read = 0.0
        self._names: dict[str, str] = {}
        self._names_read: dict[str, float] = {}

    async def health(self) -> list[RuleHealth]:
        if self.network is None:
            raise ArmError("ARM is not reachable yet", permanent=False)
        if self.pools.mode != "active" and not self.settings.lb_rule_ids:
            # the rules come from the NIC's pools: an answer before discovery would be "none"
            raise ArmError(f"this VM's NICs are not known yet ({self.pools.mode})", permanent=False)
        rules = await self._rules_now(self.network)
        return [await self.network.rule_health(rule) for rule in rules]

    async def names(self, health: Sequence[RuleHealth]) -> dict[str, str]:
        """IP configuration id -> VM name for every backend, listing each group's NICs once."""
        if self.network is None:
            raise ArmError("ARM is not reachable yet", permanent=False)
        now = time.monotonic()
        for rule in health:
            for backend in rule.backends:
                config = backend.ipconfig_id.casefold()
                group = _group_of(config)
                fresh = now - self._names_read.get(group, -math.inf) < NAMES_REFRESH
                if group and config not in self._names and not fresh:
                    self._names.update(await self.network.vm_names(group))
                    self._names_read[group] = now
        return self._names

    def my_ipconfigs(self) -> list[str]:
        """This VM's IP configuration ids, from its NICs' ids (ARM builds them that way)."""
        return [
            f"{nic_id}/ipConfigurations/{config}"
            for nic_id, configs in self.pools.known_pools().items()
            for config in configs
        ]

    async def _rules_now(self, network: Network) -> list[str]:
        if self.settings.lb_rule_ids:
            return self._rules
        if not self._rules or time.monotonic() - self._rules_read > RULES_REFRESH:
            pool_ids = {
                pool
                for configs in self.pools.known_pools().values()
                for pools in configs.values()
                for pool in pools
            }
            self._rules = await network.rules_of_pools(sorted(pool_ids))
            self._rules_read = time.monotonic()
        return self._rules


class CapacityGuard:
    """Keeps this VM serving while leaving would break a rule's minimum (see the module)."""

    name = "capacity"

    def __init__(self, minimum: Minimum, view: FleetView, on_change: Callable[[], None]) -> None:
        self.minimum = minimum
        self.view = view
        self.on_change = on_change
        self.me: Callable[[], str | None] = lambda: None
        self.held: tuple[Tracked, ...] = ()
        self.allowed_for: frozenset[str] = frozenset()
        """The held events the last check let go."""
        self.verdicts: list[RuleVerdict] = []
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.checks = 0
        self._changed = asyncio.Event()

    def follow(self, wanted: Wanted) -> None:
        held = tuple(t for t in wanted.held)
        if {t.event_id for t in held} != {t.event_id for t in self.held}:
            self.held = held
            self._changed.set()

    def approval(self) -> Approval:
        return Approval.OPEN

    def probe_hold(self) -> str | None:
        return None

    def keeps_serving(self) -> str | None:
        """Until a check let the held events go, this VM keeps serving (new events start held,
        and are let go as soon as a check allows)."""
        held = frozenset(t.event_id for t in self.held)
        if held and held <= self.allowed_for:
            return None
        if (
            self.failing_since is not None
            and time.monotonic() - self.failing_since > GUARD_PATIENCE
        ):
            return None  # ARM cannot tell: behave as without the guard
        waiting = [v.describe() for v in self.verdicts if not v.allows]
        return "; ".join(waiting) or "capacity not checked yet"

    def failure(self) -> str | None:
        waiting = [v.describe() for v in self.verdicts if not v.allows]
        if not self.held or not waiting:
            return None
        return "capacity guard keeps this VM serving: " + "; ".join(waiting)

    def status(self, *, detailed: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "minimum": self.minimum.describe(),
            "holding": bool(self.held) and self.keeps_serving() is not None,
            "checks": self.checks,
            "rules": [
                {"up": v.up, "members": v.members, "minimum": v.minimum, "allows": v.allows}
                | ({"rule": v.rule, "rank": v.rank} if detailed else {})
                for v in self.verdicts
            ],
        }
        if detailed:
            body["last_error"] = self.last_error
        return body

    async def run(self) -> None:
        def due() -> bool:
            return bool(self.held) and not {t.event_id for t in self.held} <= self.allowed_for

        await recheck(self._changed, due, self._check, self.on_change)

    async def _check(self) -> bool:
        held = self.held
        self.checks += 1
        try:
            health = await self.view.health()
            names = await self.view.names(health)
        except ArmError as error:
            self.last_error = str(error)
            self.failing_since = self.failing_since or time.monotonic()
            log.warning("capacity guard cannot read the rules' health: %s", error)
            return False
        self.failing_since = None
        self.last_error = None
        named = {name for t in held for name in t.resources}
        me = self.me() or ""
        self.verdicts = guard_verdict(
            health, names, me, self.view.my_ipconfigs(), named, self.minimum
        )
        if all(v.allows for v in self.verdicts):
            self.allowed_for = frozenset(t.event_id for t in held)
            log.info(
                "capacity guard: this VM may leave (%s)",
                ", ".join(v.describe() for v in self.verdicts) or "no rules",
            )
            return True
        log.info(
            "capacity guard keeps this VM serving: %s",
            "; ".join(v.describe() for v in self.verdicts if not v.allows),
        )
        return False


class PeerApproval:
    """An approval that releases several VMs waits until every one of them is out of rotation."""

    name = "peers"

    def __init__(self, view: FleetView, on_change: Callable[[], None]) -> None:
        self.view = view
        self.on_change = on_change
        self.pending: tuple[Tracked, ...] = ()
        self.confirmed: frozenset[str] = frozenset()
        self.still_in: list[str] = []
        self.last_error: str | None = None
        self._changed = asyncio.Event()

    def follow(self, wanted: Wanted) -> None:
        pending = tuple(
            t for t in wanted.events if len(t.resources) > 1 and t.approve_at is not None
        )
        if {t.event_id for t in pending} != {t.event_id for t in self.pending}:
            self.pending = pending
            self._changed.set()

    def approval(self) -> Approval:
        waiting = {t.event_id for t in self.pending} - self.confirmed
        return Approval.WAIT if waiting else Approval.OPEN

    def probe_hold(self) -> str | None:
        return None

    def keeps_serving(self) -> str | None:
        return None

    def failure(self) -> str | None:
        return None

    def status(self, *, detailed: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "waiting": self.approval() is Approval.WAIT,
            "still_in_rotation": len(self.still_in),
        }
        if detailed:
            body.update(still_in=self.still_in, last_error=self.last_error)
        return body

    async def run(self) -> None:
        await recheck(self._changed, lambda: bool(self._waiting()), self._check, self.on_change)

    def _waiting(self) -> list[Tracked]:
        return [t for t in self.pending if t.event_id not in self.confirmed]

    async def _check(self) -> bool:
        waiting = self._waiting()
        try:
            health = await self.view.health()
            names = await self.view.names(health)
        except ArmError as error:
            self.last_error = str(error)
            return False
        self.last_error = None
        done = True
        for tracked in waiting:
            self.still_in = peers_out(health, names, tracked.resources)
            if self.still_in:
                done = False
                log.info(
                    "peer-aware approval of %s waits: %s still in rotation",
                    tracked.event_id,
                    ", ".join(self.still_in),
                )
            else:
                self.confirmed |= {tracked.event_id}
                log.info("every VM %s names is out of rotation: approval may go", tracked.event_id)
        return done


async def recheck(
    changed: asyncio.Event,
    due: Callable[[], bool],
    check: Callable[[], Awaitable[bool]],
    on_change: Callable[[], None],
) -> None:
    """Checks whenever `due`, soon after `changed` and again with back-off while a check says
    no; a jitter of up to a second first, so that the VMs of one event do not read together."""
    backoff = Backoff(RECHECK_BASE, RECHECK_MAX)
    while True:
        changed.clear()
        pause: float | None = None
        if due():
            await asyncio.sleep(random.uniform(0, 1))  # noqa: S311 - jitter, not secrets
            if await check():
                backoff.reset()
            else:
                pause = backoff.next_delay()
            on_change()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), pause)


def _group_of(ipconfig_id: str) -> str:
    parts = ipconfig_id.split("/")
    lowered = [p.casefold() for p in parts]
    return parts[lowered.index("resourcegroups") + 1] if "resourcegroups" in lowered else ""
