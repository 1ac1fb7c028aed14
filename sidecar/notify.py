"""Telling people: webhooks (SIDECAR_WEBHOOK_URLS) and syslog (SIDECAR_SYSLOG_ADDRESS).

Invariants:
- telling never delays the drain or the approval: `publish` only queues, delivery runs in its
  own task;
- each notice reaches each webhook once, in order: retried with back-off and jitter until it
  is accepted (2xx) or given up on, with an `Idempotency-Key` header (event id + phase) so a
  receiver can drop the rare repeat; what was delivered and what is still pending are in the
  state file, so a restart neither repeats nor loses a phase. The repeat: a crash after the
  receiver accepted a notice and before the state file recorded it (a few milliseconds) sends
  it again; /status counts a delivery only once recorded;
- webhook URLs are secrets: logs and /status name their host only;
- syslog gets one RFC 5424 line per notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from typing import Any

import aiohttp
from pydantic import SecretStr

from sidecar import __version__
from sidecar.backoff import Backoff
from sidecar.events import format_time
from sidecar.metrics import Metrics
from sidecar.notices import FAILURE, Notice
from sidecar.settings import Settings, host_of
from sidecar.store import StateDocument

log = logging.getLogger(__name__)

SECTION = "notify"
APP_NAME = "azure-drain-sidecar"
MAX_ATTEMPTS = 10
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
SENT_MEMORY_SECONDS = 7 * 24 * 3600
PENDING_LIMIT = 200


class Webhook:
    """One URL: its own queue, so a slow receiver never holds up another."""

    def __init__(self, url: SecretStr) -> None:
        self.url = url
        self.host = host_of(url)
        self.id = hashlib.sha256(url.get_secret_value().encode()).hexdigest()[:12]
        self.wake = asyncio.Event()
        self.delivered = 0
        self.failures = 0
        self.last_error: str | None = None


class Notifier:
    def __init__(self, settings: Settings, document: StateDocument, metrics: Metrics) -> None:
        self.settings = settings
        self.document = document
        self.metrics = metrics
        self.webhooks = [Webhook(url) for url in settings.webhook_urls]
        self.syslog = Syslog(settings.syslog_address) if settings.syslog_address else None
        saved = document.sections.get(SECTION)
        saved = saved if isinstance(saved, dict) else {}
        sent = saved.get("sent")
        self.sent: dict[str, float] = (
            {str(k): float(v) for k, v in sent.items() if isinstance(v, int | float)}
            if isinstance(sent, dict)
            else {}
        )
        pending = saved.get("pending")
        self.pending: list[Notice] = (
            [
                notice
                for notice in (Notice.from_record(item) for item in pending or [])
                if notice is not None
            ]
            if isinstance(pending, list)
            else []
        )
        self._changed = asyncio.Event()

    def publish(self, notice: Notice) -> None:
        """Queues a notice (once per key); returns at once."""
        if any(n.key == notice.key for n in self.pending) or self._all_sent(notice):
            return
        self.pending.append(notice)
        del self.pending[:-PENDING_LIMIT]
        log.info("notice %s: %s", notice.phase, notice.text)
        self._changed.set()
        for webhook in self.webhooks:
            webhook.wake.set()

    def status(self, *, detailed: bool) -> dict[str, Any]:
        return {
            "pending": len(self.pending),
            "webhooks": [
                {
                    "host": w.host,
                    "delivered": w.delivered,
                    "failures": w.failures,
                    **({"last_error": w.last_error} if detailed else {}),
                }
                for w in self.webhooks
            ],
            "syslog": self.settings.syslog_address is not None,
        }

    async def run(self) -> None:
        """Delivers until cancelled: syslog here, each webhook in a task of its own."""
        async with aiohttp.ClientSession(
            trust_env=True,  # webhooks leave the VM: the egress proxy applies, as for ARM
            headers={"User-Agent": f"{APP_NAME}/{__version__}"},
        ) as session:
            tasks = [
                asyncio.create_task(
                    self._deliver_to(webhook, session), name=f"webhook {webhook.host}"
                )
                for webhook in self.webhooks
            ]
            try:
                while True:
                    self._changed.clear()
                    await self._to_syslog()
                    await self._forget_delivered()
                    await self._changed.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _to_syslog(self) -> None:
        if self.syslog is None:
            return
        for notice in list(self.pending):
            key = f"syslog:{notice.key}"
            if key in self.sent:
                continue
            try:
                await asyncio.to_thread(self.syslog.send, notice)
            except OSError as error:
                log.warning("syslog %s: %s", self.settings.syslog_address, error)
                return
            self.sent[key] = time.time()
        await self._save()

    async def _deliver_to(self, webhook: Webhook, session: aiohttp.ClientSession) -> None:
        while True:
            webhook.wake.clear()
            for notice in list(self.pending):
                if f"{webhook.id}:{notice.key}" not in self.sent:
                    await self._deliver(webhook, session, notice)
            self._changed.set()
            await webhook.wake.wait()

    async def _deliver(
        self, webhook: Webhook, session: aiohttp.ClientSession, notice: Notice
    ) -> None:
        backoff = Backoff(RETRY_BASE_SECONDS, RETRY_MAX_SECONDS)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            error, retry_after = await self._post(webhook, session, notice)
            if error is None:
                self.metrics.webhooks.labels("ok").inc()
                self.sent[f"{webhook.id}:{notice.key}"] = time.time()
                await self._save()
                webhook.delivered += 1  # counted once recorded: a restart will not repeat it
                return
            webhook.failures += 1
            webhook.last_error = error
            self.metrics.webhooks.labels("error").inc()
            delay = backoff.next_delay(retry_after)
            log.warning(
                "webhook to %s: %s (attempt %d of %d, next in %.1fs)",
                webhook.host,
                error,
                attempt,
                MAX_ATTEMPTS,
                delay,
            )
            await asyncio.sleep(delay)
        log.error(
            "webhook to %s: gave up on %s after %d attempts", webhook.host, notice.key, MAX_ATTEMPTS
        )
        self.metrics.webhooks.labels("dropped").inc()
        self.sent[f"{webhook.id}:{notice.key}"] = time.time()  # given up: never again
        await self._save()

    async def _post(
        self, webhook: Webhook, session: aiohttp.ClientSession, notice: Notice
    ) -> tuple[str | None, float]:
        try:
            async with session.post(
                webhook.url.get_secret_value(),
                json=notice.to_json(),
                headers={"Idempotency-Key": notice.key},
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout),
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return None, 0.0
                retry_after = response.headers.get("Retry-After", "")
                wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 0.0
                return f"HTTP {response.status}", wait
        except TimeoutError:
            return f"no answer within {self.settings.webhook_timeout:g}s", 0.0
        except aiohttp.ClientError as error:  # the message never holds the URL's secret path
            return type(error).__name__, 0.0

    async def _forget_delivered(self) -> None:
        """Pending notices every destination has; sent keys older than a week."""
        self.pending = [n for n in self.pending if not self._all_sent(n)]
        horizon = time.time() - SENT_MEMORY_SECONDS
        self.sent = {k: v for k, v in self.sent.items() if v > horizon}
        await self._save()

    def _all_sent(self, notice: Notice) -> bool:
        keys = [f"{w.id}:{notice.key}" for w in self.webhooks]
        if self.syslog is not None:
            keys.append(f"syslog:{notice.key}")
        return all(key in self.sent for key in keys)

    async def _save(self) -> None:
        section = {"sent": self.sent, "pending": [n.to_record() for n in self.pending]}
        with contextlib.suppress(OSError):  # the drain loop reports state-file trouble
            await self.document.write(SECTION, section)


class Syslog:
    """RFC 5424 lines to /dev/log (a Unix socket), udp://HOST:PORT or tcp://HOST:PORT.

    Written here rather than with logging.handlers.SysLogHandler: that handler reports a failed
    send by printing a traceback to stderr instead of raising, and frames lines the BSD way.
    Blocking (a TCP connect): call `send` off the event loop.
    """

    FACILITY = 3  # daemon
    NOTICE, WARNING = 5, 4

    def __init__(self, address: str) -> None:
        self.address = address
        self.hostname = socket.gethostname() or "-"
        self._tcp: socket.socket | None = None

    def send(self, notice: Notice) -> None:
        severity = self.WARNING if notice.phase == FAILURE else self.NOTICE
        line = f"<{self.FACILITY * 8 + severity}>{self.line(notice)}".encode()
        if self.address.startswith("udp://"):
            host, port = _host_port(self.address)
            with socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
                sock.sendto(line, (host, port))
        elif self.address.startswith("tcp://"):
            self._send_tcp(line + b"\n")  # RFC 6587 non-transparent framing
        else:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(line, self.address)

    def line(self, notice: Notice) -> str:
        """`1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG`."""
        stamp = (format_time(time.time()) or "-").replace("+00:00", "Z")
        params = {"key": notice.key, "vm": notice.vm or ""}
        if notice.event:
            params.update(event=str(notice.event.get("id")), type=str(notice.event.get("type")))
        if notice.dry_run:
            params["dry_run"] = "true"
        data = " ".join(f'{name}="{_sd_escape(value)}"' for name, value in params.items())
        text = ("[dry run] " if notice.dry_run else "") + notice.text
        text = text.replace("\r", " ").replace("\n", " ")
        return (
            f"1 {stamp} {self.hostname} {APP_NAME} {os.getpid()} {notice.phase} "
            f"[drain@32473 {data}] {text}"
        )

    def _send_tcp(self, data: bytes) -> None:
        for _ in range(2):  # once more on a fresh connection if the old one went away
            if self._tcp is None:
                host, port = _host_port(self.address)
                self._tcp = socket.create_connection((host, port), timeout=5)
            try:
                self._tcp.sendall(data)
                return
            except OSError:
                self._tcp.close()
                self._tcp = None
        raise OSError(f"cannot send to {self.address}")


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address[6:].rpartition(":") if ":" in address[6:] else (address[6:], "", "514")
    return host.strip("[]"), int(port)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _sd_escape(value: str) -> str:
    """RFC 5424 PARAM-VALUE: `"`, `\\` and `]` escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
