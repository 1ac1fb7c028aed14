"""Settings: every knob is a `SIDECAR_*` environment variable, validated once at start-up.

Invariant: a `Settings` object that exists is valid. Bad input never reaches the drain loop; it
stops start-up with one line per problem that names the variable and what it accepts. Secrets
(the admin token, webhook URLs) never appear in what `check-config` prints or a log shows.

The fields live in one small model per concern (`GROUPS`, in the order they are documented);
`Settings` is all of them together.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shlex
import shutil
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "SIDECAR_"
HOOK_ENV_PREFIX = "SIDECAR_EVENT_"
"""What hook commands receive: not settings, so never refused as misspelt ones."""
LEGACY_2016 = "legacy-2016"


class EventType(StrEnum):
    """The Scheduled Events types Azure documents; anything else is logged and ignored."""

    FREEZE = "Freeze"
    REBOOT = "Reboot"
    REDEPLOY = "Redeploy"
    PREEMPT = "Preempt"
    TERMINATE = "Terminate"


DEFAULT_EVENT_TYPES = frozenset(
    {EventType.REBOOT, EventType.REDEPLOY, EventType.PREEMPT, EventType.TERMINATE}
)
RESERVED_PATHS = ("/status", "/metrics", "/drain", "/undrain")
NIC_ID_PATTERN = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network"
    r"/networkInterfaces/[^/]+$",
    re.IGNORECASE,
)
POOL_ID_PATTERN = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network"
    r"/(loadBalancers|applicationGateways)/[^/]+/backendAddressPools/[^/]+$",
    re.IGNORECASE,
)
RULE_ID_PATTERN = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network"
    r"/loadBalancers/[^/]+/loadBalancingRules/[^/]+$",
    re.IGNORECASE,
)
MIN_HEALTHY_PATTERN = re.compile(r"^(\d+)(%?)$")
SYSLOG_PATTERN = re.compile(r"^(/\S+|(udp|tcp)://[^/\s:]+(:\d{1,5})?)$")


class ImdsSettings(BaseModel):
    title: ClassVar[str] = "Instance Metadata Service"

    imds_url: str = Field(
        "http://169.254.169.254",
        description="Base URL of IMDS; point it at `sidecar simulate` to rehearse.",
    )
    api_version: str = Field(
        "2020-07-01",
        pattern=rf"^(\d{{4}}-\d{{2}}-\d{{2}}|{LEGACY_2016})$",
        description="Scheduled Events api-version (2020-07-01 is the newest); legacy-2016 reads "
        "the retired 2016 preview (/metadata/v1/maintenance, no approval) for old images.",
    )
    instance_api_version: str = Field(
        "2021-12-13",
        pattern=r"^\d{4}-\d{2}-\d{2}$",
        description="Instance metadata api-version, versioned apart from Scheduled Events.",
    )
    poll_interval: float = Field(
        1.0,
        ge=0.25,
        le=60,
        description="Seconds between polls; Microsoft recommends 1. IMDS allows 5 requests/s per "
        "VM, approvals and tokens included, hence at least 0.25.",
    )
    imds_timeout: float = Field(
        5.0,
        gt=0,
        le=120,
        description="Per-request timeout once Scheduled Events has answered once.",
    )
    imds_first_timeout: float = Field(
        120.0,
        gt=0,
        le=600,
        description="Timeout of the first poll: enabling Scheduled Events can take 2 minutes.",
    )
    backoff_max: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Longest pause between retries after IMDS errors (jittered).",
    )
    vm_name: str | None = Field(
        None,
        min_length=1,
        description="This VM's name as it appears in Resources; default: compute.name from IMDS.",
    )

    @field_validator("imds_url")
    @classmethod
    def _imds_url(cls, value: str) -> str:
        return _base_url(value)


class DrainSettings(BaseModel):
    title: ClassVar[str] = "Draining and approval"

    event_types: Annotated[frozenset[EventType], NoDecode] = Field(
        DEFAULT_EVENT_TYPES,
        description="Comma-separated event types that drain this VM (Freeze is opt-in).",
    )
    drain_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="How long the probe stays down before approving, capped by NotBefore.",
    )
    min_drain_seconds: float = Field(
        15.0,
        ge=0,
        le=3600,
        description="Least drain worth an early approval: LB probe interval x (threshold + 1); "
        "capped by SIDECAR_DRAIN_SECONDS.",
    )
    app_ports: Annotated[frozenset[int], NoDecode] = Field(
        frozenset(),
        description="Comma-separated ports of the app: the drain ends early, after the minimum "
        "drain, once no connection to them is left. Empty: always drain the full period.",
    )
    app_health_url: str | None = Field(
        None,
        description="The app's own health endpoint (e.g. http://127.0.0.1:80/healthz): the "
        "probe serves only while it answers 2xx. Empty: the app is not checked.",
    )
    app_health_interval: float = Field(
        2.0,
        ge=0.25,
        le=60,
        description="Seconds between checks of SIDECAR_APP_HEALTH_URL.",
    )
    app_health_timeout: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Timeout of one check of SIDECAR_APP_HEALTH_URL.",
    )
    deadline_margin_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="Approve this long before NotBefore at the latest.",
    )
    approve: Literal["leader", "always", "never"] = Field(
        "leader",
        description="leader: approve only as first VM in Resources; always; never (drain only).",
    )
    state_file: Path = Field(
        Path("/var/lib/sidecar/state.json"),
        description="Where drains and approvals survive restarts and reboots.",
    )
    return_after: Literal["completed", "impact"] = Field(
        "completed",
        description="completed: serve again once the event leaves the document (Microsoft's "
        "advice; minutes after a reboot); impact: as soon as its impact is over (a new boot id "
        "after Reboot/Redeploy, DurationInSeconds after a Freeze), accepting the documented risk "
        "of a short second impact while it is still listed.",
    )
    boot_id_file: Path = Field(
        Path("/proc/sys/kernel/random/boot_id"),
        description="Where this boot's id is read (changes at every boot; the same inside "
        "containers); another file only for rehearsals and tests.",
    )
    dry_run: bool = Field(
        False,
        description="Observe and report what would be done (logs, /status, metrics, webhooks) "
        "without doing it: no probe flip, no ARM write, no hook, no approval, no state file.",
    )

    @field_validator("app_health_url")
    @classmethod
    def _app_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_http_url(value)
        return value

    @field_validator("event_types", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            names = _items(value)
            if not names:
                raise ValueError("must name at least one event type")
            by_lower = {member.value.lower(): member for member in EventType}
            unknown = [name for name in names if name.lower() not in by_lower]
            if unknown:
                allowed = ", ".join(member.value for member in EventType)
                raise ValueError(f"unknown event type {', '.join(unknown)}; allowed: {allowed}")
            return frozenset(by_lower[name.lower()] for name in names)
        return value

    @field_validator("app_ports", mode="before")
    @classmethod
    def _ports(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        ports = set()
        for item in _items(value):
            if not item.isdigit() or not 1 <= int(item) <= 65535:
                raise ValueError(f"not a TCP port: {item!r} (expected numbers 1-65535)")
            ports.add(int(item))
        return frozenset(ports)


class HookSettings(BaseModel):
    title: ClassVar[str] = "Drain hooks: the app closes its connections"

    drain_hook_url: str | None = Field(
        None,
        description="POSTed the event as JSON once the load balancer has stopped sending new "
        "flows here (the minimum drain after the probe turned 503, and the NIC out of its "
        "pools): the app finishes what is in flight and closes keep-alive connections. "
        "Approval waits for a 2xx; a failure or a timeout means no early approval.",
    )
    drain_command: str | None = Field(
        None,
        description="A command run at the same moment (no shell; the event in SIDECAR_EVENT_* "
        "variables), e.g. a graceful reload of nginx. Approval waits for exit code 0.",
    )
    undrain_hook_url: str | None = Field(
        None, description="POSTed when the VM serves again after a drain that called the hooks."
    )
    undrain_command: str | None = Field(
        None, description="Run when the VM serves again after a drain that called the hooks."
    )
    hook_timeout: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Longest a hook may take (and never past the event's deadline).",
    )

    @field_validator("drain_hook_url", "undrain_hook_url")
    @classmethod
    def _hook_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_http_url(value)
        return value

    @field_validator("drain_command", "undrain_command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            argv = shlex.split(value)
        except ValueError as error:
            raise ValueError(f"cannot be split into arguments: {error}") from None
        if not argv:
            raise ValueError("is empty")
        if shutil.which(argv[0]) is None:
            raise ValueError(f"{argv[0]}: no such executable (PATH={os.environ.get('PATH', '')})")
        return value


class ArmSettings(BaseModel):
    title: ClassVar[str] = "Backend-pool removal through Azure Resource Manager"

    arm_enabled: bool = Field(
        False,
        description="Also take this VM's NIC out of its backend pools (load balancers and "
        "Application Gateways) during a drain.",
    )
    arm_url: str = Field(
        "https://management.azure.com",
        description="Resource Manager endpoint (another cloud's, or the simulator's).",
    )
    arm_audience: str = Field(
        "https://management.azure.com",
        description="Token audience for ARM; differs from the public cloud's in sovereign clouds.",
    )
    arm_ca_bundle: Path | None = Field(
        None,
        description="PEM file of CAs to trust for ARM (private clouds, the simulator).",
    )
    arm_timeout: float = Field(
        20.0,
        gt=0,
        le=300,
        description="Longest one NIC update may take, its long-running operation included.",
    )
    arm_idle_seconds: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="ARM is reached through a helper process that carries the Azure SDKs "
        "(about 60 MiB); it stops after this long without an ARM call, and starts again (about a "
        "second of CPU) when one is needed.",
    )
    managed_identity_client_id: str | None = Field(
        None,
        min_length=1,
        description="Client id of a user-assigned identity; default: the system-assigned one.",
    )
    nic_id: str | None = Field(
        None,
        description="Resource id of the NIC to manage; default: found from this VM's id.",
    )
    backend_pool_ids: Annotated[frozenset[str], NoDecode] = Field(
        frozenset(),
        description="Comma-separated backend pool ids (load balancer or Application Gateway) "
        "to leave; default: every pool of the NIC.",
    )

    @field_validator("arm_url", "arm_audience")
    @classmethod
    def _arm_urls(cls, value: str) -> str:
        return _base_url(value)

    @field_validator("backend_pool_ids", mode="before")
    @classmethod
    def _pool_ids(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        ids = _items(value)
        malformed = [item for item in ids if not POOL_ID_PATTERN.match(item)]
        if malformed:
            raise ValueError(
                f"not a backend pool resource id: {malformed[0]} (expected /subscriptions/SUB"
                "/resourceGroups/RG/providers/Microsoft.Network/loadBalancers/LB"
                "/backendAddressPools/POOL, or applicationGateways/AGW/backendAddressPools/POOL)"
            )
        return frozenset(ids)

    @field_validator("nic_id")
    @classmethod
    def _nic_id(cls, value: str | None) -> str | None:
        if value is not None and not NIC_ID_PATTERN.match(value):
            raise ValueError(
                "not a network interface resource id (expected /subscriptions/SUB"
                "/resourceGroups/RG/providers/Microsoft.Network/networkInterfaces/NAME)"
            )
        return value

    @field_validator("arm_ca_bundle")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value


class FleetSettings(BaseModel):
    title: ClassVar[str] = "Fleet: capacity guard and peer-aware approval (need pool removal)"

    min_healthy_backends: str | None = Field(
        None,
        description="Capacity guard: before going out of rotation, keep serving while leaving "
        "would drop a load-balancing rule of this VM's pools below this many healthy backends "
        "(a count, or a percentage like 50%), but never past the point where the drain can "
        "still finish before NotBefore. Empty: no guard.",
    )
    lb_rule_ids: Annotated[frozenset[str], NoDecode] = Field(
        frozenset(),
        description="Comma-separated load-balancing rule ids the guard and peer-aware approval "
        "read; default: the rules that use this NIC's pools.",
    )
    peer_aware_approval: bool = Field(
        False,
        description="For an event that names several VMs, approve only once every VM it names "
        "is out of rotation (from the rules' health per backend), or at the deadline.",
    )

    @field_validator("min_healthy_backends")
    @classmethod
    def _min_healthy(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = MIN_HEALTHY_PATTERN.match(value.strip())
        if match is None or (match.group(2) and int(match.group(1)) > 100):
            raise ValueError("expected a count (e.g. 2) or a percentage up to 100% (e.g. 50%)")
        return value.strip()

    @field_validator("lb_rule_ids", mode="before")
    @classmethod
    def _rule_ids(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        ids = _items(value)
        malformed = [item for item in ids if not RULE_ID_PATTERN.match(item)]
        if malformed:
            raise ValueError(
                f"not a load-balancing rule id: {malformed[0]} (expected /subscriptions/SUB"
                "/resourceGroups/RG/providers/Microsoft.Network/loadBalancers/LB"
                "/loadBalancingRules/RULE)"
            )
        return frozenset(ids)


class HttpSettings(BaseModel):
    title: ClassVar[str] = "Probe server and admin endpoints"

    host: str = Field(
        "0.0.0.0",  # noqa: S104 - the load balancer probes from 168.63.129.16
        description="Address the probe server binds; the LB probes it from 168.63.129.16.",
    )
    port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="Port of the probe, /status and /metrics.",
    )
    health_path: str = Field(
        "/health",
        pattern=r"^/[A-Za-z0-9._~/-]*$",
        description="Path the load-balancer probe requests (200 serving, 503 draining).",
    )
    admin_token: SecretStr | None = Field(
        None,
        min_length=16,
        description="Turns on POST /drain and /undrain and full /status for clients off "
        "loopback, for callers that send it as a bearer token. Empty: no admin endpoints.",
    )

    @field_validator("host")
    @classmethod
    def _bindable_host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not value or any(ch.isspace() or ch in "/:" for ch in value):
                raise ValueError("must be an IP address or a host name") from None
        return value

    @field_validator("health_path")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_PATHS:
            raise ValueError(f"must not be one of {', '.join(RESERVED_PATHS)}")
        return value


class NotifySettings(BaseModel):
    title: ClassVar[str] = "Telling people: webhooks and syslog"

    webhook_urls: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (),
        description="Comma-separated URLs POSTed a JSON message (with a human `text` field, for "
        "Slack- or Teams-style incoming webhooks) at each step of a maintenance and on "
        "failures. Secrets: shown by host only.",
    )
    webhook_timeout: float = Field(
        5.0, gt=0, le=60, description="Timeout of one webhook delivery (retried with back-off)."
    )
    syslog_address: str | None = Field(
        None,
        description="Where an RFC 5424 line per state change goes: /dev/log, udp://host:514 or "
        "tcp://host:514. Empty: no syslog.",
    )

    @field_validator("webhook_urls", mode="before")
    @classmethod
    def _urls(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        urls = _items(value)
        for url in urls:
            try:
                _check_http_url(url)
            except ValueError as error:
                shown = urlsplit(url).hostname or "?"
                raise ValueError(f"a webhook URL (host {shown}) {error}") from None
        return tuple(SecretStr(url) for url in urls)

    @field_validator("syslog_address")
    @classmethod
    def _syslog(cls, value: str | None) -> str | None:
        if value is not None and not SYSLOG_PATTERN.match(value):
            raise ValueError(
                "expected /dev/log (a socket path), udp://HOST:PORT or tcp://HOST:PORT"
            )
        return value


class LoggingSettings(BaseModel):
    title: ClassVar[str] = "Logging"

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log verbosity."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text for people, json for log pipelines."
    )


GROUPS: tuple[type[BaseModel], ...] = (
    ImdsSettings,
    DrainSettings,
    HookSettings,
    ArmSettings,
    FleetSettings,
    HttpSettings,
    NotifySettings,
    LoggingSettings,
)


class Settings(  # pydantic lists the fields of the last base first: GROUPS, reversed
    LoggingSettings,
    NotifySettings,
    HttpSettings,
    FleetSettings,
    ArmSettings,
    HookSettings,
    DrainSettings,
    ImdsSettings,
    BaseSettings,
):
    """The sidecar's whole configuration, built once and passed in, never global."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # compose passes unset ${VAR:-} as "": that means the default
        case_sensitive=False,
        frozen=True,
        extra="forbid",
    )

    @model_validator(mode="after")
    def _legacy_reads_no_resource_ids(self) -> Settings:
        if self.api_version == LEGACY_2016 and self.arm_enabled:
            raise ValueError(
                "SIDECAR_API_VERSION=legacy-2016 reads no instance metadata, which pool removal "
                "needs: leave SIDECAR_ARM_ENABLED off with it"
            )
        return self

    @model_validator(mode="after")
    def _fleet_needs_arm(self) -> Settings:
        if (self.min_healthy_backends or self.peer_aware_approval) and not self.arm_enabled:
            raise ValueError(
                "SIDECAR_MIN_HEALTHY_BACKENDS and SIDECAR_PEER_AWARE_APPROVAL read the load "
                "balancer through ARM: set SIDECAR_ARM_ENABLED=true too"
            )
        return self


