"""Helpers for the load-balancer tests: small real backends on loopback, and raw TCP clients.

A ``Backend`` is a real HTTP server on 127.0.0.1 (its own event loop, in a thread) whose
``/health`` answer a test changes while it runs, like an app behind a load balancer; ``/``
answers the backend's name, so a test sees where a flow went.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from azure.identity.aio import ManagedIdentityCredential
from azure.mgmt.network.aio import NetworkManagementClient

from sidecar.simulator.frontend import quiesce

T = TypeVar("T")
SUB = "11111111-2222-4333-8444-555555555555"
RG = "rg-sim"

_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
_AZURE_ENV = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_AUTHORITY_HOST",
)
CLEAN_ENV = _PROXY_ENV + _AZURE_ENV
"""Variables that would send the Azure SDK elsewhere than the simulator."""


class Backend:
    """A small real HTTP/1.1 server on loopback (keep-alive included): ``/health`` answers
    ``status``, ``hang(True)`` holds every ``/health`` request until ``hang(False)``, ``/``
    answers the backend's name. Plain asyncio streams, so it knows every connection it has and
    closes them all when it stops."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.health_requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._released: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name=f"backend {name}", daemon=True)
        self.port = 0

    def __enter__(self) -> Backend:
        self._thread.start()
        self.port = self._ready.result(timeout=10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def hang(self, on: bool) -> None:
        if self._loop is not None and self._released is not None:
            self._loop.call_soon_threadsafe(self._released.clear if on else self._released.set)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._released = asyncio.Event()
        self._released.set()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self._ready.set_result(int(server.sockets[0].getsockname()[1]))
        try:
            await self._stop.wait()
        finally:
            await quiesce(server)
            server.close()
            self._released.set()
            idle = 0
            while idle < 5:  # connections accepted just before the close reach _serve late
                await asyncio.sleep(0)
                for writer in list(self._writers):
                    writer.transport.abort()
                if self._handlers:
                    idle = 0
                    await asyncio.wait(set(self._handlers))
                else:
                    idle += 1
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                status, body = 200, self.name
                if path == "/health":
                    self.health_requests += 1
                    if self._released is not None:
                        await self._released.wait()
                    status, body = self.status, "health"
                close = b"connection: close" in head.lower()
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
                    f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n"
                    f"{body}".encode()
                )
                await writer.drain()
                if close:
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> str:
    """One request on a fresh connection; the body, or an exception if refused."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        raise ConnectionResetError("closed without an answer")
    return data.split(b"\r\n\r\n", 1)[1].decode()


class KeptConnection:
    """One TCP connection through a frontend, used for several requests (keep-alive)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def get(self, path: str = "/") -> str:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionResetError("the flow was closed")
            head += chunk
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = b""
        while len(body) < length:
            body += self.sock.recv(length - len(body))
        return body.decode()

    def close(self) -> None:
        self.sock.close()


def run_with_client(
    arm_url: str | None,
    ca_file: object,
    scenario: Callable[[NetworkManagementClient], Awaitable[T]],
    subscription: str = SUB,
) -> T:
    """``scenario`` with a real managed-identity credential and network client, on a fresh
    event loop (AZURE_POD_IDENTITY_AUTHORITY_HOST must point at the simulator)."""

    async def main() -> T:
        async with (
            ManagedIdentityCredential() as credential,
            NetworkManagementClient(
                credential, subscription, base_url=str(arm_url), connection_verify=str(ca_file)
            ) as client,
        ):
            return await scenario(client)

    return asyncio.run(main())
