"""`sidecar demo`: one maintenance, rehearsed end to end on loopback in well under a minute.

The simulator and the sidecar run in this process, but talk only over HTTP, exactly as they do
apart. The timeline is read from the outside: the probe, /status and the simulator's control API.

The Reboot lingers as in Azure (listed as Started for 10 minutes after it starts) and the
sidecar runs with SIDECAR_RETURN_AFTER=impact: when the simulator's impact begins, the "VM"
goes down (the sidecar stops), and when it is over the VM boots (a new id in the boot-id file,
the sidecar starts again), which brings it back in rotation while the event is still listed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
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
IMPACT_AFTER_SECONDS = 1.0
IMPACT_SECONDS = 2.0
LINGER_SECONDS = 600
"""Microsoft: a started event stays listed about 10 minutes; the demo is over long before."""


@dataclass
class Facts:
    """What an observer can see at one moment; the timeline prints what changed."""

    probe: int | None = None
    phase: str | None = None
    sim_status: str | None = None
    approvals: int = 0
    impact: str | None = None
    """The simulator's impact state: pending, in-progress, over."""
    reason: str | None = None
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
        boot_id_file = Path(workdir) / "boot_id"
        boot_id_file.write_text(f"{uuid.uuid4()}\n")
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
            return_after="impact",
            boot_id_file=boot_id_file,
            log_level="WARNING",
        )
        vm = Vm(settings, boot_id_file)
        vm.power_on()
        try:
            async with aiohttp.ClientSession(trust_env=False) as http:
                timeline = Timeline(http, urls.control_url, settings, vm)
                print(f"simulator: IMDS at {urls.imds_url}, control API at {urls.control_url}")
                print(f"simulator: ARM at {urls.arm_url} (HTTPS, CA in {urls.ca_file})")
                print(f"sidecar:   probe at {timeline.probe_url}, VM name from instance metadata")
                ok = await asyncio.wait_for(timeline.play(), TIME_LIMIT_SECONDS)
        except TimeoutError:
            print(f"demo did not finish within {TIME_LIMIT_SECONDS:g}s", file=sys.stderr)
            ok = False
        finally:
            await vm.power_off()
            await simulator.stop()
    return 0 if ok else 1


class Vm:
    """The demo's VM: the sidecar (in this process) and the VM's boot id."""

    def __init__(self, settings: Settings, boot_id_file: Path) -> None:
        self.settings = settings
        self.boot_id_file = boot_id_file
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def boot_id(self) -> str:
        return self.boot_id_file.read_text().strip()

    def power_on(self) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(app.run(self.settings, self.stop), name="sidecar")

    async def power_off(self) -> None:
        if self.task is not None:
            self.stop.set()
            await self.task
            self.task = None

    async def reboot(self) -> None:
        """Down with the sidecar; up again with a new boot id, as after a real reboot."""
        await self.power_off()
        self.boot_id_file.write_text(f"{uuid.uuid4()}\n")
        self.power_on()


class Timeline:
    def __init__(
        self, http: aiohttp.ClientSession, control_url: str, settings: Settings, vm: Vm
    ) -> None:
        self.vm = vm
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
        event = {
            "type": "Reboot",
            "resources": [DEMO_VM],
            "not_before_in": NOTICE_SECONDS,
            "impact_after": IMPACT_AFTER_SECONDS,
            "impact_seconds": IMPACT_SECONDS,
            "started_for": LINGER_SECONDS,
        }
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
        self.say("azure", "starts the event (it stays listed for ~10 minutes, as in Azure)")
        await self._until(lambda f: f.impact in ("in-progress", "over"))
        old = self.vm.boot_id()
        self.say("azure", f"reboots {DEMO_VM}: the sidecar goes down with it")
        await self._until(lambda f: f.impact == "over", probe=False)
        await self.vm.reboot()
        self.say("vm", f"boots again: boot id {old[:8]}... -> {self.vm.boot_id()[:8]}...")
        facts = await self._until(lambda f: f.phase == "over")
        self.say("sidecar", f"{facts.reason} (SIDECAR_RETURN_AFTER=impact)")
        await self._until(lambda f: f.pools == before.pools)
        self.say("sidecar", "puts the NIC back in exactly the pools it left")
        facts = await self._until(lambda f: f.probe == 200)
        self.say("probe", "200: back in rotation")
        listed = facts.sim_status == "Started"
        if listed:
            self.say("azure", "the event is still listed as Started: the VM did not wait for it")
        down = time.monotonic() - down_since
        self.say("done", f"{facts.approvals} approval; out of rotation for {down:.1f}s in all")
        return facts.approvals == 1 and listed

    async def _until(self, condition: Callable[[Facts], bool], probe: bool = True) -> Facts:
        while True:
            facts = await self._facts(probe)
            if condition(facts):
                return facts
            await asyncio.sleep(0.05)

    async def _facts(self, probe: bool = True) -> Facts:
        facts = Facts()
        document = await self._control("GET", "/events")
        for entry in document["events"]:
            if entry["EventId"] == self.event_id:
                facts.sim_status = entry["EventStatus"]
                facts.impact = entry["impact"]
        if not probe:  # the VM is down: only the platform's side can be seen
            return facts
        try:
            async with self.http.get(self.probe_url) as response:
                facts.probe = response.status
            status = await self._json(f"{self.base_url}/status")
        except aiohttp.ClientError:
            return facts
        for entry in status["events"]:
            if entry["id"] == self.event_id:
                facts.phase = entry["phase"]
                facts.reason = entry["reason"]
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
