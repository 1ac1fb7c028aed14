"""Backend-pool removal: the NIC is out of its pools while a drain holds the probe down, and
exactly what was taken out is put back afterwards.

Invariants:
- a removal is never forgotten: what is about to be removed is in the state file before the
  PUT that removes it, the PUT itself records it in the NIC's tags, and both records leave only
  with the PUT that restores it; at start-up the NIC's own record is read too, so a lost or
  damaged state file still puts everything back;
- nothing is restored before the first successful poll says no drain is due;
- approval waits for the removal (gate WAIT), but never past the deadline;
- whatever an attempt raises, ARM's fault or ours, it is logged with its type, counted, shown in
  /status and retried with back-off; nothing here can stop the probe or the drain loop;
- a removal that cannot work (permission, Uniform scale set, no NIC) turns the drain into a
  probe-only drain, said once in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.arm_model import ArmError, Network, NicRef, is_uniform_scale_set, merged
from sidecar.backoff import Backoff
from sidecar.gates import Approval, Wanted
from sidecar.imds import Compute
from sidecar.metrics import Metrics
from sidecar.pool_record import PoolsByIpConfig
from sidecar.settings import Settings
from sidecar.store import StateDocument

log = logging.getLogger(__name__)

SECTION = "pools"
RESTORE_BACKOFF_MAX = 30.0
REMOVE_JITTER_SECONDS = 1.0
"""A whole update domain starts its drains in the same second: spread their first writes."""
REMOVE_BACKOFF_MAX = 5.0


class PoolAction:
    name = "pools"

    def __init__(
        self,
        settings: Settings,
        document: StateDocument,
        metrics: Metrics,
        on_change: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.document = document
        self.metrics = metrics
        self.on_change = on_change
        self.removed: dict[str, PoolsByIpConfig] = _restore_record(document.sections)
        self.nics: list[NicRef] = []
        self.memberships: dict[str, PoolsByIpConfig] = {}
        """Each NIC's pools as read at discovery (the fleet gates find their rules from them)."""
        self.mode = "standby"
        """standby (this VM not identified yet), discovering, active, probe-only."""
        self.note: str | None = None
        self._rediscover_on_drain = False
        self.want_out: bool | None = None
        self.removal_done = False
        self.gave_up = False
        self.restore_attempts = 0
        self.discover_attempts = 0
        self.startup_checked = False
        """Whether start-up has looked for pools to put back (state file, or the NICs' tags)."""
        self.last_error: str | None = None
        self.failures = 0
        self._pool_filter = {pool.casefold() for pool in settings.backend_pool_ids}
        self._changed = asyncio.Event()
        self._remove_after = 0.0
        self._backoffs = {
            "restore": Backoff(1.0, RESTORE_BACKOFF_MAX),
            "discover": Backoff(1.0, RESTORE_BACKOFF_MAX),
            "remove": Backoff(1.0, REMOVE_BACKOFF_MAX),
        }
        self._publish()
        if self.removed:  # expected after a reboot mid-maintenance: information, not a warning
            log.info(
                "the state file says %s out of backend pools; it goes back once no drain is due",
                ", ".join(_name(nic_id) for nic_id in self.removed),
            )

    # --- the gate the drain loop consults

    def follow(self, wanted: Wanted) -> None:
        if wanted.ready:  # before the first poll nobody knows whether a drain is due
            self.want(wanted.draining)

    def approval(self) -> Approval:
        return Approval.OPEN if self.settled else Approval.WAIT

    def probe_hold(self) -> str | None:
        if self.want_out is not False:
            return None
        if not self.startup_checked:
            return "checking pools"  # the NIC's own record may name pools to put back
        return "restoring pools" if self.holds_probe else None

    def failure(self) -> str | None:
        return self.last_error

    def keeps_serving(self) -> str | None:
        return None

    def want(self, out: bool) -> None:
        if out == self.want_out:
            return
        self.want_out = out
        if out:
            self.removal_done = False
            self.gave_up = False
            jitter = random.uniform(0, REMOVE_JITTER_SECONDS)  # noqa: S311 - not a secret
            self._remove_after = time.monotonic() + jitter
            if self._rediscover_on_drain:  # a role assigned since the last drain now counts
                self.mode = "discovering"
        else:
            self.restore_attempts = 0
        self._changed.set()

    def known_pools(self) -> dict[str, PoolsByIpConfig]:
        """Each NIC's pools: as read at discovery, with whatever is out of them now."""
        return {
            nic_id: merged(self.memberships.get(nic_id, {}), self.removed.get(nic_id, {}))
            for nic_id in {*self.memberships, *self.removed}
        }

    @property
    def settled(self) -> bool:
        """The approval need not wait: nothing to take out, done, or impossible."""
        if self.want_out is not True:
            return True
        return self.removal_done or self.gave_up or self.mode == "probe-only"

    @property
    def holds_probe(self) -> bool:
        """Put back, then serve: the probe waits for the first restore attempt to finish."""
        return self.want_out is False and bool(self.removed) and self.restore_attempts == 0

    def status(self, *, detailed: bool) -> dict[str, Any]:
        out = sum(len(pools) for nic in self.removed.values() for pools in nic.values())
        body: dict[str, Any] = {
            "mode": self.mode,
            "pools_out": out,
            "removal_done": self.removal_done,
            "restore_attempts": self.restore_attempts,
            "failures": self.failures,
        }
        if detailed:
            body.update(
                note=self.note,
                nics=[nic.id for nic in self.nics],
                removed=self.removed,
                last_error=self.last_error,
            )
        return body

    # --- the work

    async def run(self, compute: Compute | None, network: Network) -> None:
        """Reconciles until cancelled: pools follow `want`, retries follow their back-off."""
        while True:
            self._changed.clear()
            delays = [
                await self._attempt("discover", lambda: self._discover(network, compute))
                if self.mode == "discovering"
                else None,
                await self._attempt("restore", lambda: self._restore(network))
                if self.want_out is False and self.removed
                else None,
                await self._attempt("remove", lambda: self._remove(network))
                if self._removal_due() and time.monotonic() >= self._remove_after
                else None,
                self._remove_after - time.monotonic()
                if self._removal_due() and time.monotonic() < self._remove_after
                else None,  # the jittered start of a removal
            ]
            self._publish()
            self.on_change()
            pending = [delay for delay in delays if delay is not None]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(pending, default=None))

    def _removal_due(self) -> bool:
        return (
            self.want_out is True
            and self.mode == "active"
            and not (self.removal_done or self.gave_up)
        )

    async def _attempt(self, action: str, work: Callable[[], Awaitable[None]]) -> float | None:
        """Runs one action; returns the pause before its retry, or None when none is due."""
        try:
            await work()
        except ArmError as error:
            self.metrics.arm_operations.labels(action, "error").inc()
            return self._failed(action, error)
        except Exception as error:  # a defect, ours or the SDK's: never the end of the task
            self.metrics.arm_operations.labels(action, "unexpected").inc()
            log.exception("%s: unexpected %s", action, type(error).__name__)
            unexpected = ArmError(f"{type(error).__name__}: {error}", permanent=False)
            return self._failed(action, unexpected)
        finally:
            if action == "discover":
                self.discover_attempts += 1
                self.startup_checked = True
        self.metrics.arm_operations.labels(action, "ok").inc()
        self._backoffs[action].reset()
        self.last_error = None
        return None

    def _failed(self, action: str, error: ArmError) -> float | None:
        self.failures += 1
        self.last_error = f"{action}: {error}"
        grant = (
            f"; grant {error.permission} to this VM's managed identity" if error.permission else ""
        )
        delay = self._backoffs[action].next_delay(error.retry_after)
        if action == "restore":
            self.restore_attempts += 1
            log.error(
                "restore attempt %d failed: %s%s; %s still out of pools, retrying in %.1fs",
                self.restore_attempts,
                error,
                grant,
                ", ".join(_name(nic_id) for nic_id in self.removed),
                delay,
            )
            return delay
        if error.permanent:
            what = "cannot find this VM's NIC" if action == "discover" else "cannot leave pools"
            self._probe_only(f"{what}: {error}{grant}", for_good=action == "discover")
            self._rediscover_on_drain = action == "discover"
            return None
        log.warning("%s failed: %s; retrying in %.1fs", action, error, delay)
        return delay

    def _probe_only(self, why: str, *, for_good: bool) -> None:
        scope = "" if for_good else " for this drain"
        log.error("pool removal off%s: %s; draining with the probe only", scope, why)
        self.note = why
        if for_good:
            self.mode = "probe-only"
        else:
            self.gave_up = True

    async def _discover(self, network: Network, compute: Compute | None) -> None:
        if self.settings.nic_id:
            nics = [NicRef.parse(self.settings.nic_id)]
        elif compute is not None and is_uniform_scale_set(compute):
            self._probe_only(
                f"{compute.name} is an instance of the Uniform scale set {compute.scale_set}, "
                "whose NICs only the Compute API can change",
                for_good=True,
            )
            return
        elif compute is not None:
            nics = await network.find_nics(compute)
            if not nics:
                self._probe_only(
                    f"no NIC in resource group {compute.resource_group} belongs to "
                    f"{compute.resource_id}; set SIDECAR_NIC_ID",
                    for_good=True,
                )
                return
        else:
            nics = []
        for nic in nics:
            await self._adopt_record(network, nic)
        self.nics = nics
        self.mode = "active"
        self.note = None
        self._rediscover_on_drain = False
        log.info("pool removal on for %s", ", ".join(nic.name for nic in self.nics))

    async def _adopt_record(self, network: Network, nic: NicRef) -> None:
        """A removal the NIC remembers and the state file does not (lost, damaged, replaced)."""
        recorded = await network.recorded(nic)
        self.memberships[nic.id] = recorded.current
        for item in recorded.unreadable:
            log.warning("%s: unreadable entry in its removal record tag: %r", nic.name, item)
        await self.adopt({nic.id: recorded.removed})

    async def adopt(self, recorded: dict[str, Any]) -> None:
        """Removals the NICs' own tags record, merged into ours (and into the state file)."""
        for nic_id, configs in recorded.items():
            if not isinstance(configs, dict):
                continue
            removed = {
                str(config): [str(pool) for pool in pools if isinstance(pool, str)]
                for config, pools in configs.items()
                if isinstance(pools, list)
            }
            known = self.removed.get(str(nic_id), {})
            combined = merged(known, removed)
            if combined != known:
                log.warning(
                    "%s's own tags say it left backend pools %s that the state file does not "
                    "record; it goes back once no drain is due",
                    _name(str(nic_id)),
                    _describe(removed),
                )
                self.removed[str(nic_id)] = combined
                await self._save()

    async def _remove(self, network: Network) -> None:
        if self.settings.dry_run:  # read what would leave, write nothing
            for nic in self.nics:
                plan = await network.planned_removal(nic, self._pool_filter)
                log.info("dry run: %s would leave backend pools %s", nic.name, _describe(plan))
            self.removal_done = True
            return
        for nic in self.nics:

            async def record(change: PoolsByIpConfig, nic_id: str = nic.id) -> None:
                self.removed[nic_id] = merged(self.removed.get(nic_id, {}), change)
                await self._save()

            removed = await network.remove_pools(nic, self._pool_filter, record)
            if removed:
                log.info("%s left backend pools %s", nic.name, _describe(removed))
            else:
                log.info("%s is in none of the pools to leave", nic.name)
        self.removal_done = True

    async def _restore(self, network: Network) -> None:
        for nic_id, pools in list(self.removed.items()):
            added = await network.restore_pools(NicRef.parse(nic_id), pools)
            del self.removed[nic_id]
            await self._save()
            what = f"rejoined backend pools {_describe(added)}" if added else "was already back"
            log.info("%s %s", _name(nic_id), what)
        self.restore_attempts += 1

    async def _save(self) -> None:
        await self.document.write(SECTION, {"removed": self.removed})

    def _publish(self) -> None:
        out = sum(len(pools) for nic in self.removed.values() for pools in nic.values())
        self.metrics.pools_out.set(out)


def _restore_record(sections: dict[str, Any]) -> dict[str, PoolsByIpConfig]:
    section = sections.get(SECTION)
    removed = section.get("removed") if isinstance(section, dict) else None
    if not isinstance(removed, dict):
        return {}
    return {
        str(nic_id): {
            str(config): [str(pool) for pool in pools if isinstance(pool, str)]
            for config, pools in configs.items()
            if isinstance(pools, list)
        }
        for nic_id, configs in removed.items()
        if isinstance(configs, dict)
    }


def _describe(pools: PoolsByIpConfig) -> str:
    return "; ".join(
        f"{config}: {', '.join(_name(pool) for pool in ids)}" for config, ids in pools.items()
    )


def _name(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]
