"""The chaos soak and the scenario runner (`tools/fleet run SCENARIO`, `tools/soak`).

A scenario (JSON, `scenarios/*.json`) names a fleet, the work to give it (jobs and campaigns of
every kind the device runs, AWS IoT commands) and the faults to inject while the work runs. The
runner starts the fleet (iotjobs_host.fleet), creates the work at its times, injects the faults
at theirs, moves jobsd's clock a rollout minute at a time once the released devices have
reported, then drains (waits until every execution is terminal and every device idle, within a
deadline), stops everything and checks the invariants. It prints a report, writes it as JSON
(build/soak.json by default) and exits 0 only when every invariant holds.

The fault schedule, a list of (time offset, kind, target, argument), is a pure function of the
scenario and the seed (`schedule`): the same seed replays the same schedule. What the fleet does
in between is real processes on a real clock, so a replay is the same storm, not the same
interleaving.

Each invariant checker is a pure function of collected state (jobsd's answers, the device flash
folders, what the MQTT recorder saw, the processes and ports), so the tests can hand each a
crafted bad state and see it fail.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, Optional

from . import BUILD, ROOT

FACTORY_VERSION = "1.0.0"  # devsim's factory image (devsim.FACTORY_VERSION)
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED")
COMMAND_TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT")
STATUS_COUNTER = {"QUEUED": "numberOfQueuedThings", "IN_PROGRESS": "numberOfInProgressThings",
                  "SUCCEEDED": "numberOfSucceededThings", "FAILED": "numberOfFailedThings",
                  "REJECTED": "numberOfRejectedThings", "TIMED_OUT": "numberOfTimedOutThings",
                  "CANCELED": "numberOfCanceledThings", "REMOVED": "numberOfRemovedThings"}

# -- the scenario format --------------------------------------------------------------------------
WORK_KINDS = ("demo", "effect", "download", "ota", "app", "reboot", "command")
JOB_KINDS = tuple(k for k in WORK_KINDS if k != "command")
# faults: per device (a target thing) or of the whole stack
DEVICE_FAULTS = ("power_cut", "power_cut_at_write", "link_cut", "blackhole", "slow_link")
STACK_FAULTS = ("broker_restart", "jobsd_restart")
FAULT_KINDS = DEVICE_FAULTS + STACK_FAULTS
CAMPAIGN_KEYS = ("jobExecutionsRolloutConfig", "abortConfig", "jobExecutionsRetryConfig",
                 "timeoutConfig")
IMAGES = ("fleet32", "stock32", "pip")
PROTOCOLS = ("http", "mqtt")
_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")
_VERSION = re.compile(r"\d+(\.\d+){0,3}")
_PATH = re.compile(r"(?!\.{1,2}(/|$))[A-Za-z0-9._-]+(/(?!\.{1,2}(/|$))[A-Za-z0-9._-]+)*")
_HEAP = re.compile(r"\d+[KM]?")
MAX_DEVICES = 100  # jobsd: at most 100 targets a job


class ScenarioError(Exception):
    """A scenario file that cannot be played: the message names the file, the member (as a
    JSON path such as `work[2].version`) and what is wrong with it."""


@dataclass
class Work:
    """One item of work: a job (campaign) of one kind, or a command sent to things."""

    id: str
    kind: str
    at: float = 0.0
    targets: Any = "all"  # "all" | {"count": N} | {"group": G} | {"things": [...]}
    campaign: dict = field(default_factory=dict)  # CreateJob members, passed as they are
    continuous: bool = False
    protocol: str = "http"
    steps: int = 3  # demo
    step_ms: int = 0  # demo
    size: int = 0  # download: the file; ota: the image; app: each file
    path: str = ""  # download: where it goes (under the device's download folder)
    version: str = ""  # ota, app
    bad: bool = False  # ota: fails its self-test; app: fails at import
    files: int = 3  # app
    command: str = "ping"  # command: the payload's `command`
    repeat: int = 1  # command: executions per target thing
    every: float = 5.0  # command: seconds between repeats
    timeout: int = 30  # command: executionTimeoutSeconds
    expect: dict = field(default_factory=dict)  # {"job": STATUS, "succeeded": "all" | N}


@dataclass
class Faults:
    count: int = 0
    start: float = 0.0  # seconds after the work starts
    window: float = 60.0  # faults fall in [start, start + window)
    rates: dict = field(default_factory=dict)  # kind -> relative weight
    blackhole_seconds: float = 30.0
    slow_seconds: float = 20.0
    slow_delay_ms: int = 200
    slow_rate: int = 0  # bytes a second each way (0: no limit, only the delay)
    write_max: int = 40  # power_cut_at_write: the write number is drawn from 1..write_max


@dataclass
class Limits:
    duration: float = 120.0  # the run phase: work created, faults injected
    drain: float = 300.0  # after it: every execution terminal, every device idle
    minute: float = 20.0  # at most this many real seconds per rollout minute
    boot: float = 180.0  # every device connected


@dataclass
class Scenario:
    name: str
    devices: int
    image: str = "fleet32"
    tls: bool = True
    heap: Optional[str] = None
    seed: int = 1
    description: str = ""
    device_config: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)  # name -> [things]
    work: list = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)
    limits: Limits = field(default_factory=Limits)

    def things(self) -> list[str]:
        return thing_names(self.devices)

    def targets(self, w: Work) -> tuple[list[str], list[str]]:
        """(things, groups) a work item names; a group stands for its members."""
        t = w.targets
        if t == "all":
            return self.things(), []
        if "count" in t:
            return self.things()[:t["count"]], []
        if "things" in t:
            return list(t["things"]), []
        return [], [t["group"]]

    def target_things(self, w: Work) -> list[str]:
        things, groups = self.targets(w)
        for g in groups:
            things += [t for t in self.groups[g] if t not in things]
        return things


def thing_names(n: int) -> list[str]:
    return [f"dev-{i:03d}" for i in range(1, n + 1)]


class _Obj:
    """A JSON object being read: typed getters that name the member in their errors, and
    `done()` that refuses members nobody asked for (a typo is an error, not a default)."""

    def __init__(self, value: Any, path: str, fail: Callable[[str, str], ScenarioError]) -> None:
        self.path, self.fail = path, fail
        if not isinstance(value, dict):
            raise fail(path, f"must be a JSON object, not {_jtype(value)}")
        self.d = value
        self.seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.d

    def raw(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.d.get(key, default)

    def int(self, key: str, default: Any = None, lo: int = 0, hi: int = 10**9) -> Any:
        v = self.raw(key, default)
        if v is default and key not in self.d:
            if default is _REQUIRED:
                raise self.fail(self.at(key), "is required")
            return default
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(self.at(key), f"must be a whole number, not {_jtype(v)}")
        if not lo <= v <= hi:
            raise self.fail(self.at(key), f"must be {lo}..{hi}, not {v}")
        return v

    def num(self, key: str, default: Any = None, lo: float = 0.0, hi: float = 1e9) -> Any:
        v = self.raw(key, default)
        if key not in self.d:
            if default is _REQUIRED:
                raise self.fail(self.at(key), "is required")
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise self.fail(self.at(key), f"must be a number, not {_jtype(v)}")
        if not lo <= v <= hi:
            raise self.fail(self.at(key), f"must be {lo:g}..{hi:g}, not {v}")
        return float(v)

    def str(self, key: str, default: Any = None, pattern: Optional[re.Pattern] = None,
            choices: Optional[tuple] = None, what: str = "") -> Any:
        v = self.raw(key, default)
        if key not in self.d:
            if default is _REQUIRED:
                raise self.fail(self.at(key), "is required")
            return default
        if choices is not None and v not in choices:
            raise self.fail(self.at(key), f"must be one of {', '.join(choices)}, not {v!r}")
        if not isinstance(v, str):
            raise self.fail(self.at(key), f"must be a string, not {_jtype(v)}")
        if pattern is not None and not pattern.fullmatch(v):
            raise self.fail(self.at(key), f"must be {what}, not {v!r}")
        return v

    def bool(self, key: str, default: bool = False) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise self.fail(self.at(key), f"must be true or false, not {_jtype(v)}")
        return v

    def obj(self, key: str, required: bool = False) -> Optional[_Obj]:
        v = self.raw(key)
        if key not in self.d:
            if required:
                raise self.fail(self.at(key), "is required")
            return None
        return _Obj(v, self.at(key), self.fail)

    def done(self) -> None:
        extra = sorted(set(self.d) - self.seen)
        if extra:
            known = ", ".join(sorted(self.seen))
            raise self.fail(self.at(extra[0]), f"is not a member this object has (known: {known})")


_REQUIRED = object()


def _jtype(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return {int: "a number", float: "a number", str: f"the string {v!r}", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def load_scenario(path: str) -> Scenario:
    """Read and check a scenario file; ScenarioError says exactly what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read it: {e.strerror or e}") from None
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise ScenarioError(f"{path}: not JSON: {e}") from None
    name = os.path.splitext(os.path.basename(path))[0]
    return parse_scenario(obj, path, name)


def parse_scenario(obj: Any, source: str = "scenario", name: str = "scenario") -> Scenario:
    def fail(where: str, msg: str) -> ScenarioError:
        return ScenarioError(f"{source}: {where}: {msg}" if where else f"{source}: {msg}")

    top = _Obj(obj, "", fail)
    fleet = top.obj("fleet", required=True)
    assert fleet is not None
    scn = Scenario(
        name=top.str("name", name, re.compile(r"[A-Za-z0-9._-]{1,64}"), what="a name of "
                     "1..64 of A-Z a-z 0-9 . _ -"),
        description=top.str("description", ""),
        seed=top.int("seed", 1, 0, 2**63 - 1),
        devices=fleet.int("devices", _REQUIRED, 1, MAX_DEVICES),
        image=fleet.str("image", "fleet32", choices=IMAGES),
        tls=fleet.bool("tls", True),
        heap=fleet.str("heap", None, _HEAP, what="a heap size such as 128K"),
    )
    fleet.done()
    things = set(scn.things())
    cfg = top.obj("device_config")
    if cfg is not None:
        scn.device_config = cfg.d
        cfg.seen = set(cfg.d)
    groups = top.obj("groups")
    if groups is not None:
        for gname in list(groups.d):
            where = groups.at(gname)
            if not _ID.fullmatch(gname):
                raise fail(where, "a group name is 1..40 of A-Z a-z 0-9 _ -")
            g = groups.obj(gname)
            assert g is not None
            if g.has("count") == g.has("things"):
                raise fail(where, "give either count or things")
            if g.has("count"):
                members = scn.things()[:g.int("count", lo=1, hi=scn.devices)]
            else:
                members = _thing_list(g.raw("things"), g.at("things"), things, fail)
            g.done()
            scn.groups[gname] = members
    work = top.raw("work")
    if not isinstance(work, list) or not work:
        raise fail("work", "must be a non-empty list of work items" if "work" in top.d
                   else "is required (a list of work items)")
    ids: set[str] = set()
    for i, item in enumerate(work):
        w = _work(_Obj(item, f"work[{i}]", fail), scn, things, fail)
        if w.id in ids:
            raise fail(f"work[{i}].id", f"{w.id!r} is used by another work item")
        ids.add(w.id)
        scn.work.append(w)
    faults = top.obj("faults")
    if faults is not None:
        scn.faults = _faults(faults, fail)
    limits = top.obj("limits")
    if limits is not None:
        scn.limits = Limits(
            duration=limits.num("duration", 120.0, 1, 86400),
            drain=limits.num("drain", 300.0, 1, 86400),
            minute=limits.num("minute", 20.0, 0.5, 3600),
            boot=limits.num("boot", 180.0, 1, 3600))
        limits.done()
    f = scn.faults
    if f.count and f.start + f.window > scn.limits.duration:
        raise fail("faults.window", f"faults end at {f.start + f.window:g} s, after "
                                    f"limits.duration ({scn.limits.duration:g} s)")
    late = [w for w in scn.work if w.at > scn.limits.duration]
    if late:
        raise fail(f"work[{scn.work.index(late[0])}].at",
                   f"{late[0].at:g} s is after limits.duration ({scn.limits.duration:g} s)")
    top.done()
    return scn


