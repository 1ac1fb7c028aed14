"""The IMDS client: Scheduled Events, approvals and this VM's identity.

Invariants: every request carries `Metadata: true`, never goes through a proxy (the session is
built with `trust_env=False`, so HTTP_PROXY and friends are ignored) and is bounded by a timeout.
Failures come out as `ImdsError`, marked transient (retry with back-off) or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from sidecar.events import EventsDocument, MalformedDocument, parse_document

TRANSIENT_STATUSES = frozenset({404, 410, 429, 500, 502, 503, 504})
"""404 and 410 are what IMDS answers while Scheduled Events is still starting up."""


class ImdsError(Exception):
    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        status: int | None = None,
        retry_after: float = 0,
        unanswered: bool = False,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.retry_after = retry_after
        self.unanswered = unanswered
        """The request left and no answer came: IMDS may have acted on it (an approval)."""


@dataclass(frozen=True)
class Compute:
    """The parts of `/metadata/instance/compute` the sidecar needs."""

    name: str
    resource_id: str
    resource_group: str
    subscription_id: str
    scale_set: str

    @classmethod
    def from_json(cls, payload: Any) -> Compute:
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            raise ImdsError("instance metadata has no compute.name", transient=True)

        def text(key: str) -> str:
            value = payload.get(key, "")
            return value if isinstance(value, str) else ""

        return cls(
            name=payload["name"],
            resource_id=text("resourceId"),
            resource_group=text("resourceGroupName"),
            subscription_id=text("subscriptionId"),
            scale_set=text("vmScaleSetName"),
        )


def new_session() -> aiohttp.ClientSession:
    """One pooled session for IMDS; `trust_env=False` keeps every proxy out of the path."""
    return aiohttp.ClientSession(
        trust_env=False,
        headers={"Metadata": "true"},
        connector=aiohttp.TCPConnector(limit=4, use_dns_cache=False),
    )


class ImdsClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        api_version: str,
        instance_api_version: str,
    ) -> None:
        self._session = session
        self._events_url = f"{base_url}/metadata/scheduledevents"
        self._compute_url = f"{base_url}/metadata/instance/compute"
        self._api_version = api_version
        self._instance_api_version = instance_api_version

    async def scheduled_events(self, timeout: float) -> EventsDocument:
        payload = await self._request("GET", self._events_url, self._api_version, timeout)
        try:
            return parse_document(payload)
        except MalformedDocument as error:
            raise ImdsError(
                f"malformed Scheduled Events document: {error}", transient=True
            ) from None

    async def approve(self, event_id: str, timeout: float) -> None:
        body = {"StartRequests": [{"EventId": event_id}]}
        await self._request("POST", self._events_url, self._api_version, timeout, body)

    async def compute(self, timeout: float) -> Compute:
        payload = await self._request("GET", self._compute_url, self._instance_api_version, timeout)
        return Compute.from_json(payload)

    def describe(self) -> dict[str, Any] | None:
        """Nothing beyond /status's own fields (the 2016 preview has more to say)."""
        return None

    async def _request(
        self, method: str, url: str, api_version: str | None, timeout: float, body: Any = None
    ) -> Any:
        return await request_json(self._session, method, url, api_version, timeout, body)


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    api_version: str | None,
    timeout: float,
    body: Any = None,
) -> Any:
    """One IMDS request, bounded, its failures as `ImdsError`; JSON back (None for a POST)."""
    what = f"{method} {url}"
    try:
        async with session.request(
            method,
            url,
            params={"api-version": api_version} if api_version else None,
            json=body,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as response:
            text = await response.text(errors="replace")
            if response.status != 200:
                raise _status_error(what, response.status, text, response.headers)
    except TimeoutError:
        raise ImdsError(
            f"{what}: no answer within {timeout:g}s", transient=True, unanswered=True
        ) from None
    except aiohttp.ClientConnectorError as error:  # never connected: nothing was sent
        raise ImdsError(f"{what}: {error}", transient=True) from None
    except aiohttp.ClientError as error:
        raise ImdsError(
            f"{what}: {error or type(error).__name__}", transient=True, unanswered=True
        ) from None
    if method == "POST":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ImdsError(f"{what}: answer is not JSON ({error})", transient=True) from None


def _status_error(what: str, status: int, text: str, headers: Any) -> ImdsError:
    detail = text.strip().replace("\n", " ")[:300]
    newest = _newest_versions(text)
    if status == 400 and newest:
        detail += f" (this IMDS supports api-versions {', '.join(newest)})"
    return ImdsError(
        f"{what}: HTTP {status}: {detail}",
        transient=status in TRANSIENT_STATUSES,
        status=status,
        retry_after=_retry_after(headers.get("Retry-After")),
    )


def _newest_versions(text: str) -> list[str]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return []
    versions = payload.get("newest-versions") if isinstance(payload, dict) else None
    return [str(version) for version in versions] if isinstance(versions, list) else []


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
