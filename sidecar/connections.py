"""Counts established TCP connections to the app's ports, from /proc/net/tcp and tcp6.

Why: a drain can end as soon as the last client has left, instead of always waiting the full
SIDECAR_DRAIN_SECONDS. Only the sockets of this network namespace are visible, which is why the
compose file puts the sidecar in the app's namespace. Blocking file reads: call it in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PROC_NET = Path("/proc/net")
ESTABLISHED = "01"


def count_established(ports: Iterable[int], proc_net: Path = PROC_NET) -> int:
    wanted = {f"{port:04X}" for port in ports}
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc_net / table).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel or namespace
            continue
        for line in lines:
            fields = line.split()
            # "sl local_address rem_address st ...", addresses as HEXIP:HEXPORT
            if len(fields) > 3 and fields[3] == ESTABLISHED:
                count += fields[1].rpartition(":")[2] in wanted
    return count
