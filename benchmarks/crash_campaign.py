"""Crash campaign: maintenances with pool removal on, the sidecar killed (SIGKILL) at random
moments, its state file sometimes deleted or damaged, and the invariants checked after each run.

One `sidecar simulate` (IMDS and ARM) and one `sidecar run` (SIDECAR_ARM_ENABLED, a 2 s drain,
0.25 s polls) serve the whole campaign. Each run adds a fresh Reboot naming web-1, NotBefore
60-120 s ahead, that leaves the document 1-3 s after it starts. Meanwhile the sidecar is killed
0-3 times, each time restarted after a random pause, while this script reads its /status (and
the NIC) every ~75 ms: the kill point of a kill is the phase of the last answer seen before it
(`removing` is `draining` with the NIC's removal not done yet; `starting` is a sidecar that has
not answered since its restart). Kills are *timed* (the first at a random moment of the 6.5 s
from the run's start: before the event, mid-removal, around the approval, while Started, while
restoring, after; the next ones 0-3 s after the previous restart) or, in 40 % of the runs,
*targeted* (at the first sight of chosen phases, to reach the short ones). Before some restarts
the state file is deleted, truncated at a random byte or replaced by random bytes. A few runs
carry one simulator fault that widens a window: a slow removal PUT or operation, a slow restore
operation, an approval answered late (after the sidecar's 2 s IMDS timeout, or just before).

After every run (a violation is recorded with the run's seed, and the campaign goes on):
1. at most one approval of the event reached IMDS;
2. no approval before the event's creation + SIDECAR_DRAIN_SECONDS, nor before the first NIC
   write after the event's creation (the removal) had finished, unless NotBefore - margin had
   come;
3. once the event has left and the sidecar runs undisturbed: the NIC in exactly its original
   pools (order included) and otherwise unchanged, none of our record tags, the state file's
   `pools.removed` empty, the probe 200;
4. the sidecar never died by itself, and /status never showed a background task failure.

`python -m benchmarks.crash_campaign [--runs N] [--seed S] [--quick] [--run-seed X ...]`
writes benchmarks/results/crash_campaign.json; `--run-seed` replays single runs' plans (timing
on the machine decides the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.lab import (
    PATIENCE,
    RECORD_TAG,
    Sidecar,
    Simulator,
    fetch,
    machine,
    table,
    wall_time,
    without_pools,
    write_results,
)

DRAIN_SECONDS = 2.0
MARGIN_SECONDS = 5.0
IMDS_TIMEOUT = 2.0
EVENT_AT = 1.5
"""Seconds from a run's start to its event: timed kills before it hit the quiet sidecar."""
KILL_WINDOW = 6.5
"""A run's first timed kill falls in [0, KILL_WINDOW] s from its start: before the event, the
whole maintenance (about 4 s undisturbed) and a little after."""
NEXT_KILL = 3.0
"""Later timed kills fall in [0, NEXT_KILL] s after the previous restart."""
TICK = 0.075
NIC = "web-1-nic"
TIMESTAMP_SLACK = 0.001
"""The simulator's timestamps have milliseconds."""
LAZY_SLACK = 0.3
"""How late the simulator may stamp the end of an ARM operation nobody polls: it settles such
an operation when someone looks, and this script looks every tick."""
SETTINGS = {
    "SIDECAR_ARM_ENABLED": "true",
    "SIDECAR_DRAIN_SECONDS": f"{DRAIN_SECONDS:g}",
    "SIDECAR_MIN_DRAIN_SECONDS": "1",
    "SIDECAR_DEADLINE_MARGIN_SECONDS": f"{MARGIN_SECONDS:g}",
    "SIDECAR_POLL_INTERVAL": "0.25",
    "SIDECAR_IMDS_TIMEOUT": f"{IMDS_TIMEOUT:g}",
}
TARGETS = ("removing", "draining", "approving", "approved", "started", "restoring pools")
"""Phases a targeted kill waits for, in the order a maintenance goes through them."""
DAMAGES = ("deleted", "truncated", "garbage")
FAULTS = ("slow removal PUT", "slow removal operation", "late approval answer", "slow restore")


