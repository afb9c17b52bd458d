"""`tools/stack up|down|status|env`: the local stack for real boards, in one command.

    tools/stack up [--endpoint HOST[:PORT]] [--dir DIR]      (make stack ENDPOINT=HOST:PORT)
    tools/stack status | env | down [--dir DIR]

`up` makes what is missing under DIR (default build/stack) and starts two processes that outlive
it: mosquitto and jobsd. What it makes, once, and keeps across `down`/`up`:

- `ca/`: a local CA (tools/provision --local takes it) and the broker's certificate for the
  endpoint's host (made again only when the endpoint changes or it nears expiry);
- `credentials`: one access key (AWS shared-credentials format, mode 0600). jobsd verifies
  Signature Version 4 with it on both REST APIs; `env` holds the lines boto3, the AWS CLI and
  tools/jobs need (`. DIR/env`);
- `mosquitto.conf`: the device listener on the endpoint (mutual TLS, the certificate's CN is the
  username, jobsd's ACL, `things.acl`) and a loopback listener for jobsd and tools, both with
  `set_tcp_nodelay true` (without it every job costs two ~44 ms stalls, PLATFORM.md); messages
  and sessions persist in `mosquitto/`;
- `jobsd.sqlite3` (things, jobs, streams) and `files/` (jobsd's --files: what devices download).

Where it listens: the device listener and jobsd's data API (devices fetch files from it, under
signed URLs) on the endpoint's address (or --bind); the loopback MQTT listener and jobsd's
control plane on 127.0.0.1 only. Nothing else. Every address and port is checked before anything
starts, so a typo fails at once with the reason.

The processes are recorded in `pids.json` with their start times: `down` and `status` act only
on processes that are still the ones `up` started, never on a reused PID. `settings.json` keeps
the options of the last `up`, so `down`, `status` and a second `up` need none.
"""
from __future__ import annotations

import argparse
import configparser
import ipaddress
import json
import os
import secrets
import shlex
import signal
import socket
import string
import subprocess
import sys
import time
from typing import Optional

from . import BUILD, ROOT, TOOLS
from .pki import PKI
from .stack import mosquitto_binary, port_open

DEFAULT_DIR = os.path.join(BUILD, "stack")
DEFAULTS = {"endpoint": "127.0.0.1:8883", "mqtt_port": 1883, "control_port": 8440,
            "data_port": 8441, "bind": None, "region": "us-east-1"}
PROFILE = "iotjobs-local"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class StackError(Exception):
    """A precise reason `up`/`down` cannot do what was asked (exit 2)."""


# -- settings and files ---------------------------------------------------------------------------
class Paths:
    def __init__(self, folder: str) -> None:
        self.dir = os.path.abspath(folder)
        j = lambda *p: os.path.join(self.dir, *p)  # noqa: E731
        self.ca, self.settings, self.pids = j("ca"), j("settings.json"), j("pids.json")
        self.credentials, self.env = j("credentials"), j("env")
        self.conf, self.acl, self.persist = j("mosquitto.conf"), j("things.acl"), j("mosquitto") + os.sep
        self.mosquitto_log, self.jobsd_log, self.jobsd_out = j("mosquitto.log"), j("jobsd.log"), j("jobsd.out")
        self.db, self.files = j("jobsd.sqlite3"), j("files")


def split_endpoint(text: str) -> tuple[str, int]:
    host, port = text, 8883
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _port(p, text)
    if not host:
        raise StackError(f"--endpoint {text!r}: no host")
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise StackError(f"{whole!r}: the port must be 1..65535")
    return int(text)


def resolve(host: str) -> str:
    """The address `host` names (an IP as it is); StackError when it names none."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError):
        raise StackError(f"cannot resolve {host!r}: give the IP address this PC has on the "
                         "boards' network, e.g. --endpoint 192.168.1.20") from None


def check_bindable(addr: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            if e.errno == 98:  # EADDRINUSE
                raise StackError(f"{what}: {addr}:{port} is already in use by another process "
                                 "(choose another port, or stop what holds it)") from None
            if e.errno == 99:  # EADDRNOTAVAIL
                raise StackError(f"{what}: {addr} is not an address of this machine "
                                 "(`ip -brief address` lists them; or give --bind)") from None
            raise StackError(f"{what}: cannot listen on {addr}:{port}: {e.strerror}") from None


def _write(path: str, text: str, mode: int = 0o644) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StackError(f"{path} is unreadable ({e}); remove it and run `tools/stack up` again") from None
    return value if isinstance(value, dict) else None


def ensure_credentials(p: Paths) -> tuple[str, str]:
    """The stack's access key: read from `credentials`, made once (mode 0600)."""
    cp = configparser.ConfigParser()
    if os.path.exists(p.credentials):
        cp.read(p.credentials)
        if cp.has_option(PROFILE, "aws_access_key_id") and cp.has_option(PROFILE, "aws_secret_access_key"):
            return cp.get(PROFILE, "aws_access_key_id"), cp.get(PROFILE, "aws_secret_access_key")
        raise StackError(f"{p.credentials} has no [{PROFILE}] key pair; remove it to make a new one")
    upper = string.ascii_uppercase + string.digits
    key_id = "AKIA" + "".join(secrets.choice(upper) for _ in range(16))
    secret = secrets.token_urlsafe(30)[:40]
    _write(p.credentials, f"[{PROFILE}]\naws_access_key_id = {key_id}\n"
                          f"aws_secret_access_key = {secret}\n", 0o600)
    return key_id, secret


