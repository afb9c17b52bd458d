"""The chaos soak (tools/iotjobs_host/soak.py): the scenario parser (a bad file is refused with
the member it names and why), the seeded fault schedule (a pure function of scenario and seed),
every invariant checker against a crafted bad state (each can fail), and the short soak itself
(scenarios/soak-short.json: 10 devices, more than 100 faults, about 2 minutes) as one system
test that must pass with no violation. Pinned seeds of violations found by the soak follow at the
end, marked xfail(strict=True) with the bug until it is fixed (all fixed so far: seeds 16,
4, 10/8 (the resume past the end) and both of seed 1000)."""
from __future__ import annotations

import copy
import json
import os
import random
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from iotjobs_host import soak
from iotjobs_host.devsim import make_image, provision_ota

SCENARIOS = os.path.join(ROOT, "scenarios")
MINIMAL = {"fleet": {"devices": 4}, "work": [{"id": "a", "kind": "demo"}]}


def scenario(**over) -> dict:
    d = copy.deepcopy(MINIMAL)
    d.update(over)
    return d


def parse(obj) -> soak.Scenario:
    return soak.parse_scenario(obj, "s.json", "s")


def refused(obj) -> str:
    with pytest.raises(soak.ScenarioError) as e:
        parse(obj)
    return str(e.value)


# -- the scenario parser --------------------------------------------------------------------------
def test_minimal_scenario_takes_the_defaults():
    s = parse(MINIMAL)
    assert (s.name, s.devices, s.image, s.tls, s.seed) == ("s", 4, "fleet32", True, 1)
    assert s.things() == ["dev-001", "dev-002", "dev-003", "dev-004"]
    (w,) = s.work
    assert (w.id, w.kind, w.at, w.targets, w.steps) == ("a", "demo", 0.0, "all", 3)
    assert s.faults.count == 0 and s.limits.drain == 300


def test_shipped_scenarios_parse_and_say_what_the_issue_asks():
    short = soak.load_scenario(os.path.join(SCENARIOS, "soak-short.json"))
    assert short.devices == 10 and short.faults.count >= 100
    full = soak.load_scenario(os.path.join(SCENARIOS, "soak.json"))
    assert full.devices == 50 and full.faults.count >= 1000
    assert {w.kind for w in full.work} == set(soak.WORK_KINDS)
    assert {k for k, v in full.faults.rates.items() if v} == set(soak.FAULT_KINDS)
    assert any(w.kind == "ota" and w.bad for w in full.work)
    rollout = soak.load_scenario(os.path.join(SCENARIOS, "rollout.json"))
    (w,) = rollout.work
    assert rollout.devices == 50 and w.kind == "ota" and not w.bad and w.targets == "all"
    assert w.campaign["jobExecutionsRolloutConfig"] and w.expect == {"job": "COMPLETED",
                                                                     "succeeded": "all"}


@pytest.mark.parametrize("obj, message", [
    ([1], "s.json: must be a JSON object, not a list"),
    ({"work": []}, "s.json: fleet: is required"),
    (scenario(fleet={"devices": 0}), "s.json: fleet.devices: must be 1..100, not 0"),
    (scenario(fleet={"devices": "4"}), "s.json: fleet.devices: must be a whole number, not the "
                                       "string '4'"),
    (scenario(fleet={"devices": 4, "image": "esp32"}), "s.json: fleet.image: must be one of "
                                                       "fleet32, stock32, pip, not 'esp32'"),
    (scenario(fleet={"devices": 4, "tls": "yes"}), "s.json: fleet.tls: must be true or false"),
    (scenario(fleet={"devices": 4, "devcies": 5}), "s.json: fleet.devcies: is not a member"),
    (scenario(work=[]), "s.json: work: must be a non-empty list of work items"),
    ({"fleet": {"devices": 4}}, "s.json: work: is required"),
    (scenario(work=[{"id": "a", "kind": "flash"}]), "s.json: work[0].kind: must be one of demo, "
                                                    "effect, download, ota, app, reboot, command, "
                                                    "not 'flash'"),
    (scenario(work=[{"kind": "demo"}]), "s.json: work[0].id: is required"),
    (scenario(work=[{"id": "a b", "kind": "demo"}]), "s.json: work[0].id: must be 1..40 of"),
    (scenario(work=[{"id": "a", "kind": "demo"}, {"id": "a", "kind": "reboot"}]),
     "s.json: work[1].id: 'a' is used by another work item"),
    (scenario(work=[{"id": "a", "kind": "ota"}]), "s.json: work[0].version: is required"),
    (scenario(work=[{"id": "a", "kind": "ota", "version": "two"}]),
     "s.json: work[0].version: must be a version such as 2.0.0, not 'two'"),
    (scenario(work=[{"id": "a", "kind": "ota", "verison": "2.0"}]), "s.json: work[0].version: "
                                                                    "is required"),
    (scenario(work=[{"id": "a", "kind": "ota", "version": "2.0", "verison": "2.0"}]),
     "s.json: work[0].verison: is not a member this object has"),
    (scenario(work=[{"id": "a", "kind": "demo", "steps": 101}]),
     "s.json: work[0].steps: must be 0..100, not 101"),
    (scenario(work=[{"id": "a", "kind": "demo", "protocol": "mqtt"}]),
     "s.json: work[0].protocol: is not a member"),
    (scenario(work=[{"id": "a", "kind": "download", "protocol": "ftp"}]),
     "s.json: work[0].protocol: must be one of http, mqtt, not 'ftp'"),
    (scenario(work=[{"id": "a", "kind": "download", "path": "../etc/passwd"}]),
     "s.json: work[0].path: must be a relative path"),
    (scenario(work=[{"id": "a", "kind": "demo", "targets": {"count": 5}}]),
     "s.json: work[0].targets.count: must be 1..4 (the fleet's size)"),
    (scenario(work=[{"id": "a", "kind": "demo", "targets": "some"}]),
     's.json: work[0].targets: must be "all", {"count": N}, {"group": NAME} or {"things": [...]}'),
    (scenario(work=[{"id": "a", "kind": "demo", "targets": {"group": "canary"}}]),
     "s.json: work[0].targets.group: 'canary' is not a group of the scenario (groups: none)"),
    (scenario(work=[{"id": "a", "kind": "demo", "targets": {"things": ["dev-009"]}}]),
     "s.json: work[0].targets.things: 'dev-009' is not a thing of this fleet (dev-001 .. dev-004)"),
    (scenario(groups={"canary": {"count": 2, "things": ["dev-001"]}}),
     "s.json: groups.canary: give either count or things"),
    (scenario(work=[{"id": "a", "kind": "demo", "campaign": {"rollout": {}}}]),
     "s.json: work[0].campaign.rollout: is not a campaign option (known: "
     "jobExecutionsRolloutConfig, abortConfig, jobExecutionsRetryConfig, timeoutConfig)"),
    (scenario(work=[{"id": "a", "kind": "demo", "campaign": {"abortConfig": []}}]),
     "s.json: work[0].campaign.abortConfig: must be a JSON object, not a list"),
    (scenario(work=[{"id": "a", "kind": "command", "command": "ping", "repeat": 0}]),
     "s.json: work[0].repeat: must be 1..1000, not 0"),
    (scenario(work=[{"id": "a", "kind": "demo", "expect": {"succeeded": "most"}}]),
     's.json: work[0].expect.succeeded: must be "all" or a whole number'),
    (scenario(faults={"count": 5}), "s.json: faults.rates: 5 faults need at least one kind with "
                                    "a rate above 0"),
    (scenario(faults={"count": 5, "rates": {"meteor": 1}}),
     "s.json: faults.rates.meteor: is not a fault kind (kinds: power_cut, power_cut_at_write, "
     "link_cut, blackhole, slow_link, broker_restart, jobsd_restart)"),
    (scenario(faults={"count": 5, "rates": {"power_cut": -1}}),
     "s.json: faults.rates.power_cut: must be 0..1e+06, not -1"),
    (scenario(faults={"count": 5, "window": 100, "rates": {"power_cut": 1}},
              limits={"duration": 60}),
     "s.json: faults.window: faults end at 100 s, after limits.duration (60 s)"),
    (scenario(work=[{"id": "a", "kind": "demo", "at": 200}]),
     "s.json: work[0].at: 200 s is after limits.duration (120 s)"),
    (scenario(limits={"drain": 0}), "s.json: limits.drain: must be 1..86400, not 0"),
    (scenario(seeds=3), "s.json: seeds: is not a member this object has"),
])
def test_bad_scenarios_are_refused_precisely(obj, message):
    assert refused(obj).startswith(message)