@dataclass(frozen=True)
class Config:
    runs: int
    seed: int
    kills: tuple[int, int] = (0, 3)
    targeted_share: float = 0.4
    damage_share: float = 0.45
    """Of the runs with at least one kill (so about a third of all runs)."""
    fault_share: float = 0.4
    run_seeds: tuple[int, ...] = ()
    """Replays these runs' plans instead of drawing `runs` seeds from `seed`."""


@dataclass(frozen=True)
class Kill:
    after: float | None
    """Timed: seconds from the run's start (the first kill) or from the previous restart;
    None for a kill targeted at `phase`."""
    phase: str | None
    pause: float
    damage: str | None


@dataclass(frozen=True)
class Plan:
    seed: int
    not_before_in: float
    started_for: float
    fault: str | None
    fault_body: dict[str, Any] | None
    kills: tuple[Kill, ...]


def plan_run(seed: int, config: Config) -> Plan:
    rng = random.Random(seed)
    count = rng.randint(*config.kills)
    damaged = rng.randrange(count) if count and rng.random() < config.damage_share else None
    damages = [rng.choice(DAMAGES) if i == damaged else None for i in range(count)]
    pauses = [round(rng.uniform(0.05, 1.5), 3) for _ in range(count)]
    if rng.random() < config.targeted_share:
        phases = sorted(rng.sample(TARGETS, count), key=TARGETS.index)
        moments: list[tuple[float | None, str | None]] = [(None, p) for p in phases]
    else:
        delays = [rng.uniform(0, KILL_WINDOW), *(rng.uniform(0, NEXT_KILL) for _ in pauses[1:])]
        moments = [(round(delay, 3), None) for delay in delays[:count]]
    kills = tuple(
        Kill(after, phase, pause, damage)
        for (after, phase), pause, damage in zip(moments, pauses, damages, strict=True)
    )
    fault = rng.choice(FAULTS) if rng.random() < config.fault_share else None
    return Plan(
        seed=seed,
        not_before_in=round(rng.uniform(60, 120), 1),
        started_for=round(rng.uniform(1, 3), 2),
        fault=fault,
        fault_body=_fault_body(fault, rng),
        kills=kills,
    )


def _fault_body(fault: str | None, rng: random.Random) -> dict[str, Any] | None:
    if fault is None:
        return None
    target, kind, seconds = {
        "slow removal PUT": ("arm-put", "slow", rng.uniform(0.5, 2)),
        "slow removal operation": ("arm-operation", "slow", rng.uniform(1, 4)),
        "late approval answer": ("approve", "late", rng.uniform(1, 3)),
        "slow restore": ("arm-operation", "slow", rng.uniform(1, 4)),
    }[fault]
    return {"target": target, "kind": kind, "seconds": round(seconds, 2), "count": 1}


@dataclass
class RunRecord:
    index: int
    seed: int
    event_id: str = ""
    fault: str | None = None
    kills: list[dict[str, Any]] = field(default_factory=list)
    phases_seen: list[str] = field(default_factory=list)
    approvals: int = 0
    approval_s: float | None = None
    """Seconds from the event's creation to its (first) approval."""
    removal_done_s: float | None = None
    back_s: float | None = None
    """Seconds from the event leaving the document to the end state (invariant 3)."""
    violations: list[dict[str, Any]] = field(default_factory=list)

    def violated(self, invariant: str, detail: str) -> None:
        self.violations.append({"invariant": invariant, "seed": self.seed, "detail": detail})


