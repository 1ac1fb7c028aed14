"""Backend-pool removal: the NIC is out of its pools while a drain holds the probe down, and
exactly what was taken out is put back afterwards.

Invariants:
- what is about to be removed is in the state file before the PUT that removes it, and leaves it
  only after the PUT that restores it succeeded: whatever the moment of a crash, the next start
  puts back everything the file says is out;
- nothing is restored before the first successful poll says no drain is due;
- a failed restore is retried until it succeeds, every attempt logged and shown in /status;
- a removal that cannot work (permission, Uniform scale set, no NIC) turns the drain into a
  probe-only drain, said once in the log; it never holds the approval past the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.arm import ArmError, ArmNetwork, NicRef, PoolsByIpConfig, is_uniform_scale_set
from sidecar.backoff import Backoff
from sidecar.imds import Compute
from sidecar.metrics import Metrics
from sidecar.settings import Settings
from sidecar.store import StateDocument

log = logging.getLogger(__name__)

SECTION = "pools"
RESTORE_BACKOFF_MAX = 30.0
REMOVE_BACKOFF_MAX = 5.0


class PoolAction:
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
        self.mode = "discovering"
        self.note: str | None = None
        self._rediscover_on_drain = False
        self.want_out: bool | None = None
        self.removal_done = False
        self.gave_up = False
        self.restore_attempts = 0
        self.last_error: str | None = None
        self._pool_filter = {pool.casefold() for pool in settings.backend_pool_ids}
        self._changed = asyncio.Event()
        self._backoffs = {
            "restore": Backoff(1.0, RESTORE_BACKOFF_MAX),
            "discover": Backoff(1.0, RESTORE_BACKOFF_MAX),
            "remove": Backoff(1.0, REMOVE_BACKOFF_MAX),
        }
        self._publish()
        if self.removed:
            log.warning(
                "the state file says %s out of backend pools; it goes back once no drain is due",
                ", ".join(_name(nic_id) for nic_id in self.removed),
            )

    # --- what the drain loop asks and reads

    def want(self, out: bool) -> None:
        """Called on every decision of the drain loop; the work happens in `run`."""
        if out == self.want_out:
            return
        self.want_out = out
        if out:
            self.removal_done = False
            self.gave_up = False
            if self._rediscover_on_drain:  # a role assigned since the last drain now counts
                self.mode = "discovering"
        else:
            self.restore_attempts = 0
        self._changed.set()

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

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "note": self.note,
            "nics": [nic.id for nic in self.nics],
            "removed": self.removed,
            "removal_done": self.removal_done,
            "restore_attempts": self.restore_attempts,
            "last_error": self.last_error,
        }

    # --- the work

    async def run(self, compute: Compute | None, network: ArmNetwork) -> None:
        """Reconciles until cancelled: pools follow `want`, retries follow their back-off."""
        while True:
            self._changed.clear()
            delays = [
                await self._attempt("restore", lambda: self._restore(network))
                if self.want_out is False and self.removed
                else None,
                await self._attempt("discover", lambda: self._discover(network, compute))
                if self.mode == "discovering"
                else None,
                await self._attempt("remove", lambda: self._remove(network))
                if self._removal_due()
                else None,
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
        except (ArmError, OSError) as error:
            self.metrics.arm_operations.labels(action, "error").inc()
            self.last_error = f"{action}: {error}"
            return self._failed(action, error)
        self.metrics.arm_operations.labels(action, "ok").inc()
        self._backoffs[action].reset()
        self.last_error = None
        return None

    def _failed(self, action: str, error: ArmError | OSError) -> float | None:
        permanent = isinstance(error, ArmError) and error.permanent
        permission = error.permission if isinstance(error, ArmError) else None
        grant = f"; grant {permission} to this VM's managed identity" if permission else ""
        delay = self._backoffs[action].next_delay()
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
        if permanent:
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

    async def _discover(self, network: ArmNetwork, compute: Compute | None) -> None:
        if self.settings.nic_id:
            self.nics = [NicRef.parse(self.settings.nic_id)]
        elif compute is not None and is_uniform_scale_set(compute):
            self._probe_only(
                f"{compute.name} is an instance of the Uniform scale set {compute.scale_set}, "
                "whose NICs only the Compute API can change",
                for_good=True,
            )
            return
        elif compute is not None:
            self.nics = await network.find_nics(compute)
            if not self.nics:
                self._probe_only(
                    f"no NIC in resource group {compute.resource_group} belongs to "
                    f"{compute.resource_id}; set SIDECAR_NIC_ID",
                    for_good=True,
                )
                return
        self.mode = "active"
        self.note = None
        self._rediscover_on_drain = False
        log.info("pool removal on for %s", ", ".join(nic.name for nic in self.nics))

    async def _remove(self, network: ArmNetwork) -> None:
        for nic in self.nics:

            async def record(change: PoolsByIpConfig, nic_id: str = nic.id) -> None:
                self.removed[nic_id] = _merged(self.removed.get(nic_id, {}), change)
                await self._save()

            removed = await network.remove_pools(nic, self._chosen, record)
            if removed:
                log.info("%s left backend pools %s", nic.name, _describe(removed))
            else:
                log.info("%s is in none of the pools to leave", nic.name)
        self.removal_done = True

    async def _restore(self, network: ArmNetwork) -> None:
        for nic_id, pools in list(self.removed.items()):
            added = await network.restore_pools(NicRef.parse(nic_id), pools)
            del self.removed[nic_id]
            await self._save()
            what = f"rejoined backend pools {_describe(added)}" if added else "was already back"
            log.info("%s %s", _name(nic_id), what)
        self.restore_attempts += 1

    def _chosen(self, pool_id: str) -> bool:
        return not self._pool_filter or pool_id.casefold() in self._pool_filter

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


def _merged(recorded: PoolsByIpConfig, change: PoolsByIpConfig) -> PoolsByIpConfig:
    merged = {config: list(pools) for config, pools in recorded.items()}
    for config, pools in change.items():
        known = {pool.casefold() for pool in merged.get(config, [])}
        merged[config] = [*merged.get(config, []), *(p for p in pools if p.casefold() not in known)]
    return merged


def _describe(pools: PoolsByIpConfig) -> str:
    return "; ".join(
        f"{config}: {', '.join(_name(pool) for pool in ids)}" for config, ids in pools.items()
    )


def _name(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]
