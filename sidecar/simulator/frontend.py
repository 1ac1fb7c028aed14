"""Load-balancer frontends on loopback: a layer-4 TCP proxy for each rule that asks for one.

Invariants: each new TCP connection is one flow, given at accept time to one backend among the
rule's eligible ones (in the pool, probed up, with a loopback port for the rule's backend port),
round-robin; an established flow stays with its backend whatever happens later (probe down, the
NIC leaving the pool), as a Standard Load Balancer keeps established flows; with no eligible
backend a new connection is closed at once; bytes are relayed both ways, half-closes included;
``stop`` closes every listener and every socket it opened, which ends every flow, and waits
for them (cancelling a straggler).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

from sidecar.simulator import backends
from sidecar.simulator.lb import LoadBalancer, Rule
from sidecar.simulator.loopback import LOOPBACK
from sidecar.simulator.world import World

CONNECT_SECONDS = 5.0
STOP_SECONDS = 2.0
_SETTLE_ROUNDS = 5
"""Event-loop rounds without a flow before ``stop`` trusts that no accepted connection is
still on its way to its handler."""
_CHUNK = 65536
RuleKey = tuple[str, str]
"""(load balancer id, rule name), casefolded."""


def rule_key(lb: LoadBalancer, rule: Rule) -> RuleKey:
    return (lb.id.casefold(), rule.name.casefold())


@dataclass
class FlowStats:
    accepted: int = 0
    refused: int = 0
    """New connections closed at once: no eligible backend."""
    failed: int = 0
    """The chosen backend did not accept the connection."""
    active: int = 0
    by_backend: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "refused": self.refused,
            "failed": self.failed,
            "active": self.active,
            "by_backend": {k: dict(v) for k, v in sorted(self.by_backend.items())},
        }


@dataclass
class _Listener:
    server: asyncio.Server
    requested: int
    port: int


class Frontends:
    """The listeners and flows of every rule with a loopback frontend."""

    def __init__(self, world: World, host: str = LOOPBACK) -> None:
        self.world = world
        self.host = host
        self._listeners: dict[RuleKey, _Listener] = {}
        self._stats: dict[RuleKey, FlowStats] = {}
        self._turn: dict[RuleKey, int] = {}
        self._flows: set[asyncio.Task[Any]] = set()
        self._sockets: set[asyncio.StreamWriter] = set()
        self._errors: dict[RuleKey, tuple[int, str]] = {}
        self._stopping = False
        self._lock = asyncio.Lock()  # the supervisor and control requests both reconcile

    def port_of(self, lb: LoadBalancer, rule: Rule) -> int | None:
        listener = self._listeners.get(rule_key(lb, rule))
        return listener.port if listener is not None else None

    def error_of(self, lb: LoadBalancer, rule: Rule) -> str | None:
        """Why the rule's requested frontend could not listen (it is not retried until the
        rule asks for another port)."""
        error = self._errors.get(rule_key(lb, rule))
        return error[1] if error is not None and error[0] == rule.listen else None

    def stats_of(self, lb: LoadBalancer, rule: Rule) -> FlowStats:
        return self._stats.setdefault(rule_key(lb, rule), FlowStats())

    async def reconcile(self) -> None:
        """Listen for exactly the rules that ask for it, on the port they ask for."""
        async with self._lock:
            if not self._stopping:
                await self._reconcile()

    async def _reconcile(self) -> None:
        wanted = {
            rule_key(lb, rule): (lb, rule)
            for lb in self.world.lbs.all()
            for rule in lb.rules
            if rule.listen is not None
        }
        for key, listener in list(self._listeners.items()):
            found = wanted.get(key)
            if found is None or found[1].listen not in (listener.requested, listener.port):
                del self._listeners[key]
                await _close_server(listener.server)
        for key, (_, rule) in wanted.items():
            listen = rule.listen
            if key in self._listeners or listen is None or self.error_of(*wanted[key]):
                continue
            try:
                server = await asyncio.start_server(
                    functools.partial(self._serve, key), self.host, listen
                )
            except OSError as error:
                self._errors[key] = (listen, f"cannot listen on {self.host}:{listen}: {error}")
                continue
            self._errors.pop(key, None)
            port = int(server.sockets[0].getsockname()[1])
            self._listeners[key] = _Listener(server, listen, port)

    async def stop(self) -> None:
        self._stopping = True
        async with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for listener in listeners:
            await quiesce(listener.server)
            listener.server.close()
        idle = 0
        while idle < _SETTLE_ROUNDS:  # a connection accepted just before the close starts late
            await asyncio.sleep(0)
            for sock in list(self._sockets):
                sock.transport.abort()  # ends both pipes of its flow
            if not self._flows:
                idle += 1
                continue
            idle = 0
            _, late = await asyncio.wait(set(self._flows), timeout=STOP_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            self._flows.difference_update(late)
        for listener in listeners:
            await _close_server(listener.server)
        self._stopping = False

    def _pick(self, key: RuleKey) -> tuple[str, int] | None:
        """(backend ipconfig id, loopback port) for a new flow, round-robin; None: refuse."""
        lb = self.world.lbs.get(key[0])
        rule = lb.rule(key[1]) if lb is not None else None
        if lb is None or rule is None:
            return None
        eligible = backends.eligible(self.world, lb, rule)
        if not eligible:
            return None
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        member, _, port = eligible[turn % len(eligible)]
        return member.ipconfig_id, port

    async def _serve(
        self, key: RuleKey, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._flows.add(task)
        self._sockets.add(writer)
        try:
            await self._flow(key, reader, writer)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # Cancelled by ``stop`` itself: end quietly (asyncio 3.11 would log the
            # cancellation of a connection callback as an error).
        finally:
            self._sockets.discard(writer)
            await _close(writer)
            if task is not None:
                self._flows.discard(task)

    async def _flow(
        self, key: RuleKey, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        stats = self._stats.setdefault(key, FlowStats())
        chosen = None if self._stopping else self._pick(key)
        if chosen is None:
            stats.refused += 1
            return
        backend, port = chosen
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                up_reader, up_writer = await asyncio.open_connection(LOOPBACK, port)
        except (OSError, TimeoutError):
            stats.failed += 1
            return
        self._sockets.add(up_writer)
        stats.accepted += 1
        counts = stats.by_backend.setdefault(backend, {"active": 0, "total": 0})
        counts["active"] += 1
        counts["total"] += 1
        stats.active += 1
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            counts["active"] -= 1
            stats.active -= 1
            self._sockets.discard(up_writer)
            await _close(up_writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then pass the half-close on."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


async def quiesce(server: asyncio.Server) -> None:
    """Stop accepting, then let connections accepted a moment ago reach their handler.

    Python 3.11's ``Server.close`` leaks a connection accepted just before it whose transport
    is made just after it (``Server._attach`` asserts, the socket is never closed): taking the
    listening sockets off the loop first and giving pending accepts a few rounds avoids that.
    """
    loop = asyncio.get_running_loop()
    for sock in server.sockets:
        loop.remove_reader(sock.fileno())
    for _ in range(_SETTLE_ROUNDS):
        await asyncio.sleep(0)


async def _close_server(server: asyncio.Server) -> None:
    await quiesce(server)
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            await server.wait_closed()