def test_bad_files_are_refused_precisely(tmp_path):
    with pytest.raises(soak.ScenarioError, match=r"missing.json: cannot read it"):
        soak.load_scenario(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"fleet": {"devices": 4},\n "work": [}\n')
    with pytest.raises(soak.ScenarioError, match=r"bad.json: not JSON: .*line 2 column 11"):
        soak.load_scenario(str(bad))


def test_groups_and_targets_resolve():
    s = parse(scenario(groups={"canary": {"count": 2}, "late": {"things": ["dev-004"]}}, work=[
        {"id": "a", "kind": "demo", "targets": {"group": "canary"}},
        {"id": "b", "kind": "demo", "targets": {"count": 3}},
        {"id": "c", "kind": "demo", "targets": {"things": ["dev-002", "dev-004"]}},
        {"id": "d", "kind": "demo", "targets": {"group": "late"}}]))
    assert s.groups == {"canary": ["dev-001", "dev-002"], "late": ["dev-004"]}
    assert [s.target_things(w) for w in s.work] == [
        ["dev-001", "dev-002"], ["dev-001", "dev-002", "dev-003"], ["dev-002", "dev-004"],
        ["dev-004"]]
    assert s.targets(s.work[0]) == ([], ["canary"])


# -- the seeded schedule --------------------------------------------------------------------------
FAULTY = scenario(fleet={"devices": 20}, faults={
    "count": 300, "start": 5, "window": 100, "write_max": 25, "blackhole_seconds": 30,
    "rates": {"power_cut": 3, "power_cut_at_write": 2, "link_cut": 1, "blackhole": 1,
              "slow_link": 1, "broker_restart": 0.5, "jobsd_restart": 0.5}})


def test_same_seed_same_schedule_different_seed_different():
    s = parse(FAULTY)
    a = soak.schedule(s, 7)
    random.seed(123)  # the global generator has no say
    random.random()
    assert soak.schedule(parse(copy.deepcopy(FAULTY)), 7) == a
    assert soak.schedule_digest(soak.schedule(s, 7)) == soak.schedule_digest(a)
    b = soak.schedule(s, 8)
    assert b != a and soak.schedule_digest(b) != soak.schedule_digest(a)


def test_schedule_is_what_the_scenario_says():
    s = parse(FAULTY)
    plan = soak.schedule(s, 11)
    assert len(plan) == 300
    assert [f.at for f in plan] == sorted(f.at for f in plan)
    assert all(5 <= f.at < 105 for f in plan)
    assert {f.kind for f in plan} == set(soak.FAULT_KINDS)  # 300 draws: every kind comes up
    things = set(s.things())
    for f in plan:
        if f.kind in soak.DEVICE_FAULTS:
            assert f.target in things, f
        else:
            assert f.target is None, f
        if f.kind == "power_cut_at_write":
            assert isinstance(f.arg, int) and 1 <= f.arg <= 25
        if f.kind == "blackhole":
            assert f.arg == 30
    kinds = [f.kind for f in plan]
    # the rates are weights: power cuts (3) far outnumber broker restarts (0.5)
    assert kinds.count("power_cut") > 2 * kinds.count("broker_restart")
    only = parse(scenario(faults={"count": 50, "rates": {"link_cut": 1, "power_cut": 0}}))
    assert {f.kind for f in soak.schedule(only, 1)} == {"link_cut"}
    assert soak.schedule(parse(MINIMAL), 1) == []


def test_schedule_command_prints_it(capsys, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(FAULTY))
    assert soak.main([str(path), "--seed", "5", "--schedule"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines == [f.as_json() for f in soak.schedule(parse(FAULTY), 5)]


def test_a_bad_scenario_exits_2(capsys, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(scenario(fleet={"devices": 0})))
    assert soak.main([str(path)]) == 2
    assert "fleet.devices: must be 1..100, not 0" in capsys.readouterr().err


# -- the invariant checkers, each against a state that breaks it ----------------------------------
def row(thing, status, n=1, started=True):
    s = {"status": status, "executionNumber": n, "retryAttempt": n - 1, "queuedAt": 1}
    if started:
        s["startedAt"] = 2
    return {"thingArn": f"arn:aws:iot:us-east-1:123456789012:thing/{thing}",
            "jobExecutionSummary": s}


def test_check_executions():
    jobs = {"j": {"status": "COMPLETED"}, "w": {"status": "SCHEDULED"}}
    ok = soak.check_executions(jobs, {"j": [row("a", "SUCCEEDED"), row("b", "CANCELED", started=False)],
                                      "w": [row("a", "QUEUED", started=False)]},
                               [{"executionId": "e1", "status": "TIMED_OUT"}])
    assert ok.ok and ok.count == 4
    bad = soak.check_executions({"j": {"status": "IN_PROGRESS", "isConcurrent": True}},
                                {"j": [row("a", "SUCCEEDED"), row("b", "IN_PROGRESS"),
                                       row("c", "QUEUED", started=False)]},
                                [{"executionId": "e2", "status": "IN_PROGRESS",
                                  "targetArn": "arn:x:thing/c", "commandArn": "arn:x:command/p"}])
    assert len(bad.violations) == 4, bad.violations
    assert "j on b #1: IN_PROGRESS" in bad.violations[0]
    assert "still rolling out" in bad.violations[2]
    assert "command p execution e2 on c: IN_PROGRESS" in bad.violations[3]


def test_check_effects_finds_a_duplicated_effect():
    ex = {"fx": [row("a", "SUCCEEDED"), row("b", "SUCCEEDED"), row("c", "FAILED"),
                 row("c", "SUCCEEDED", 2), row("d", "CANCELED", started=False)]}
    good = {"a": ["fx"], "b": ["other", "fx"], "c": ["fx", "fx"]}
    c = soak.check_effects(good, ex, ["fx"])
    assert c.ok and c.count == 4, c.violations
    c = soak.check_effects({**good, "a": ["fx", "fx"]}, ex, ["fx"])
    assert c.violations == ["fx on a: applied 2 times by 1 started execution(s) (SUCCEEDED)"]
    c = soak.check_effects({**good, "b": []}, ex, ["fx"])
    assert c.violations == ["fx on b: 1 execution(s) SUCCEEDED but the effect was applied 0 time(s)"]
    c = soak.check_effects({**good, "d": ["fx"]}, ex, ["fx"])
    assert c.violations == ["fx on d: applied 1 times by 0 started execution(s) (CANCELED)"]
    # commands: an execution id at most once, and once when SUCCEEDED
    c = soak.check_effects({}, {}, [], {"a": ["e1", "e2", "e1"]}, {"e1": "SUCCEEDED",
                                                                   "e3": "SUCCEEDED",
                                                                   "e4": "TIMED_OUT"})
    assert c.violations == ["command execution e1 on a: applied 2 times",
                            "command execution e3 SUCCEEDED but its effect was never applied"]


def test_check_downloads(tmp_path):
    import hashlib

    (tmp_path / "a" / "data" / "soak").mkdir(parents=True)
    (tmp_path / "a" / "data" / "soak" / "x.bin").write_bytes(b"hello")
    sha = hashlib.sha256(b"hello").hexdigest()
    flashes = {"a": str(tmp_path / "a")}
    assert soak.check_downloads(flashes, {"a": [("dl", "soak/x.bin", sha)]}).ok
    c = soak.check_downloads(flashes, {"a": [("dl", "soak/x.bin", "0" * 64),
                                             ("dl2", "soak/y.bin", sha)]})
    assert len(c.violations) == 2 and "data/soak/y.bin is missing" in c.violations[1]


def req(seq, thing, job, token, status, n=1):
    return {"seq": seq, "thing": thing, "job": job, "token": token, "status": status, "n": n}


def rep(seq, thing, job, token):
    return {"seq": seq, "thing": thing, "job": job, "token": token}


def test_check_terminal_updates_finds_two_accepted():
    requests = [req(1, "a", "j", "t1", "IN_PROGRESS"), req(3, "a", "j", "t2", "SUCCEEDED"),
                req(5, "a", "j", "t3", "SUCCEEDED"),  # a resend: rejected, no accepted reply
                req(6, "b", "j", "t1", "FAILED"), req(8, "b", "j", "t4", "SUCCEEDED", 2)]
    replies = [rep(2, "a", "j", "t1"), rep(4, "a", "j", "t2"), rep(4, "a", "j", "t2"),  # a dup
               rep(7, "b", "j", "t1"), rep(9, "b", "j", "t4"), rep(10, "c", "j", "zz")]
    c = soak.check_terminal_updates(requests, replies)
    assert c.ok and c.count == 3 and c.notes == {"unmatched replies": 1}, c
    c = soak.check_terminal_updates(requests + [req(11, "a", "j", "t5", "FAILED")],
                                    replies + [rep(12, "a", "j", "t5")])
    assert c.violations == ["j on a #1: 2 terminal updates accepted (clientTokens t2, t5)",
                            "j on a #1: the device reported SUCCEEDED then FAILED"]
    # an outcome the service never acknowledged, then another one for the same execution
    c = soak.check_terminal_updates(requests + [req(11, "b", "j", "t6", "REJECTED", 2)], replies)
    assert c.violations == ["j on b #2: the device reported SUCCEEDED then REJECTED"], c.violations


def ota_folder(tmp_path, name="dev.ota"):
    folder = str(tmp_path / name)
    provision_ota(folder)
    return folder


def install(folder, slot, version, state, boot=True, **flags):
    with open(os.path.join(folder, slot + ".bin"), "wb") as f:
        f.write(make_image(version, payload=b"x" * 100, **flags))
    path = os.path.join(folder, "otadata.json")
    od = json.load(open(path)) if os.path.exists(path) else {"seq": 0, "boot": None, "state": {}}
    od["state"][slot] = state
    if boot:
        od["boot"] = slot
    with open(path, "w") as f:
        json.dump(od, f)


def test_check_firmware(tmp_path):
    factory = ota_folder(tmp_path, "f.ota")
    updated = ota_folder(tmp_path, "u.ota")
    install(updated, "ota_1", "2.0.0", "VALID")
    rolled = ota_folder(tmp_path, "r.ota")
    install(rolled, "ota_1", "3.0.0", "ABORTED", selftest="fail")
    good = {"f": {"ota": factory, "expected": "1.0.0", "log": "devsim: bootloader: ota_0 version "
                                                             "1.0.0 (UNDEFINED)\n"},
            "u": {"ota": updated, "expected": "2.0.0"},
            "r": {"ota": rolled, "expected": "1.0.0"}}
    c = soak.check_firmware(good)
    assert c.ok and c.count == 3, c.violations
    # the version of the last successful OTA is not what boots
    assert soak.check_firmware({"u": {"ota": updated, "expected": "2.1.0"}}).violations == [
        "u: boots 2.0.0 from ota_1, but its last successful OTA installed 2.1.0"]
    # the last boot ran another version than the files say
    c = soak.check_firmware({"f": {**good["f"], "log": "devsim: bootloader: ota_1 version 2.0.0 "
                                                       "(VALID)\n"}})
    assert c.violations == ["f: its last boot ran 2.0.0 from ota_1, not 1.0.0"]
    # an image still on trial (pending verify) would be rolled back at the next boot
    trial = ota_folder(tmp_path, "t.ota")
    install(trial, "ota_1", "2.0.0", "PENDING_VERIFY")
    assert soak.check_firmware({"t": {"ota": trial, "expected": "2.0.0"}}).violations == [
        "t: boots 1.0.0 from ota_0, but its last successful OTA installed 2.0.0"]
    new = ota_folder(tmp_path, "n.ota")
    install(new, "ota_1", "2.0.0", "NEW")
    assert soak.check_firmware({"n": {"ota": new, "expected": "2.0.0"}}).violations == [
        "n: ota_1 boots next in state NEW (an update still on trial)"]
    # a corrupted image is never booted; nothing bootable at all is a violation
    broken = ota_folder(tmp_path, "b.ota")
    with open(os.path.join(broken, "ota_0.bin"), "r+b") as f:
        f.seek(5000)
        f.write(b"\0\0\0")
    assert soak.check_firmware({"b": {"ota": broken, "expected": "1.0.0"}}).violations == [
        "b: no bootable image (nothing bootable)"]
    # an image that fails its self-test, marked valid (what the bootloader would run)
    bad = ota_folder(tmp_path, "x.ota")
    install(bad, "ota_1", "3.0.0", "VALID", selftest="fail")
    assert soak.check_firmware({"x": {"ota": bad, "expected": "3.0.0"}}).violations == [
        "x: boots an image that fails its self-test (3.0.0)"]


def test_check_apps(tmp_path):
    (tmp_path / "a" / "app.d").mkdir(parents=True)
    st = {"v": 1, "seq": 2, "cur": "b", "prev": "a", "ver": {"a": "1.0", "b": "1.1"},
          "trial": False, "tries": 0, "failed": None}
    (tmp_path / "a" / "app.d" / "state.json").write_text(json.dumps(st))
    (tmp_path / "n").mkdir()
    devices = {"a": {"flash": str(tmp_path / "a"), "expected": "1.1"},
               "n": {"flash": str(tmp_path / "n"), "expected": None}}
    assert soak.check_apps(devices).ok
    c = soak.check_apps({"a": {"flash": str(tmp_path / "a"), "expected": "1.2"},
                         "n": {"flash": str(tmp_path / "n"), "expected": "1.0"}})
    assert c.violations == [
        "a: runs application 1.1, but its last successful app-update installed 1.2",
        "n: runs application None, but its last successful app-update installed 1.0"]
    (tmp_path / "a" / "app.d" / "state.json").write_text(json.dumps({**st, "trial": True}))
    assert soak.check_apps({"a": devices["a"]}).violations == ["a: application 1.1 is still on trial"]


JOURNAL = {"ver": 1, "boot": 3, "oom": 0, "job": None, "out": None, "done": ["j:1:SUCCEEDED"]}


def flash_with(tmp_path, name, **files):
    d = tmp_path / name
    d.mkdir()
    for fname, content in files.items():
        (d / fname.replace("__", ".")).write_text(content if isinstance(content, str)
                                                  else json.dumps(content))
    return str(d)


def test_check_journals_finds_one_that_does_not_parse(tmp_path):
    good = flash_with(tmp_path, "good", journal__json=JOURNAL, commands__json=JOURNAL)
    nocmd = flash_with(tmp_path, "nocmd", journal__json=JOURNAL)
    c = soak.check_journals({"good": good, "nocmd": nocmd})
    assert c.ok and c.count == 3, c.violations
    torn = flash_with(tmp_path, "torn", journal__json='{"ver": 1, "boot": 3, "job": nu')
    fmt = flash_with(tmp_path, "fmt", journal__json={**JOURNAL, "ver": 2})
    job = flash_with(tmp_path, "job", journal__json={**JOURNAL, "job": {"id": "j", "n": 1}})
    out = flash_with(tmp_path, "out", journal__json=JOURNAL,
                     commands__json={**JOURNAL, "out": ["e", 1, "SUCCEEDED"]})
    busy = flash_with(tmp_path, "busy", journal__json={**JOURNAL, "out": [
        "j", 1, "SUCCEEDED", None, 2]})
    missing = flash_with(tmp_path, "missing")
    c = soak.check_journals({"torn": torn, "fmt": fmt, "job": job, "out": out, "busy": busy,
                             "missing": missing})
    assert len(c.violations) == 6, c.violations
    v = {x.split(":", 1)[0]: x for x in c.violations}
    assert v["torn"].startswith("torn: journal.json does not parse: ")
    assert v["fmt"] == "fmt: journal.json: unknown journal format"
    assert v["job"] == "job: journal.json: bad job entry"
    assert v["out"] == "out: commands.json: bad outbox entry"
    assert v["busy"].startswith("busy: journal.json still holds work after the drain")
    assert v["missing"] == "missing: journal.json is missing (every boot writes it)"
    assert soak.journal_idle(good) and not soak.journal_idle(busy)


def test_check_counters_finds_a_mismatch():
    ex = {"j": [row("a", "SUCCEEDED"), row("b", "FAILED"), row("b", "SUCCEEDED", 2)]}
    counts = {"numberOfSucceededThings": 2, "numberOfFailedThings": 1, "numberOfQueuedThings": 0}
    assert soak.check_counters({"j": {"jobProcessDetails": counts}}, ex).ok
    c = soak.check_counters({"j": {"jobProcessDetails": {**counts, "numberOfFailedThings": 0,
                                                         "numberOfQueuedThings": 1}}}, ex)
    assert c.violations == ["j: numberOfFailedThings 0 but 1 listed; numberOfQueuedThings 1 but "
                            "0 listed"]


def test_check_parts_finds_an_orphan(tmp_path):
    clean = flash_with(tmp_path, "clean", journal__json=JOURNAL)
    orphan = flash_with(tmp_path, "orphan")
    os.makedirs(os.path.join(orphan, "data", "soak"))
    with open(os.path.join(orphan, "data", "soak", "dl.bin.part"), "wb") as f:
        f.write(b"x" * 10)
    assert soak.check_parts({"clean": clean}).ok
    assert soak.check_parts({"clean": clean, "orphan": orphan}).violations == [
        "orphan: data/soak/dl.bin.part (10 bytes)"]


def test_check_leaks_finds_a_process_and_a_port():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    s = socket.create_server(("127.0.0.1", 0))
    try:
        port = s.getsockname()[1]
        started = soak.proc_start_time(p.pid)
        assert started is not None
        c = soak.check_leaks([(p.pid, started, "sleeper")], [(port, "listener")])
        assert c.violations == [f"sleeper (pid {p.pid}) still runs",
                                f"listener: port {port} still listens"]
        # a pid reused by another process is not ours
        assert soak.check_leaks([(p.pid, started + 1, "sleeper")], []).ok
    finally:
        p.kill()
        p.wait()
        s.close()
    c = soak.check_leaks([(p.pid, started, "sleeper")], [(port, "listener")])
    assert c.ok and c.count == 2


def test_check_expectations():
    s = parse(scenario(work=[{"id": "a", "kind": "demo", "expect": {"job": "COMPLETED",
                                                                    "succeeded": "all"}}]))
    ex = {"a": [row(t, "SUCCEEDED") for t in s.things()]}
    assert soak.check_expectations(s, {"a": {"status": "COMPLETED"}}, ex).ok
    c = soak.check_expectations(s, {"a": {"status": "CANCELED"}}, {"a": ex["a"][:3]})
    assert c.violations == ["a: job CANCELED, expected COMPLETED",
                            "a: 3 thing(s) SUCCEEDED, expected 4"]


def test_report_formats_every_part():
    r = {"scenario": "s", "seed": 3, "devices": 2, "runtime_s": 10.0,
         "faults": {"planned": 2, "injected": 2, "by_kind": {"power_cut": 2},
                    "power_cuts_during": {"ota": 1, "idle": 1}},
         "rollout_minutes": 1, "jobs": {"j": {"kind": "ota", "status": "COMPLETED", "reason": None,
                                              "things": {"SUCCEEDED": 2}, "unreleased": 0}},
         "commands": {"ping": {"SUCCEEDED": 2}}, "drained": True, "drain_after_last_fault_s": 4.2,
         "invariants": [{"name": "parts", "what": "no orphaned .part files after the drain",
                         "checked": 2, "violations": 1}],
         "violations": [{"invariant": "parts", "detail": "a: x.part (1 bytes)"}], "ok": False}
    text = soak.format_report(r)
    assert "faults: 2 injected of 2 planned: power_cut 2" in text
    assert "power cuts during: ota 1, idle 1" in text
    assert "job j (ota): COMPLETED; things SUCCEEDED 2" in text
    assert "drained: yes, 4.2 s after the last fault" in text
    assert "FAIL no orphaned .part files after the drain: 2 checked, 1 violation(s)" in text
    assert "violation [parts] a: x.part (1 bytes)" in text
    assert text.endswith("result: FAIL (1 violation(s))")


def test_write_cuts_are_told_apart_by_what_was_written():
    logs = {"a": "devsim: power cut at flash write 3 (rename journal.json.tmp)\n"
                 "devsim: power cut at flash write 9 (write /w/devices/a/flash.ota/ota_1.bin)\n",
            "b": "devsim: power cut at flash write 1 (write data/soak/x.bin.part)\n"
                 "devsim: power cut at flash write 2 (truncate commands.json.tmp)\n"
                 "devsim: power cut at flash write 2 (mkdir app.d)\n"}
    assert soak.write_cuts(logs) == {"OTA slot": 1, "app": 1, "commands journal": 1,
                                     "download": 1, "journal": 1}


# -- the short soak -------------------------------------------------------------------------------
def test_short_soak_holds_every_invariant(tmp_path):
    """scenarios/soak-short.json with its own seed: 10 devices over mutual TLS, more than 100
    faults of every kind while jobs, campaigns and commands run; every invariant holds."""
    scn = soak.load_scenario(os.path.join(SCENARIOS, "soak-short.json"))
    lines: list[str] = []
    report = soak.Soak(scn, scn.seed, str(tmp_path / "soak"), log=lines.append).run()
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=1))
    text = soak.format_report(report)
    assert report["ok"], text + "\n--- run log ---\n" + "\n".join(lines[-40:])
    assert report["faults"]["injected"] >= 100 and not report["faults"]["failed"], text
    assert set(report["faults"]["by_kind"]) == set(soak.FAULT_KINDS), text
    assert report["drained"] and report["devices"] == 10, text
    assert {c["name"] for c in report["invariants"]} >= {
        "terminal", "effects", "one-terminal", "firmware", "journals", "counters", "parts",
        "leaks"}, text
    assert all(c["checked"] > 0 for c in report["invariants"]), text


# -- pinned regressions: what the soak found ------------------------------------------------------
def _advance(jobsd, seconds: float) -> float:
    import urllib.request

    req = urllib.request.Request(jobsd.control_url + "/_jobsd/test-hooks", method="PUT",
                                 data=json.dumps({"advanceClock": seconds}).encode(),
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=30) as r:
        return json.load(r)["now"]


# Soak seed 16, fixed in jobsd/core.py: after advanceClock the timer thread kept the sleep it
# had planned on the old clock, so a deadline the move brought closer was served late.
def test_pinned_seed_16_a_deadline_brought_closer_by_advance_clock_is_served_on_time(
        tmp_path, mosquitto, procs):
    from iotjobs_host import stack

    jobsd = stack.Jobsd(str(tmp_path / "jobsd"), mosquitto.broker, extra=["--test-hooks"])
    procs.append(jobsd)
    jobsd.iot.create_thing(thingName="t1")
    arn = jobsd.iot.create_command(commandId="ping", payload={
        "content": b'{"command": "ping"}', "contentType": "application/json"})["commandArn"]
    target = jobsd.iot.describe_thing(thingName="t1")["thingArn"]
    eid = jobsd.data.start_command_execution(targetArn=target, commandArn=arn,
                                             executionTimeoutSeconds=60)["executionId"]
    _advance(jobsd, 57)  # the deadline is now 3 s away on jobsd's clock
    stack.wait_until(lambda: jobsd.iot.get_command_execution(
        executionId=eid, targetArn=target)["status"] == "TIMED_OUT", 20,
        "the command execution to time out 3 s after the clock moved", 0.2)


# Soak seed 16, fixed in jobsd/core.py and main.py: the advanceClock offset lived in memory only,
# so a restarted jobsd's clock went back behind what it had stored.
def test_pinned_seed_16_jobsd_clock_survives_a_restart(tmp_path, mosquitto, procs):
    from iotjobs_host import stack

    db = str(tmp_path / "jobsd.sqlite3")
    first = stack.Jobsd(str(tmp_path / "jobsd"), mosquitto.broker, extra=["--test-hooks"], db=db)
    procs.append(first)
    before = _advance(first, 3600)
    ports = [first.control_url.split("//")[1], first.data_url.split("//")[1]]
    first.proc.popen.kill()
    first.proc.stop()
    again = stack.Jobsd(str(tmp_path / "jobsd"), mosquitto.broker, db=db, extra=[
        "--test-hooks", "--control", ports[0], "--data", ports[1]])
    procs.append(again)
    assert _advance(again, 0) >= before


SEED_4_BUG = (  # fixed in lib/iotjobs/runner.py (Runner._subscribed)
    "lib/iotjobs bug (soak-short, seed 4: dev-008 resent its effect-2 SUCCEEDED update for ever, "
    "demo-2 and dl-2 stayed QUEUED): Runner.run() subscribes the jobs (and commands) topics only "
    "`if not t.subs`. When the link is lost in the middle of the first subscriptions of a boot "
    "(here a broker restart right after a power cut), transport.subs holds the filters "
    "subscribed so far; every reconnect restores just those, and the rest (`+/update/+`, the "
    "commands topics) are never subscribed in that boot: replies to updates never arrive, the "
    "outbox is never acknowledged, no other job starts.")


def test_pinned_seed_4_a_link_lost_during_the_first_subscriptions(
        tmp_path, mosquitto, jobsd, iot, device):
    """The link dies right after the 2nd SUBACK of the device's first connection (plain MQTT
    through the proxy: a CONNACK is 4 bytes, a SUBACK 5), then the device reconnects: it must
    still get the replies to its updates, so two jobs in a row both SUCCEED."""
    from conftest import thing_arn
    from iotjobs_host import stack
    from iotjobs_host.netproxy import Proxy

    iot.create_thing(thingName="subs-1")
    with Proxy(mosquitto.port) as proxy:
        proxy.cut_after(4 + 2 * 5)
        dev = device("subs-1", tls=False, broker=proxy.address)
        assert proxy.cut_fired.wait(60), dev.log_text()
        proxy.drop_all()  # the device sees its connection end
        proxy.restore()
        stack.wait_until(lambda: "] connected" in dev.log_text(10**6), 60, "the reconnect")
        for j in ("subs-a", "subs-b"):
            iot.create_job(jobId=j, targets=[thing_arn("subs-1")],
                           document=json.dumps({"operation": "demo", "steps": 0}))
        try:
            stack.wait_until(lambda: iot.describe_job_execution(
                jobId="subs-b", thingName="subs-1")["execution"]["status"] == "SUCCEEDED",
                40, "the second job to succeed", 0.2)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{dev.log_text(3000)}") from None


@pytest.mark.skipif(os.environ.get("IOTJOBS_SOAK_LONG") != "1",
                    reason="the whole seed-4 soak replay runs in make soak (IOTJOBS_SOAK_LONG=1); "
                    "the targeted reproduction above runs always")
def test_pinned_seed_4_soak_short(tmp_path):
    scn = soak.load_scenario(os.path.join(SCENARIOS, "soak-short.json"))
    scn.limits.drain = 90  # what is stuck stays stuck: no need to wait 5 minutes to see it
    report = soak.Soak(scn, 4, str(tmp_path / "soak"), log=lambda s: None).run()
    assert report["ok"], soak.format_report(report)


RERUN_BUG = (
    "lib/iotjobs bug (soak, seed 1000: dev-035 installed fw-2 2.0.0 and reported SUCCEEDED, "
    "the update was lost in a jobsd restart; 10 s later it asked start-next, got the same "
    "execution back, ran the OTA again and reported REJECTED DOWNGRADE, which the service "
    "kept): Runner.step() goes on to start-next in the same turn after _reconcile() resumed "
    "and finished the journal's job even when that job's outcome is still in the outbox "
    "(its _flush timed out), and run_job() treats an execution whose outcome waits in the "
    "outbox as new (finished_status looks at `done` only). The same execution runs twice: "
    "an effect applied twice, an outcome replaced by another.")


class OneJobService:
    """Plays the jobs service for one thing and one execution of an `effect` job on the plain
    listener, and loses the first terminal update (no answer at all), as a service that
    restarts at that moment does; the resend is accepted."""

    def __init__(self, port: int, thing: str) -> None:
        import threading

        import paho.mqtt.client as mqtt

        self.base = f"$aws/things/{thing}/jobs/"
        self.execution = {"jobId": "fx", "thingName": thing, "status": "IN_PROGRESS",
                          "queuedAt": 1, "startedAt": 1, "lastUpdatedAt": 1,
                          "versionNumber": 2, "executionNumber": 1,
                          "jobDocument": {"operation": "effect"}}
        self.terminal: list[str] = []  # statuses of the terminal updates, in order
        self.done = threading.Event()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="svc-" + thing)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(self.base + "#", 1)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _reply(self, topic: str, body: dict) -> None:
        self.client.publish(self.base + topic, json.dumps({**body, "timestamp": 1}), 1)

    def _on_message(self, client, userdata, msg) -> None:
        rest = msg.topic[len(self.base):]
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        token = {"clientToken": body.get("clientToken")}
        if rest == "start-next":
            ex = {} if self.done.is_set() else {"execution": self.execution}
            self._reply("start-next/accepted", {**token, **ex})
        elif rest == "fx/get":
            self._reply("fx/get/accepted", {**token, "execution": self.execution})
        elif rest == "fx/update":
            if body.get("status") in soak.TERMINAL:
                self.terminal.append(body["status"])
                if len(self.terminal) == 1:
                    return  # lost
                self.done.set()
            self._reply("fx/update/accepted", token)

    def stop(self) -> None:
        from iotjobs_host import pahofix

        self.client.disconnect()
        pahofix.loop_stop(self.client)