class Campaign:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.stack = contextlib.ExitStack()
        self.simulator = Simulator(
            workdir, "--arm-port", "0", "--arm-retry-after", "0.2", "--started-seconds", "2"
        )
        self.stack.callback(self.simulator.close)
        assert self.simulator.arm_url and self.simulator.ca_file
        self.original = self.nic()
        self.sidecar = Sidecar(
            workdir,
            "web-1",
            {
                "SIDECAR_IMDS_URL": self.simulator.imds_url,
                # ARM honours proxy variables; lab.child_env sets NO_PROXY=localhost for it
                "SIDECAR_ARM_URL": self.simulator.arm_url.replace("127.0.0.1", "localhost"),
                "SIDECAR_ARM_CA_BUNDLE": self.simulator.ca_file,
                **SETTINGS,
            },
        )
        self.stack.callback(self.sidecar.close)
        self.state_file = Path(self.sidecar.settings["SIDECAR_STATE_FILE"])

    def close(self) -> None:
        self.stack.close()

    # --- readings

    def nic(self) -> dict[str, Any]:
        document: dict[str, Any] = self.simulator.control("GET", f"/nics/{NIC}")
        return document

    def status(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            answer = fetch(f"{self.sidecar.url}/status", timeout=2)
            if answer.status == 200:
                body: dict[str, Any] = answer.json()
                return body
        return None

    def event(self, event_id: str) -> dict[str, Any] | None:
        for event in self.simulator.control("GET", "/events")["events"]:
            if event["EventId"] == event_id:
                return dict(event)
        return None

    def saved_removals(self) -> Any:
        """The state file's `pools.removed`, or a text saying why it cannot be read."""
        try:
            document = json.loads(self.state_file.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as error:
            return f"unreadable: {error}"
        return document.get("pools", {}).get("removed", {})

    def end_state(self) -> dict[str, Any]:
        """What invariant 3 expects, as {what: (ok, seen)}."""
        nic = self.nic()
        ours = sorted(tag for tag in nic.get("tags") or {} if tag.startswith(RECORD_TAG))
        removed = self.saved_removals()
        probe = self.sidecar.probe_code()
        return {
            "pools": (pools(nic) == pools(self.original), pools(nic)),
            "rest of the NIC": (without_pools(nic) == without_pools(self.original), "changed"),
            "record tags": (not ours, ours),
            "state file pools.removed": (removed == {}, removed),
            "probe": (probe == 200, probe),
        }

    def ready(self) -> bool:
        status = self.status()
        ok = status is not None and status["state"] == "serving"
        return ok and status is not None and status["pools"]["mode"] == "active"

    # --- one run

    def run(self, index: int, plan: Plan) -> RunRecord:
        record = RunRecord(index, plan.seed, fault=plan.fault)
        if not self.ready() or not all(ok for ok, _ in self.end_state().values()):
            self.recover()  # only after a violation: the world is put back by hand
        watch = Watch(self, record)
        start = reference = time.monotonic()  # timed kills count from here
        if plan.fault_body and plan.fault != "slow restore":
            self.simulator.control("POST", "/faults", plan.fault_body)
        kills = list(plan.kills)
        damage_rng = random.Random(plan.seed ^ 0x5EED)
        event: dict[str, Any] | None = None
        created = start + EVENT_AT
        fault_pending = plan.fault == "slow restore"
        hard_limit = start + EVENT_AT + plan.not_before_in + plan.started_for + 3 * PATIENCE
        while True:
            now = time.monotonic()
            if event is None and now >= start + EVENT_AT:
                event = self.simulator.add_event(
                    type="Reboot",
                    resources=["web-1"],
                    not_before_in=plan.not_before_in,
                    started_for=plan.started_for,
                )
                record.event_id = event["EventId"]
                created = time.monotonic()
            listed = self.event(record.event_id) if event is not None else None
            gone = event is not None and listed is None
            if fault_pending and listed is not None and listed["EventStatus"] == "Started":
                self.simulator.control("POST", "/faults", plan.fault_body)
                fault_pending = False
            phase = watch.look(before_event=event is None, gone=gone)
            if kills and _due(kills[0], now - reference, phase, gone):
                kill = kills.pop(0)
                record.kills.append(
                    {
                        "phase": phase,
                        "nic": watch.nic,
                        "trigger": kill.phase or "time",
                        "t_s": round(now - created, 3),
                        "pause_s": kill.pause,
                        "damage": self.kill_and_restart(kill, damage_rng),
                    }
                )
                watch.restarted()
                reference = time.monotonic()
            elif not kills and gone:
                break
            if now > hard_limit:
                record.violated("3", f"the event was still listed {now - created:.0f} s on")
                break
            time.sleep(TICK)
        left = time.monotonic()
        self.check_approval(record, event)
        self.check_end_state(record, watch, left)
        self.simulator.control("DELETE", "/faults")
        record.phases_seen = watch.seen
        return record

    def kill_and_restart(self, kill: Kill, rng: random.Random) -> dict[str, Any] | None:
        self.sidecar.kill()
        damage = self.damage(kill.damage, rng) if kill.damage else None
        time.sleep(kill.pause)
        self.sidecar.restart()
        return damage

    def damage(self, kind: str, rng: random.Random) -> dict[str, Any]:
        try:
            raw = self.state_file.read_bytes()
        except FileNotFoundError:
            return {"kind": kind, "size": None}
        if kind == "deleted":
            self.state_file.unlink()
            return {"kind": kind, "size": len(raw)}
        if kind == "truncated":
            at = rng.randrange(len(raw))
            self.state_file.write_bytes(raw[:at])
            return {"kind": kind, "size": len(raw), "at": at}
        garbage = rng.randbytes(rng.randint(1, 512))
        self.state_file.write_bytes(garbage)
        return {"kind": kind, "size": len(raw), "garbage_bytes": len(garbage)}

    # --- the invariants

    def check_approval(self, record: RunRecord, event: dict[str, Any] | None) -> None:
        if event is None:
            return
        approvals = self.simulator.approvals_of(record.event_id)
        record.approvals = len(approvals)
        if len(approvals) > 1:
            record.violated("1", f"{len(approvals)} approvals: {approvals}")
        if not approvals:
            return
        created = wall_time(event["created_at"])
        approved = wall_time(approvals[0]["at"])
        deadline = wall_time(event["not_before"]) - MARGIN_SECONDS
        record.approval_s = round(approved - created, 3)
        writes = sorted(
            (op for op in self.simulator.control("GET", "/operations") if self._ours(op, created)),
            key=lambda op: wall_time(op["created_at"]),
        )
        removal = writes[0] if writes else None
        finished = wall_time(removal["finished_at"]) if removal and removal["finished_at"] else None
        if finished is not None:
            record.removal_done_s = round(finished - created, 3)
        if approved >= deadline:
            return
        if approved < created + DRAIN_SECONDS - TIMESTAMP_SLACK:
            record.violated("2", f"approved {approved - created:.3f} s after the event's creation")
        when = f"approved {approved - created:.3f} s after the event's creation"
        if removal is None:
            record.violated("2", f"{when}; the NIC was never written after the event")
            return
        what = (
            f"the removal operation {removal['id']} "
            f"(created {wall_time(removal['created_at']) - created:.3f} s after the event)"
        )
        # An operation its client polled to the end finished at that poll; one nobody polled
        # finished when the simulator next looked (every tick: see Watch.look).
        slack = TIMESTAMP_SLACK if removal["polls"] >= 2 else LAZY_SLACK
        if finished is None or removal["status"] != "Succeeded":
            record.violated("2", f"{when}; {what} is still {removal['status']}")
        elif approved < finished - slack:
            record.violated("2", f"{when}; {what} finished {finished - created:.3f} s after it")

    def _ours(self, operation: dict[str, Any], since: float) -> bool:
        same = operation["resource_id"].casefold() == self.original["id"].casefold()
        return same and wall_time(operation["created_at"]) >= since

    def check_end_state(self, record: RunRecord, watch: Watch, left: float) -> None:
        deadline = left + 2 * PATIENCE
        while True:
            watch.look(before_event=False, gone=True)
            state = self.end_state()
            if all(ok for ok, _ in state.values()):
                record.back_s = round(time.monotonic() - left, 3)
                break
            if time.monotonic() > deadline:
                wrong = {what: seen for what, (ok, seen) in state.items() if not ok}
                record.violated("3", f"{2 * PATIENCE:g} s after the event left: {wrong}")
                break
            time.sleep(TICK)
        if not self.sidecar.child.alive():
            record.violated("4", f"the sidecar is dead:\n{self.sidecar.child.output()}")
            self.sidecar.restart()
        record.violations.extend(watch.violations)

    def recover(self) -> None:
        """Back to the initial world and a fresh sidecar, after a violation left a mess."""
        self.sidecar.kill()
        self.simulator.control("POST", "/reset")
        self.state_file.unlink(missing_ok=True)
        self.sidecar.restart()
        deadline = time.monotonic() + 2 * PATIENCE
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar never came back:\n{self.sidecar.child.output()}")
            time.sleep(TICK)


def _due(kill: Kill, elapsed: float, phase: str, gone: bool) -> bool:
    """`elapsed`: seconds since the run's start or the last restart."""
    if kill.after is not None:
        return elapsed >= kill.after
    # a targeted phase that never showed: kill once the maintenance is over
    return phase == kill.phase or (gone and phase == "serving, after the event")


class Watch:
    """Reads /status every tick; keeps the phase, and the failures that are invariant 4's."""

    def __init__(self, campaign: Campaign, record: RunRecord) -> None:
        self.campaign = campaign
        self.record = record
        self.phase = "starting"
        self.seen: list[str] = []
        self.violations: list[dict[str, Any]] = []
        self.nic = ""
        self._failed_tasks: set[str] = set()

    def restarted(self) -> None:
        self.phase = "starting"

    def look(self, *, before_event: bool, gone: bool) -> str:
        # Reading the NIC also makes the simulator settle an operation nobody polls any more
        # (it does so lazily, when someone looks): its finished_at is then at most a tick late.
        self.nic = nic_state(self.campaign.nic(), self.campaign.original)
        sidecar = self.campaign.sidecar
        if not sidecar.child.alive():
            self._violation("4", f"the sidecar died by itself:\n{sidecar.child.output()}")
            sidecar.restart()
            self.restarted()
            return self.phase
        status = self.campaign.status()
        if status is None:
            return self.phase  # not listening yet (or a slow answer): keep the last one
        for name, task in status["tasks"].items():
            if task["failures"] and name not in self._failed_tasks:
                self._failed_tasks.add(name)
                self._violation("4", f"task {name} failed: {task.get('last_error')}")
        self.phase = label(status, self.record.event_id, before_event=before_event, gone=gone)
        if self.phase not in self.seen:
            self.seen.append(self.phase)
        return self.phase

    def _violation(self, invariant: str, detail: str) -> None:
        self.violations.append({"invariant": invariant, "seed": self.record.seed, "detail": detail})


def label(status: dict[str, Any], event_id: str, *, before_event: bool, gone: bool) -> str:
    """The kill point a /status answer stands for."""
    state = str(status["state"])
    for event in status["events"]:
        if event.get("id") == event_id:
            phase = str(event["phase"])
            if phase == "draining" and not status["pools"]["removal_done"]:
                return "removing"
            return phase
    if state == "serving":
        return (
            "serving, before the event" if before_event or not gone else "serving, after the event"
        )
    return state


def nic_state(nic: dict[str, Any], original: dict[str, Any]) -> str:
    """`in`, `out` or `partly out` of its pools, and the provisioning state unless Succeeded."""
    now, before = pools(nic), pools(original)
    where = "in" if now == before else "out" if not any(now.values()) else "partly out"
    state = nic["properties"].get("provisioningState", "?")
    return where if state == "Succeeded" else f"{where}, {state}"


def pools(nic: dict[str, Any]) -> dict[str, list[str]]:
    """Pool ids per IP configuration, in order."""
    return {
        config["name"]: [
            member["id"]
            for member in config["properties"].get("loadBalancerBackendAddressPools", [])
        ]
        for config in nic["properties"]["ipConfigurations"]
    }


def run_campaign(workdir: Path, config: Config, progress: bool = False) -> dict[str, Any]:
    rng = random.Random(config.seed)
    seeds = config.run_seeds or tuple(rng.randrange(2**32) for _ in range(config.runs))
    records: list[RunRecord] = []
    started = time.monotonic()
    campaign = Campaign(workdir)
    try:
        deadline = time.monotonic() + 2 * PATIENCE
        while not campaign.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar never served:\n{campaign.sidecar.child.output()}")
            time.sleep(TICK)
        for index, seed in enumerate(seeds, start=1):
            record = campaign.run(index, plan_run(seed, config))
            records.append(record)
            if progress:
                print(_progress(record), flush=True)
    finally:
        campaign.close()
    return summarize(config, records, time.monotonic() - started)


def _progress(record: RunRecord) -> str:
    kills = ", ".join(
        k["phase"] + (f" +{k['damage']['kind']}" if k["damage"] else "") for k in record.kills
    )
    verdict = "OK" if not record.violations else f"{len(record.violations)} VIOLATION(S)"
    return (
        f"run {record.index:3d} seed {record.seed:10d}: {verdict}; kills [{kills}]; "
        f"fault {record.fault or '-'}; approved at {record.approval_s} s"
    )


def summarize(config: Config, records: list[RunRecord], seconds: float) -> dict[str, Any]:
    kills = [kill for record in records for kill in record.kills]
    return {
        "benchmark": "crash_campaign",
        "config": asdict(config),
        "settings": SETTINGS,
        "seconds": round(seconds, 1),
        "runs": len(records),
        "runs_with_kills": sum(1 for r in records if r.kills),
        "kills": len(kills),
        "kill_points": dict(Counter(k["phase"] for k in kills).most_common()),
        "kill_triggers": dict(Counter(k["trigger"] for k in kills).most_common()),
        "nic_at_kills": dict(Counter(k["nic"] for k in kills).most_common()),
        "damages": dict(Counter(k["damage"]["kind"] for k in kills if k["damage"]).most_common()),
        "faults": dict(Counter(r.fault for r in records if r.fault).most_common()),
        "approved_runs": sum(1 for r in records if r.approvals),
        "violations": [v for r in records for v in r.violations],
        "run_records": [asdict(r) for r in records],
    }


def render(results: dict[str, Any]) -> str:
    rows: list[tuple[str, object]] = [
        ("runs", results["runs"]),
        ("runs with a kill", results["runs_with_kills"]),
        ("kills (SIGKILL + restart)", results["kills"]),
        *((f"  killed while {phase}", n) for phase, n in results["kill_points"].items()),
        ("the NIC at the kills (pools, provisioning state)", ""),
        *((f"  {state}", n) for state, n in results["nic_at_kills"].items()),
        ("state files damaged", sum(results["damages"].values())),
        *((f"  {kind}", n) for kind, n in results["damages"].items()),
        ("runs with a fault", sum(results["faults"].values())),
        *((f"  {kind}", n) for kind, n in results["faults"].items()),
        ("runs approved by the sidecar", results["approved_runs"]),
        ("invariant violations", len(results["violations"])),
    ]
    return table(("", "count"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="maintenances (default 150; --quick 8)")
    parser.add_argument("--seed", type=int, default=1, help="campaign seed (default 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument(
        "--run-seed", type=int, action="append", default=[], help="replay this run's plan"
    )
    args = parser.parse_args()
    config = Config(
        runs=args.runs or (8 if args.quick else 150),
        seed=args.seed,
        run_seeds=tuple(args.run_seed),
    )
    with tempfile.TemporaryDirectory(prefix="crash-") as workdir:
        results = run_campaign(Path(workdir), config, progress=True)
    results["quick"] = args.quick
    results["machine"] = machine()
    print()
    print(render(results))
    for violation in results["violations"]:
        print(
            f"VIOLATION of invariant {violation['invariant']} (run seed {violation['seed']}): "
            f"{violation['detail'][:2000]}"
        )
    name = "crash_campaign.quick" if args.quick or args.run_seed else "crash_campaign"
    print(f"wrote {write_results(name, results)}")


if __name__ == "__main__":
    main()
