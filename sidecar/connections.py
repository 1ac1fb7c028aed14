"""Counts established TCP connections to the app's ports, from /proc/net/tcp and tcp6.

Why: a drain can end as soon as the last client has left, instead of always waiting the full
SIDECAR_DRAIN_SECONDS. Only the sockets of this network namespace are visible, which is why the
compose file puts the sidecar in the app's namespace.

Invariant: the sidecar's own connections are never counted: not its sockets, and not the app's
end of a connection whose other end is one of them (the app-health check's keep-alive
connection, a drain hook's request). Blocking file reads: call it in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

PROC_NET = Path("/proc/net")
OWN_FDS = Path("/proc/self/fd")
ESTABLISHED = "01"


class Row(NamedTuple):
    local: str
    remote: str
    state: str
    inode: str


def count_established(
    ports: Iterable[int], proc_net: Path = PROC_NET, own_fds: Path = OWN_FDS
) -> int:
    wanted = {f"{port:04X}" for port in ports}
    rows = list(_rows(proc_net))
    mine = _socket_inodes(own_fds)
    my_ends = {row.local for row in rows if row.inode in mine}
    return sum(
        1
        for row in rows
        if row.state == ESTABLISHED
        and row.local.rpartition(":")[2] in wanted
        and row.inode not in mine
        and row.remote not in my_ends
    )


def _rows(proc_net: Path) -> Iterable[Row]:
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc_net / table).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel or namespace
            continue
        for line in lines:
            # "sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ..."
            fields = line.split()
            if len(fields) > 9:
                yield Row(fields[1], fields[2], fields[3], fields[9])


def _socket_inodes(own_fds: Path) -> set[str]:
    inodes: set[str] = set()
    try:
        names = os.listdir(own_fds)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(own_fds / name)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes
