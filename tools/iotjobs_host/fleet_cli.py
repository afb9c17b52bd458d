"""`tools/fleet`: a fleet of simulated devices on this PC (tools/iotjobs_host/fleet.py).

    tools/fleet up --devices N [--image fleet32] [--tls|--no-tls] [--dir DIR] [--seed S]
    tools/fleet status | down [--dir DIR]
    tools/fleet power-cut THING | cut-at-write THING N | link-cut THING
    tools/fleet blackhole THING SECONDS | slow THING [--delay-ms MS] [--rate B/S] [--seconds S]
    tools/fleet heal [THING] | restart-broker | kill-jobsd | advance-clock SECONDS
    tools/fleet measure [--devices 50] [--seconds 30]      (a running fleet, or one of its own)
    tools/fleet run SCENARIO ...                            (iotjobs_host.soak)

`up` starts a supervisor process that outlives the command (the devices' proxies live in it):
it starts mosquitto, jobsd and the devices, records them in DIR (default build/fleet) and takes
commands on the unix socket DIR/fleet.sock. `down` asks it to stop everything it started, by
PID, and waits until it has; if the supervisor is gone, `down` stops what it recorded (a record
is a PID and its start time: a PID since reused by another process is never signalled)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

from . import BUILD, TOOLS
from .localstack import _read_json, _save_records, _write, alive, spawn, stop_process

DEFAULT_DIR = os.path.join(BUILD, "fleet")
UP_TIMEOUT_BASE = 60.0  # plus 2 s a device
DOWN_TIMEOUT = 120.0


class FleetError(Exception):
    """A precise reason a command cannot do what was asked (exit 2)."""


class Paths:
    def __init__(self, folder: str) -> None:
        self.dir = os.path.abspath(folder)
        j = lambda *p: os.path.join(self.dir, *p)  # noqa: E731
        self.sock, self.pids, self.state = j("fleet.sock"), j("pids.json"), j("fleet.json")
        self.log, self.work = j("supervisor.log"), j("run")


def _rel(path: str) -> str:
    rel = os.path.relpath(path, os.getcwd())
    return path if rel.startswith("..") else rel


# -- talking to the supervisor ------------------------------------------------------------------------
def request(p: Paths, op: str, timeout: float = 60.0, **args) -> object:
    """One command to the supervisor; its result. FleetError when it refuses or cannot be
    reached."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(p.sock)
            s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise FleetError(f"no fleet is running in {_rel(p.dir)} (tools/fleet up starts one)") from None
    except OSError as e:
        raise FleetError(f"the fleet's supervisor did not answer {op}: {e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise FleetError(f"the supervisor's answer to {op} is not JSON: {data[:200]!r}") from None
    if not reply.get("ok"):
        raise FleetError(reply.get("error", "refused"))
    return reply.get("result")


def _supervisor(p: Paths) -> Optional[dict]:
    rec = (_read_json(p.pids) or {}).get("supervisor")
    return rec if alive(rec) else None


# -- the supervisor (runs detached) -------------------------------------------------------------------
FAULTS = {
    "power-cut": ("power_cut", ("thing",)),
    "cut-at-write": ("power_cut_at_write", ("thing", "n")),
    "link-cut": ("link_cut", ("thing",)),
    "blackhole": ("blackhole", ("thing", "seconds")),
    "slow": ("slow_link", ("thing", "delay_ms", "rate", "seconds")),
    "heal": ("heal", ("thing",)),
    "restart-broker": ("restart_broker", ()),
    "kill-jobsd": ("kill_jobsd", ()),
    "advance-clock": ("advance_clock", ("seconds",)),
}


def device_config(keys: str) -> dict:
    """What every device of an `up` fleet is provisioned with, so that any shipped scenario
    plays on it: the OTA and app-update signing key (made in `keys` on the first `up`, kept
    after: the devices' flash trusts it), the test handlers (the soak's effect jobs), and the
    fleet's own file server as the one download and update source."""
    from . import sign

    pub = os.path.join(keys, sign.PUB_DER_FILE)
    if not (os.path.exists(pub) and os.path.exists(os.path.join(keys, sign.KEY_FILE))):
        pub = sign.keygen(keys, force=True)[sign.PUB_DER_FILE]
    local = ["http://127.0.0.1:"]
    return {"test_handlers": True, "progress_min_ms": 1000,
            "ota": {"pubkey": pub, "allow": local}, "download": {"allow": local}}


def supervise(args: argparse.Namespace) -> int:
    """Start the fleet, record it, serve commands until `down` (or SIGTERM), stop it."""
    from .fleet import Fleet

    p = Paths(args.dir)
    os.dup2(2, 1)  # its stdout too goes to supervisor.log (`up` gives it as stderr)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    fleet = Fleet(p.work, args.devices, image=args.image, tls=args.tls, heap=args.heap,
                  seed=args.seed, jobsd_extra=args.jobsd_arg or (), keepalive=args.keepalive,
                  config=device_config(os.path.join(p.work, "keys")))
    print(f"fleet: starting {args.devices} devices in {p.work} (seed {fleet.seed})", flush=True)
    t0 = time.monotonic()
    try:
        fleet.start()
    except BaseException as e:
        _write(p.state, json.dumps({"error": f"{type(e).__name__}: {e}"}, indent=1) + "\n")
        print(f"fleet: start failed: {e}", flush=True)
        return 1
    lock = threading.Lock()

    def record() -> None:
        recs = _read_json(p.pids) or {}
        for name, pid in fleet.processes().items():
            if "/firmware" not in name:
                st = _start_time(pid)
                if st:
                    recs[name] = {"pid": pid, "start": st}
        _save_records(p, recs)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(300)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        return
                    data += chunk
                req = json.loads(data)
                op, a = req.get("op"), req.get("args") or {}
                with lock:
                    if op == "status":
                        result: object = fleet.status()
                    elif op == "processes":
                        result = {"supervisor": os.getpid(), **fleet.processes()}
                    elif op == "down":
                        done.set()
                        result = "stopping"
                    elif op in FAULTS:
                        method, names = FAULTS[op]
                        kw = {n: a[n] for n in names if a.get(n) is not None}
                        result = getattr(fleet, method)(**kw)
                        if op in ("restart-broker", "kill-jobsd"):
                            record()
                    else:
                        raise ValueError(f"unknown command {op!r}")
                reply = {"ok": True, "result": result}
            except Exception as e:  # one bad command never takes the supervisor down
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    if os.path.exists(p.sock):
        os.remove(p.sock)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(p.sock)
    os.chmod(p.sock, 0o600)
    server.listen(16)

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, name="fleet-control", daemon=True).start()
    record()
    state = {k: v for k, v in fleet.status().items() if k != "devices"}
    state.update({"ready": True, "devices": args.devices, "started_in_s": round(time.monotonic() - t0, 1),
                  "supervisor": os.getpid(), "socket": p.sock})
    _write(p.state, json.dumps(state, indent=1) + "\n")
    print(f"fleet: up in {state['started_in_s']} s; every device has asked for work", flush=True)
    while not done.wait(3600):
        pass
    print("fleet: stopping", flush=True)
    with lock:
        leaks = fleet.stop()
    server.close()
    try:
        os.remove(p.sock)
    except OSError:
        pass
    print("fleet: stopped" + (f"; left behind: {leaks}" if leaks else ", nothing left behind"),
          flush=True)
    return 1 if leaks else 0


def _start_time(pid: int) -> Optional[str]:
    from .fleet import start_time

    return start_time(pid)


# -- commands ------------------------------------------------------------------------------------------
def up(args: argparse.Namespace) -> int:
    p = Paths(args.dir)
    os.makedirs(p.dir, exist_ok=True)
    os.chmod(p.dir, 0o700)  # keys and the control socket: this user only
    if _supervisor(p):
        print(f"fleet: already running in {_rel(p.dir)}")
        _print_summary(p, _read_json(p.state) or {})
        return 0
    leftovers = [n for n, r in (_read_json(p.pids) or {}).items() if alive(r)]
    if leftovers:
        raise FleetError(f"processes of an earlier fleet still run ({', '.join(leftovers)}): "
                         f"run `tools/fleet down --dir {_rel(p.dir)}` first")
    for path in (p.state, p.pids):
        if os.path.exists(path):
            os.remove(path)
    if args.devices < 1:
        raise FleetError("--devices must be 1 or more")
    argv = [os.path.join(TOOLS, "fleet"), "supervise", "--dir", p.dir, "--devices", str(args.devices),
            "--image", args.image, "--keepalive", str(args.keepalive),
            "--tls" if args.tls else "--no-tls"]
    if args.heap:
        argv += ["--heap", args.heap]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    for a in args.jobsd_arg or ():
        argv += [f"--jobsd-arg={a}"]
    rec = spawn(argv, os.devnull, p.log)
    _save_records(p, {"supervisor": rec})
    timeout = UP_TIMEOUT_BASE + 2.0 * args.devices
    deadline = time.monotonic() + timeout
    print(f"fleet: starting {args.devices} devices (supervisor pid {rec['pid']}, log "
          f"{_rel(p.log)}) ...", flush=True)
    while True:
        rec["_popen"].poll()
        state = _read_json(p.state) or {}
        if state.get("ready"):
            break
        if state.get("error") or not alive(rec):
            stop_process(rec)
            raise FleetError(f"the fleet did not start: {state.get('error', 'the supervisor exited')}"
                             f"; {_rel(p.log)} ends:\n{_tail(p.log)}")
        if time.monotonic() > deadline:
            stop_process(rec, timeout=DOWN_TIMEOUT)
            raise FleetError(f"the fleet was not up within {timeout:.0f} s; see {_rel(p.log)}:\n"
                             f"{_tail(p.log)}")
        time.sleep(0.1)
    print(f"fleet: up in {_rel(p.dir)}: {args.devices} devices, every one has asked for work "
          f"({state.get('started_in_s')} s; seed {state.get('seed')})")
    _print_summary(p, state)
    return 0


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


