"""tools/iotjobs_host/fleet.py and tools/fleet: a fleet of simulated devices on this PC.

A small fleet (five devices over mutual TLS, each behind its own proxy) starts with every device
asking for work, runs a job on all of them, and takes each fault the chaos soak injects: a power
cut mid-job (devsim boots the device again and the job still ends SUCCEEDED), a power cut at a
flash write, a link cut and a blackhole (the device reconnects), a slow link, a broker restart,
jobsd killed and started again on its database, and jobsd's clock moved (a scheduled job
starts). Then stop() leaves no process and no listening port. The CLI's up/status/down round
trip (a detached supervisor) leaves nothing behind either. Every wait has a deadline."""
from __future__ import annotations

import json
import math
import os
import subprocess
import time

import pytest
from conftest import ROOT, thing_arn

from iotjobs_host import stack
from iotjobs_host.fleet import Fleet, is_firmware, listening_ports, start_time

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED"}
KEEPALIVE = 5  # a blackholed device finds out within about 1.5 keepalives
BLACKHOLE_S = 8.0  # longer than that: the device must reconnect
FLEET_CLI = os.path.join(ROOT, "tools", "fleet")


def execution(fleet: Fleet, job: str, thing: str) -> dict:
    return fleet.iot.describe_job_execution(jobId=job, thingName=thing)["execution"]


def wait_status(fleet: Fleet, job: str, things: list[str], statuses=TERMINAL,
                timeout: float = 60.0) -> dict[str, str]:
    """Wait until each thing's execution of `job` is in `statuses`; thing -> status."""
    got: dict[str, str] = {}

    def reached():
        for t in things:
            if got.get(t) not in statuses:
                got[t] = execution(fleet, job, t)["status"]
        return all(s in statuses for s in got.values())

    try:
        stack.wait_until(reached, timeout, f"{job} on {things} to reach {statuses}", 0.1)
    except TimeoutError as e:
        logs = "".join(f"\n--- {t}\n{fleet.device(t).log_text(2500)}" for t in things
                       if got.get(t) not in statuses)
        raise AssertionError(f"{e}; seen {got}{logs}") from None
    return got


def job(fleet: Fleet, job_id: str, targets: list[str], doc: dict, **kw) -> None:
    fleet.iot.create_job(jobId=job_id, targets=targets, document=json.dumps(doc), **kw)


def effects(fleet: Fleet, thing: str) -> list[str]:
    try:
        with open(os.path.join(fleet.device(thing).flash, "effects.log")) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def full_log(fleet: Fleet, thing: str) -> str:
    return fleet.device(thing).log_text(10**8)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(str(tmp_path / "fleet"), 5, tls=True, keepalive=KEEPALIVE,
              config={"test_handlers": True, "progress_min_ms": 0})
    yield f
    f.stop()