def ensure_certificates(p: Paths, host: str) -> tuple[PKI, dict[str, str], list[str]]:
    """The CA (kept) and a broker certificate naming `host` (made again when it does not)."""
    notes = []
    try:
        pki = PKI(p.ca, days=3650, load=True)
    except (ValueError, OSError) as e:
        raise StackError(f"{p.ca}: {e}") from None
    if pki.created:
        notes.append(f"made a local CA in {p.ca} (ca-key.pem mode 0600: whoever reads it can make "
                     "certificates the broker trusts)")
    folder = os.path.join(p.ca, "broker")
    files = {k: os.path.join(folder, f) for k, f in
             (("cert_pem", "cert.pem"), ("key_pem", "key.pem"))}
    if not _server_cert_fits(files["cert_pem"], host, pki):
        files = pki.server(cn=host, name="broker", hosts=(host,))
        os.chmod(files["key_pem"], 0o600)
        notes.append(f"made the broker certificate for {host}")
    return pki, files, notes


def _server_cert_fits(path: str, host: str, pki: PKI) -> bool:
    import datetime

    from cryptography import x509

    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in names.get_values_for_type(x509.IPAddress)}
    have |= set(names.get_values_for_type(x509.DNSName))
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    return (host in have and cert.issuer == pki.ca_cert.subject
            and cert.not_valid_after_utc > soon)


def mosquitto_conf(p: Paths, s: dict, broker_files: dict[str, str], pki: PKI) -> str:
    lines = [
        "# Written by tools/stack up; edits are lost at the next `up`.",
        "per_listener_settings true",
        f"log_dest file {p.mosquitto_log}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        # queued QoS 1 messages and persistent sessions survive a broker restart
        "persistence true",
        f"persistence_location {p.persist}",
        "autosave_interval 60",
        # small packets go out at once: without it each job costs two ~44 ms Nagle stalls
        "set_tcp_nodelay true",
        "",
        "# jobsd and tools on this PC: loopback only, no TLS",
        f"listener {s['mqtt_port']} 127.0.0.1",
        "allow_anonymous true",
        "",
        "# devices: mutual TLS; the certificate's CN is the username (= thing name); jobsd's ACL",
        f"listener {s['tls_port']} {s['bind_addr']}",
        f"cafile {pki.ca_pem}",
        f"certfile {broker_files['cert_pem']}",
        f"keyfile {broker_files['key_pem']}",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {p.acl}",
    ]
    if os.geteuid() == 0:  # else mosquitto drops to user `mosquitto`, who cannot read DIR
        lines.insert(1, "user root")
    return "\n".join(lines) + "\n"


def env_lines(p: Paths, s: dict) -> list[str]:
    control = f"http://127.0.0.1:{s['control_port']}"
    data = f"http://{_url_host(s['host'])}:{s['data_port']}"
    return [
        f"export AWS_SHARED_CREDENTIALS_FILE={shlex.quote(p.credentials)}",
        f"export AWS_PROFILE={PROFILE}",
        f"export AWS_REGION={s['region']}",
        f"export AWS_ENDPOINT_URL_IOT={control}",
        f"export AWS_ENDPOINT_URL_IOT_JOBS_DATA={data}",
        f"export IOTJOBS_ENDPOINT={control}",
        f"export IOTJOBS_DATA_ENDPOINT={data}",
    ]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- processes --------------------------------------------------------------------------------
