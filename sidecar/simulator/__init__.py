"""A local fake of Azure IMDS and of the network-interface slice of Azure Resource Manager.

It serves, on loopback over real HTTP/HTTPS: Scheduled Events (with approvals and a simulated
platform that starts and retires events), instance metadata, managed-identity tokens, and ARM
network interfaces (list, get, PUT with If-Match and a long-running operation), plus a control
API to script scenarios and inject faults.

Invariant: this subpackage imports nothing from the rest of ``sidecar``. It is an independent
implementation of the Azure contract, so the sidecar and the simulator check each other instead
of sharing one reading of the docs.
"""

from sidecar.simulator.endpoints import SimulatorUrls
from sidecar.simulator.options import ScheduleSpec, SimulatorOptions
from sidecar.simulator.server import Simulator
from sidecar.simulator.world import World

__all__ = ["ScheduleSpec", "Simulator", "SimulatorOptions", "SimulatorUrls", "World"]