def _base_url(value: str) -> str:
    """Paths are appended to these, so a trailing slash goes and a query is refused."""
    _check_http_url(value)
    if urlsplit(value).query:
        raise ValueError("must not carry a query")
    return value.rstrip("/")


def _check_http_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.fragment:
        raise ValueError("must not carry a fragment")


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


class ConfigError(Exception):
    """Configuration the sidecar refuses to start with; `lines` are ready to print."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings() -> Settings:
    """Builds `Settings` from the environment, turning every problem into a `ConfigError`."""
    env = os.environ
    problems = _unknown_variables(env)
    try:
        settings = Settings()
    except ValidationError as error:
        problems.extend(_describe(error, env))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return settings


def _unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A misspelt variable would otherwise be ignored silently and its default used."""
    known = {env_name(name) for name in Settings.model_fields}
    lines = []
    for name in sorted(env):
        upper = name.upper()
        if upper.startswith(HOOK_ENV_PREFIX):
            continue
        if upper.startswith(ENV_PREFIX) and upper not in known:
            close = difflib.get_close_matches(upper, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"{name}: unknown setting{hint}")
    return lines


SECRET_FIELDS = frozenset({"admin_token", "webhook_urls"})


def _describe(error: ValidationError, env: Mapping[str, str]) -> list[str]:
    lines = []
    for problem in error.errors(include_url=False):
        location = problem["loc"]
        if not location:  # a model-level check; its message names the variables
            lines.append(str(problem["msg"]).removeprefix("Value error, "))
            continue
        variable = env_name(str(location[0]))
        message = str(problem["msg"]).removeprefix("Value error, ")
        raw = next((value for key, value in env.items() if key.upper() == variable), None)
        secret = str(location[0]) in SECRET_FIELDS
        shown = f"={raw!r}" if raw is not None and not secret else ""
        lines.append(f"{variable}{shown}: {message}")
    return lines


def describe_settings(settings: Settings) -> list[str]:
    """The effective settings as `SIDECAR_X=value` lines, secrets redacted."""
    return [
        f"{env_name(name)}={render_value(getattr(settings, name))}"
        for name in Settings.model_fields
    ]


def render_value(value: object) -> str:
    """A value as it would be written in the environment; secrets as `****` or their host."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, SecretStr):
        return "****"
    if isinstance(value, tuple) and all(isinstance(item, SecretStr) for item in value):
        return ",".join(f"https://{host_of(item)}/****" for item in value)
    if isinstance(value, frozenset):
        return ",".join(sorted(str(item) for item in value))
    return str(value)


def host_of(url: SecretStr) -> str:
    """What may be shown of a secret URL."""
    return urlsplit(url.get_secret_value()).hostname or "?"
