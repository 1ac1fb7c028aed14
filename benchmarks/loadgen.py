"""Closed-loop HTTP load, as users would send it through the load balancer.

`--concurrency` workers each send one request, wait for its answer, then wait for their next slot
(paced so that together they send `--rate` requests/s); so never more than `--concurrency` requests
are outstanding, and a slow backend slows the client instead of piling up requests. A worker that
fell behind sends at once but never bursts to catch up.

Each request is tried once. The client is a minimal HTTP/1.1 client on asyncio streams rather
than aiohttp's, because aiohttp quietly resends an idempotent request once when the server drops
the connection: that would hide exactly the failures this rehearsal counts.

By default every request opens its own TCP connection: through a layer-4 balancer (the Azure Load
Balancer, HAProxy in `mode tcp`) each connection is a new flow, balanced among the backends
healthy at that moment. `--keepalive` reuses each worker's connection instead, which pins it to
the backend it first reached for as long as it lives (a failed one is replaced by a new one).

Bounded: it stops after `--duration` seconds, `--max-requests` requests, or on SIGTERM, and then
writes every request as `[sent_at (CLOCK_MONOTONIC), latency_s, error or null, backend]` to
`--out` (JSON). `--ready-file` is written at the first successful answer.
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

Record = tuple[float, float, str | None, str]


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

    async def get(self) -> tuple[int, str]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(self.request)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionAbortedError("closed without an answer")
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

    async def one(client: HttpClient) -> None:
        nonlocal ready_file
        sent = time.monotonic()
        backend = ""
        error: str | None
        try:
            async with asyncio.timeout(args.timeout):
                status, backend = await client.get()
            error = None if status == 200 else f"HTTP {status}"
        except TimeoutError:
            error = "timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as problem:
            error = type(problem).__name__
        if error is not None:
            client.close()  # never reuse a connection in an unknown state
        records.append((sent, time.monotonic() - sent, error, backend))
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
    parser.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    parser.add_argument("--keepalive", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()
    result = asyncio.run(generate(args))
    _write_atomically(args.out, json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
