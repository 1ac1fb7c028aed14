"""A local fake of Azure IMDS and of the network-interface slice of Azure Resource Manager.

It serves, on loopback over real HTTP/HTTPS: Scheduled Events (with approvals and a simulated
platform that starts and retires events), instance metadata, managed-identity tokens, and ARM
network interfaces (list, get, PUT with If-Match and a long-running operation) and load
balancers (reads, rule health), with ARM's permission checks and throttling; load balancers
that probe real apps on loopback and forward flows to them; plus a control API to script
scenarios and inject faults. Start it with `sidecar simulate` or, in Python,
`sidecar.simulator.server.Simulator`.

Invariant: this subpackage imports nothing from the rest of ``sidecar``. It is an independent
implementation of the Azure contract, so the sidecar and the simulator check each other instead
of sharing one reading of the docs. This file imports nothing at all: the main CLI loads
`sidecar.simulator.main` to build its parser, and `sidecar run` must not carry the servers, TLS
and `cryptography` (about 9 MiB of RSS and 0.1 s of start-up).
"""
