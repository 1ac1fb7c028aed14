"""`sidecar demo`: one maintenance, rehearsed end to end on loopback in well under a minute.

The simulator and the sidecar run in this process, but talk only over HTTP, exactly as they do
apart. The timeline is read from the outside: the probe, /status and the simulator's control API.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sidecar import app, logs
from sidecar.settings import Settings
from sidecar.simulator.options import SimulatorOptions
from sidecar.simulator.server import Simulator

DEMO_VM = "demo-vm"
TIME_LIMIT_SECONDS = 55.0
NOTICE_SECONDS = 60
DRAIN_SECONDS = 5.0


@dataclass
class Facts:
    """What an observer can see at one moment; the timeline prints what changed."""

    probe: int | None = None
    phase: str | None = None
    sim_status: str | None = None
    approvals: int = 0
    pools: int | None = None
    """Backend-pool memberships of the demo VM's NIC, as (simulated) ARM sees them."""


def main() -> int:
    logs.configure("WARNING", "text")
    try:
        return asyncio.run(run_demo())
    except KeyboardInterrupt:
        return 130


async def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as workdir:
        simulator = Simulator(
            SimulatorOptions(
                port=0,
                vm_name=DEMO_VM,
                arm_port=0,
                arm_retry_after=0.2,
                started_seconds=3.0,
                ca_file=Path(workdir) / "ca.pem",
            )
        )
        urls = await simulator.start()
        _no_proxy_for_loopback()
        settings = Settings(
            imds_url=urls.imds_url,
            arm_enabled=True,
            arm_url=urls.arm_url or "",
            arm_ca_bundle=urls.ca_file,
            poll_interval=0.5,
            drain_seconds=DRAIN_SECONDS,
            min_drain_seconds=2.0,
            host="127.0.0.1",
            port=_free_port(),
            state_file=Path(workdir) / "state.json",
            log_level="WARNING",
        )
        stop = asyncio.Event()
        sidecar = asyncio.create_task(app.run(settings, stop), name="sidecar")
        try:
            async with aiohttp.ClientSession(trust_env=False) as http:
                timeline = Timeline(http, urls.control_url, settings)
                print(f"simulator: IMDS at {urls.imds_url}, control API at {urls.control_url}")
                print(f"simulator: ARM at {urls.arm_url} (HTTPS, CA in {urls.ca_file})")
                print(f"sidecar:   probe at {timeline.probe_url}, VM name from instance metadata")
                ok = await asyncio.wait_for(timeline.play(), TIME_LIMIT_SECONDS)
        except TimeoutError:
            print(f"demo did not finish within {TIME_LIMIT_SECONDS:g}s", file=sys.stderr)
            ok = False
        finally:
            stop.set()
            await sidecar
            await simulator.stop()
    return 0 if ok else 1


class Timeline:
    def __init__(self, http: aiohttp.ClientSession, control_url: str, settings: Settings) -> None:
        self.http = http
        self.control_url = control_url
        self.base_url = f"http://{settings.host}:{settings.port}"
        self.probe_url = f"{self.base_url}{settings.health_path}"
        self.started = time.monotonic()
        self.event_id: str | None = None

    def say(self, who: str, text: str) -> None:
        print(f"{time.monotonic() - self.started:6.1f}s  {who:<9} {text}", flush=True)

    async def play(self) -> bool:
        before = await self._until(lambda f: f.probe == 200 and bool(f.pools))
        self.say("probe", "200: serving, no maintenance pending")
        self.say("arm", f"NIC {DEMO_VM}-nic has {before.pools} backend-pool memberships")
        event = {"type": "Reboot", "resources": [DEMO_VM], "not_before_in": NOTICE_SECONDS}
        self.event_id = (await self._control("POST", "/events", event))[0]["EventId"]
        self.say("azure", f"schedules a Reboot of {DEMO_VM}, NotBefore in {NOTICE_SECONDS}s")

        await self._until(lambda f: f.phase is not None)
        status = await self._json(f"{self.base_url}/status")
        mine = next(e for e in status["events"] if e["id"] == self.event_id)
        self.say("sidecar", f"sees it: {mine['phase']}, {mine['reason']}")
        await self._until(lambda f: f.probe == 503)
        down_since = time.monotonic()
        self.say("probe", "503: the load balancer stops sending new flows")
        await self._until(lambda f: f.pools == 0)
        self.say("sidecar", "takes the NIC out of its backend pools (ARM, If-Match etag)")
        self.say("sidecar", f"drains for {DRAIN_SECONDS:g}s (SIDECAR_DRAIN_SECONDS)")
        await self._until(lambda f: f.approvals > 0)
        self.say("sidecar", "approves the event (POST StartRequests)")
        await self._until(lambda f: f.sim_status == "Started")
        self.say("azure", "starts the event: the VM would reboot now")
        await self._until(lambda f: f.sim_status is None)
        self.say("azure", "the event is done and leaves the document")
        await self._until(lambda f: f.pools == before.pools)
        self.say("sidecar", "puts the NIC back in exactly the pools it left")
        facts = await self._until(lambda f: f.probe == 200)
        self.say("probe", "200: back in rotation")
        down = time.monotonic() - down_since
        self.say("done", f"{facts.approvals} approval; out of rotation for {down:.1f}s in all")
        return facts.approvals == 1

    async def _until(self, condition: Any) -> Facts:
        while True:
            facts = await self._facts()
            if condition(facts):
                return facts
            await asyncio.sleep(0.05)

    async def _facts(self) -> Facts:
        facts = Facts()
        try:
            async with self.http.get(self.probe_url) as response:
                facts.probe = response.status
            status = await self._json(f"{self.base_url}/status")
        except aiohttp.ClientError:
            return facts
        for entry in status["events"]:
            if entry["id"] == self.event_id:
                facts.phase = entry["phase"]
        document = await self._control("GET", "/events")
        for entry in document["events"]:
            if entry["EventId"] == self.event_id:
                facts.sim_status = entry["EventStatus"]
        approvals = await self._control("GET", "/approvals")
        facts.approvals = sum(1 for a in approvals if a["event_id"] == self.event_id)
        for nic in await self._control("GET", "/nics"):
            if nic["name"] == f"{DEMO_VM}-nic":
                facts.pools = sum(len(config["pools"]) for config in nic["ip_configurations"])
        return facts

    async def _json(self, url: str) -> Any:
        async with self.http.get(url) as response:
            return await response.json()

    async def _control(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, f"{self.control_url}{path}", json=body) as response:
            response.raise_for_status()
            return await response.json()


def _no_proxy_for_loopback() -> None:
    """The ARM client honours proxy variables, as it should in production; the simulated ARM
    is on loopback, where no proxy can help."""
    for name in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(name, "")
        os.environ[name] = ",".join(filter(None, [current, "127.0.0.1", "localhost"]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
