"""Closed-loop HTTP load, as users would send it through the load balancer.

`--concurrency` workers each send one request, wait for its answer, then wait for their next slot
(paced so that together they send `--rate` requests/s); so never more than `--concurrency` requests
are outstanding, and a slow backend slows the client instead of piling up requests. A worker that
fell behind sends at once but never bursts to catch up.

By default every request opens its own TCP connection: through a layer-4 balancer (the Azure Load
Balancer, HAProxy in `mode tcp`) each connection is a new flow, balanced among the backends
healthy at that moment. `--keepalive` reuses each worker's connection instead, which pins it to
the backend it first reached for as long as it lives (a failed one is replaced by a new one).

What counts as a failure is what a real client would show its user. Every request has a
`--timeout` (2 s by default): a request to a frozen VM fails when it times out. A request on a
new connection is tried once. A request on a *reused* keep-alive connection that fails before
any byte of the answer arrived (the server had closed that idle connection: EOF or a reset) is
sent once more on a new connection, as urllib3, Go's net/http and browsers do (RFC 9112
§9.3.1); those retries are counted apart (`retried`), and the request fails only if the retry
fails. A timeout, or an error after bytes of the answer arrived, is a failure at once. The client
is a minimal HTTP/1.1 client on asyncio streams, so that exactly this policy applies (aiohttp's
own client has a retry policy of its own).

Bounded: it stops after `--duration` seconds, `--max-requests` requests, or on SIGTERM, and then
writes every request as `[sent_at (CLOCK_MONOTONIC), latency_s, error or null, backend,
retried]` to `--out` (JSON). `--ready-file` is written at the first successful answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

Record = tuple[float, float, str | None, str, bool]


class NothingReceived(ConnectionError):
    """The connection ended before any byte of the answer: the request may be sent again."""


class HttpClient:
    """One worker's connection: GET, read the whole answer, report status and `X-Backend`."""

    def __init__(self, host: str, port: int, path: str, keepalive: bool) -> None:
        self.host = host
        self.port = port
        self.keepalive = keepalive
        connection = "keep-alive" if keepalive else "close"
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: {connection}\r\n\r\n"
        ).encode()
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.used = False
        """The open connection has carried a request already (it is a reused one)."""

    @property
    def reusing(self) -> bool:
        return self.streams is not None and self.used

    async def get(self) -> tuple[int, str]:
        """One request; NothingReceived when the connection ended before any byte came back."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
            self.used = False
        reader, writer = self.streams
        self.used = True
        try:
            writer.write(self.request)
            await writer.drain()
            status_line = await reader.readline()
        except (ConnectionResetError, BrokenPipeError) as error:
            raise NothingReceived(str(error) or type(error).__name__) from error
        if not status_line:
            raise NothingReceived("closed without an answer")
        status = int(status_line.split()[1])
        length = 0
        backend = ""
        closes = not self.keepalive
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            key = name.strip().lower()
            if key == "content-length":
                length = int(value)
            elif key == "x-backend":
                backend = value.strip()
            elif key == "connection" and value.strip().lower() == "close":
                closes = True
        await reader.readexactly(length)
        if closes:
            self.close()
        return status, backend

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def generate(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    url = urlsplit(args.url)
    host, port, path = url.hostname or "127.0.0.1", url.port or 80, url.path or "/"
    records: list[Record] = []
    budget = [args.max_requests]
    ready_file: Path | None = args.ready_file
    period = args.concurrency / args.rate
    started = time.monotonic()
    deadline = started + args.duration

    async def attempt(client: HttpClient, deadline: float) -> tuple[str | None, str, bool]:
        """(error, backend, may retry): one try on the worker's connection."""
        reused = client.reusing
        try:
            async with asyncio.timeout_at(deadline):
                status, backend = await client.get()
            return (None if status == 200 else f"HTTP {status}"), backend, False
        except TimeoutError:
            error, retry = "timeout", False
        except NothingReceived:
            error, retry = "closed before answering", reused
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as problem:
            error, retry = type(problem).__name__, False
        client.close()  # never reuse a connection in an unknown state
        return error, "", retry

    async def one(client: HttpClient) -> None:
        nonlocal ready_file
        sent = time.monotonic()
        loop_deadline = loop.time() + args.timeout
        error, backend, retry = await attempt(client, loop_deadline)
        if retry:  # the server had closed this idle connection: once more, on a new one
            error, backend, _ = await attempt(client, loop_deadline)
        records.append((sent, time.monotonic() - sent, error, backend, retry))
        if error is None and ready_file is not None:
            _write_atomically(ready_file, json.dumps({"first_answer": sent}))
            ready_file = None

    async def worker(index: int) -> None:
        client = HttpClient(host, port, path, args.keepalive)
        slot = started + index * period / args.concurrency
        try:
            while budget[0] > 0 and not stop.is_set():
                now = time.monotonic()
                if slot > now:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), slot - now)
                    if stop.is_set():
                        break
                if time.monotonic() >= deadline:
                    break
                budget[0] -= 1
                slot = max(slot + period, time.monotonic())
                await one(client)
        finally:
            client.close()

    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    return {
        "url": args.url,
        "rate": args.rate,
        "concurrency": args.concurrency,
        "keepalive": args.keepalive,
        "started": started,
        "stopped": time.monotonic(),
        "retried": sum(1 for r in records if r[4]),
        "records": sorted(records),
    }


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s, all workers")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="hard limit, seconds")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="per request, retry included, seconds"
    )
    parser.add_argument("--keepalive", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()
    result = asyncio.run(generate(args))
    _write_atomically(args.out, json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