def _print_summary(p: Paths, s: dict) -> None:
    d = _rel(p.dir)
    print(f"  MQTT for tools (no TLS):      {s.get('mqtt')}")
    print(f"  MQTT devices (mutual TLS):    {s.get('mqtt_tls')}  (each device through its own proxy)")
    print(f"  jobsd control plane (iot):    {s.get('control_url')}")
    print(f"  jobsd data API and files:     {s.get('data_url')}  (files: {_rel(s.get('files', ''))})")
    print(f"  dashboard:                    {s.get('dashboard_url')}")
    print("boto3 / the AWS CLI / tools/jobs (no credentials checked; any key works):")
    print(f"  export AWS_ENDPOINT_URL_IOT={s.get('control_url')} "
          f"AWS_ENDPOINT_URL_IOT_JOBS_DATA={s.get('data_url')}")
    print(f"  export IOTJOBS_ENDPOINT={s.get('control_url')} AWS_ACCESS_KEY_ID=local "
          "AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1")
    print("  every device is in the thing group `fleet` "
          "(arn:aws:iot:us-east-1:123456789012:thinggroup/fleet)")
    print("Faults:   tools/fleet power-cut dev-001 | blackhole dev-002 30 | restart-broker | ...")
    print(f"Status:   tools/fleet status --dir {d}")
    print(f"Stop:     tools/fleet down --dir {d}")