def _start_time(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat (start time in clock ticks): a PID with another start time
    is another process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


def alive(rec: Optional[dict]) -> bool:
    """The recorded process still runs and is the one recorded (not a reused PID, not a zombie)."""
    if not rec:
        return False
    return (_start_time(rec["pid"]) == rec["start"]) and _state(rec["pid"]) not in ("Z", "X", None)


def spawn(argv: list[str], stdout: str, stderr: str) -> dict:
    with open(stdout, "wb") as out, open(stderr, "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True, cwd=ROOT)
    return {"pid": proc.pid, "start": _start_time(proc.pid), "argv": argv, "_popen": proc}


def stop_process(rec: dict, timeout: float = STOP_TIMEOUT) -> str:
    """SIGTERM, then SIGKILL after `timeout`; only if the record is still that process."""
    if not alive(rec):
        return "not running"
    pid = rec["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(rec) and time.monotonic() < deadline:
        _reap(rec)
        time.sleep(0.05)
    if alive(rec):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while alive(rec) and time.monotonic() < deadline:
            _reap(rec)
            time.sleep(0.05)
        return "killed (did not stop within %.0f s of SIGTERM)" % timeout
    return "stopped"


def _reap(rec: dict) -> None:
    proc = rec.get("_popen")
    if proc is not None:
        proc.poll()


def _wait(cond, timeout: float, what: str, proc: dict, log: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        _reap(proc)
        if not alive(proc):
            raise StackError(f"{what}: the process exited; its log ({log}) ends:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{what}: not ready within {timeout:.0f} s; see {log}:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
    except OSError:
        return "(no log)"


def _records(p: Paths) -> dict:
    return _read_json(p.pids) or {}


def _save_records(p: Paths, recs: dict) -> None:
    _write(p.pids, json.dumps({k: {f: v for f, v in r.items() if not f.startswith("_")}
                               for k, r in recs.items()}, indent=1) + "\n")


# -- commands ---------------------------------------------------------------------------------
def settings_for(args: argparse.Namespace, p: Paths) -> dict:
    saved = _read_json(p.settings) or {}
    s = dict(DEFAULTS)
    s.update({k: v for k, v in saved.items() if k in DEFAULTS})
    for k in DEFAULTS:
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    s["host"], s["tls_port"] = split_endpoint(s["endpoint"])
    s["bind_addr"] = resolve(s["bind"] or s["host"])
    return s


def up(args: argparse.Namespace) -> int:
    p = Paths(args.dir)
    os.makedirs(p.dir, exist_ok=True)
    os.chmod(p.dir, 0o700)  # keys, credentials and the database: this user only
    recs = _records(p)
    running = [name for name in ("mosquitto", "jobsd") if alive(recs.get(name))]
    if running == ["mosquitto", "jobsd"]:
        print(f"stack: already running in {p.dir} (tools/stack down --dir {_rel(p.dir)} stops it)")
        s = settings_for(argparse.Namespace(), p)
        _print_summary(p, s)
        return 0
    if running:
        raise StackError(f"half a stack is running ({', '.join(running)}): "
                         f"run `tools/stack down --dir {_rel(p.dir)}` first")
    s = settings_for(args, p)
    checks = [(s["bind_addr"], s["tls_port"], "the device listener (--endpoint)"),
              ("127.0.0.1", s["mqtt_port"], "the loopback MQTT listener (--mqtt-port)"),
              ("127.0.0.1", s["control_port"], "jobsd's control plane (--control-port)"),
              (s["bind_addr"], s["data_port"], "jobsd's data API (--data-port)")]
    ports = [c[1] for c in checks]
    if len(set(ports)) != len(ports):
        raise StackError(f"the four ports must differ: {ports}")
    for addr, port, what in checks:
        check_bindable(addr, port, what)
    mosquitto = mosquitto_binary()

    pki, broker_files, notes = ensure_certificates(p, s["host"])
    ensure_credentials(p)
    subprocess.run([os.path.join(TOOLS, "jobsd"), "--write-acl", p.acl], check=True)
    os.makedirs(p.persist, exist_ok=True)
    os.makedirs(p.files, exist_ok=True)
    _write(p.conf, mosquitto_conf(p, s, broker_files, pki))
    _write(p.settings, json.dumps({k: s[k] for k in DEFAULTS}, indent=1) + "\n")
    _write(p.env, "# . this file: boto3, the AWS CLI and tools/jobs then talk to the local stack\n"
           + "\n".join(env_lines(p, s)) + "\n", 0o600)
    for n in notes:
        print("stack: " + n)

    recs = {}
    try:
        recs["mosquitto"] = spawn([mosquitto, "-c", p.conf], os.devnull, p.mosquitto_log)
        _save_records(p, recs)
        probe = "127.0.0.1" if ipaddress.ip_address(s["bind_addr"]).is_unspecified else s["bind_addr"]
        _wait(lambda: port_open(s["mqtt_port"]) and port_open(s["tls_port"], probe),
              START_TIMEOUT, "mosquitto", recs["mosquitto"], p.mosquitto_log)
        data_url = f"http://{_url_host(s['host'])}:{s['data_port']}"
        jobsd_argv = [os.path.join(TOOLS, "jobsd"), "--broker", f"127.0.0.1:{s['mqtt_port']}",
                      "--control", f"127.0.0.1:{s['control_port']}",
                      "--data", f"{_url_host(s['bind_addr'])}:{s['data_port']}",
                      "--db", p.db, "--files", p.files, "--files-url", data_url,
                      "--credentials", p.credentials, "--region", s["region"],
                      "--client-id", "jobsd-stack"]
        recs["jobsd"] = spawn(jobsd_argv, p.jobsd_out, p.jobsd_log)
        _save_records(p, recs)
        _wait(lambda: _ready(p.jobsd_out), START_TIMEOUT, "jobsd", recs["jobsd"], p.jobsd_log)
    except BaseException:
        for name in ("jobsd", "mosquitto"):
            if name in recs:
                stop_process(recs[name])
        if os.path.exists(p.pids):
            os.remove(p.pids)
        raise
    print(f"stack: up in {_rel(p.dir)} (mosquitto pid {recs['mosquitto']['pid']}, "
          f"jobsd pid {recs['jobsd']['pid']})")
    _print_summary(p, s)
    return 0


def _ready(path: str) -> bool:
    try:
        with open(path) as f:
            return any(line.startswith("READY ") for line in f)
    except OSError:
        return False


def _rel(path: str) -> str:
    rel = os.path.relpath(path, os.getcwd())
    return path if rel.startswith("..") else rel


def _print_summary(p: Paths, s: dict) -> None:
    host = s["host"]
    print(f"  devices (MQTT, mutual TLS):  {_url_host(host)}:{s['tls_port']}  "
          f"(listening on {s['bind_addr']})")
    print(f"  jobsd data API and files:    http://{_url_host(host)}:{s['data_port']}")
    print(f"  jobsd control plane (iot):   http://127.0.0.1:{s['control_port']}")
    print(f"  MQTT for tools (no TLS):     127.0.0.1:{s['mqtt_port']}")
    print("A board:")
    print(f"  tools/provision THING --local {_rel(p.ca)} --endpoint {_url_host(host)}:{s['tls_port']} "
          f"--acl {_rel(p.acl)}")
    print("boto3, the AWS CLI and tools/jobs (signed with the stack's key):")
    print(f"  . {_rel(p.env)}")
    print("Stop:")
    print(f"  tools/stack down --dir {_rel(p.dir)}")


def down(args: argparse.Namespace) -> int:
    p = Paths(args.dir)
    recs = _records(p)
    if not recs:
        print(f"stack: nothing running in {_rel(p.dir)}")
        return 0
    for name in ("jobsd", "mosquitto"):  # jobsd first: it finishes its requests and disconnects
        if name in recs:
            print(f"stack: {name} (pid {recs[name]['pid']}) {stop_process(recs[name])}")
    os.remove(p.pids)
    return 0


def status(args: argparse.Namespace) -> int:
    p = Paths(args.dir)
    recs = _records(p)
    up_ = [n for n in ("mosquitto", "jobsd") if alive(recs.get(n))]
    for name in ("mosquitto", "jobsd"):
        rec = recs.get(name)
        state = f"running (pid {rec['pid']})" if name in up_ else "stopped"
        print(f"{name}: {state}")
    if len(up_) == 2:
        _print_summary(p, settings_for(argparse.Namespace(), p))
        return 0
    return 3 if not up_ else 1


def env(args: argparse.Namespace) -> int:
    p = Paths(args.dir)
    if not os.path.exists(p.env):
        raise StackError(f"no stack in {_rel(p.dir)}: run `tools/stack up` first")
    with open(p.env) as f:
        sys.stdout.write(f.read())
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/stack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("up", "make what is missing and start mosquitto and jobsd"),
                           ("down", "stop them (by the PIDs `up` recorded)"),
                           ("status", "running or not (exit 0 running, 3 stopped, 1 half)"),
                           ("env", "print the environment lines for boto3, the AWS CLI, tools/jobs")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--dir", default=DEFAULT_DIR, help="the stack's folder (default build/stack)")
        if name == "up":
            c.add_argument("--endpoint", metavar="HOST[:PORT]",
                           help="where boards reach the broker: this PC's address on their network "
                                "(default 127.0.0.1:8883; port 8883 when left out). The broker's "
                                "certificate names HOST; the device listener binds its address")
            c.add_argument("--bind", metavar="ADDR",
                           help="listen for devices (and jobsd's data API) on ADDR instead of the "
                                "endpoint's address (e.g. behind NAT, or 0.0.0.0)")
            c.add_argument("--mqtt-port", type=int, help="loopback MQTT listener (default 1883)")
            c.add_argument("--control-port", type=int, help="jobsd's control plane (default 8440)")
            c.add_argument("--data-port", type=int, help="jobsd's data API and files (default 8441)")
            c.add_argument("--region", help="the region jobsd signs and answers as (default us-east-1)")
    args = ap.parse_args(argv)
    try:
        return {"up": up, "down": down, "status": status, "env": env}[args.cmd](args)
    except StackError as e:
        print(f"stack: {e}", file=sys.stderr)
        return 2
