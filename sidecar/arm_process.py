"""The Azure SDKs in a helper process that lives only while ARM is needed.

Why: azure-identity and azure-mgmt-network cost about 60 MiB of memory (azure-mgmt-network
ships every operation and model of the Network API in three modules, so it loads whole or not
at all). Imported by `sidecar run` itself, they would stay for the life of the process after its
first maintenance, on every VM of a fleet. So `sidecar run` keeps them in
`python -m sidecar.arm_process`, a child started by the first ARM call and stopped after
SIDECAR_ARM_IDLE_SECONDS without one: between maintenances the sidecar is back to its own size.

Protocol, one JSON object per line: the parent first sends `{"settings", "subscription"}`, then
calls `{"id", "op", "args"}`; the child answers `{"id", "result"}` or `{"id", "error": {...}}`.
A removal first asks the parent to record its plan, `{"id", "before_write": change}`, and waits
for `{"id", "written": true}` (or `false` with an `"error"`): the plan is in the state file
before the PUT that removes, as it would be in one process.

Invariants:
- every call ends, with the child's answer or a transient `ArmError`: the child cannot start,
  exits, or does not answer within the call's bound (then it is killed); the next call starts a
  new child. The pool action's read-modify-write makes a repeated call safe.
- the child exits when its stdin closes, so a `sidecar run` killed by SIGKILL leaves no helper
  behind beyond the request already on the wire (which ARM would finish anyway);
- secrets of the sidecar (admin token, webhook URLs) are not sent to the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from sidecar.arm_model import ArmError, Backend, NicRef, Recorded, RuleHealth
from sidecar.imds import Compute
from sidecar.pool_record import PoolsByIpConfig
from sidecar.settings import SECRET_FIELDS, Settings

if TYPE_CHECKING:
    from sidecar.arm import ArmNetwork

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60.0
"""Starting Python and importing the SDKs takes about a second; a loaded VM may take longer."""
LINE_LIMIT = 16 * 1024 * 1024
"""The longest message: a resource group's NIC names for the fleet gates can be large."""
STOP_GRACE_SECONDS = 5.0

BeforeWrite = Callable[[PoolsByIpConfig], Awaitable[None]]


class ArmProcess:
    """The NIC and load-balancer operations, each carried out by the helper process."""

    def __init__(self, settings: Settings, subscription_id: str) -> None:
        self.settings = settings
        self.subscription_id = subscription_id
        self.idle_seconds = settings.arm_idle_seconds
        self.call_bound = START_TIMEOUT_SECONDS + 12 * settings.arm_timeout
        """A removal is up to five read-modify-write rounds, each call bounded by ARM_TIMEOUT."""
        self.starts = 0
        self._helper: _Helper | None = None
        self._starting = asyncio.Lock()
        self._ids = itertools.count(1)
        self._idle: asyncio.TimerHandle | None = None
        self._closed = False

    # --- the operations (see sidecar.arm.ArmNetwork)

    async def find_nics(self, compute: Compute) -> list[NicRef]:
        ids = await self._call("find_nics", {"compute": asdict(compute)})
        return [NicRef.parse(str(nic_id)) for nic_id in ids]

    async def recorded(self, nic: NicRef) -> Recorded:
        found = await self._call("recorded", {"nic": nic.id})
        return Recorded(found["removed"], found["unreadable"], found["current"])

    async def planned_removal(self, nic: NicRef, pool_filter: Collection[str]) -> PoolsByIpConfig:
        plan: PoolsByIpConfig = await self._call(
            "planned_removal", {"nic": nic.id, "pool_filter": sorted(pool_filter)}
        )
        return plan

    async def remove_pools(
        self, nic: NicRef, pool_filter: Collection[str], before_write: BeforeWrite
    ) -> PoolsByIpConfig:
        removed: PoolsByIpConfig = await self._call(
            "remove_pools", {"nic": nic.id, "pool_filter": sorted(pool_filter)}, before_write
        )
        return removed

    async def restore_pools(self, nic: NicRef, removed: Mapping[str, list[str]]) -> PoolsByIpConfig:
        added: PoolsByIpConfig = await self._call(
            "restore_pools", {"nic": nic.id, "removed": dict(removed)}
        )
        return added

    async def rules_of_pools(self, pool_ids: Collection[str]) -> list[str]:
        rules: list[str] = await self._call("rules_of_pools", {"pool_ids": list(pool_ids)})
        return rules

    async def rule_health(self, rule_id: str) -> RuleHealth:
        health = await self._call("rule_health", {"rule_id": rule_id})
        backends = tuple(Backend(**backend) for backend in health["backends"])
        return RuleHealth(health["rule_id"], health["up"], health["down"], backends)

    async def vm_names(self, resource_group: str) -> dict[str, str]:
        names: dict[str, str] = await self._call("vm_names", {"resource_group": resource_group})
        return names

    # --- the helper's lifecycle

    def status(self, *, detailed: bool) -> dict[str, Any]:
        helper = self._helper
        return {
            "running": helper is not None and helper.alive,
            "pid": helper.process.pid if helper is not None and helper.alive else None,
            "starts": self.starts,
        }

    async def close(self) -> None:
        self._closed = True
        self._cancel_idle()
        if self._helper is not None:
            await self._helper.stop()
            self._helper = None

    async def _call(
        self, op: str, args: dict[str, Any], before_write: BeforeWrite | None = None
    ) -> Any:
        self._cancel_idle()
        call_id = next(self._ids)
        helper: _Helper | None = None
        try:
            async with asyncio.timeout(self.call_bound):
                helper = await self._running()
                return await helper.call(call_id, op, args, before_write)
        except TimeoutError:
            if helper is not None:
                await helper.stop(kill=True)  # its state is unknown: the next call starts anew
            raise ArmError(
                f"the ARM helper did not answer {op} within {self.call_bound:g}s", permanent=False
            ) from None
        finally:
            if helper is not None:
                helper.forget(call_id)
            self._arm_idle()

    async def _running(self) -> _Helper:
        async with self._starting:
            if self._closed:
                raise ArmError("shutting down", permanent=False)
            if self._helper is None or not self._helper.alive:
                self._helper = await _Helper.start(self.settings, self.subscription_id)
                self.starts += 1
            return self._helper

    def _arm_idle(self) -> None:
        helper = self._helper
        if helper is None or helper.busy or self._closed:
            return
        self._cancel_idle()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.idle_seconds, self._stop_idle)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _stop_idle(self) -> None:
        helper = self._helper
        if helper is None or helper.busy:
            return
        self._helper = None
        log.debug("ARM helper idle for %gs: stopping it", self.idle_seconds)
        task = asyncio.get_running_loop().create_task(helper.stop())
        _KEEP.add(task)
        task.add_done_callback(_KEEP.discard)