def test_fleet_runs_a_job_everywhere_and_takes_every_fault(fleet: Fleet):
    t0 = time.monotonic()
    fleet.start()
    things = fleet.things
    assert things == ["dev-001", "dev-002", "dev-003", "dev-004", "dev-005"]
    assert all(fleet.asked(t) >= 1 for t in things), fleet.counts()
    assert len({d.proxy.port for d in fleet.devices}) == 5, "each device has a link of its own"
    assert all(d.proxy.accepted == 1 for d in fleet.devices)
    assert len({d.flash for d in fleet.devices}) == 5
    for d in fleet.devices:  # its own certificate (CN = the thing), from the fleet's one CA
        assert d.tls_dir and d.tls_dir.endswith(d.thing)
        with open(os.path.join(d.flash, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["port"] == d.proxy.port and cfg["tls"]

    # one job to the thing group: every device runs it once
    job(fleet, "all-1", [fleet.group_arn], {"operation": "effect"})
    assert set(wait_status(fleet, "all-1", things).values()) == {"SUCCEEDED"}
    assert all(effects(fleet, t) == ["all-1"] for t in things)

    a, b, c, d, e = things
    # d: a dead link longer than its keepalive (it must notice, and reconnect after it)
    asked_d = fleet.asked(d)
    fleet.blackhole(d, BLACKHOLE_S)
    assert fleet.device(d).proxy.is_cut

    # a: a power cut in the middle of a job; devsim boots it again and the job still ends
    job(fleet, "long-a", [thing_arn(a)], {"operation": "demo", "steps": 4, "step_ms": 400})
    wait_status(fleet, "long-a", [a], {"IN_PROGRESS"} | TERMINAL, 30)
    killed = fleet.power_cut(a)
    assert killed is not None and start_time(killed) is None
    # b: a power cut at its 7th flash write from now (the job's journal writes)
    fleet.power_cut_at_write(b, 7)
    assert fleet.cut_pending(b)
    job(fleet, "effect-b", [thing_arn(b)], {"operation": "effect"})
    # c: its connection closed under it: it reconnects and asks again
    asked_c = fleet.asked(c)
    fleet.link_cut(c)
    # e: a slow link (each chunk held 150 ms each way): a job still ends, slower
    fleet.slow_link(e, delay_ms=150)
    t_e = time.monotonic()
    job(fleet, "slow-e", [thing_arn(e)], {"operation": "effect"})

    assert wait_status(fleet, "long-a", [a])[a] == "SUCCEEDED"
    assert killed in fleet.device(a).boots() and len(fleet.device(a).boots()) >= 2
    assert wait_status(fleet, "effect-b", [b])[b] == "SUCCEEDED"
    assert "devsim: power cut at flash write 7 " in full_log(fleet, b), full_log(fleet, b)[-3000:]
    assert not fleet.cut_pending(b) and len(fleet.device(b).boots()) == 2
    assert effects(fleet, b) == ["all-1", "effect-b"], "the side effect exactly once"
    fleet.wait_asked([c], 30, "c to ask again after its link cut", since={c: asked_c})
    assert fleet.device(c).proxy.accepted == 2
    assert wait_status(fleet, "slow-e", [e])[e] == "SUCCEEDED"
    assert time.monotonic() - t_e >= 0.3, "a request and its reply each held 150 ms"
    assert fleet.device(e).proxy.is_slow
    fleet.heal(e)
    assert not fleet.device(e).proxy.is_slow
    fleet.wait_asked([d], BLACKHOLE_S + 3 * KEEPALIVE + 10, "d to reconnect after its blackhole",
                     since={d: asked_d})
    assert not fleet.device(d).proxy.is_cut and fleet.device(d).proxy.accepted >= 2
    assert len(fleet.device(d).boots()) == 1, "a dead link is no reason to reboot"

    # the broker restarts: every device reconnects and takes the next job
    accepted = {dev.thing: dev.proxy.accepted for dev in fleet.devices}
    old_broker = fleet.mosquitto.proc.pid
    fleet.restart_broker()
    assert fleet.mosquitto.proc.pid != old_broker and start_time(old_broker) is None
    job(fleet, "all-2", [fleet.group_arn], {"operation": "effect"})
    assert set(wait_status(fleet, "all-2", things).values()) == {"SUCCEEDED"}
    assert all(dev.proxy.accepted > accepted[dev.thing] for dev in fleet.devices)

    # jobsd killed (SIGKILL) and started again on its database, on the same ports
    old_jobsd, control = fleet.jobsd.proc.pid, fleet.control_url
    new_jobsd = fleet.kill_jobsd()
    assert new_jobsd != old_jobsd and start_time(old_jobsd) is None
    assert fleet.control_url == control
    assert fleet.iot.describe_job(jobId="all-2")["job"]["status"] == "COMPLETED"
    job(fleet, "all-3", [fleet.group_arn], {"operation": "effect"})
    assert set(wait_status(fleet, "all-3", things).values()) == {"SUCCEEDED"}

    # jobsd's clock: a job scheduled 31 minutes ahead starts when the clock is moved there
    now = fleet.advance_clock(0)
    start = math.ceil((now + 31 * 60) / 60) * 60
    job(fleet, "later", [thing_arn(a)], {"operation": "effect"},
        schedulingConfig={"startTime": time.strftime("%Y-%m-%dT%H:%M", time.gmtime(start))})
    assert fleet.iot.describe_job(jobId="later")["job"]["status"] == "SCHEDULED"
    assert fleet.advance_clock(start - now + 1) >= start
    assert wait_status(fleet, "later", [a])[a] == "SUCCEEDED"

    for t in things:
        assert "Traceback" not in full_log(fleet, t), full_log(fleet, t)[-3000:]
    pids = fleet.processes()
    ports = {fleet.mosquitto.port, fleet.mosquitto.tls_port, *(dev.proxy.port for dev in fleet.devices)}
    assert fleet.stop() == []
    assert all(start_time(p) is None for p in pids.values()), pids
    assert not (listening_ports() & ports)
    assert time.monotonic() - t0 < 120


def test_a_power_cut_aims_at_the_firmware_never_at_a_helper():
    """Fleet.power_cut kills the interpreter devsim exec'd (`-X heapsize=...`), never one of
    devsim's short-lived forked helpers (the bootloader's checks), whose death halted devsim."""
    import sys

    fw = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-X", "heapsize=96K"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--heap", "96K"])
    try:
        assert is_firmware(fw.pid) and not is_firmware(other.pid)
        assert not is_firmware(2**22 + 1)  # no such process
    finally:
        for p in (fw, other):
            p.kill()
            p.wait()