# fixed in lib/iotjobs/runner.py (step, run_job): RERUN_BUG is what it was
def test_pinned_seed_1000_an_outcome_waiting_in_the_outbox_is_never_run_again(
        tmp_path, mosquitto, device):
    """The device takes an `effect` job, applies the effect and loses its power (a halt right
    after the effect, then SIGKILL); after the boot it reconciles, finishes the job and sends
    SUCCEEDED, which the service never answers. It must resend that outcome, never run the
    execution again: the effect is applied once."""
    from iotjobs_host import stack

    svc = OneJobService(mosquitto.port, "fx-1")
    try:
        dev = device("fx-1", tls=False, config={"test_handlers": True,
                                                "halt_at": "handler-after-effect"})
        stack.wait_until(lambda: "@@HALT handler-after-effect" in dev.log_text(10**6), 60,
                         "the halt after the effect")
        dev.power_cut()
        assert svc.done.wait(60), (svc.terminal, dev.log_text(3000))
        with open(os.path.join(dev.flash, "effects.log")) as f:
            effects = f.read().split()
        assert effects == ["fx"], (effects, svc.terminal, dev.log_text(3000))
    finally:
        svc.stop()


SILENT_CLOSE_BUG = (
    "lib/iotjobs bug (found diagnosing soak seed 1000, whose BAD_RESPONSE failures turned out to "
    "be the Range-past-the-end bug below): http.get raised HttpError('BAD_RESPONSE', status 0) "
    "when the server closes the connection before a status line (it went away mid-request, as "
    "a killed jobsd does), and fetch_file (download-file, app-update) and the OTA's _stream "
    "treat every HttpError below 500 as final: a lost connection, which they retry with Range "
    "when it comes as an OSError, failed the job at once.")