def _thing_list(v: Any, where: str, things: set[str], fail) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(t, str) for t in v):
        raise fail(where, "must be a non-empty list of thing names")
    unknown = [t for t in v if t not in things]
    if unknown:
        raise fail(where, f"{unknown[0]!r} is not a thing of this fleet (dev-001 .. "
                          f"dev-{len(things):03d})")
    if len(set(v)) != len(v):
        raise fail(where, "names a thing twice")
    return list(v)


def _work(o: _Obj, scn: Scenario, things: set[str], fail) -> Work:
    kind = o.str("kind", _REQUIRED, choices=WORK_KINDS)
    w = Work(id=o.str("id", _REQUIRED, _ID, what="1..40 of A-Z a-z 0-9 _ -"), kind=kind)
    w.at = o.num("at", 0.0, 0, 86400)
    t = o.raw("targets", "all")
    where = o.at("targets")
    if t != "all":
        if not isinstance(t, dict) or len(t) != 1 or next(iter(t)) not in ("count", "group",
                                                                         "things"):
            raise fail(where, 'must be "all", {"count": N}, {"group": NAME} or {"things": [...]}')
        if "count" in t:
            n = t["count"]
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= scn.devices:
                raise fail(where + ".count", f"must be 1..{scn.devices} (the fleet's size)")
        elif "group" in t:
            if t["group"] not in scn.groups:
                raise fail(where + ".group", f"{t['group']!r} is not a group of the scenario "
                                             f"(groups: {', '.join(scn.groups) or 'none'})")
        else:
            _thing_list(t["things"], where + ".things", things, fail)
    w.targets = t
    if kind == "command":
        w.command = o.str("command", "ping", re.compile(r"[a-z0-9-]{1,32}"),
                          what="a command name (ping, effect, reboot, get-config, ...)")
        w.repeat = o.int("repeat", 1, 1, 1000)
        w.every = o.num("every", 5.0, 0, 3600)
        w.timeout = o.int("timeout", 30, 1, 43200)
        w.expect = _expect(o, fail)
        o.done()
        return w
    camp = o.obj("campaign")
    if camp is not None:
        for key in camp.d:
            if key not in CAMPAIGN_KEYS:
                raise fail(camp.at(key), f"is not a campaign option (known: "
                                         f"{', '.join(CAMPAIGN_KEYS)})")
            camp.obj(key)  # each is an object; jobsd checks what is inside
        w.campaign = dict(camp.d)
    w.continuous = o.bool("continuous", False)
    if kind in ("download", "ota", "app"):
        w.protocol = o.str("protocol", "http", choices=PROTOCOLS)
    if kind == "demo":
        w.steps = o.int("steps", 3, 0, 100)
        w.step_ms = o.int("step_ms", 0, 0, 10000)
    elif kind == "download":
        w.size = o.int("size", 16384, 1, 4 << 20)
        w.path = o.str("path", f"soak/{w.id}.bin", _PATH, what="a relative path of "
                                                              "A-Z a-z 0-9 . _ - segments")
    elif kind == "ota":
        w.version = o.str("version", _REQUIRED, _VERSION, what="a version such as 2.0.0")
        w.size = o.int("size", 65536, 4097, 0x180000)
        w.bad = o.bool("bad", False)
    elif kind == "app":
        w.version = o.str("version", _REQUIRED, _VERSION, what="a version such as 1.0")
        w.files = o.int("files", 3, 1, 40)
        w.size = o.int("size", 2048, 1, 256 * 1024)
        w.bad = o.bool("bad", False)
    w.expect = _expect(o, fail)
    o.done()
    return w


def _expect(o: _Obj, fail) -> dict:
    e = o.obj("expect")
    if e is None:
        return {}
    out: dict[str, Any] = {}
    if e.has("job"):
        out["job"] = e.str("job", choices=("COMPLETED", "CANCELED", "IN_PROGRESS"))
    if e.has("succeeded"):
        v = e.raw("succeeded")
        if v != "all" and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise fail(e.at("succeeded"), 'must be "all" or a whole number')
        out["succeeded"] = v
    e.done()
    return out


def _faults(o: _Obj, fail) -> Faults:
    f = Faults(count=o.int("count", 0, 0, 100000), start=o.num("start", 0.0, 0, 86400),
               window=o.num("window", 60.0, 0.001, 86400),
               blackhole_seconds=o.num("blackhole_seconds", 30.0, 0.1, 3600),
               slow_seconds=o.num("slow_seconds", 20.0, 0.1, 3600),
               slow_delay_ms=o.int("slow_delay_ms", 200, 0, 60000),
               slow_rate=o.int("slow_rate", 0, 0, 10**9),
               write_max=o.int("write_max", 40, 1, 100000))
    rates = o.obj("rates")
    if rates is not None:
        for kind in rates.d:
            if kind not in FAULT_KINDS:
                raise fail(rates.at(kind), f"is not a fault kind (kinds: {', '.join(FAULT_KINDS)})")
            f.rates[kind] = rates.num(kind, lo=0, hi=1e6)
        rates.done()
    if f.count and not any(f.rates.values()):
        raise fail(o.at("rates"), f"{f.count} faults need at least one kind with a rate above 0")
    o.done()
    return f


# -- the fault schedule ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the work started
    kind: str
    target: Optional[str]  # the thing, for a device fault
    arg: Optional[float]  # power_cut_at_write: the write number; blackhole, slow_link: seconds

    def as_json(self) -> dict:
        return {"at": self.at, "kind": self.kind, "target": self.target, "arg": self.arg}


def schedule(scn: Scenario, seed: int) -> list[Fault]:
    """The faults to inject, in time order: a pure function of the scenario and the seed."""
    f = scn.faults
    rng = random.Random(seed)
    kinds = [k for k in FAULT_KINDS if f.rates.get(k, 0) > 0]
    weights = [f.rates[k] for k in kinds]
    things = scn.things()
    out = []
    for _ in range(f.count):
        at = round(f.start + rng.random() * f.window, 3)
        kind = rng.choices(kinds, weights)[0]
        target = rng.choice(things) if kind in DEVICE_FAULTS else None
        arg: Optional[float] = None
        if kind == "power_cut_at_write":
            arg = rng.randint(1, f.write_max)
        elif kind == "blackhole":
            arg = f.blackhole_seconds
        elif kind == "slow_link":
            arg = f.slow_seconds
        out.append(Fault(at, kind, target, arg))
    out.sort(key=lambda x: x.at)
    return out


# -- invariants -----------------------------------------------------------------------------------
@dataclass
class Check:
    """One invariant: what it checked (`count` items) and what broke it."""

    name: str
    what: str
    count: int = 0
    violations: list = field(default_factory=list)  # [detail, ...]
    notes: dict = field(default_factory=dict)  # more figures for the report

    @property
    def ok(self) -> bool:
        return not self.violations

    def bad(self, detail: str) -> None:
        self.violations.append(detail)


def check_executions(jobs: dict[str, dict], executions: dict[str, list[dict]],
                     commands: Optional[list[dict]] = None) -> Check:
    """Every job execution reached a terminal status or is legitimately pending (a QUEUED
    execution of a job outside its schedule or window, which no device may see yet); every
    command execution is terminal. `jobs`: job id -> DescribeJob's job; `executions`: job id ->
    ListJobExecutionsForJob rows; `commands`: GetCommandExecution results."""
    c = Check("terminal", "every execution terminal or legitimately pending")
    for job_id, rows in executions.items():
        job = jobs.get(job_id) or {}
        for row in rows:
            s = row["jobExecutionSummary"]
            c.count += 1
            if s["status"] in TERMINAL:
                continue
            if s["status"] == "QUEUED" and job.get("status") == "SCHEDULED":
                continue  # a window closed or a start ahead: the device may not see it yet
            c.bad(f"{job_id} on {_name(row['thingArn'])} #{s.get('executionNumber')}: "
                  f"{s['status']} (job {job.get('status')})")
        if job.get("isConcurrent") and job.get("status") == "IN_PROGRESS":
            c.bad(f"{job_id}: still rolling out (things not yet released)")
    for cx in commands or []:
        c.count += 1
        if cx.get("status") not in COMMAND_TERMINAL:
            c.bad(f"command {cx.get('commandArn', '').rsplit('/', 1)[-1]} execution "
                  f"{cx.get('executionId')} on {_name(cx.get('targetArn', ''))}: {cx.get('status')}")
    return c


