"""The bench's equipment: the simulator, sidecars, stand-in web apps and HAProxy as processes.

Everything binds 127.0.0.1 and is spoken to over loopback; HTTP goes through `http.client`, which
never consults proxy variables. Every process started here is killed by its owner's `close()`
(callers use `contextlib.ExitStack`), so an interrupted benchmark leaves nothing behind.
Timestamps are `time.monotonic()` (CLOCK_MONOTONIC, shared by every process on the machine) unless
a name says `wall`.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import json
import math
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

PATIENCE = 30.0
"""Bounds waits for things that take milliseconds on a quiet machine: generous on purpose."""

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


# --- small utilities


def wait_for(
    probe: Callable[[], T | None], what: str, timeout: float = PATIENCE, every: float = 0.02
) -> T:
    """Polls `probe` until it returns something truthy; raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ListenPorts:
    """Ports to listen on, below the kernel's ephemeral range. `free_port()` hands out ephemeral
    ports, and on a busy machine an outgoing connection can take one between the pick and the
    bind, or between a kill and the restart that binds it again; these never collide that way."""

    def __init__(self) -> None:
        low = 32768
        with contextlib.suppress(OSError, ValueError, IndexError):
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        self._next = max(1024, low - 10_000)
        self._end = low

    def take(self) -> int:
        while self._next < self._end:
            port, self._next = self._next, self._next + 1
            with socket.socket() as sock, contextlib.suppress(OSError):
                sock.bind(("127.0.0.1", port))
                return port
        raise RuntimeError("no free port below the ephemeral range")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wall_time(iso: str) -> float:
    """The simulator's ISO 8601 timestamps as Unix time."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(url: str, method: str = "GET", body: Any = None, timeout: float = 10.0) -> Answer:
    """One request on a fresh connection (control API, /status)."""
    host, port, path = _split(url)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    payload = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return Answer(response.status, response.read())
    finally:
        connection.close()


def _split(url: str) -> tuple[str, int, str]:
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port or 80), "/" + path


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation): the value a q% tail actually contains."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def distribution(values: Sequence[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
        "mean": sum(values) / len(values) if values else math.nan,
    }


def cpus_available() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin(command: list[str], cpu: int | None) -> list[str]:
    """Prefixes `taskset -c CPU` (taskset execs, so the pid stays the command's own)."""
    if cpu is None or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", str(cpu), *command]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(cpus_available()),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "haproxy": _version(["haproxy", "-v"]),
        "wrk": _version(["wrk", "--version"]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _version(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0] if text else None


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Writes `benchmarks/results/<name>.json` atomically (a half-written file is never read)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(temporary, path)
    return path


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain fixed-width table (it also reads as Markdown)."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# --- processes


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment minus SIDECAR_* settings and proxies; loopback never goes via a proxy."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("SIDECAR_") and key.upper() not in PROXY_VARIABLES
    }
    return {**env, "NO_PROXY": "localhost,127.0.0.1", "PYTHONUNBUFFERED": "1", **(extra or {})}


class Child:
    """A process whose output goes to a log file (read it when something goes wrong).

    It leads a process group of its own, and signals go to the whole group: a "VM" that freezes
    or dies takes every process of the app with it (nginx's workers, gunicorn's), never leaving
    one behind that still listens."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._handle = log.open("ab")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            command,
            env=env if env is not None else child_env(),
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def signal(self, signum: int) -> None:
        """`signum` to the whole process group (quietly nothing once it is gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def freeze(self) -> None:
        """SIGSTOP: the VM goes silent. The kernel still completes handshakes into the listen
        backlog, but nothing answers, nothing is reset: clients wait for their timeouts."""
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: a power cut, as far as these processes can tell (a stopped one too)."""
        self.signal(signal.SIGKILL)
        self.popen.wait(PATIENCE)

    def terminate(self, timeout: float = PATIENCE) -> int | None:
        if self.alive():
            self.signal(signal.SIGCONT)  # a stopped process handles SIGTERM only once resumed
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def close(self) -> None:
        self.kill()
        self._handle.close()


class LoadGenerator:
    """`benchmarks.loadgen` as a child process: started, waited for until its first answer,
    stopped and read back."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        url: str,
        *,
        rate: float,
        concurrency: int,
        duration: float,
        max_requests: int,
        timeout: float,
        keepalive: bool,
    ) -> None:
        self.name = name
        self.out = workdir / f"{name}.json"
        self.ready = workdir / f"{name}-ready.json"
        self.ready.unlink(missing_ok=True)
        args = [
            *("--url", url),
            *("--rate", str(rate)),
            *("--concurrency", str(concurrency)),
            *("--duration", str(duration)),
            *("--max-requests", str(max_requests)),
            *("--timeout", str(timeout)),
            *("--out", str(self.out)),
            *("--ready-file", str(self.ready)),
            *(("--keepalive",) if keepalive else ()),
        ]
        self.child = Child(python_module("benchmarks.loadgen", *args), workdir / f"{name}.log")

    def wait_ready(self, what: str) -> None:
        """Until the first answer came back; a generator that exited meanwhile is an error."""

        def answered() -> bool:
            if not self.child.alive():
                raise RuntimeError(f"load generator {self.name} exited:\n{self.child.output()}")
            return self.ready.exists()

        wait_for(answered, what)

    def stop(self) -> tuple[list[list[Any]], int]:
        """Its records ([sent at, seconds, error or None], ...) and the requests it retried."""
        self.child.terminate(timeout=PATIENCE)
        result = json.loads(self.out.read_text())
        records: list[list[Any]] = result["records"]
        return records, int(result["retried"])

    def close(self) -> None:
        self.child.close()


def _niced(command: list[str], nice: int) -> list[str]:
    """Prefixes `nice -n N` (nice execs, so the pid stays the command's own)."""
    return ["nice", "-n", str(nice), *command] if nice else command


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Simulator:
    """`sidecar simulate` with a client for its control API."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        cpu: int | None = None,
        name: str = "simulator",
    ) -> None:
        ready = workdir / f"{name}-ready.json"
        ready.unlink(missing_ok=True)
        self.child = Child(
            pin(
                python_module(
                    "sidecar", "simulate", "--port", "0", "--ready-file", str(ready), *args
                ),
                cpu,
            ),
            workdir / f"{name}.log",
        )
        try:
            urls = wait_for(lambda: self._ready(ready), "the simulator's ready file")
        except BaseException:
            self.child.close()
            raise
        self.imds_url: str = urls["imds_url"]
        self.control_url: str = urls["control_url"]
        self.arm_url: str | None = urls.get("arm_url")
        self.ca_file: str | None = urls.get("ca_file")

    def _ready(self, path: Path) -> dict[str, Any] | None:
        if not self.child.alive():
            raise RuntimeError(f"the simulator exited:\n{self.child.output()}")
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            loaded: dict[str, Any] = json.loads(path.read_text())
            return loaded
        return None

    def view(self, vm: str) -> str:
        """VM `vm`'s IMDS base URL."""
        return f"{self.imds_url}/vms/{vm}"

    def control(self, method: str, path: str, body: Any = None) -> Any:
        answer = fetch(f"{self.control_url}{path}", method, body)
        if answer.status >= 300:
            raise RuntimeError(f"{method} /control{path}: {answer.status} {answer.body!r}")
        return answer.json() if answer.body else None

    def add_event(self, **fields: Any) -> dict[str, Any]:
        created: list[dict[str, Any]] = self.control("POST", "/events", fields)
        return created[0]

    def cancel_event(self, event_id: str) -> None:
        with contextlib.suppress(RuntimeError):  # already gone: the platform retired it
            self.control("DELETE", f"/events/{event_id}")

    def approvals_of(self, event_id: str) -> list[dict[str, Any]]:
        approvals: list[dict[str, Any]] = self.control("GET", "/approvals")
        return [a for a in approvals if a["event_id"] == event_id]

    def close(self) -> None:
        self.child.terminate(5)
        self.child.close()


class Sidecar:
    """`sidecar run`, configured only through SIDECAR_* variables; restartable like after a
    reboot (same port, same state file)."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        settings: dict[str, str],
        *,
        cpu: int | None = None,
        env: dict[str, str] | None = None,
        nice: int = 0,
        port: int | None = None,
    ) -> None:
        """`nice` lowers the sidecar's CPU priority (its ARM helper inherits it): a fleet
        rehearsal runs a hundred "VMs" on the cores the simulated platform needs too. `port`:
        the probe's port (default: a free one)."""
        self.name = name
        self.port = port or free_port()
        self.workdir = workdir
        self.cpu = cpu
        self.nice = nice
        self.env = env or {}
        self.boot_id_file = workdir / f"{name}-boot_id"
        self.boot_id_file.write_text(f"{uuid.uuid4()}\n")
        self.settings = {
            "SIDECAR_HOST": "127.0.0.1",
            "SIDECAR_PORT": str(self.port),
            "SIDECAR_STATE_FILE": str(workdir / f"{name}-state.json"),
            "SIDECAR_BOOT_ID_FILE": str(self.boot_id_file),
            **settings,
        }
        self.child = self._start()

    def _start(self) -> Child:
        return Child(
            _niced(pin(python_module("sidecar", "run"), self.cpu), self.nice),
            self.workdir / f"{self.name}-sidecar.log",
            child_env({**self.env, **self.settings}),
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def probe_code(self, timeout: float = 2.0) -> int | None:
        """The probe's status, or None while nothing listens."""
        with contextlib.suppress(OSError):
            return fetch(f"{self.url}/health", timeout=timeout).status
        return None

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = fetch(f"{self.url}/status").json()
        return body

    def wait_probe(self, code: int, timeout: float = PATIENCE) -> None:
        def reached() -> bool:
            if not self.child.alive():
                raise RuntimeError(f"sidecar {self.name} exited:\n{self.child.output()}")
            return self.probe_code() == code

        wait_for(reached, f"sidecar {self.name}'s probe to answer {code}", timeout)

    def kill(self) -> None:
        self.child.close()

    def new_boot_id(self) -> None:
        """What a reboot does to /proc/sys/kernel/random/boot_id."""
        self.boot_id_file.write_text(f"{uuid.uuid4()}\n")

    def restart(self) -> None:
        self.child.close()
        self.child = self._start()

    def close(self) -> None:
        self.child.close()


class WebApp:
    """The stand-in for the user's web app (benchmarks/webapp.py); restartable on its port.
    Its drain hook is `POST /drain` (SIDECAR_DRAIN_HOOK_URL)."""

    kind = "webapp"

    def __init__(self, workdir: Path, name: str, *, cpu: int | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.workdir = workdir
        self.cpu = cpu
        self.child = self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hook_settings(self) -> dict[str, str]:
        """The sidecar settings that make it drain this app."""
        return {
            "SIDECAR_DRAIN_HOOK_URL": f"{self.url}/drain",
            "SIDECAR_UNDRAIN_HOOK_URL": f"{self.url}/undrain",
        }

    def start(self) -> Child:
        child = Child(
            pin(
                python_module("benchmarks.webapp", "--port", str(self.port), "--name", self.name),
                self.cpu,
            ),
            self.workdir / f"{self.name}-app.log",
        )
        self.child = child
        return child

    def wait_listening(self, timeout: float = PATIENCE) -> None:
        def up() -> bool:
            if not self.child.alive():
                raise RuntimeError(f"app {self.name} exited:\n{self.child.output()}")
            return listening(self.port)

        wait_for(up, f"app {self.name} on port {self.port}", timeout, every=0.01)

    def kill(self) -> None:
        self.child.close()

    def close(self) -> None:
        self.child.close()


def nginx_binary() -> str | None:
    """Debian puts nginx in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def nginx_config(root: Path, port: int, name: str) -> str:
    """nginx as an unprivileged app on loopback: every path it writes is under `root`. Run as
    root (CI), its workers keep our user instead of switching to `nobody`, which a user
    namespace that maps only root (scripts/check) could not do."""
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
    temp = "\n".join(
        f"    {kind}_temp_path {root}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# written by benchmarks/lab.py
{user}daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log notice;
events {{ worker_connections 512; }}
http {{
    access_log off;
{temp}
    default_type text/plain;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location /slow {{
            # a request in flight for a while: 600 kB sent at 100 kB/s (6 s)
            alias {root}/slow.bin;
            limit_rate 100k;
            add_header X-Backend {name} always;
        }}
        location / {{
            add_header X-Backend {name} always;
            return 200 "hello from {name}\\n";
        }}
    }}
}}
"""


class Nginx:
    """Debian's nginx as the app, with its own config, pid file, logs and temp paths in a
    directory of its own; restartable on its port. Its drain hook is a graceful reload."""

    kind = "nginx"
    SLOW_BYTES = 600_000

    def __init__(self, workdir: Path, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.workdir = workdir
        self.root = workdir / f"{name}-nginx"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "slow.bin").write_bytes(b"x" * self.SLOW_BYTES)
        self.config = self.root / "nginx.conf"
        self.config.write_text(nginx_config(self.root, self.port, name))
        self.binary = nginx_binary() or "nginx"
        self.child = self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, *args: str) -> list[str]:
        """nginx with this instance's config and error log (`-e`: not Debian's /var/log)."""
        return [self.binary, "-c", str(self.config), "-e", str(self.root / "error.log"), *args]

    def reload_command(self) -> str:
        """The graceful reload, as SIDECAR_DRAIN_COMMAND: new workers take new connections;
        the old ones finish their requests, close their keep-alive connections, and exit."""
        return " ".join(self.command("-s", "reload"))

    def hook_settings(self) -> dict[str, str]:
        return {"SIDECAR_DRAIN_COMMAND": self.reload_command()}

    def start(self) -> Child:
        (self.root / "nginx.pid").unlink(missing_ok=True)
        self.child = Child(self.command(), self.workdir / f"{self.name}-nginx.log")
        return self.child

    def wait_listening(self, timeout: float = PATIENCE) -> None:
        def up() -> bool:
            if not self.child.alive():
                raise RuntimeError(
                    f"nginx {self.name} exited:\n{self.child.output()}"
                    f"{(self.root / 'error.log').read_text(errors='replace')[-2000:]}"
                )
            return listening(self.port) and (self.root / "nginx.pid").exists()

        wait_for(up, f"nginx {self.name} on port {self.port}", timeout, every=0.01)

    def kill(self) -> None:
        self.child.close()

    def close(self) -> None:
        self.child.close()


# --- HAProxy


@dataclass(frozen=True)
class Backend:
    """One HAProxy server: traffic goes to `port`, health checks to `check_port`/`check_path`."""

    name: str
    port: int
    check_port: int
    check_path: str = "/health"


@dataclass(frozen=True)
class CheckPolicy:
    """Like an Azure LB probe: interval, and consecutive results to go down / come back."""

    inter_ms: int = 1000
    fall: int = 2
    rise: int = 2
    timeout_ms: int = 1000
    """A check without an answer within this fails (Azure: min(interval, 30 s))."""


def haproxy_available() -> bool:
    return shutil.which("haproxy") is not None


def haproxy_config(
    frontend_port: int,
    backends: Sequence[Backend],
    checks: CheckPolicy,
    runtime_dir: Path,
) -> str:
    """Layer 4, like the Azure Load Balancer: each TCP connection is one flow, balanced once;
    a failed connection to a backend is not retried for the client (`retries 0`, no redispatch);
    flows established before a backend goes down continue (HAProxy's default)."""
    servers = "\n".join(
        f"    server {b.name} 127.0.0.1:{b.port} check port {b.check_port}"
        f" inter {checks.inter_ms} fall {checks.fall} rise {checks.rise}"
        for b in backends
    )
    paths = {b.check_path for b in backends}
    if len(paths) != 1:
        raise ValueError("one check path per backend section")
    return f"""# written by benchmarks/lab.py; no user/group/daemon: it runs as our child
global
    maxconn 1000
    stats socket {runtime_dir}/stats.sock mode 600 level admin
    pidfile {runtime_dir}/haproxy.pid

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check {checks.timeout_ms}ms
    retries 0

frontend vip
    bind 127.0.0.1:{frontend_port}
    default_backend web

backend web
    balance roundrobin
    option httpchk GET {paths.pop()}
    http-check expect status 200
{servers}
"""


class HAProxy:
    """HAProxy in the foreground (`-db`) with its stats socket in a short temporary directory
    (a Unix socket path must stay under 108 bytes, which pytest's tmp_path may not)."""

    def __init__(
        self,
        workdir: Path,
        backends: Sequence[Backend],
        checks: CheckPolicy = CheckPolicy(),
        *,
        cpu: int | None = None,
    ) -> None:
        self.runtime = Path(tempfile.mkdtemp(prefix="hap-"))
        self.port = free_port()
        self.backends = list(backends)
        config = workdir / "haproxy.cfg"
        config.write_text(haproxy_config(self.port, backends, checks, self.runtime))
        self.child = Child(pin(["haproxy", "-db", "-f", str(config)], cpu), workdir / "haproxy.log")
        try:
            wait_for(self._socket_up, "HAProxy's stats socket", every=0.02)
        except BaseException:
            self.close()
            raise

    def _socket_up(self) -> bool:
        if not self.child.alive():
            raise RuntimeError(f"haproxy exited:\n{self.child.output()}")
        return (self.runtime / "stats.sock").exists() and listening(self.port)

    def command(self, line: str) -> str:
        """One runtime API command over the stats socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.runtime / "stats.sock"))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_status(self) -> dict[str, str]:
        """Server name -> `UP`, `DOWN`, `MAINT`, `UP 1/2` (going down), `DOWN 1/2` (coming up)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        name, kind, status = header.index("svname"), header.index("pxname"), header.index("status")
        result = {}
        for line in lines[1:]:
            fields = line.split(",")
            if (
                len(fields) > status
                and fields[kind] == "web"
                and fields[name]
                not in (
                    "BACKEND",
                    "FRONTEND",
                )
            ):
                result[fields[name]] = fields[status]
        return result

    def wait_all_up(self, timeout: float = PATIENCE) -> None:
        wait_for(
            lambda: all(s == "UP" for s in self.server_status().values()),
            f"every HAProxy server UP (log:\n{self.child.output()})",
            timeout,
        )

    def close(self) -> None:
        self.child.terminate(5)
        self.child.close()
        shutil.rmtree(self.runtime, ignore_errors=True)


def in_rotation(status: str) -> bool:
    """HAProxy sends new connections to UP servers (`UP 1/2` is still up, failing checks)."""
    return status.startswith("UP")


class StatusWatcher:
    """Samples one HAProxy server's status every `every` seconds in a thread; keeps the changes."""

    def __init__(self, haproxy: HAProxy, server: str, every: float = 0.02) -> None:
        self.haproxy = haproxy
        self.server = server
        self.every = every
        self.changes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"watch-{server}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                status = self.haproxy.server_status().get(self.server, "?")
                if status != last:
                    with self._changed:
                        self.changes.append((time.monotonic(), status))
                        self._changed.notify_all()
                    last = status
            self._stop.wait(self.every)

    def current(self) -> str | None:
        return self.changes[-1][1] if self.changes else None

    def out_since(self, moment: float) -> float | None:
        """When the server first left rotation at or after `moment`."""
        return next((t for t, s in self.changes if t >= moment and not in_rotation(s)), None)

    def back_since(self, moment: float) -> float | None:
        """When the server was next in rotation at or after `moment`."""
        return next((t for t, s in self.changes if t >= moment and in_rotation(s)), None)

    def wait(self, predicate: Callable[[], T | None], what: str, timeout: float = PATIENCE) -> T:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (result := predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
                self._changed.wait(remaining)
            return result

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --- /proc readings


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def pss_bytes(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return None


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU time of one process (fields 14 and 15 of /proc/PID/stat); with
    `reaped_children`, that of its children it has waited for too (16 and 17: a sidecar's
    ARM helpers that have stopped)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = sum(int(value) for value in fields[11 : 15 if reaped_children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """A process's children (a sidecar's: its ARM helper while one runs); none once it is gone."""
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(child) for child in text.split()]
    return []


MIB = 1024 * 1024


RECORD_TAG = "drain-sidecar-removed"
"""The NIC tag (and `-2`, `-3`, ...) where the sidecar records the pools it took the NIC out of."""


def without_pools(nic: dict[str, Any]) -> dict[str, Any]:
    """The NIC minus what a pool change may touch: pools, etags, states, our record tags."""
    copy: dict[str, Any] = json.loads(json.dumps(nic))
    copy.pop("etag", None)
    copy["tags"] = {
        k: v for k, v in (copy.get("tags") or {}).items() if not k.startswith(RECORD_TAG)
    }
    copy["properties"].pop("provisioningState", None)
    for config in copy["properties"]["ipConfigurations"]:
        config.pop("etag", None)
        config["properties"].pop("loadBalancerBackendAddressPools", None)
        config["properties"].pop("provisioningState", None)
    return copy