# fixed in lib/iotjobs/http.py: a close before the status line is a lost link (OSError)
def test_pinned_seed_1000_a_server_that_closes_before_answering_is_retried(
        tmp_path, mosquitto, jobsd, iot, device):
    """The file server closes the first connection without a word (as jobsd killed while the
    request was on its way); the device retries as it does after any lost connection and the
    download SUCCEEDS."""
    import hashlib
    import http.server
    import threading

    from conftest import thing_arn, wait_execution

    body = os.urandom(20000)
    closed = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if not closed:
                closed.append(self.path)
                self.close_connection = True
                return  # not a byte: the connection just ends
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        iot.create_thing(thingName="dl-1")
        doc = {"operation": "download-file", "url": f"http://127.0.0.1:{srv.server_address[1]}/f",
               "path": "f.bin", "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        iot.create_job(jobId="dl", targets=[thing_arn("dl-1")], document=json.dumps(doc))
        dev = device("dl-1", config={"download": {"allow": ["http://127.0.0.1:"]}})
        ex = wait_execution(iot, "dl", "dl-1", soak.TERMINAL, 60, device=dev)
        assert closed, "the server was never asked"
        assert ex["status"] == "SUCCEEDED", ex
    finally:
        srv.shutdown()
        srv.server_close()


# -- on a fleet `tools/fleet up` runs ---------------------------------------------------------------
def test_a_scenario_plays_on_a_running_fleet(tmp_path):
    """`tools/fleet up` then `tools/fleet run SCENARIO --fleet DIR`: the run drives that fleet
    (its jobsd, its devices, its faults through the supervisor), tags its job ids, leaves the
    fleet running. `up` gave the devices a signing key and the test handlers, so a signed OTA
    and an effect job play; a scenario of another size is refused with exit 2."""
    fleet = tmp_path / "fleet"
    tools = os.path.join(ROOT, "tools")
    up = subprocess.run([os.path.join(tools, "fleet"), "up", "--devices", "3", "--dir", str(fleet),
                         "--keepalive", "10"], capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        path = tmp_path / "s.json"
        path.write_text(json.dumps({
            "fleet": {"devices": 3},
            "work": [{"id": "d", "kind": "demo", "targets": "all", "steps": 1},
                     {"id": "o", "kind": "ota", "version": "2.0.0", "size": 65536, "at": 1,
                      "targets": "all"},  # signed: the up fleet's devices trust its key
                     {"id": "e", "kind": "effect", "at": 1, "targets": "all"},
                     {"id": "r", "kind": "demo", "at": 2, "targets": "all",
                      "campaign": {"jobExecutionsRolloutConfig": {"maximumPerMinute": 1}}},
                     {"id": "p", "kind": "command", "at": 1, "targets": {"count": 2}}],
            "faults": {"count": 8, "start": 1, "window": 8, "rates": {
                "power_cut": 1, "link_cut": 1, "power_cut_at_write": 1, "broker_restart": 0.5,
                "jobsd_restart": 0.5, "slow_link": 1}, "slow_seconds": 2},
            "limits": {"duration": 10, "drain": 120, "minute": 5}}))
        report = tmp_path / "r.json"
        run = subprocess.run([os.path.join(tools, "fleet"), "run", str(path), "--fleet", str(fleet),
                              "--workdir", str(tmp_path / "w"), "--report", str(report)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr
        r = json.loads(report.read_text())
        assert r["fleet"] == str(fleet) and r["ok"] and r["faults"]["injected"] == 8, r
        assert all(j.startswith(("d-", "r-", "o-", "e-")) for j in r["jobs"]), r["jobs"]
        assert len(r["jobs"]) == 4, r["jobs"]
        jobs = json.dumps(r["jobs"])
        assert all(d["things"] == {"SUCCEEDED": 3} for d in r["jobs"].values()
                   if d["kind"] != "ota"), jobs
        # the OTA ran on all three; a power cut in its self-test window rolls it back (FAILED),
        # which the invariants (r["ok"]) judged legitimate
        ota = next(d for d in r["jobs"].values() if d["kind"] == "ota")
        assert sum(ota["things"].get(s, 0) for s in ("SUCCEEDED", "FAILED")) == 3, jobs
        assert "leaks" not in {c["name"] for c in r["invariants"]}  # the fleet stays up
        status = subprocess.run([os.path.join(tools, "fleet"), "status", "--dir", str(fleet)],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        # the rollout wants 50 devices
        for scenario, why in ((os.path.join(SCENARIOS, "rollout.json"), "has 3 fleet32 devices"),):
            refused = subprocess.run([os.path.join(tools, "fleet"), "run", scenario, "--fleet",
                                      str(fleet), "--workdir", str(tmp_path / "w2")],
                                     capture_output=True, text=True, timeout=120)
            assert refused.returncode == 2 and why in refused.stderr, refused.stderr
    finally:
        down = subprocess.run([os.path.join(tools, "fleet"), "down", "--dir", str(fleet)],
                              capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr


# soak-short seed 10 (fw-2 on dev-007), seed 8 (app-1 on dev-005), stock32 seed 16 (fw-2 on
# dev-008), soak seed 1000 (fw-2, app-1, app-3): a power cut after a file's last bytes were written
# and checkpointed resumed with `Range: bytes=<size>-`; jobsd's 416 `Content-Range: bytes */<size>`
# was unparsable to http.get (BAD_RESPONSE) and the job FAILED though every byte was there. Fixed:
# the OTA asks nothing when the slot holds every byte, and http.get takes that 416 as an empty 206.
def test_pinned_seed_10_a_download_cut_after_its_last_checkpoint_resumes(
        tmp_path, mosquitto, jobsd, iot, device, files):
    """A 64 KiB download-file (its last chunk is also a checkpoint): the device halts at that
    checkpoint, loses its power, resumes, and the job SUCCEEDS with the file in place."""
    import hashlib

    from conftest import thing_arn, wait_execution
    from iotjobs_host import sign, stack

    body = os.urandom(64 * 1024)
    sign.put_object(str(files / "soak"), "f.bin", data=body)
    iot.create_thing(thingName="dl-2")
    doc = {"operation": "download-file", "url": sign.presigned("soak", "f.bin"), "path": "f.bin",
           "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    iot.create_job(jobId="dl64", targets=[thing_arn("dl-2")], document=json.dumps(doc))
    dev = device("dl-2", config={"download": {"allow": ["http://127.0.0.1:"]},
                                 "halt_at": "download-checkpoint"})
    stack.wait_until(lambda: "@@HALT download-checkpoint" in dev.log_text(10**6), 60,
                     "the halt at the last checkpoint")
    dev.power_cut()
    ex = wait_execution(iot, "dl64", "dl-2", soak.TERMINAL, 60, device=dev)
    assert ex["status"] == "SUCCEEDED", (ex, dev.log_text(2000))
    with open(os.path.join(dev.flash, "data", "f.bin"), "rb") as f:
        assert f.read() == body