def check_effects(effects: dict[str, list[str]], executions: dict[str, list[dict]],
                  effect_jobs: list[str], command_effects: Optional[dict[str, list[str]]] = None,
                  effect_commands: Optional[dict[str, str]] = None) -> Check:
    """No job's side effect applied twice. `effects`: thing -> the lines of its effects.log
    (one job id per effect the `effect` handler applied). An execution that started may apply
    it once, so a thing's count of a job is at most its started executions of the job, and at
    least its SUCCEEDED ones. `command_effects`: thing -> lines of command-effects.log (one
    execution id each), each at most once and exactly once for a SUCCEEDED `effect` command
    (`effect_commands`: execution id -> status)."""
    c = Check("effects", "no side effect applied twice")
    for job_id in effect_jobs:
        per_thing: dict[str, list[dict]] = {}
        for row in executions.get(job_id, []):
            per_thing.setdefault(_name(row["thingArn"]), []).append(row["jobExecutionSummary"])
        for thing in sorted(set(per_thing) | {t for t, lines in effects.items() if job_id in lines}):
            rows = per_thing.get(thing, [])
            n = effects.get(thing, []).count(job_id)
            started = sum(1 for s in rows if s.get("startedAt") is not None)
            succeeded = sum(1 for s in rows if s["status"] == "SUCCEEDED")
            c.count += 1
            if n > started:
                c.bad(f"{job_id} on {thing}: applied {n} times by {started} started "
                      f"execution(s) ({', '.join(s['status'] for s in rows) or 'none'})")
            elif n < succeeded:
                c.bad(f"{job_id} on {thing}: {succeeded} execution(s) SUCCEEDED but the effect "
                      f"was applied {n} time(s)")
    statuses = effect_commands or {}
    for thing, lines in sorted((command_effects or {}).items()):
        for eid in sorted(set(lines)):
            c.count += 1
            if lines.count(eid) > 1:
                c.bad(f"command execution {eid} on {thing}: applied {lines.count(eid)} times")
    applied = {eid for lines in (command_effects or {}).values() for eid in lines}
    for eid, status in sorted(statuses.items()):
        if status == "SUCCEEDED" and eid not in applied:
            c.count += 1
            c.bad(f"command execution {eid} SUCCEEDED but its effect was never applied")
    return c


def check_downloads(flashes: dict[str, str], placed: dict[str, list[tuple[str, str, str]]]) -> Check:
    """A SUCCEEDED download-file left the file in place with the published bytes.
    `placed`: thing -> [(job id, path under data/, sha256 hex)] of its SUCCEEDED downloads."""
    import hashlib

    c = Check("downloads", "every SUCCEEDED download's file in place, intact")
    for thing, items in sorted(placed.items()):
        for job_id, path, sha in items:
            c.count += 1
            p = os.path.join(flashes[thing], "data", *path.split("/"))
            try:
                with open(p, "rb") as f:
                    got = hashlib.sha256(f.read()).hexdigest()
            except OSError as e:
                c.bad(f"{job_id} on {thing}: SUCCEEDED but data/{path} is missing ({e.strerror})")
                continue
            if got != sha:
                c.bad(f"{job_id} on {thing}: data/{path} has sha256 {got[:16]}.., not {sha[:16]}..")
    return c


def check_terminal_updates(requests: list[dict], replies: list[dict]) -> Check:
    """At most one terminal update accepted per execution, and one outcome per execution from
    its device (a resend repeats it). `requests`: the devices' update
    requests as recorded (`thing`, `job`, `token`, `status`, `n`, `seq`); `replies`: the
    `update/accepted` replies (`thing`, `job`, `token`, `seq`). A reply is matched to the
    latest request of its thing, job and clientToken before it; a device draws a random tag
    for its tokens at every boot, so distinct accepted tokens are distinct updates (MQTT may
    deliver one twice). A reply whose request was not recorded (the recorder was cut off by a
    broker restart) cannot be placed and is counted apart (`unmatched`)."""
    c = Check("one-terminal", "at most one terminal update accepted per execution")
    last: dict[tuple, dict] = {}
    accepted: dict[tuple, set] = {}
    events = sorted([(r["seq"], 0, r) for r in requests] + [(r["seq"], 1, r) for r in replies],
                    key=lambda e: (e[0], e[1]))
    unmatched = 0
    for _, is_reply, r in events:
        key = (r["thing"], r["job"], r["token"])
        if not is_reply:
            last[key] = r
            continue
        req = last.get(key)
        if req is None:
            unmatched += 1
            continue
        if req["status"] in TERMINAL:
            accepted.setdefault((r["thing"], r["job"], req.get("n")), set()).add(r["token"])
    for (thing, job, n), toks in sorted(accepted.items(), key=lambda kv: str(kv[0])):
        c.count += 1
        if len(toks) > 1:
            c.bad(f"{job} on {thing} #{n}: {len(toks)} terminal updates accepted "
                  f"(clientTokens {', '.join(sorted(toks))})")
    # A device that resends its outcome resends the same one: an execution it reported with
    # two terminal statuses was run again after it had ended (whatever the service kept).
    said: dict[tuple, list[str]] = {}
    for r in sorted(requests, key=lambda r: r["seq"]):
        if r["status"] in TERMINAL:
            seen = said.setdefault((r["thing"], r["job"], r.get("n")), [])
            if r["status"] not in seen:
                seen.append(r["status"])
    for (thing, job, n), statuses in sorted(said.items(), key=lambda kv: str(kv[0])):
        if len(statuses) > 1:
            c.bad(f"{job} on {thing} #{n}: the device reported {' then '.join(statuses)}")
    c.notes["unmatched replies"] = unmatched
    return c


# devsim's bootloader states (esp_ota_img_states_t)
_BOOTABLE = ("VALID", "UNDEFINED")


def boot_choice(ota: str) -> tuple[Optional[str], Optional[dict], str]:
    """What devsim's bootloader would boot next from the OTA folder `ota`, read-only:
    (slot, image metadata, state of that slot). An image still on trial (PENDING_VERIFY) would
    be rolled back; a NEW one would be tried."""
    from .devsim import parse_image, read_otadata

    try:
        with open(os.path.join(ota, "partitions.json")) as f:
            labels = [p["label"] for p in json.load(f) if p["type"] == 0]
    except (OSError, ValueError, KeyError, TypeError):
        return None, None, "no partition table"
    od = read_otadata(ota)
    state, boot = od["state"], od.get("boot")
    candidates = []
    if boot in labels and state.get(boot) not in ("INVALID", "ABORTED", "PENDING_VERIFY"):
        candidates.append(boot)
    candidates += [s for s in labels if s != boot and state.get(s, "UNDEFINED") in _BOOTABLE]
    for slot in candidates:
        try:
            with open(os.path.join(ota, slot + ".bin"), "rb") as f:
                image = parse_image(f.read())
        except OSError:
            image = None
        if image is not None:
            return slot, image, state.get(slot, "UNDEFINED")
    return None, None, "nothing bootable"


_BOOT_LINE = re.compile(r"devsim: bootloader: (\S+) version (\S+) \((\w+)\)")


def check_firmware(devices: dict[str, dict]) -> Check:
    """Every device boots on a valid image and runs the version its last successful OTA
    installed. `devices`: thing -> {"ota": its OTA folder, "expected": the version of its last
    SUCCEEDED OTA (or the factory's), "log": the tail of its devsim log (optional), "alive":
    whether devsim still ran at the end (optional)}. A devsim that ended or halted no longer
    boots its device."""
    c = Check("firmware", "every device on a valid image, the version of its last successful OTA")
    for thing, d in sorted(devices.items()):
        c.count += 1
        if d.get("alive") is False or _halted(d.get("log") or ""):
            last = [ln for ln in (d.get("log") or "").splitlines() if ln.startswith("devsim:")]
            c.bad(f"{thing}: devsim no longer boots it ({last[-1] if last else 'its process ended'})")
        slot, image, state = boot_choice(d["ota"])
        want = d["expected"]
        if image is None:
            c.bad(f"{thing}: no bootable image ({state})")
            continue
        if state not in _BOOTABLE:
            c.bad(f"{thing}: {slot} boots next in state {state} (an update still on trial)")
        if image["version"] != want:
            c.bad(f"{thing}: boots {image['version']} from {slot}, but its last successful "
                  f"OTA installed {want}")
        if image.get("selftest") == "fail":
            c.bad(f"{thing}: boots an image that fails its self-test ({image['version']})")
        boots = _BOOT_LINE.findall(d.get("log") or "")
        if boots and boots[-1][1] != want:
            c.bad(f"{thing}: its last boot ran {boots[-1][1]} from {boots[-1][0]}, not {want}")
    return c


def check_apps(devices: dict[str, dict]) -> Check:
    """Every device runs the application version its last successful app-update installed.
    `devices`: thing -> {"flash": folder, "expected": version or None (no app-update
    succeeded)}."""
    c = Check("app", "every device runs the application its last successful app-update installed")
    for thing, d in sorted(devices.items()):
        c.count += 1
        path = os.path.join(d["flash"], "app.d", "state.json")
        try:
            with open(path) as f:
                st = json.load(f)
        except OSError:
            st = None
        except ValueError as e:
            c.bad(f"{thing}: app.d/state.json does not parse: {e}")
            continue
        cur = st.get("ver", {}).get(st.get("cur")) if isinstance(st, dict) else None
        if cur != d["expected"]:
            c.bad(f"{thing}: runs application {cur}, but its last successful app-update "
                  f"installed {d['expected']}")
        elif isinstance(st, dict) and st.get("trial"):
            c.bad(f"{thing}: application {cur} is still on trial")
    return c


def _journal_problem(d: Any) -> Optional[str]:
    """Why the journal's content would not load (lib/iotjobs/journal.py's rules), or None."""
    if not isinstance(d, dict) or d.get("ver") != 1:
        return "unknown journal format"
    job, out, done = d.get("job"), d.get("out"), d.get("done", [])
    if job is not None and not (
            isinstance(job, dict) and isinstance(job.get("id"), str)
            and isinstance(job.get("n"), int) and isinstance(job.get("step"), int)
            and "cp" in job and job.get("t") in ("RUN", "REBOOT")):
        return "bad job entry"
    if out is not None and not (
            isinstance(out, list) and len(out) == 5 and isinstance(out[0], str)
            and isinstance(out[1], int) and isinstance(out[2], str)
            and (out[3] is None or isinstance(out[3], dict))):
        return "bad outbox entry"
    if not (isinstance(done, list) and all(isinstance(e, str) for e in done)):
        return "bad done list"
    return None


JOURNALS = ("journal.json", "commands.json")


def check_journals(flashes: dict[str, str]) -> Check:
    """Every journal parses: the jobs journal (journal.json, which every boot writes) and the
    commands journal (commands.json, once a command came), by the rules the device loads them
    with; after the drain neither holds work (no job, no unacknowledged outcome)."""
    c = Check("journals", "every journal parses (and is idle after the drain)")
    for thing, flash in sorted(flashes.items()):
        for name in JOURNALS:
            path = os.path.join(flash, name)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError:
                if name == "journal.json":
                    c.count += 1
                    c.bad(f"{thing}: {name} is missing (every boot writes it)")
                continue
            c.count += 1
            try:
                d = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                c.bad(f"{thing}: {name} does not parse: {e}")
                continue
            why = _journal_problem(d)
            if why:
                c.bad(f"{thing}: {name}: {why}")
            elif d.get("job") is not None or d.get("out") is not None:
                c.bad(f"{thing}: {name} still holds work after the drain: job {d.get('job')}, "
                      f"outbox {d.get('out')}")
    return c


