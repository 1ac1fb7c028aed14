"""Where a simulated VM really listens: a map from its ports to ports on 127.0.0.1.

Invariants: a VM is found by name case-insensitively; a map holds only valid ports (1-65535)
and replaces the previous one whole; the address is always 127.0.0.1, so load-balancer probes
and forwarded flows never leave the machine. No map, no probe traffic.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.simulator.errors import ControlError

LOOPBACK = "127.0.0.1"


def parse_ports(body: object) -> dict[int, int]:
    """``{"8080": 41234, "80": 41235}`` (keys as strings or numbers) -> {8080: 41234, ...}."""
    if not isinstance(body, Mapping):
        raise ControlError(400, 'ports must map the VM\'s ports to loopback ports: {"8080": 41234}')
    ports: dict[int, int] = {}
    for key, value in body.items():
        port = int(key) if isinstance(key, str) and key.isdigit() else key
        valid = isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535
        target_ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535
        if not valid or not target_ok:
            raise ControlError(400, f"bad port mapping {key!r}: {value!r} (ports are 1-65535)")
        ports[int(port)] = int(value)
    return ports


class PortBook:
    """Each VM's port map, by VM name."""

    def __init__(self) -> None:
        self._maps: dict[str, dict[int, int]] = {}

    def set(self, vm: str, ports: Mapping[int, int]) -> None:
        if ports:
            self._maps[vm.casefold()] = dict(ports)
        else:
            self._maps.pop(vm.casefold(), None)

    def of(self, vm: str) -> dict[int, int]:
        return dict(self._maps.get(vm.casefold(), {}))

    def lookup(self, vm: str, port: int) -> int | None:
        return self._maps.get(vm.casefold(), {}).get(port)

    def any(self) -> bool:
        return bool(self._maps)

    def to_json(self, vm: str) -> dict[str, int]:
        return {
            str(port): target for port, target in sorted(self._maps.get(vm.casefold(), {}).items())
        }
