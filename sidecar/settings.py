"""Settings: every knob is a `SIDECAR_*` environment variable, validated once at start-up.

Invariant: a `Settings` object that exists is valid. Bad input never reaches the drain loop; it
stops start-up with one line per problem that names the variable and what it accepts.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "SIDECAR_"


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
RESERVED_PATHS = ("/status", "/metrics")
NIC_ID_PATTERN = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network"
    r"/networkInterfaces/[^/]+$",
    re.IGNORECASE,
)
POOL_ID_PATTERN = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network"
    r"/loadBalancers/[^/]+/backendAddressPools/[^/]+$",
    re.IGNORECASE,
)


def _group(name: str) -> dict[str, Any]:
    """Tags a field with the heading it is documented under (configs/, README)."""
    return {"group": name}


class Settings(BaseSettings):
    """The sidecar's whole configuration, built once and passed in, never global."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # compose passes unset ${VAR:-} as "": that means the default
        case_sensitive=False,
        frozen=True,
        extra="forbid",
    )

    # --- Instance Metadata Service
    imds_url: str = Field(
        "http://169.254.169.254",
        description="Base URL of IMDS; point it at `sidecar simulate` to rehearse.",
        json_schema_extra=_group("IMDS"),
    )
    api_version: str = Field(
        "2020-07-01",
        pattern=r"^\d{4}-\d{2}-\d{2}$",
        description="Scheduled Events api-version (2020-07-01 is the newest).",
        json_schema_extra=_group("IMDS"),
    )
    instance_api_version: str = Field(
        "2021-12-13",
        pattern=r"^\d{4}-\d{2}-\d{2}$",
        description="Instance metadata api-version, versioned apart from Scheduled Events.",
        json_schema_extra=_group("IMDS"),
    )
    poll_interval: float = Field(
        1.0,
        ge=0.25,
        le=60,
        description="Seconds between polls; Microsoft recommends 1. IMDS allows 5 requests/s per "
        "VM, approvals and tokens included, hence at least 0.25.",
        json_schema_extra=_group("IMDS"),
    )
    imds_timeout: float = Field(
        5.0,
        gt=0,
        le=120,
        description="Per-request timeout once Scheduled Events has answered once.",
        json_schema_extra=_group("IMDS"),
    )
    imds_first_timeout: float = Field(
        120.0,
        gt=0,
        le=600,
        description="Timeout of the first poll: enabling Scheduled Events can take 2 minutes.",
        json_schema_extra=_group("IMDS"),
    )
    backoff_max: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Longest pause between retries after IMDS errors (jittered).",
        json_schema_extra=_group("IMDS"),
    )
    vm_name: str | None = Field(
        None,
        min_length=1,
        description="This VM's name as it appears in Resources; default: compute.name from IMDS.",
        json_schema_extra=_group("IMDS"),
    )

    # --- Draining and approval
    event_types: Annotated[frozenset[EventType], NoDecode] = Field(
        DEFAULT_EVENT_TYPES,
        description="Comma-separated event types that drain this VM (Freeze is opt-in).",
        json_schema_extra=_group("Drain"),
    )
    drain_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="How long the probe stays down before approving, capped by NotBefore.",
        json_schema_extra=_group("Drain"),
    )
    min_drain_seconds: float = Field(
        15.0,
        ge=0,
        le=3600,
        description="Least drain worth an early approval: LB probe interval x (threshold + 1); "
        "capped by SIDECAR_DRAIN_SECONDS.",
        json_schema_extra=_group("Drain"),
    )
    app_ports: Annotated[frozenset[int], NoDecode] = Field(
        frozenset(),
        description="Comma-separated ports of the app: the drain ends early, after the minimum "
        "drain, once no connection to them is left. Empty: always drain the full period.",
        json_schema_extra=_group("Drain"),
    )
    app_health_url: str | None = Field(
        None,
        description="The app's own health endpoint (e.g. http://127.0.0.1:80/healthz): the "
        "probe serves only while it answers 2xx. Empty: the app is not checked.",
        json_schema_extra=_group("Drain"),
    )
    app_health_interval: float = Field(
        2.0,
        ge=0.25,
        le=60,
        description="Seconds between checks of SIDECAR_APP_HEALTH_URL.",
        json_schema_extra=_group("Drain"),
    )
    app_health_timeout: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Timeout of one check of SIDECAR_APP_HEALTH_URL.",
        json_schema_extra=_group("Drain"),
    )
    deadline_margin_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="Approve this long before NotBefore at the latest.",
        json_schema_extra=_group("Drain"),
    )
    approve: Literal["leader", "always", "never"] = Field(
        "leader",
        description="leader: approve only as first VM in Resources; always; never (drain only).",
        json_schema_extra=_group("Drain"),
    )
    state_file: Path = Field(
        Path("/var/lib/sidecar/state.json"),
        description="Where drains and approvals survive restarts and reboots.",
        json_schema_extra=_group("Drain"),
    )
    return_after: Literal["completed", "impact"] = Field(
        "completed",
        description="completed: serve again once the event leaves the document (Microsoft's "
        "advice; minutes after a reboot); impact: as soon as its impact is over (a new boot id "
        "after Reboot/Redeploy, DurationInSeconds after a Freeze), accepting the documented risk "
        "of a short second impact while it is still listed.",
        json_schema_extra=_group("Drain"),
    )
    boot_id_file: Path = Field(
        Path("/proc/sys/kernel/random/boot_id"),
        description="Where this boot's id is read (changes at every boot; the same inside "
        "containers); another file only for rehearsals and tests.",
        json_schema_extra=_group("Drain"),
    )

    # --- Backend pool removal through Azure Resource Manager
    arm_enabled: bool = Field(
        False,
        description="Also take this VM's NIC out of its backend pools during a drain.",
        json_schema_extra=_group("ARM"),
    )
    arm_url: str = Field(
        "https://management.azure.com",
        description="Resource Manager endpoint (another cloud's, or the simulator's).",
        json_schema_extra=_group("ARM"),
    )
    arm_audience: str = Field(
        "https://management.azure.com",
        description="Token audience for ARM; differs from the public cloud's in sovereign clouds.",
        json_schema_extra=_group("ARM"),
    )
    arm_ca_bundle: Path | None = Field(
        None,
        description="PEM file of CAs to trust for ARM (private clouds, the simulator).",
        json_schema_extra=_group("ARM"),
    )
    arm_timeout: float = Field(
        20.0,
        gt=0,
        le=300,
        description="Longest one NIC update may take, its long-running operation included.",
        json_schema_extra=_group("ARM"),
    )
    managed_identity_client_id: str | None = Field(
        None,
        min_length=1,
        description="Client id of a user-assigned identity; default: the system-assigned one.",
        json_schema_extra=_group("ARM"),
    )
    nic_id: str | None = Field(
        None,
        description="Resource id of the NIC to manage; default: found from this VM's id.",
        json_schema_extra=_group("ARM"),
    )
    backend_pool_ids: Annotated[frozenset[str], NoDecode] = Field(
        frozenset(),
        description="Comma-separated backend pool ids to leave; default: every pool of the NIC.",
        json_schema_extra=_group("ARM"),
    )

    # --- HTTP surface
    host: str = Field(
        "0.0.0.0",  # noqa: S104 - the load balancer probes from 168.63.129.16
        description="Address the probe server binds; the LB probes it from 168.63.129.16.",
        json_schema_extra=_group("HTTP"),
    )
    port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="Port of the probe, /status and /metrics.",
        json_schema_extra=_group("HTTP"),
    )
    health_path: str = Field(
        "/health",
        pattern=r"^/[A-Za-z0-9._~/-]*$",
        description="Path the load-balancer probe requests (200 serving, 503 draining).",
        json_schema_extra=_group("HTTP"),
    )

    # --- Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log verbosity.", json_schema_extra=_group("Logging")
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text for people, json for log pipelines.",
        json_schema_extra=_group("Logging"),
    )

    @field_validator("imds_url", "arm_url", "arm_audience")
    @classmethod
    def _base_url(cls, value: str) -> str:
        """Paths are appended to these, so a trailing slash goes and a query is refused."""
        _check_http_url(value)
        if urlsplit(value).query:
            raise ValueError("must not carry a query")
        return value.rstrip("/")

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
            names = [name.strip() for name in value.split(",") if name.strip()]
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
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            if not item.isdigit() or not 1 <= int(item) <= 65535:
                raise ValueError(f"not a TCP port: {item!r} (expected numbers 1-65535)")
            ports.add(int(item))
        return frozenset(ports)

    @field_validator("backend_pool_ids", mode="before")
    @classmethod
    def _pool_ids(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        ids = [item.strip() for item in value.split(",") if item.strip()]
        malformed = [item for item in ids if not POOL_ID_PATTERN.match(item)]
        if malformed:
            raise ValueError(
                f"not a backend pool resource id: {malformed[0]} (expected /subscriptions/SUB"
                "/resourceGroups/RG/providers/Microsoft.Network/loadBalancers/LB"
                "/backendAddressPools/POOL)"
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


def _check_http_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.fragment:
        raise ValueError("must not carry a fragment")


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
        if upper.startswith(ENV_PREFIX) and upper not in known:
            close = difflib.get_close_matches(upper, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"{name}: unknown setting{hint}")
    return lines


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
        shown = f"={raw!r}" if raw is not None else ""
        lines.append(f"{variable}{shown}: {message}")
    return lines


def describe_settings(settings: Settings) -> list[str]:
    """The effective settings as `SIDECAR_X=value` lines, secrets redacted."""
    lines = []
    for name in Settings.model_fields:
        value = getattr(settings, name)
        lines.append(f"{env_name(name)}={render_value(value)}")
    return lines


def render_value(value: object) -> str:
    """A value as it would be written in the environment."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, frozenset):
        return ",".join(sorted(str(item) for item in value))
    return str(value)