def journal_idle(flash: str) -> bool:
    """The device holds no work: neither journal has a job or an unacknowledged outcome."""
    for name in JOURNALS:
        try:
            with open(os.path.join(flash, name)) as f:
                d = json.load(f)
        except OSError:
            continue
        except ValueError:
            return False  # being replaced? (never: renames are atomic) look again later
        if isinstance(d, dict) and (d.get("job") is not None or d.get("out") is not None):
            return False
    return True


def check_counters(jobs: dict[str, dict], executions: dict[str, list[dict]]) -> Check:
    """jobsd's counters equal its executions: DescribeJob's jobProcessDetails against the
    ListJobExecutionsForJob rows counted by status (every attempt counts)."""
    c = Check("counters", "jobsd's counters equal its executions")
    for job_id, job in sorted(jobs.items()):
        c.count += 1
        counts = job.get("jobProcessDetails") or {}
        have: dict[str, int] = {}
        for row in executions.get(job_id, []):
            key = STATUS_COUNTER.get(row["jobExecutionSummary"]["status"], "?")
            have[key] = have.get(key, 0) + 1
        wrong = [f"{k} {counts.get(k, 0)} but {have.get(k, 0)} listed"
                 for k in sorted(set(STATUS_COUNTER.values()) | set(have))
                 if counts.get(k, 0) != have.get(k, 0)]
        if wrong:
            c.bad(f"{job_id}: " + "; ".join(wrong))
    return c


def check_parts(flashes: dict[str, str]) -> Check:
    """No orphaned `.part` files: after the drain no download is under way, so a `.part` file
    (download-file's and app-update's partial downloads) is left over."""
    c = Check("parts", "no orphaned .part files after the drain")
    for thing, flash in sorted(flashes.items()):
        c.count += 1
        for dirpath, _, names in os.walk(flash):
            for n in sorted(names):
                if n.endswith(".part"):
                    rel = os.path.relpath(os.path.join(dirpath, n), flash)
                    c.bad(f"{thing}: {rel} ({os.path.getsize(os.path.join(dirpath, n))} bytes)")
    return c


# -- processes and ports ------------------------------------------------------------------------
def proc_start_time(pid: int) -> Optional[int]:
    """The process's start time (clock ticks after boot; tells a pid reused from the one
    recorded), None when there is no such process or it is a zombie (it holds nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _listening_inodes(port: int) -> set[str]:
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                out.add(cols[9])
    return out


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def check_leaks(pids: list[tuple[int, Optional[int], str]], ports: list[tuple[int, str]]) -> Check:
    """No process or port leaked after stop. `pids`: (pid, start time as recorded, what) of
    every process the run started (mosquitto, every jobsd, devsim, every firmware boot);
    `ports`: (port, what) of every listener it opened (broker, jobsd, proxies). A port leaks
    when it still listens in this process or in one of the recorded processes still alive."""
    c = Check("leaks", "no process or port left after stop")
    alive = []
    for pid, started, what in pids:
        c.count += 1
        now = proc_start_time(pid)
        if now is not None and (started is None or now == started):
            alive.append(pid)
            c.bad(f"{what} (pid {pid}) still runs")
    ours = _socket_inodes(os.getpid())
    for pid in alive:
        ours |= _socket_inodes(pid)
    for port, what in ports:
        c.count += 1
        if _listening_inodes(port) & ours:
            c.bad(f"{what}: port {port} still listens")
    return c


def _name(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


# -- what the run saw on the wire -----------------------------------------------------------------
class Recorder:
    """A paho client on the broker's plain listener: every message on every thing's jobs topics
    goes to `wire` (a JSON line each: seconds, topic, payload; for diagnosis), and every job
    update request and `update/accepted` reply is kept, numbered in arrival order, for the
    one-terminal-update check. It reconnects and resubscribes after a broker restart (what is
    published meanwhile is not seen)."""

    TOPICS = ("$aws/things/+/jobs/#",)

    def __init__(self, port: int, wire: Optional[str] = None) -> None:
        import paho.mqtt.client as mqtt

        self.lock = threading.Lock()
        self.seq = 0
        self.requests: list[dict] = []
        self.replies: list[dict] = []
        self.connects = 0
        self.t0 = time.monotonic()
        self.wire = open(wire, "w") if wire else None
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"soak-recorder-{os.getpid()}-{id(self):x}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect("127.0.0.1", port, keepalive=20)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.stop()
            raise TimeoutError("the recorder did not subscribe")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connects += 1
        client.subscribe([(t, 1) for t in self.TOPICS])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        with self.lock:
            if self.wire is not None:
                self.wire.write(json.dumps([round(time.monotonic() - self.t0, 3), msg.topic,
                                            msg.payload[:400].decode(errors="replace")]) + "\n")
            update = len(parts) in (6, 7) and parts[5] == "update"
            if not update or (len(parts) == 7 and parts[6] != "accepted"):
                return
            try:
                body = json.loads(msg.payload)
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            self.seq += 1
            rec = {"thing": parts[2], "job": parts[4], "token": body.get("clientToken"),
                   "seq": self.seq}
            if len(parts) == 6:
                rec["status"] = body.get("status")
                rec["n"] = body.get("executionNumber")
                self.requests.append(rec)
            else:
                self.replies.append(rec)

    def snapshot(self) -> tuple[list[dict], list[dict]]:
        with self.lock:
            return list(self.requests), list(self.replies)

    def stop(self) -> None:
        from . import pahofix

        try:
            self.client.disconnect()
        finally:
            pahofix.loop_stop(self.client)
            with self.lock:
                if self.wire is not None:
                    self.wire.close()
                    self.wire = None


# -- the work -------------------------------------------------------------------------------------
APP_ENTRY = ("VERSION = {version!r}\n\n\ndef start(api):\n"
             "    api.log('soak application %s' % VERSION)\n")


def _ns(**kw: Any) -> argparse.Namespace:
    """The arguments tools/jobs' subcommands read, with the defaults of its parser."""
    from .jobs_cli import STREAM_ROLE

    base = {"thing": [], "group": [], "continuous": False, "force": True, "protocol": "http",
            "role_arn": STREAM_ROLE, "campaign": {}}
    base.update(kw)
    return argparse.Namespace(**base)


class WorkMaker:
    """Creates each work item the way an operator would, through tools/jobs' own code
    (iotjobs_host.jobs_cli: signed images and bundles by tools/sign, objects in jobsd's files
    folder, streams for the MQTT way) on jobsd's control plane."""

    def __init__(self, scn: Scenario, workdir: str, files: str, keys: dict[str, str],
                 seed: int) -> None:
        self.scn, self.workdir, self.files, self.keys = scn, workdir, files, keys
        self.rng = random.Random(f"{seed}:content")
        self.downloads: dict[str, tuple[str, str]] = {}  # job id -> (path, sha256)
        self.command_arns: dict[str, str] = {}

    def create_job(self, iot: Any, w: Work) -> str:
        """Create the job of `w`; returns what tools/jobs printed. A refusal of the service (a
        campaign option out of range...) is the scenario's mistake: ScenarioError."""
        from botocore.exceptions import ClientError, ParamValidationError

        try:
            return self._create_job(iot, w)
        except ClientError as e:
            err = e.response.get("Error", {})
            if err.get("Code") in ("InvalidRequestException", "LimitExceededException",
                                   "ResourceAlreadyExistsException"):
                raise ScenarioError(f"work {w.id}: jobsd refused the job: {err.get('Code')}: "
                                    f"{err.get('Message')}") from None
            raise
        except ParamValidationError as e:
            raise ScenarioError(f"work {w.id}: {e}") from None

    def _create_job(self, iot: Any, w: Work) -> str:
        from . import jobs_cli

        things, groups = self.scn.targets(w)
        common = {"job_id": w.id, "thing": things, "group": groups, "continuous": w.continuous,
                  "campaign": dict(w.campaign), "protocol": w.protocol}
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if w.kind == "ota":
                rc = jobs_cli.cmd_ota(iot, _ns(cmd="ota", image=self._image(w), key=self.keys["key"],
                                               files=self.files, bucket="firmware",
                                               version=w.version, afr_ota=False, **common))
            elif w.kind == "download":
                rc = jobs_cli.cmd_download(iot, _ns(cmd="download", file=self._blob(w),
                                                    path=w.path, files=self.files,
                                                    bucket="files", key_name=None, **common))
            elif w.kind == "app":
                rc = jobs_cli.cmd_app(iot, _ns(cmd="app", dir=self._app(w), version=w.version,
                                               key=self.keys["key"], files=self.files,
                                               bucket="apps", exclude=[], allow_downgrade=False,
                                               **common))
            else:
                doc = {"demo": {"operation": "demo", "steps": w.steps, "step_ms": w.step_ms},
                       "effect": {"operation": "effect"},
                       "reboot": {"operation": "reboot"}}[w.kind]
                iot.create_job(jobId=w.id, targets=jobs_cli._targets(iot, things, groups),
                               document=json.dumps(doc, separators=(",", ":")),
                               targetSelection="CONTINUOUS" if w.continuous else "SNAPSHOT",
                               **w.campaign)
                rc = 0
        if rc != 0:
            raise ScenarioError(f"work {w.id}: tools/jobs {w.kind} failed: {out.getvalue().strip()}")
        return out.getvalue().strip()

    def _path(self, *parts: str) -> str:
        p = os.path.join(self.workdir, "work", *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def _image(self, w: Work) -> str:
        from .devsim import make_image

        path = self._path(f"{w.id}.bin")
        flags = {"selftest": "fail"} if w.bad else {}
        payload = self.rng.randbytes(w.size - 4096)
        with open(path, "wb") as f:
            f.write(make_image(w.version, payload=payload, **flags))
        return path

    def _blob(self, w: Work) -> str:
        import hashlib

        data = self.rng.randbytes(w.size)
        path = self._path(f"{w.id}.blob")
        with open(path, "wb") as f:
            f.write(data)
        self.downloads[w.id] = (w.path, hashlib.sha256(data).hexdigest())
        return path

    def _app(self, w: Work) -> str:
        root = self._path(f"app-{w.id}", "x")[:-2]
        os.makedirs(root, exist_ok=True)
        entry = APP_ENTRY.format(version=w.version)
        if w.bad:
            entry = "raise ImportError('broken on purpose')\n" + entry
        with open(os.path.join(root, "application.py"), "w") as f:
            f.write(entry)
        for i in range(w.files - 1):
            with open(os.path.join(root, f"data{i}.bin"), "wb") as f:
                f.write(self.rng.randbytes(w.size))
        return root

    def create_command(self, iot: Any, w: Work) -> str:
        payload = json.dumps({"command": w.command}).encode()
        arn = iot.create_command(commandId=w.id, payload={
            "content": payload, "contentType": "application/json"})["commandArn"]
        self.command_arns[w.id] = arn
        return arn


# -- a fleet that runs already ----------------------------------------------------------------------
class _RemoteDevice:
    """A device of a running fleet, as Soak sees one of its own (fleet.FleetDevice)."""

    def __init__(self, d: dict, workdir: str) -> None:
        from types import SimpleNamespace

        self.thing, self.flash, self.pid = d["thing"], d["flash"], d["devsim_pid"]
        self.start = proc_start_time(self.pid)
        self.log_path = os.path.join(workdir, "devices", self.thing, "device.log")
        self.proxy = SimpleNamespace(port=int(d["proxy"].rsplit(":", 1)[1]))

    def alive(self) -> bool:
        return self.start is not None and proc_start_time(self.pid) == self.start

    def log_text(self, tail: int = 8000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - tail))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def boots(self) -> list[int]:
        return [int(m) for m in re.findall(r"devsim: boot \d+ \(image \S+, heap \S+, pid (\d+)\)",
                                            self.log_text(10**8))]