_KEEP: set[asyncio.Task[None]] = set()
"""Tasks nobody awaits, kept referenced until done (asyncio holds only weak references)."""


class _Helper:
    """One running child: its pipes, the calls waiting for an answer, and their callbacks."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pending: dict[int, tuple[asyncio.Future[Any], BeforeWrite | None]] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, settings: Settings, subscription_id: str) -> _Helper:
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar.arm_process",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,  # its log lines go where ours go
                limit=LINE_LIMIT,
            )
        except OSError as error:
            raise ArmError(f"cannot start the ARM helper: {error}", permanent=False) from None
        helper = cls(process)
        settings_json = settings.model_dump(mode="json", exclude=set(SECRET_FIELDS))
        helper.send({"settings": settings_json, "subscription": subscription_id})
        log.debug("ARM helper started (pid %d)", process.pid)
        return helper

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self.reader.done()

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def send(self, message: dict[str, Any]) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing():
            raise ArmError("the ARM helper is gone", permanent=False)
        stdin.write(json.dumps(message).encode() + b"\n")

    async def call(
        self, call_id: int, op: str, args: dict[str, Any], before_write: BeforeWrite | None
    ) -> Any:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = (answer, before_write)
        try:
            self.send({"id": call_id, "op": op, "args": args})
        except (ArmError, OSError) as error:
            raise ArmError(f"cannot reach the ARM helper: {error}", permanent=False) from None
        return await answer

    def forget(self, call_id: int) -> None:
        self.pending.pop(call_id, None)

    async def stop(self, *, kill: bool = False) -> None:
        """Closing stdin asks the child to exit; it is killed if it does not."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        if kill and self.process.returncode is None:
            self.process.kill()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_GRACE_SECONDS)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader

    async def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None  # noqa: S101 - created with a pipe
        try:
            while line := await stdout.readline():
                self._dispatch(json.loads(line))
        except (ValueError, OSError) as error:  # a broken helper: end it, fail its calls
            log.error("the ARM helper sent what it should not (%s): stopping it", error)
            self.process.kill()
        code = await self.process.wait()
        for answer, _ in self.pending.values():
            if not answer.done():
                answer.set_exception(
                    ArmError(f"the ARM helper exited (code {code})", permanent=False)
                )

    def _dispatch(self, message: dict[str, Any]) -> None:
        call_id = message["id"]
        entry = self.pending.get(call_id)
        if entry is None:
            return  # a call given up on: its late answer is dropped
        answer, before_write = entry
        if "before_write" in message:
            task = asyncio.get_running_loop().create_task(
                self._record_plan(call_id, before_write, message["before_write"])
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif answer.done():
            return
        elif "error" in message:
            error = message["error"]
            answer.set_exception(
                ArmError(
                    str(error["message"]),
                    permanent=bool(error["permanent"]),
                    permission=error.get("permission"),
                    retry_after=float(error.get("retry_after") or 0.0),
                )
            )
        else:
            answer.set_result(message["result"])

    async def _record_plan(
        self, call_id: int, before_write: BeforeWrite | None, change: PoolsByIpConfig
    ) -> None:
        try:
            if before_write is None:
                raise RuntimeError("no plan recorder for this call")
            await before_write(change)
        except Exception as error:  # the child must not write what we could not record
            log.error("cannot record the removal plan before the PUT: %s", error)
            reply = {"id": call_id, "written": False, "error": f"{type(error).__name__}: {error}"}
        else:
            reply = {"id": call_id, "written": True}
        with contextlib.suppress(ArmError, OSError):
            self.send(reply)


# --- the child


async def _serve(stdin: asyncio.StreamReader) -> None:
    from sidecar import logs
    from sidecar.arm import ArmNetwork  # this process exists to carry the SDKs

    hello = json.loads(await stdin.readline())
    settings = Settings.model_validate(hello["settings"])
    logs.configure(settings.log_level, settings.log_format)
    network = ArmNetwork(settings, str(hello["subscription"]))
    plans: dict[int, asyncio.Future[str | None]] = {}
    running: set[asyncio.Task[None]] = set()

    def send(message: dict[str, Any]) -> None:
        sys.stdout.buffer.write(json.dumps(message).encode() + b"\n")
        sys.stdout.buffer.flush()

    async def before_write(call_id: int, change: PoolsByIpConfig) -> None:
        written: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        plans[call_id] = written
        send({"id": call_id, "before_write": change})
        try:
            problem = await written
        finally:
            plans.pop(call_id, None)
        if problem is not None:
            raise ArmError(f"the plan could not be recorded first: {problem}", permanent=False)

    async def handle(call_id: int, op: str, args: dict[str, Any]) -> None:
        try:
            result = await _perform(network, op, args, lambda c: before_write(call_id, c))
        except ArmError as error:
            send({"id": call_id, "error": _error_fields(error)})
        except Exception as error:  # a defect, ours or the SDK's: the parent retries
            log.exception("ARM helper: %s failed unexpectedly", op)
            unexpected = ArmError(f"{type(error).__name__}: {error}"[:500], permanent=False)
            send({"id": call_id, "error": _error_fields(unexpected)})
        else:
            send({"id": call_id, "result": result})

    try:
        while line := await stdin.readline():
            message = json.loads(line)
            call_id = int(message["id"])
            if "written" in message:
                future = plans.get(call_id)
                if future is not None and not future.done():
                    future.set_result(None if message["written"] else str(message.get("error")))
                continue
            task = asyncio.get_running_loop().create_task(
                handle(call_id, str(message["op"]), dict(message["args"]))
            )
            running.add(task)
            task.add_done_callback(running.discard)
    finally:  # stdin closed: the parent is done with us, or gone
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await network.close()


async def _perform(
    network: ArmNetwork, op: str, args: dict[str, Any], before_write: BeforeWrite
) -> Any:
    """One operation of `ArmNetwork`, its arguments and result as JSON."""
    if op == "find_nics":
        return [nic.id for nic in await network.find_nics(Compute(**args["compute"]))]
    if op == "recorded":
        return asdict(await network.recorded(NicRef.parse(args["nic"])))
    if op == "planned_removal":
        return await network.planned_removal(NicRef.parse(args["nic"]), args["pool_filter"])
    if op == "remove_pools":
        return await network.remove_pools(
            NicRef.parse(args["nic"]), args["pool_filter"], before_write
        )
    if op == "restore_pools":
        return await network.restore_pools(NicRef.parse(args["nic"]), args["removed"])
    if op == "rules_of_pools":
        return await network.rules_of_pools(args["pool_ids"])
    if op == "rule_health":
        return asdict(await network.rule_health(args["rule_id"]))
    if op == "vm_names":
        return await network.vm_names(args["resource_group"])
    raise ArmError(f"unknown operation {op!r}", permanent=True)


def _error_fields(error: ArmError) -> dict[str, Any]:
    return {
        "message": str(error),
        "permanent": error.permanent,
        "permission": error.permission,
        "retry_after": error.retry_after,
    }


async def _child_main() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await _serve(stdin)


def main() -> int:
    from sidecar import logs

    logs.configure("INFO", "text")  # until the parent's settings arrive
    try:
        asyncio.run(_child_main())
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