def test_devsim_cut_at_write_from_the_start(tmp_path):
    """devsim --cut-at-write 1: the first boot loses its power at its first flash write (the
    journal's boot count); the next boot goes on."""
    dev = stack.Device(str(tmp_path / "d"), "cut-1", f"127.0.0.1:{stack.free_port()}",
                       extra=["--cut-at-write", "1"])
    try:
        stack.wait_until(lambda: len(dev.boots()) >= 2 or not dev.proc.alive(), 30,
                         "a second boot")
        log = dev.log_text(10**6)
        assert "devsim: power cut at flash write 1 (truncate journal.json.tmp)" in log, log
        assert "firmware exited with -9" in log
        assert not os.path.exists(str(tmp_path / "d" / "flash") + ".cut")
    finally:
        dev.stop()


def _fleet_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([FLEET_CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _processes_under(folder: str) -> list[int]:
    """PIDs whose command line or working folder names `folder` (what the fleet started)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if folder in cmd or cwd.startswith(folder):
            out.append(int(name))
    return out


def test_cli_up_status_down_leaves_nothing(tmp_path):
    folder = str(tmp_path / "cli")
    up = _fleet_cli("up", "--devices", "3", "--dir", folder, "--seed", "7")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "every one has asked for work" in up.stdout and "seed 7" in up.stdout
        state = json.load(open(os.path.join(folder, "fleet.json")))
        assert up.stdout.count(state["control_url"]) >= 2
        assert state["dashboard_url"] == state["control_url"] + "/dashboard"
        assert "tools/fleet down --dir" in up.stdout

        st = _fleet_cli("status", "--dir", folder, "--json")
        assert st.returncode == 0, st.stdout + st.stderr
        devices = json.loads(st.stdout)["devices"]
        assert [d["thing"] for d in devices] == ["dev-001", "dev-002", "dev-003"]
        assert all(d["alive"] and d["asked"] >= 1 and d["firmware_pid"] for d in devices)
        pids = [d["devsim_pid"] for d in devices] + [d["firmware_pid"] for d in devices]
        records = json.load(open(os.path.join(folder, "pids.json")))
        pids += [r["pid"] for r in records.values()]
        ports = [int(state[k].rsplit(":", 1)[1]) for k in ("mqtt", "mqtt_tls", "control_url", "data_url")]
        ports += [int(d["proxy"].rsplit(":", 1)[1]) for d in devices]
        assert _fleet_cli("status", "--dir", folder).returncode == 0

        cut = _fleet_cli("power-cut", "dev-002", "--dir", folder)
        assert cut.returncode == 0, cut.stdout + cut.stderr
        assert _fleet_cli("blackhole", "nobody", "1", "--dir", folder).returncode == 2
    finally:
        down = _fleet_cli("down", "--dir", folder)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped the fleet" in down.stdout
    assert all(start_time(p) is None for p in pids), [p for p in pids if start_time(p)]
    assert _processes_under(folder) == []
    assert not (listening_ports() & set(ports))
    assert not os.path.exists(os.path.join(folder, "fleet.sock"))
    assert _fleet_cli("status", "--dir", folder).returncode == 3
    assert "nothing running" in _fleet_cli("down", "--dir", folder).stdout