class RemoteFleet:
    """The fleet `tools/fleet up` runs in a folder, driven through its supervisor's socket with
    the calls of iotjobs_host.fleet.Fleet; stop() leaves it running (it is `tools/fleet
    down`'s to stop, so its processes and ports are not this run's to check)."""

    def __init__(self, folder: str) -> None:
        from .fleet_cli import Paths

        self.paths = Paths(folder)
        self.status: dict = {}

    def _req(self, op: str, **args: Any) -> Any:
        from .fleet_cli import FleetError, request

        try:
            return request(self.paths, op, timeout=300, **args)
        except FleetError as e:
            if op == "advance-clock":  # jobsd restarting: tried again at the next tick
                raise ConnectionError(str(e)) from None
            raise ScenarioError(str(e)) from None

    def start(self) -> None:
        from types import SimpleNamespace

        from .stack import boto3_client

        st = self.status = self._req("status")
        self.files = st["files"]
        self.workdir = st["workdir"]
        self.mosquitto = SimpleNamespace(port=int(st["mqtt"].rsplit(":", 1)[1]))
        self.jobsd = SimpleNamespace(
            control_url=st["control_url"], data_url=st["data_url"],
            iot=boto3_client("iot", st["control_url"]),
            data=boto3_client("iot-jobs-data", st["data_url"]))
        self.devices = [_RemoteDevice(d, self.workdir) for d in st["devices"]]

    def signing_key(self) -> str:
        """The key the fleet's devices trust for OTA images and app bundles (ota.pubkey of
        their config.json): status' `signing_key`, else keys/signing-key.pem of the fleet."""
        st = self._req("status")
        key = st.get("signing_key") or os.path.join(st["workdir"], "keys", "signing-key.pem")
        return key

    def check(self, scn: Scenario, key: str) -> None:
        """Refuse a scenario this fleet cannot play (its size, image, TLS, what its devices
        were provisioned with)."""
        st = self.status
        if len(self.devices) != scn.devices or st.get("image") != scn.image or \
                bool(st.get("tls")) != scn.tls:
            raise ScenarioError(
                f"the fleet running in {self.paths.dir} has {len(self.devices)} {st.get('image')} "
                f"devices{' over TLS' if st.get('tls') else ''}; the scenario {scn.name} wants "
                f"{scn.devices} {scn.image}{' over TLS' if scn.tls else ''} (tools/fleet down, or "
                "tools/fleet up with those options)")
        try:
            with open(os.path.join(self.devices[0].flash, "config.json")) as f:
                cfg = json.load(f)
        except (OSError, ValueError, IndexError):
            cfg = {}
        kinds = {w.kind for w in scn.work}
        signed = kinds & {"ota", "app"}
        if signed and not ((cfg.get("ota") or {}).get("pubkey") and os.path.exists(key)):
            raise ScenarioError(
                f"the fleet's devices trust no signing key this run can use ({key}), and the "
                f"scenario has {' and '.join(sorted(signed))} work (signed updates)")
        effects = "effect" in kinds or any(w.command == "effect" for w in scn.work
                                            if w.kind == "command")
        if effects and not cfg.get("test_handlers"):
            raise ScenarioError("the fleet's devices run without the test handlers "
                                "(test_handlers in config.json); the scenario has effect work")

    def power_cut(self, thing: str) -> Any:
        return self._req("power-cut", thing=thing)

    def power_cut_at_write(self, thing: str, n: int) -> None:
        self._req("cut-at-write", thing=thing, n=n)

    def restart_broker(self) -> None:
        self._req("restart-broker")

    def kill_jobsd(self) -> None:
        self._req("kill-jobsd")

    def link_cut(self, thing: str) -> None:
        self._req("link-cut", thing=thing)

    def blackhole(self, thing: str, seconds: float) -> None:
        self._req("blackhole", thing=thing, seconds=seconds)

    def slow_link(self, thing: str, delay_ms: float = 0, rate: Optional[float] = None,
                  seconds: Optional[float] = None) -> None:
        self._req("slow", thing=thing, delay_ms=delay_ms, rate=rate, seconds=seconds)

    def advance_clock(self, seconds: float) -> Any:
        return self._req("advance-clock", seconds=seconds)

    def stop(self) -> list[str]:
        return []


def running_fleet(folder: str) -> bool:
    """A `tools/fleet up` supervisor answers in `folder`."""
    from .fleet_cli import FleetError, Paths, request

    if not os.path.exists(Paths(folder).sock):
        return False
    try:
        request(Paths(folder), "processes", timeout=10)
        return True
    except FleetError:
        return False


# -- the run --------------------------------------------------------------------------------------
class _Transient(Exception):
    pass


def _transient(e: BaseException) -> bool:
    """jobsd or the broker restarting under us: try again shortly."""
    from urllib.error import URLError

    from botocore.exceptions import (ConnectionClosedError, EndpointConnectionError,
                                     ReadTimeoutError)

    return isinstance(e, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError,
                          ConnectionError, TimeoutError, URLError))