def status(args: argparse.Namespace) -> int:
    p = Paths(args.dir)
    if not _supervisor(p):
        left = [n for n, r in (_read_json(p.pids) or {}).items() if alive(r)]
        if left:
            print(f"fleet: the supervisor is gone but {len(left)} of its processes run "
                  f"({', '.join(left[:5])}...): tools/fleet down --dir {_rel(p.dir)}")
            return 1
        print(f"fleet: not running in {_rel(p.dir)}")
        return 3
    st = request(p, "status")
    assert isinstance(st, dict)
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    devs = st["devices"]
    up_ = sum(1 for d in devs if d["alive"] and d["connections"])
    print(f"fleet: running in {_rel(p.dir)}: {len(devs)} devices ({up_} connected), image "
          f"{st['image']}, {'mutual TLS' if st['tls'] else 'plain MQTT'}, seed {st['seed']}")
    print(f"  mosquitto pid {st['mosquitto']['pid']} {'up' if st['mosquitto']['alive'] else 'DOWN'}, "
          f"jobsd pid {st['jobsd']['pid']} {'up' if st['jobsd']['alive'] else 'DOWN'}")
    _print_summary(p, st)
    print(f"{'thing':<9} {'devsim':>7} {'firmware':>8} {'boots':>5} {'asked':>5} {'conns':>5}  link")
    for d in devs:
        link = "cut" if d["cut"] else "slow" if d["slow"] else "ok"
        if d["cut_pending"]:
            link += " (cut at write armed)"
        print(f"{d['thing']:<9} {d['devsim_pid']:>7} {d['firmware_pid'] or '-':>8} {d['boots']:>5} "
              f"{d['asked']:>5} {d['connections']:>5}  {link}")
    return 0


def down(args: argparse.Namespace) -> int:
    p = Paths(args.dir)
    recs = _read_json(p.pids) or {}
    sup = _supervisor(p)
    if sup is None and not any(alive(r) for r in recs.values()):
        print(f"fleet: nothing running in {_rel(p.dir)}")
        _cleanup(p)
        return 0
    if sup is not None:
        try:
            request(p, "down", timeout=10)
        except FleetError:
            os.kill(sup["pid"], signal.SIGTERM)  # it stops the fleet on SIGTERM too
        deadline = time.monotonic() + DOWN_TIMEOUT
        while alive(sup) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(sup):
            print(f"fleet: the supervisor (pid {sup['pid']}) {stop_process(sup)}")
        else:
            print(f"fleet: supervisor (pid {sup['pid']}) stopped the fleet")
    # What the supervisor could not stop (it was killed, or failed): by record, devices first.
    left = 0
    for name in sorted((n for n in recs if n != "supervisor"),
                       key=lambda n: (n in ("jobsd", "mosquitto"), n)):
        if alive(recs[name]):
            firmware = _children(recs[name]["pid"]) if name.endswith("/devsim") else []
            print(f"fleet: {name} (pid {recs[name]['pid']}) {stop_process(recs[name])}")
            for rec in firmware:
                if alive(rec):
                    print(f"fleet: {name} firmware (pid {rec['pid']}) {stop_process(rec)}")
            left += 1
    if os.path.exists(p.log):
        tail = _tail(p.log, 400).strip().splitlines()
        if tail:
            print("fleet: supervisor log: " + tail[-1])
    _cleanup(p)
    return 0


def _children(pid: int) -> list[dict]:
    from .fleet import children, start_time

    return [{"pid": c, "start": start_time(c)} for c in children(pid) if start_time(c)]


def _cleanup(p: Paths) -> None:
    for path in (p.pids, p.sock):
        try:
            os.remove(path)
        except OSError:
            pass
    state = _read_json(p.state) or {}
    if state:
        state["ready"] = False
        _write(p.state, json.dumps(state, indent=1) + "\n")


def fault(args: argparse.Namespace) -> int:
    p = Paths(args.dir)
    names = FAULTS[args.cmd][1]
    kw = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    result = request(p, args.cmd, timeout=120, **kw)
    print(f"fleet: {args.cmd} {' '.join(str(v) for v in kw.values())}: done"
          + (f" ({result})" if result is not None else ""))
    return 0


