"""The start-up check of the NICs' own removal records, in a process of its own.

Why: a removal is never forgotten, so a sidecar whose state file cannot vouch for its NICs (no
file, or a damaged one) must read the NICs' record tags at start-up. Reading them needs the
Azure SDKs, about 60 MiB that `sidecar run` would then carry for its whole life, on every VM of
a fleet, mostly for nothing. So `sidecar run` asks this short-lived child
(`python -m sidecar.arm_check`, the same settings in its environment) and loads the SDKs itself
only when there is something to put back, or when a drain first needs ARM.

Invariant: the child prints one JSON object, `{"removed": {nic_id: {ipconfig: [pool ids]}}}`,
and exits 0, or exits non-zero; the parent treats anything but a clean answer as "unknown" and
then checks in-process, so a failing child can delay a restore, never skip one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from sidecar.arm_model import NicRef, is_uniform_scale_set
from sidecar.settings import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

CHILD_TIMEOUT_SECONDS = 120.0


async def recorded_removals(settings: Settings) -> dict[str, Any] | None:
    """The NICs' recorded removals as the child read them; None when it could not tell."""
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar.arm_check",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        log.warning("cannot start the NIC record check: %s", error)
        return None
    try:
        out, err = await asyncio.wait_for(child.communicate(), CHILD_TIMEOUT_SECONDS)
    except TimeoutError:
        child.kill()
        await child.wait()
        log.warning("the NIC record check took over %gs", CHILD_TIMEOUT_SECONDS)
        return None
    if child.returncode != 0:
        text = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        log.warning("the NIC record check failed: %s", text[0][:300])
        return None
    try:
        answer = json.loads(out)
        removed = answer["removed"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return removed if isinstance(removed, dict) else None


async def _check(settings: Settings) -> dict[str, Any]:
    from sidecar.arm import ArmNetwork  # this process exists to carry the SDKs for a moment
    from sidecar.imds import ImdsClient, new_session

    async with new_session() as session:
        imds = ImdsClient(
            session,
            settings.imds_url,
            api_version=settings.api_version,
            instance_api_version=settings.instance_api_version,
        )
        compute = await imds.compute(settings.imds_timeout)
    if settings.nic_id:
        subscription = NicRef.parse(settings.nic_id).subscription
    else:
        subscription = compute.subscription_id
    network = ArmNetwork(settings, subscription)
    try:
        if settings.nic_id:
            nics = [NicRef.parse(settings.nic_id)]
        elif is_uniform_scale_set(compute):
            nics = []  # their NICs are never changed, so never recorded
        else:
            nics = await network.find_nics(compute)
        removed = {}
        for nic in nics:
            recorded = await network.recorded(nic)
            if recorded.removed:
                removed[nic.id] = recorded.removed
        return {"removed": removed}
    finally:
        await network.close()


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as error:
        print("; ".join(error.lines), file=sys.stderr)
        return 2
    try:
        answer = asyncio.run(_check(settings))
    except Exception as error:  # any failure is "unknown" to the parent, said on stderr
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