class Soak:
    """Plays one scenario with one seed: the fleet, the work, the faults, the drain, the
    checks. `run()` returns the report (a dict); `ok` in it says whether every invariant held."""

    def __init__(self, scn: Scenario, seed: int, workdir: str,
                 log: Callable[[str], None] = print, fleet_dir: Optional[str] = None) -> None:
        self.scn, self.seed, self.workdir = scn, seed, workdir
        # on a running fleet (tools/fleet up), job and command ids carry this run's tag: the
        # fleet's jobsd may hold those of earlier runs
        self.remote = fleet_dir
        if fleet_dir:
            tag = f"{int(time.time()) % 10**6:06d}"
            for w in scn.work:
                w.id = f"{w.id}-{tag}"
        self.baseline: dict[str, tuple[str, Optional[str]]] = {}
        self.finished: dict[str, float] = {}  # job id -> when first seen COMPLETED or CANCELED
        self.faults = schedule(scn, seed)
        self.log = log
        self.t0 = 0.0
        self.fleet: Any = None
        self.recorder: Optional[Recorder] = None
        self.maker: Optional[WorkMaker] = None
        self.created: dict[str, float] = {}  # work id -> when created (s into the run)
        self.command_runs: list[tuple[float, Work, int]] = []  # (at, work, repeat index)
        self.command_executions: dict[str, tuple[str, str]] = {}  # execution id -> (work id, thing)
        self.injected: list[dict] = []
        self.restores: list[tuple[float, str, str]] = []  # (when, kind, thing)
        self.cut_until: dict[str, float] = {}
        self.slow_until: dict[str, float] = {}
        self.last_fault_end = 0.0
        self.last_advance = 0.0
        self.minutes = 0
        self.advanced = 0.0  # seconds jobsd's clock was moved forward
        self.drained_at: Optional[float] = None  # seconds into the run
        self.pids: list[tuple[int, Optional[int], str]] = []
        self.ports: list[tuple[int, str]] = []
        self.errors: list[str] = []

    # -- helpers --------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    @property
    def iot(self) -> Any:
        return self.fleet.jobsd.iot

    @property
    def data(self) -> Any:
        return self.fleet.jobsd.data

    def api(self, fn: Callable[[], Any], what: str, deadline: float = 120.0) -> Any:
        """Call jobsd, riding out its restarts."""
        end = time.monotonic() + deadline
        while True:
            try:
                return fn()
            except Exception as e:
                if not _transient(e) or time.monotonic() > end:
                    raise
                self._pause(0.2)

    @staticmethod
    def _pause(seconds: float) -> None:
        """The driver's tick: a bounded wait between two looks at the world."""
        threading.Event().wait(seconds)

    def device(self, thing: str) -> Any:
        for d in self.fleet.devices:
            if d.thing == thing:
                return d
        raise KeyError(thing)

    def flashes(self) -> dict[str, str]:
        return {d.thing: d.flash for d in self.fleet.devices}

    # -- the phases -----------------------------------------------------------------------------
    def run(self) -> dict:
        from . import sign

        scn = self.scn
        started = time.time()
        where = f"the fleet running in {self.remote}" if self.remote else "a fleet of its own"
        self.log(f"soak: scenario {scn.name}, seed {self.seed}, {scn.devices} devices "
                 f"({scn.image}{', TLS' if scn.tls else ''}) on {where}, {len(scn.work)} work "
                 f"item(s), {len(self.faults)} fault(s) planned")
        os.makedirs(self.workdir, exist_ok=True)
        if self.remote:
            self.fleet = RemoteFleet(self.remote)
            key = self.fleet.signing_key()
        else:
            from .fleet import Fleet

            keys = sign.keygen(os.path.join(self.workdir, "keys"), force=True)
            key = keys[sign.KEY_FILE]
            cfg = {"test_handlers": True, "progress_min_ms": 1000,
                   "ota": {"pubkey": keys[sign.PUB_DER_FILE], "allow": ["http://127.0.0.1:"]},
                   "download": {"allow": ["http://127.0.0.1:"]}}
            cfg.update(scn.device_config)
            self.fleet = Fleet(os.path.join(self.workdir, "fleet"), scn.devices,
                               **self._fleet_kwargs(cfg))
        state: dict[str, Any] = {}
        boot_s = drain_s = None
        drained = False
        try:
            t = time.monotonic()
            self.fleet.start()
            boot_s = time.monotonic() - t
            if self.remote:
                self.fleet.check(scn, key)
            else:
                self.log(f"soak: fleet up in {boot_s:.1f} s")
            self._record_processes()
            self.baseline = {d.thing: (_running_version(d.flash), _app_version(d.flash))
                             for d in self.fleet.devices}
            self.recorder = Recorder(self.fleet.mosquitto.port,
                                     os.path.join(self.workdir, "wire.jsonl"))
            self.maker = WorkMaker(scn, self.workdir, str(self.fleet.files), {"key": key},
                                   self.seed)
            self._prepare()
            self.t0 = self.recorder.t0 = time.monotonic()
            self._run_phase()
            drained, drain_s = self._drain()
            state = self._collect()
            self._record_processes()
        except ScenarioError:
            raise
        except Exception as e:  # reported as a violation; the checks still look at what is there
            import traceback

            self.errors.append(f"{type(e).__name__}: {e}")
            self.log("soak: the run failed:\n" + traceback.format_exc())
        finally:
            if self.recorder is not None:
                requests, replies = self.recorder.snapshot()
                state["requests"], state["replies"] = requests, replies
                self.recorder.stop()
            self._record_processes()
            state["fleet_leaks"] = self.fleet.stop()
        checks = self._checks(state)
        return self._report(started, boot_s, drained, drain_s, state, checks)

    def _fleet_kwargs(self, cfg: dict) -> dict:
        """Fleet's options from the scenario (keepalive, a device setting, is devsim's)."""
        cfg = dict(cfg)
        kw: dict[str, Any] = {"image": self.scn.image, "tls": self.scn.tls, "heap": self.scn.heap,
                              "seed": self.seed, "config": cfg,
                              "start_timeout": self.scn.limits.boot}
        if "keepalive" in cfg:
            kw["keepalive"] = cfg.pop("keepalive")
        return kw

    def _record_processes(self) -> None:
        """Every process and listener the fleet runs now (their pids and ports are checked
        after the stop; a firmware boot is its own process)."""
        seen = {p for p, _, _ in self.pids}
        seen_ports = {p for p, _ in self.ports}

        def add(pid: Optional[int], what: str) -> None:
            if pid and pid not in seen:
                seen.add(pid)
                self.pids.append((pid, proc_start_time(pid), what))

        def port(p: Optional[int], what: str) -> None:
            if p and p not in seen_ports:
                seen_ports.add(p)
                self.ports.append((p, what))

        f = self.fleet
        if self.remote:
            return  # a fleet this run did not start, and does not stop
        add(f.mosquitto.proc.pid, "mosquitto")
        port(f.mosquitto.port, "mosquitto")
        port(f.mosquitto.tls_port, "mosquitto (TLS)")
        add(f.jobsd.proc.pid, "jobsd")
        for url, what in ((f.jobsd.control_url, "jobsd control"), (f.jobsd.data_url, "jobsd data")):
            port(int(url.rsplit(":", 1)[1]), what)
        for d in f.devices:
            add(d.pid, f"devsim {d.thing}")
            for pid in d.boots():
                add(pid, f"firmware of {d.thing}")
            if getattr(d, "proxy", None) is not None:
                port(d.proxy.port, f"netproxy of {d.thing}")

    def _prepare(self) -> None:
        """Things and groups in jobsd's registry (things the fleet has not registered are)."""
        iot = self.iot
        for thing in self.scn.things():
            try:
                iot.describe_thing(thingName=thing)
            except iot.exceptions.ResourceNotFoundException:
                iot.create_thing(thingName=thing)
        for g, members in self.scn.groups.items():
            iot.create_thing_group(thingGroupName=g)
            for thing in members:
                iot.add_thing_to_thing_group(thingGroupName=g, thingName=thing)
        for w in self.scn.work:
            if w.kind == "command":
                for k in range(w.repeat):
                    self.command_runs.append((w.at + k * w.every, w, k))
        self.command_runs.sort(key=lambda r: (r[0], r[1].id, r[2]))

    def _run_phase(self) -> None:
        scn = self.scn
        work = sorted((w for w in scn.work if w.kind != "command"), key=lambda w: w.at)
        faults = list(self.faults)
        runs = list(self.command_runs)
        next_rollout = 0.0
        last_line = 0.0
        while work or faults or runs or self.now() < scn.limits.duration:
            t = self.now()
            while work and work[0].at <= t:
                w = work.pop(0)
                self._create(w)
            while runs and runs[0][0] <= t:
                _, w, k = runs.pop(0)
                self._send_commands(w, k)
            while faults and faults[0].at <= self.now():
                self._inject(faults.pop(0))
            self._restore_due()
            if self.now() >= next_rollout:
                self._rollout_tick()
                next_rollout = self.now() + 1.0
            if self.now() - last_line >= 10:
                last_line = self.now()
                self.log(f"soak: {self.now():6.1f} s: {len(self.injected)}/{len(self.faults)} "
                         f"faults injected, {len(self.created)} job(s) created, "
                         f"{self.minutes} rollout minute(s)")
            self._pause(0.05)

    def _create(self, w: Work) -> None:
        assert self.maker is not None
        line = self.api(lambda: self.maker.create_job(self.iot, w), f"creating {w.id}")
        self.created[w.id] = self.now()
        self.log(f"soak: {self.now():6.1f} s: {line or 'created ' + w.id}")

    def _send_commands(self, w: Work, k: int) -> None:
        assert self.maker is not None
        if w.id not in self.maker.command_arns:
            self.api(lambda: self.maker.create_command(self.iot, w), f"creating command {w.id}")
            self.created[w.id] = self.now()
        arn = self.maker.command_arns[w.id]
        for thing in self.scn.target_things(w):
            target = f"{arn.split(':command/')[0]}:thing/{thing}"
            out = self.api(lambda target=target: self.data.start_command_execution(
                targetArn=target, commandArn=arn, executionTimeoutSeconds=w.timeout),
                f"starting {w.id}")
            self.command_executions[out["executionId"]] = (w.id, thing)

    # -- faults ---------------------------------------------------------------------------------
    def _phase_of(self, thing: str) -> str:
        """What the device was doing, from its journal: the kind of the job it holds, or idle."""
        try:
            with open(os.path.join(self.device(thing).flash, "journal.json")) as f:
                job = (json.load(f) or {}).get("job")
        except (OSError, ValueError, AttributeError):
            return "unknown"
        if not isinstance(job, dict):
            return "idle"
        kinds = {w.id: w.kind for w in self.scn.work}
        return kinds.get(job.get("id"), "other")

    def _inject(self, fault: Fault) -> None:
        t = self.now()
        rec = {**fault.as_json(), "injected_at": round(t, 3)}
        f = self.fleet
        try:
            if fault.kind == "power_cut":
                rec["during"] = self._phase_of(fault.target)
            if fault.kind == "power_cut":
                if self._power_cut(fault.target) is None:
                    rec["missed"] = "between two boots"
            elif fault.kind == "power_cut_at_write":
                f.power_cut_at_write(fault.target, int(fault.arg))
            elif fault.kind == "broker_restart":
                rec["tries"] = self._again(f.restart_broker)
                self._record_processes()
            elif fault.kind == "jobsd_restart":
                # its test clock's offset is in its database: it resumes there
                rec["tries"] = self._again(f.kill_jobsd)
                self._record_processes()
            elif fault.kind == "link_cut":
                f.link_cut(fault.target)
            elif fault.kind == "blackhole":
                until = t + float(fault.arg)
                if self.cut_until.get(fault.target, 0) < until:
                    self.cut_until[fault.target] = until
                f.blackhole(fault.target, float(fault.arg))
                self.restores.append((until, "blackhole", fault.target))
            elif fault.kind == "slow_link":
                until = t + float(fault.arg)
                self.slow_until[fault.target] = max(self.slow_until.get(fault.target, 0), until)
                sf = self.scn.faults
                f.slow_link(fault.target, delay_ms=sf.slow_delay_ms, rate=sf.slow_rate or None,
                            seconds=float(fault.arg))
                self.restores.append((until, "slow_link", fault.target))
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            self.log(f"soak: {t:6.1f} s: fault {fault.kind} on {fault.target} failed: {e}")
        rec["took"] = round(self.now() - t, 3)
        self.injected.append(rec)
        self.last_fault_end = max(self.last_fault_end, self.now())

    def _again(self, restart: Callable[[], Any], tries: int = 3) -> int:
        """A restart of the broker or jobsd, tried again when the service does not come back
        in time (a loaded machine: jobsd's READY later than the fleet waits for); leaving the
        fleet without it would be a fault the schedule did not ask for. How many tries."""
        for n in range(1, tries + 1):
            try:
                restart()
                return n
            except (TimeoutError, RuntimeError) as e:
                if n == tries:
                    raise
                self.log(f"soak: {self.now():6.1f} s: the restart did not come back ({e!s:.80}); "
                         "again")
        return tries

    def _power_cut(self, thing: str) -> Optional[int]:
        """SIGKILL the thing's firmware process (the interpreter devsim started, never one of
        devsim's own short-lived helper children, whose death halts devsim); its pid, or None
        between two boots."""
        from .fleet import children

        d = self.device(thing)
        for pid in children(d.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                continue
            if not any(a.startswith(b"heapsize=") for a in argv):
                continue
            started = proc_start_time(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return None
            end = time.monotonic() + 10
            while proc_start_time(pid) == started and started is not None and time.monotonic() < end:
                self._pause(0.005)
            return pid
        return None

    def _restore_due(self) -> None:
        t = self.now()
        due = [r for r in self.restores if r[0] <= t]
        if not due:
            return
        self.restores = [r for r in self.restores if r[0] > t]
        for _, _, _ in due:
            self.last_fault_end = max(self.last_fault_end, t)

    # -- jobsd's clock ----------------------------------------------------------------------------
    def _rollout_tick(self) -> None:
        """Move jobsd's clock a rollout minute once every released device of every job still
        rolling out has reported (its execution is terminal), or after `limits.minute` real
        seconds at most."""
        try:
            releasing = []
            settled = True
            for w in self.scn.work:
                if w.kind == "command" or w.id not in self.created or w.id in self.finished:
                    continue
                job = self.iot.describe_job(jobId=w.id)["job"]
                self._note(w, job)
                if not w.campaign.get("jobExecutionsRolloutConfig"):
                    continue
                if not (job["status"] == "IN_PROGRESS" and job.get("isConcurrent")):
                    continue
                releasing.append(w.id)
                p = job.get("jobProcessDetails") or {}
                if p.get("numberOfQueuedThings", 0) + p.get("numberOfInProgressThings", 0):
                    settled = False
            wall = time.monotonic()
            if not releasing:
                self.last_advance = wall  # a campaign created later gets a whole minute
            if not releasing or not (settled or wall - self.last_advance >= self.scn.limits.minute):
                return
            self.fleet.advance_clock(60)
        except Exception as e:
            if _transient(e):
                return
            raise
        self.advanced += 60
        self.last_advance = wall
        self.minutes += 1

    # -- the drain --------------------------------------------------------------------------------
    def _drain(self) -> tuple[bool, Optional[float]]:
        """Wait until every execution is terminal (or legitimately pending) and every device
        idle, within limits.drain (or until all that is left waits on devices that have
        halted); (drained, seconds after the last fault it took)."""
        start = self.now()
        self.log(f"soak: {start:6.1f} s: every fault injected; draining (at most "
                 f"{self.scn.limits.drain:g} s)")
        last_line = start
        while True:
            self._restore_due()
            self._rollout_tick()
            try:
                pending = self._pending()
            except Exception as e:
                if not _transient(e):
                    raise
                pending = [(None, "jobsd not answering")]
            if not pending and not self.restores:
                t = self.now()
                self.drained_at = t
                took = t - self.last_fault_end
                self.log(f"soak: {t:6.1f} s: drained {took:.1f} s after the last fault")
                return True, took
            text = [p for _, p in pending]
            halted = self.halted()
            if pending and all(thing in halted for thing, _ in pending):
                self.log(f"soak: {self.now():6.1f} s: what is left waits on halted devices "
                         f"({', '.join(sorted(halted))}): " + "; ".join(text[:5]))
                return False, None
            if self.now() - start > self.scn.limits.drain:
                self.log(f"soak: not drained after {self.scn.limits.drain:g} s: "
                         + "; ".join(text[:5]))
                return False, None
            if self.now() - last_line >= 10:
                last_line = self.now()
                self.log(f"soak: {self.now():6.1f} s: waiting for {len(pending)}: "
                         + "; ".join(text[:4]))
            self._pause(0.5)

    def _note(self, w: Work, job: dict) -> None:
        """When a job was first seen done (COMPLETED or CANCELED), for the report."""
        if job.get("status") in ("COMPLETED", "CANCELED") and w.id not in self.finished:
            self.finished[w.id] = self.now()

    def halted(self) -> set[str]:
        """Devices whose devsim no longer boots them (its process ended, or it halted)."""
        return {d.thing for d in self.fleet.devices
                if not d.alive() or _halted(d.log_text(300))}

    def _pending(self) -> list[tuple[Optional[str], str]]:
        """(thing or None, what) of everything not yet settled."""
        out: list[tuple[Optional[str], str]] = []
        for w in self.scn.work:
            if w.kind == "command":
                continue
            job = self.iot.describe_job(jobId=w.id)["job"]
            self._note(w, job)
            p = job.get("jobProcessDetails") or {}
            busy = p.get("numberOfQueuedThings", 0) + p.get("numberOfInProgressThings", 0)
            if job["status"] == "IN_PROGRESS" and job.get("isConcurrent"):
                out.append((None, f"{w.id} rolling out"))
            elif busy and job["status"] != "SCHEDULED":
                for row in self.iot.list_job_executions_for_job(jobId=w.id, maxResults=100)[
                        "executionSummaries"]:
                    st = row["jobExecutionSummary"]["status"]
                    if st not in TERMINAL:
                        thing = _name(row["thingArn"])
                        out.append((thing, f"{w.id} on {thing}: {st}"))
        for cx in self._command_executions():
            if cx["status"] not in COMMAND_TERMINAL:
                thing = _name(cx["targetArn"])
                out.append((thing, f"command {cx['executionId'][:8]} on {thing}: {cx['status']}"))
        for thing, flash in self.flashes().items():
            if not journal_idle(flash):
                out.append((thing, f"{thing} busy"))
        return out

    def _command_executions(self) -> list[dict]:
        """ListCommandExecutions of every command of the scenario: executionId, targetArn,
        commandArn, status."""
        out: list[dict] = []
        for arn in (self.maker.command_arns.values() if self.maker else ()):
            kw: dict[str, Any] = {"commandArn": arn, "maxResults": 100}
            while True:
                page = self.iot.list_command_executions(**kw)
                out += page.get("commandExecutions", [])
                if not page.get("nextToken"):
                    break
                kw = {**kw, "nextToken": page["nextToken"]}
        return [cx for cx in out if cx.get("executionId") in self.command_executions]

    # -- what is checked ----------------------------------------------------------------------------
    def _collect(self) -> dict:
        iot = self.iot
        jobs: dict[str, dict] = {}
        executions: dict[str, list[dict]] = {}
        for w in self.scn.work:
            if w.kind == "command":
                continue
            jobs[w.id] = self.api(lambda w=w: iot.describe_job(jobId=w.id)["job"], "describe")
            rows: list[dict] = []
            kw: dict[str, Any] = {"jobId": w.id, "maxResults": 100}
            while True:
                page = self.api(lambda kw=kw: iot.list_job_executions_for_job(**kw), "list")
                rows += page.get("executionSummaries", [])
                if not page.get("nextToken"):
                    break
                kw = {**kw, "nextToken": page["nextToken"]}
            executions[w.id] = rows
        commands = [{k: cx.get(k) for k in ("executionId", "commandArn", "targetArn", "status")}
                    for cx in self.api(self._command_executions, "commands")]
        logs = {d.thing: d.log_text(10**7) for d in self.fleet.devices}
        alive = {d.thing: d.alive() for d in self.fleet.devices}
        # why executions did not succeed (statusDetails is in DescribeJobExecution only)
        reasons: dict[str, dict[str, int]] = {}
        for job_id, rows in executions.items():
            for row in rows:
                s = row["jobExecutionSummary"]
                if s["status"] not in ("FAILED", "REJECTED", "TIMED_OUT"):
                    continue
                ex = self.api(lambda job_id=job_id, row=row, s=s: iot.describe_job_execution(
                    jobId=job_id, thingName=_name(row["thingArn"]),
                    executionNumber=s["executionNumber"])["execution"], "describe execution")
                d = (ex.get("statusDetails") or {}).get("detailsMap") or {}
                why = " ".join(x for x in (s["status"], d.get("reason"), d.get("message")) if x)
                per = reasons.setdefault(job_id, {})
                per[why[:120]] = per.get(why[:120], 0) + 1
        return {"jobs": jobs, "executions": executions, "commands": commands, "logs": logs,
                "reasons": reasons,
                "alive": alive}

    def _checks(self, state: dict) -> list[Check]:
        scn = self.scn
        if "jobs" not in state:
            return []
        jobs, executions = state["jobs"], state["executions"]
        flashes = self.flashes()
        checks = [check_executions(jobs, executions, state["commands"])]
        effects = {t: _lines(os.path.join(f, "effects.log")) for t, f in flashes.items()}
        cmd_effects = {t: _lines(os.path.join(f, "command-effects.log")) for t, f in flashes.items()}
        effect_cmds = {w.id for w in scn.work if w.kind == "command" and w.command == "effect"}
        statuses = {cx["executionId"]: cx["status"] for cx in state["commands"]
                    if self.command_executions.get(cx["executionId"], ("",))[0] in effect_cmds}
        checks.append(check_effects(effects, executions,
                                    [w.id for w in scn.work if w.kind == "effect"],
                                    cmd_effects, statuses))
        checks.append(check_terminal_updates(state.get("requests", []), state.get("replies", [])))
        succeeded = _succeeded(executions)
        ota = {w.id: w for w in scn.work if w.kind == "ota"}
        fw = {}
        for d in self.fleet.devices:
            versions = [ota[j].version for j in ota if d.thing in succeeded.get(j, ())]
            fw[d.thing] = {"ota": _ota_dir(d), "log": state["logs"].get(d.thing, ""),
                           "expected": max(versions, key=_vkey, default=self.baseline.get(
                               d.thing, (FACTORY_VERSION, None))[0]),
                           "alive": state["alive"].get(d.thing)}
        checks.append(check_firmware(fw))
        for j, w in ota.items():
            if w.bad and succeeded.get(j):
                checks[-1].bad(f"{j}: an image that fails its self-test SUCCEEDED on "
                               f"{', '.join(sorted(succeeded[j]))}")
        apps = {w.id: w for w in scn.work if w.kind == "app"}
        if apps:
            checks.append(check_apps({t: {"flash": f, "expected": max(
                (apps[j].version for j in apps if t in succeeded.get(j, ())), key=_vkey,
                default=self.baseline.get(t, (None, None))[1])} for t, f in flashes.items()}))
        if self.maker and self.maker.downloads:
            placed: dict[str, list] = {}
            for j, (path, sha) in self.maker.downloads.items():
                for t in succeeded.get(j, ()):
                    placed.setdefault(t, []).append((j, path, sha))
            checks.append(check_downloads(flashes, placed))
        checks.append(check_journals(flashes))
        checks.append(check_counters(jobs, executions))
        checks.append(check_parts(flashes))
        if not self.remote:  # a running fleet stays up: its processes are not this run's
            leaks = check_leaks(self.pids, self.ports)
            for what in state.get("fleet_leaks") or []:
                leaks.bad(f"the fleet's stop left {what} behind")
            checks.append(leaks)
        exp = check_expectations(scn, jobs, executions)
        if exp.count:
            checks.append(exp)
        return checks

    def _report(self, started: float, boot_s: Optional[float], drained: bool,
                drain_s: Optional[float], state: dict, checks: list[Check]) -> dict:
        by_kind: dict[str, int] = {}
        during: dict[str, int] = {}
        failed = 0
        for r in self.injected:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
            if "during" in r:
                during[r["during"]] = during.get(r["during"], 0) + 1
            failed += "error" in r
        jobs_out: dict[str, Any] = {}
        outcomes: dict[str, int] = {}
        for w in self.scn.work:
            if w.kind == "command":
                continue
            job = state.get("jobs", {}).get(w.id, {})
            counts: dict[str, int] = {}
            final: dict[str, int] = {}
            last: dict[str, dict] = {}
            for row in state.get("executions", {}).get(w.id, []):
                s = row["jobExecutionSummary"]
                counts[s["status"]] = counts.get(s["status"], 0) + 1
                t = _name(row["thingArn"])
                if t not in last or s["executionNumber"] > last[t]["executionNumber"]:
                    last[t] = s
            for s in last.values():
                final[s["status"]] = final.get(s["status"], 0) + 1
                outcomes[s["status"]] = outcomes.get(s["status"], 0) + 1
            jobs_out[w.id] = {"kind": w.kind, "status": job.get("status"),
                              "reason": job.get("reasonCode"),
                              "things": final, "attempts": counts,
                              "took_s": (round(self.finished[w.id] - self.created[w.id], 1)
                                         if w.id in self.finished and w.id in self.created
                                         else None),
                              "unreleased": len(self.scn.target_things(w)) - len(last),
                              "not_succeeded": state.get("reasons", {}).get(w.id, {})}
        cmd_out: dict[str, dict] = {}
        for cx in state.get("commands", []):
            wid = self.command_executions.get(cx["executionId"], ("?",))[0]
            d = cmd_out.setdefault(wid, {})
            d[cx["status"]] = d.get(cx["status"], 0) + 1
        violations = [{"invariant": c.name, "detail": v} for c in checks for v in c.violations]
        if self.errors:
            violations += [{"invariant": "run", "detail": e} for e in self.errors]
        if not drained:
            violations.append({"invariant": "drain", "detail": f"not drained within "
                               f"{self.scn.limits.drain:g} s"})
        if failed:
            violations.append({"invariant": "faults", "detail": f"{failed} fault(s) could not "
                               "be injected"})
        return {
            "scenario": self.scn.name, "seed": self.seed, "devices": self.scn.devices,
            "image": self.scn.image, "tls": self.scn.tls, "fleet": self.remote or "its own",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "runtime_s": round(time.time() - started, 1),
            "boot_s": boot_s and round(boot_s, 1),
            "faults": {"planned": len(self.faults), "injected": len(self.injected),
                       "write_cuts_fired": write_cuts(state.get("logs", {})),
                       "power_cuts_missed": sum("missed" in r for r in self.injected),
                       "by_kind": dict(sorted(by_kind.items())), "power_cuts_during":
                           dict(sorted(during.items())), "failed": failed,
                       "schedule_sha256": schedule_digest(self.faults),
                       "log": self.injected},
            "rollout_minutes": self.minutes,
            "jobs": jobs_out, "outcomes": dict(sorted(outcomes.items())), "commands": cmd_out,
            "drained": drained,
            "drain_after_last_fault_s": drain_s and round(drain_s, 1),
            # the last fault's end is its injection, or for a blackhole or a slow link the
            # moment the link came back
            "last_fault_injected_at_s": round(max((r["injected_at"] for r in self.injected),
                                                  default=0.0), 1),
            "last_fault_ended_at_s": round(self.last_fault_end, 1),
            "drained_at_s": self.drained_at and round(self.drained_at, 1),
            "invariants": [{"name": c.name, "what": c.what, "checked": c.count,
                            "violations": len(c.violations), **({"notes": c.notes} if c.notes else {})}
                           for c in checks],
            "violations": violations,
            "ok": not violations and bool(checks),
        }


def check_expectations(scn: Scenario, jobs: dict[str, dict], executions: dict[str, list[dict]]) -> Check:
    """What the scenario says a work item must end as (`expect`): the job's status, how many
    things SUCCEEDED ("all": every target)."""
    c = Check("expect", "every work item ended as the scenario expects")
    succeeded = _succeeded(executions)
    for w in scn.work:
        if not w.expect or w.kind == "command":
            continue
        c.count += 1
        job = jobs.get(w.id, {})
        if "job" in w.expect and job.get("status") != w.expect["job"]:
            c.bad(f"{w.id}: job {job.get('status')}, expected {w.expect['job']}")
        want = w.expect.get("succeeded")
        if want is not None:
            n = len(succeeded.get(w.id, ()))
            need = len(scn.target_things(w)) if want == "all" else want
            if n != need:
                c.bad(f"{w.id}: {n} thing(s) SUCCEEDED, expected {need}")
    return c


def schedule_digest(faults: list[Fault]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([f.as_json() for f in faults]).encode()).hexdigest()


def _succeeded(executions: dict[str, list[dict]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for job_id, rows in executions.items():
        for row in rows:
            if row["jobExecutionSummary"]["status"] == "SUCCEEDED":
                out.setdefault(job_id, set()).add(_name(row["thingArn"]))
    return out


def _vkey(v: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", v))


def _running_version(flash: str) -> str:
    """The firmware version the device boots (its OTA folder, as the bootloader sees it)."""
    from .devsim import ota_dir

    image = boot_choice(ota_dir(flash))[1]
    return image["version"] if image else FACTORY_VERSION


def _app_version(flash: str) -> Optional[str]:
    """The version of the application the device runs, None without one."""
    try:
        with open(os.path.join(flash, "app.d", "state.json")) as f:
            st = json.load(f)
        return st.get("ver", {}).get(st.get("cur"))
    except (OSError, ValueError, AttributeError):
        return None


def _ota_dir(d: Any) -> str:
    from .devsim import ota_dir

    return ota_dir(d.flash)


_WRITE_CUT = re.compile(r"devsim: power cut at flash write \d+ \(\w+ (.*)\)")


def write_cuts(logs: dict[str, str]) -> dict[str, int]:
    """The power cuts at a flash write that fired (devsim logs them), by what was written."""
    out: dict[str, int] = {}
    for log in logs.values():
        for path in _WRITE_CUT.findall(log):
            if ".ota/ota_" in path:
                what = "OTA slot"
            elif "otadata" in path:
                what = "otadata"
            elif path.startswith("journal.json"):
                what = "journal"
            elif path.startswith("commands.json"):
                what = "commands journal"
            elif path.startswith("app.d"):
                what = "app"
            elif path.startswith("data") or path.endswith(".part"):
                what = "download"
            elif "effects.log" in path:
                what = "effect"
            else:
                what = "other"
            out[what] = out.get(what, 0) + 1
    return dict(sorted(out.items()))


def _halted(log_tail: str) -> bool:
    """devsim's log ends with it halting (a bricked board, or a boot it could not make)."""
    lines = [ln for ln in log_tail.splitlines() if ln.startswith("devsim:")]
    return bool(lines) and lines[-1].rstrip().endswith("halted")


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [ln for ln in f.read().splitlines() if ln]
    except OSError:
        return []


# -- the report and the command line --------------------------------------------------------------
def format_report(r: dict) -> str:
    out = [f"soak report: scenario {r['scenario']}, seed {r['seed']}, {r['devices']} devices, "
           f"{r['runtime_s']} s"]
    f = r["faults"]
    out.append(f"faults: {f['injected']} injected of {f['planned']} planned: "
               + ", ".join(f"{k} {v}" for k, v in f["by_kind"].items()))
    if f["power_cuts_during"]:
        out.append("power cuts during: " + ", ".join(f"{k} {v}" for k, v in
                                                     f["power_cuts_during"].items())
                   + "; at a flash write, fired: " + (", ".join(
                       f"{k} {v}" for k, v in (f.get("write_cuts_fired") or {}).items()) or "none")
                   + f"; between two boots (nothing to cut): {f.get('power_cuts_missed', 0)}")
    out.append(f"rollout minutes: {r['rollout_minutes']}")
    for j, d in r["jobs"].items():
        out.append(f"job {j} ({d['kind']}): {d['status']}"
                   + (f" {d['reason']}" if d.get("reason") else "") + "; things "
                   + (", ".join(f"{k} {v}" for k, v in sorted(d["things"].items())) or "none")
                   + (f"; {d['unreleased']} unreleased" if d["unreleased"] else "")
                   + (f"; done {d['took_s']} s after its creation" if d.get("took_s") is not None
                      else ""))
        for why, n in sorted((d.get("not_succeeded") or {}).items()):
            out.append(f"    {n} x {why}")
    for c, d in r["commands"].items():
        out.append(f"command {c}: " + ", ".join(f"{k} {v}" for k, v in sorted(d.items())))
    out.append(f"drained: {'yes' if r['drained'] else 'NO'}"
               + (f", {r['drain_after_last_fault_s']} s after the last fault (the last "
                  f"injected at {r.get('last_fault_injected_at_s')} s, ended at "
                  f"{r.get('last_fault_ended_at_s')} s; drained at {r.get('drained_at_s')} s)"
                  if r["drain_after_last_fault_s"] is not None else ""))
    for c in r["invariants"]:
        out.append(f"  {'ok  ' if not c['violations'] else 'FAIL'} {c['what']}: {c['checked']} "
                   f"checked, {c['violations']} violation(s)"
                   + (f" ({', '.join(f'{k} {v}' for k, v in c['notes'].items())})"
                      if c.get("notes") else ""))
    for v in r["violations"]:
        out.append(f"  violation [{v['invariant']}] {v['detail']}")
    out.append(f"result: {'PASS' if r['ok'] else 'FAIL'} ({len(r['violations'])} violation(s))")
    return "\n".join(out)


DEFAULT_REPORT = os.path.join(BUILD, "soak.json")


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="the scenario file (JSON; scenarios/*.json)")
    p.add_argument("--seed", type=int, help="the fault schedule's seed (default: the scenario's)")
    p.add_argument("--report", default=DEFAULT_REPORT,
                   help=f"write the report here as JSON (default {os.path.relpath(DEFAULT_REPORT, ROOT)})")
    p.add_argument("--workdir", help="the run's folder: keys, images, bundles and (its own fleet) "
                                     "the fleet (default build/soak/<scenario>-<seed>, emptied first)")
    p.add_argument("--fleet", metavar="DIR",
                   help="play on the fleet `tools/fleet up --dir DIR` runs (default for "
                        "`tools/fleet run`: the one in build/fleet if it runs, else a fleet of "
                        "its own, started and stopped by the run)")
    p.add_argument("--own-fleet", action="store_true",
                   help="start a fleet of its own even when one runs")
    p.add_argument("--schedule", action="store_true",
                   help="print the fault schedule and exit (nothing is started)")


def main_run(args: argparse.Namespace) -> int:
    """`tools/fleet run SCENARIO [--seed N] [--report PATH]`: play it, print and write the
    report; 0 only when every invariant holds (2: the scenario cannot be played)."""
    try:
        scn = load_scenario(args.scenario)
    except ScenarioError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    seed = scn.seed if getattr(args, "seed", None) is None else args.seed
    if getattr(args, "schedule", False):
        for f in schedule(scn, seed):
            print(json.dumps(f.as_json()))
        return 0
    fleet_dir = getattr(args, "fleet", None)
    if fleet_dir is None and getattr(args, "auto_fleet", True) and not getattr(args, "own_fleet", False):
        from .fleet_cli import DEFAULT_DIR

        fleet_dir = DEFAULT_DIR if running_fleet(DEFAULT_DIR) else None
    elif fleet_dir is not None and not running_fleet(fleet_dir):
        print(f"soak: no fleet runs in {fleet_dir} (tools/fleet up --dir {fleet_dir} starts one)",
              file=sys.stderr)
        return 2
    workdir = getattr(args, "workdir", None) or os.path.join(BUILD, "soak", f"{scn.name}-{seed}")
    if os.path.isdir(workdir):
        import shutil

        shutil.rmtree(workdir)
    print(f"soak: seed {seed} (replay: --seed {seed})", flush=True)
    soak = Soak(scn, seed, workdir, log=lambda s: print(s, flush=True),
                fleet_dir=os.path.abspath(fleet_dir) if fleet_dir else None)
    old = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = soak.run()
    except ScenarioError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, old)
    report["workdir"] = workdir
    path = getattr(args, "report", None) or DEFAULT_REPORT
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(format_report(report), flush=True)
    print(f"soak: report written to {path}", flush=True)
    return 0 if report["ok"] else 1


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/soak", description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    ap.set_defaults(auto_fleet=False)  # tools/soak starts its own fleet unless --fleet says
    return main_run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
