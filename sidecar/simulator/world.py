"""The whole simulated world, in memory: VMs, events, NICs, load balancers, tokens, faults.

Invariants: all simulator state hangs off one ``World`` (no module-level mutable state); the
world does no I/O and reads time only through its injected clock, so tests can drive time by
hand; ``reset`` rebuilds the initial scenario (events, VMs, NICs, load balancers, operations,
permissions, settings; faults are cleared) but keeps what belongs to the platform rather than
the scenario: issued tokens (a running sidecar's cached token stays valid), the request
counts, ARM's throttling buckets, fault ids (a request still held by an old hang is released,
never re-captured) and a never-decreasing ``DocumentIncarnation``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.simulator import ids, seed
from sidecar.simulator.appgw import GatewayStore
from sidecar.simulator.errors import ControlError
from sidecar.simulator.events import (
    ANY_APPROVAL,
    EventBook,
    EventSpec,
    ScheduledEvent,
    parse_event_spec,
    parse_start_when,
)
from sidecar.simulator.faults import FaultBook
from sidecar.simulator.health import HealthBook
from sidecar.simulator.identity import Permissions, TokenBook
from sidecar.simulator.lb import LoadBalancerStore
from sidecar.simulator.loopback import PortBook
from sidecar.simulator.lro import IN_PROGRESS, OperationBook
from sidecar.simulator.network import Nic, NicStore
from sidecar.simulator.throttle import Throttle, ThrottleSettings
from sidecar.simulator.times import Clock
from sidecar.simulator.traffic import RequestLog
from sidecar.simulator.vms import UNIFORM, Vm
from sidecar.simulator.warmup import Warmup, parse_warmup_status


@dataclass(frozen=True)
class WorldConfig:
    """What the initial scenario is made of (from the CLI flags)."""

    subscription_id: str
    resource_group: str
    location: str
    default_vm: str
    started_seconds: float = 5.0
    arm_retry_after: float = 1.0
    arm_page_size: int = 0
    arm_throttle: bool = False
    schedule: tuple[tuple[str, float | None], ...] = ()
    """Events (type, seconds until NotBefore or None for the type's notice) at start-up."""
    start_when: str = ANY_APPROVAL
    warmup_seconds: float = 0.0


@dataclass
class Settings:
    """Knobs a test may turn while the simulator runs (``PATCH /control/settings``)."""

    started_seconds: float
    arm_retry_after: float
    arm_page_size: int
    start_when: str = ANY_APPROVAL
    warmup_seconds: float = 0.0
    warmup_status: int = 410
    arm_throttle: ThrottleSettings = field(default_factory=ThrottleSettings)

    def to_json(self) -> dict[str, Any]:
        return {
            "started_seconds": self.started_seconds,
            "arm_retry_after": self.arm_retry_after,
            "arm_page_size": self.arm_page_size,
            "start_when": self.start_when,
            "warmup_seconds": self.warmup_seconds,
            "warmup_status": self.warmup_status,
            "arm_throttle": self.arm_throttle.to_json(),
        }

    def update(self, body: object) -> None:
        if not isinstance(body, dict):
            raise ControlError(400, "settings must be a JSON object")
        known = {"started_seconds", "arm_retry_after", "arm_page_size", "start_when"}
        known |= {"warmup_seconds", "warmup_status", "arm_throttle"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ControlError(400, f"unknown settings: {', '.join(unknown)}")
        for key in ("started_seconds", "arm_retry_after", "warmup_seconds"):
            if key in body:
                value = body[key]
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ControlError(400, f"'{key}' must be a non-negative number")
                if not math.isfinite(value):
                    raise ControlError(400, f"'{key}' must be finite")
                setattr(self, key, float(value))
        if "arm_page_size" in body:
            size = body["arm_page_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ControlError(400, "'arm_page_size' must be a non-negative integer")
            self.arm_page_size = size
        if "start_when" in body:
            self.start_when = parse_start_when(body["start_when"])
        if "warmup_status" in body:
            self.warmup_status = parse_warmup_status(body["warmup_status"])
        if "arm_throttle" in body:
            self.arm_throttle.update(body["arm_throttle"])


class World:
    """Everything the IMDS, ARM and control servers read and change."""

    def __init__(self, config: WorldConfig, clock: Clock = time.time) -> None:
        self.config = config
        self.clock = clock
        self.tokens = TokenBook(clock)
        self.requests = RequestLog(clock)
        self.faults = FaultBook(clock)
        self.throttle = Throttle(clock)
        self._build(incarnation=0)

    def _build(self, incarnation: int) -> None:
        config = self.config
        self.settings = Settings(
            config.started_seconds,
            config.arm_retry_after,
            config.arm_page_size,
            arm_throttle=ThrottleSettings(enabled=config.arm_throttle),
        )
        self.settings.start_when = config.start_when
        self.settings.warmup_seconds = config.warmup_seconds
        self.warmup = Warmup()
        self.events = EventBook(self.clock, incarnation)
        self.vms: dict[str, Vm] = {}
        self.nics = NicStore()
        self.operations = OperationBook(self.clock)
        self.faults.clear()
        self.permissions = Permissions()
        self.lbs = LoadBalancerStore()
        self.appgws = GatewayStore()
        self.ports = PortBook()
        self.lb_health = HealthBook()
        self._populate()

    def _populate(self) -> None:
        config = self.config
        where = (config.subscription_id, config.resource_group, config.location)
        self.lbs.add(seed.load_balancer(*where))
        self.appgws.add(seed.application_gateway(*where))
        default = self.new_vm(config.default_vm)
        self.add_vm(default, nic=False)
        self.nics.add(seed.default_nic(default), nic_id=seed.nic_resource_id(default))
        if default.key != seed.OTHER_VM:
            self.add_vm(self.new_vm(seed.OTHER_VM), address="10.0.1.6")
        orphan = f"{seed.nic_name(default)}-orphan"
        self.nics.add(
            seed.simple_nic(
                name=orphan,
                subscription=config.subscription_id,
                resource_group=config.resource_group,
                location=config.location,
                vm_reference=None,
                address="10.0.1.7",
                pools=[],
            ),
            nic_id=ids.nic_id(config.subscription_id, config.resource_group, orphan),
        )
        now = self.clock()
        for event_type, seconds in config.schedule:
            body: dict[str, Any] = {"type": event_type}
            if seconds is not None:
                body["not_before_in"] = seconds
            spec = parse_event_spec(
                body,
                now=now,
                default_vm=default.name,
                started_seconds=self.settings.started_seconds,
                start_when=self.settings.start_when,
            )
            self.events.add(spec)

    def reset(self) -> None:
        """Back to the initial scenario; DocumentIncarnation keeps counting upwards."""
        self._build(incarnation=self.events.incarnation + 1)

    def now(self) -> float:
        return self.clock()

    # VMs -----------------------------------------------------------------------------------

    def new_vm(self, name: str, resource_group: str | None = None) -> Vm:
        return Vm(
            name=name,
            subscription_id=self.config.subscription_id,
            resource_group=resource_group or self.config.resource_group,
            location=self.config.location,
        )

    def vm(self, name: str) -> Vm | None:
        return self.vms.get(name.casefold())

    def ensure_vm(self, name: str) -> Vm:
        """The VM behind an IMDS view, created with defaults (and a NIC) on first use."""
        existing = self.vm(name)
        if existing is not None:
            return existing
        return self.add_vm(self.new_vm(name))

    def add_vm(
        self,
        vm: Vm,
        *,
        nic: bool = True,
        pools: Sequence[str] | None = None,
        address: str | None = None,
    ) -> Vm:
        if vm.key in self.vms:
            raise ControlError(409, f"VM {vm.name} already exists")
        self.vms[vm.key] = vm
        if nic:
            rg = vm.resource_group
            pool_ids = [
                self.expand_pool(p, rg) for p in (pools if pools is not None else [seed.HTTP_POOL])
            ]
            nic_id = seed.nic_resource_id(vm)
            doc = seed.simple_nic(
                name=seed.nic_name(vm),
                subscription=vm.subscription_id,
                resource_group=rg,
                location=vm.location,
                vm_reference=ids.reference_form(vm.resource_id),
                address=address or self.nics.next_ip(),
                pools=pool_ids,
            )
            self.nics.add(doc, nic_id=nic_id, uniform=vm.orchestration == UNIFORM)
        return vm

    def resource_group_exists(self, resource_group: str) -> bool:
        wanted = resource_group.casefold()
        if wanted == self.config.resource_group.casefold():
            return True
        if any(vm.resource_group.casefold() == wanted for vm in self.vms.values()):
            return True
        if any(lb.resource_group.casefold() == wanted for lb in self.lbs.all()):
            return True
        return any(nic.resource_group.casefold() == wanted for nic in self.nics.all())

    def expand_pool(self, reference: str, resource_group: str) -> str:
        """A pool id from a full id, ``lb/pool`` or a bare pool name of the default LB."""
        if reference.startswith("/"):
            return reference
        load_balancer, _, pool = reference.rpartition("/")
        return ids.pool_id(
            self.config.subscription_id,
            resource_group,
            load_balancer or seed.LOAD_BALANCER,
            pool,
        )

    def expand_appgw_pool(self, reference: str, resource_group: str) -> str:
        """An application-gateway pool id from a full id, ``gateway/pool`` or a pool of agw-web."""
        if reference.startswith("/"):
            return reference
        gateway, _, pool = reference.rpartition("/")
        return ids.appgw_pool_id(
            self.config.subscription_id, resource_group, gateway or seed.APP_GATEWAY, pool
        )

    # Events --------------------------------------------------------------------------------

    def add_events(self, specs: Iterable[EventSpec]) -> list[ScheduledEvent]:
        specs = list(specs)
        taken = {spec.event_id.casefold() for spec in specs}
        if len(taken) != len(specs):
            raise ControlError(409, "duplicate event_id in one request")
        for spec in specs:
            if self.events.get(spec.event_id) is not None:
                raise ControlError(409, f"event {spec.event_id} already exists")
        return [self.events.add(spec) for spec in specs]

    # NICs and operations -------------------------------------------------------------------

    def operation_settle(self) -> float:
        """How long an unpolled operation runs before finishing by itself."""
        return max(10.0, 5 * self.settings.arm_retry_after)

    def refresh_nics(self) -> None:
        """Carry finished operations' outcome into their NIC's provisioningState."""
        for nic in self.nics.all():
            self.refresh_nic(nic)

    def refresh_nic(self, nic: Nic) -> Nic:
        if nic.pending_operation is None:
            return nic
        operation = self.operations.get(nic.pending_operation)
        if operation is None:
            nic.pending_operation = None
            return nic
        self.operations.settle(operation)
        if operation.status != IN_PROGRESS:
            self.nics.set_state(nic, operation.status)
            nic.pending_operation = None
        return nic

    def nic_summaries(self) -> list[dict[str, Any]]:
        self.refresh_nics()
        return [nic.summary() for nic in self.nics.all()]