# -- measuring -------------------------------------------------------------------------------------------
def _mem(pid: int) -> dict[str, int]:
    """kB: VmRSS (/proc/PID/status), Pss and private pages (/proc/PID/smaps_rollup)."""
    out = {"rss": 0, "pss": 0, "private": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss"] = int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    out["private"] += int(line.split()[1])
    except OSError:
        pass
    return out


def _ticks(pid: int) -> Optional[int]:
    """utime + stime (clock ticks) of /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def measure_processes(procs: dict[str, int], seconds: float) -> list[tuple[str, int, dict, float]]:
    """Per kind of process (devsim, firmware, mosquitto, jobsd, supervisor): (kind, how many,
    mean memory in kB, mean CPU % of one core over `seconds`)."""
    hz = os.sysconf("SC_CLK_TCK")
    before = {n: _ticks(pid) for n, pid in procs.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    after = {n: _ticks(pid) for n, pid in procs.items()}
    kinds: dict[str, list[tuple[dict, float]]] = {}
    for name, pid in procs.items():
        b, a = before.get(name), after.get(name)
        if b is None or a is None:
            continue  # it ended (or began) inside the window
        kind = name.split("/", 1)[1] if "/" in name else name
        kinds.setdefault(kind, []).append((_mem(pid), 100.0 * (a - b) / hz / dt))
    rows = []
    for kind in ("devsim", "firmware", "mosquitto", "jobsd", "supervisor"):
        items = kinds.get(kind)
        if not items:
            continue
        n = len(items)
        mem = {k: sum(m[k] for m, _ in items) // n for k in ("rss", "pss", "private")}
        rows.append((kind, n, mem, sum(c for _, c in items) / n))
    return rows


def print_measure(rows: list[tuple[str, int, dict, float]], seconds: float, devices: int) -> None:
    print(f"idle over {seconds:.0f} s, {devices} devices (memory: kB per process, mean; "
          "CPU: % of one core per process, mean)")
    print(f"{'process':<22} {'count':>5} {'VmRSS':>8} {'Pss':>8} {'private':>8} {'CPU %':>7}")
    label = {"devsim": "devsim (python)", "firmware": "firmware (micropython)",
             "supervisor": "supervisor (proxies)"}
    per: dict[str, float] = {"rss": 0, "pss": 0, "private": 0, "cpu": 0.0}
    for kind, n, mem, cpu in rows:
        print(f"{label.get(kind, kind):<22} {n:>5} {mem['rss']:>8} {mem['pss']:>8} "
              f"{mem['private']:>8} {cpu:>7.2f}")
        if kind in ("devsim", "firmware"):
            for k in ("rss", "pss", "private"):
                per[k] += mem[k]
            per["cpu"] += cpu
        elif kind == "supervisor" and devices:
            per["cpu"] += cpu / devices
    print(f"{'per device':<22} {'':>5} {int(per['rss']):>8} {int(per['pss']):>8} "
          f"{int(per['private']):>8} {per['cpu']:>7.2f}")
    print("(per device: devsim + firmware, plus its share of the supervisor's CPU: its proxy)")


def measure(args: argparse.Namespace) -> int:
    p = Paths(args.dir)
    if _supervisor(p) and not args.devices:
        procs = request(p, "processes")
        assert isinstance(procs, dict)
        devices = sum(1 for n in procs if n.endswith("/devsim"))
        time.sleep(args.settle)
        print_measure(measure_processes(procs, args.seconds), args.seconds, devices)
        return 0
    import tempfile

    from .fleet import Fleet

    n = args.devices or 50
    with tempfile.TemporaryDirectory(prefix="fleet-measure-") as tmp:
        fleet = Fleet(tmp, n, image=args.image, tls=args.tls)
        t0 = time.monotonic()
        try:
            fleet.start()
            print(f"{n} devices up (every one asked for work) in {time.monotonic() - t0:.1f} s; "
                  f"settling {args.settle:.0f} s")
            time.sleep(args.settle)
            procs = {"supervisor": os.getpid(), **fleet.processes()}
            print_measure(measure_processes(procs, args.seconds), args.seconds, n)
        finally:
            leaks = fleet.stop()
        if leaks:
            print(f"left behind: {leaks}")
            return 1
    return 0


def _soak():
    """iotjobs_host.soak, or None while it does not exist."""
    try:
        from . import soak
    except ImportError as e:
        if getattr(e, "name", None) not in ("iotjobs_host.soak", None):
            raise
        return None
    return soak


def run(args: argparse.Namespace) -> int:
    """`tools/fleet run SCENARIO ...`: soak.main_run(args)."""
    soak = _soak()
    if soak is None:
        print("fleet: `run` plays scenarios with iotjobs_host.soak (tools/iotjobs_host/soak.py), "
              "which is not there yet", file=sys.stderr)
        return 2
    return soak.main_run(args)


# -- the command line ------------------------------------------------------------------------------------
def _fleet_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--devices", type=int, required=True, help="how many (dev-001 ...)")
    c.add_argument("--image", default="fleet32", choices=("fleet32", "stock32", "pip"),
                   help="the devices' interpreter (default fleet32)")
    c.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                   help="mutual TLS, a certificate per device (default; --no-tls: plain MQTT)")
    c.add_argument("--heap", help="devsim --heap (default devsim's)")
    c.add_argument("--seed", type=int, help="the fleet's random seed (default: a random one)")
    c.add_argument("--keepalive", type=int, default=60, help="the devices' MQTT keepalive (s)")
    c.add_argument("--jobsd-arg", action="append", metavar="ARG",
                   help="one more jobsd option, e.g. --jobsd-arg=--minute-seconds=1 (repeatable)")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def cmd(name: str, helptext: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--dir", default=DEFAULT_DIR, help="the fleet's folder (default build/fleet)")
        return c

    _fleet_options(cmd("up", "start mosquitto, jobsd and N devices under a supervisor"))
    s = sub.add_parser("supervise", help=argparse.SUPPRESS)
    s.add_argument("--dir", required=True)
    _fleet_options(s)
    cmd("status", "what runs (exit 0 running, 3 not)").add_argument(
        "--json", action="store_true", help="the supervisor's full status as JSON")
    cmd("down", "stop everything `up` started")
    cmd("power-cut", "SIGKILL a device's firmware (devsim boots it again)").add_argument("thing")
    c = cmd("cut-at-write", "cut a device's power just before its N-th flash write from now")
    c.add_argument("thing")
    c.add_argument("n", type=int)
    cmd("link-cut", "close a device's connections (it reconnects)").add_argument("thing")
    c = cmd("blackhole", "a dead link (nothing passes, nothing closes) for SECONDS")
    c.add_argument("thing")
    c.add_argument("seconds", type=float)
    c = cmd("slow", "a slow link: --delay-ms per chunk and/or --rate bytes/s")
    c.add_argument("thing")
    c.add_argument("--delay-ms", type=float, default=0)
    c.add_argument("--rate", type=float, help="bytes a second each way")
    c.add_argument("--seconds", type=float, help="then back to full speed (default: until heal)")
    cmd("heal", "end blackholes and slow links (of one device or all)").add_argument(
        "thing", nargs="?")
    cmd("restart-broker", "stop and start mosquitto on the same ports")
    cmd("kill-jobsd", "SIGKILL jobsd and start it again on the same database and ports")
    cmd("advance-clock", "move jobsd's clock forward (test hook)").add_argument("seconds", type=float)
    c = cmd("measure", "memory and idle CPU per device (of the running fleet, or of its own)")
    c.add_argument("--devices", type=int, help="start a fleet of this many for the measurement "
                   "(default: measure the running fleet, else start 50)")
    c.add_argument("--seconds", type=float, default=30.0, help="the CPU window (default 30)")
    c.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait after the start before measuring (default 5)")
    c.add_argument("--image", default="fleet32", choices=("fleet32", "stock32", "pip"))
    c.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True)
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tools/fleet status | head` ends quietly
    soak = _soak() if argv[:1] == ["run"] else None  # only `run` needs it
    if soak is not None:
        soak.add_run_args(sub.add_parser("run", help="play a scenario (iotjobs_host.soak)"))
    else:
        sub.add_parser("run", help="play a scenario (tools/fleet run SCENARIO --help)",
                       add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    handlers = {"up": up, "supervise": supervise, "status": status, "down": down,
                "measure": measure, "run": run}
    try:
        return handlers.get(args.cmd, fault)(args)
    except FleetError as e:
        print(f"fleet: {e}", file=sys.stderr)
        return 2
