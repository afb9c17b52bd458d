"""tools/stack: the local stack for real boards, as a new user runs it (real processes).

The device listener and jobsd's data API are put on 127.0.0.2 (still this machine: Linux
answers the whole of 127.0.0.0/8) so that "binds where the user asked and nowhere else" can be
checked against the kernel's socket table: the loopback listeners stay on 127.0.0.1."""
from __future__ import annotations

import configparser
import json
import os
import signal
import subprocess

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import ROOT, wait_execution
from iotjobs_host import stack

STACK = os.path.join(ROOT, "tools", "stack")
PROVISION = os.path.join(ROOT, "tools", "provision")
JOBS = os.path.join(ROOT, "tools", "jobs")
HOST = "127.0.0.2"


def run(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([*args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{args[0]} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def pids(folder) -> dict:
    try:
        with open(os.path.join(folder, "pids.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def listening() -> dict[int, set[str]]:
    """Port -> local addresses of every listening TCP socket on this machine (IPv4 and IPv6)."""
    out: dict[int, set[str]] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{name}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            addr, port = fields[1].split(":")
            if fields[3] != "0A":  # LISTEN
                continue
            if name == "tcp":
                host = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                host = "v6:" + addr
            out.setdefault(int(port, 16), set()).add(host)
    return out


@pytest.fixture
def stack_dir(tmp_path):
    """The stack's folder; whatever `up` started there is stopped at the end, even on failure."""
    folder = tmp_path / "stack"
    yield folder
    run(STACK, "down", "--dir", str(folder), check=False)
    for rec in pids(folder).values():  # `down` failed: end them by their PIDs
        if running(rec["pid"]):
            os.kill(rec["pid"], signal.SIGKILL)


@pytest.fixture
def ports():
    picked: set[int] = set()
    while len(picked) < 4:
        picked.add(stack.free_port())
    tls, mqtt, control, data = sorted(picked)
    return {"tls": tls, "mqtt": mqtt, "control": control, "data": data}


def up(folder, ports, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(STACK, "up", "--dir", str(folder), "--endpoint", f"{HOST}:{ports['tls']}",
               "--mqtt-port", str(ports["mqtt"]), "--control-port", str(ports["control"]),
               "--data-port", str(ports["data"]), *extra, check=check)


def signed(folder, service: str, url: str):
    cp = configparser.ConfigParser()
    cp.read(os.path.join(folder, "credentials"))
    section = cp[cp.sections()[0]]
    return boto3.client(service, endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id=section["aws_access_key_id"],
                        aws_secret_access_key=section["aws_secret_access_key"],
                        config=Config(retries={"max_attempts": 1}))


def stack_env(folder) -> dict:
    """The process environment after `. DIR/env`, with no other AWS settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IOTJOBS_"))}
    with open(os.path.join(folder, "env")) as f:
        for line in f:
            if line.startswith("export "):
                k, _, v = line[7:].strip().partition("=")
                env[k] = v.strip("'")
    return env


def test_up_provision_job_down_up_again(stack_dir, ports, tmp_path, procs):
    r = up(stack_dir, ports)
    recs = pids(stack_dir)
    assert set(recs) == {"mosquitto", "jobsd"} and all(running(x["pid"]) for x in recs.values())
    # what it prints is what a user needs next
    assert f"--endpoint {HOST}:{ports['tls']}" in r.stdout and "tools/provision THING --local" in r.stdout
    assert f". {stack_dir}/env" in r.stdout
    assert "tools/stack down" in r.stdout

    conf = (stack_dir / "mosquitto.conf").read_text().splitlines()
    assert "set_tcp_nodelay true" in conf and "require_certificate true" in conf
    assert "use_identity_as_username true" in conf and f"acl_file {stack_dir}/things.acl" in conf
    assert "persistence true" in conf
    assert oct(os.stat(stack_dir / "credentials").st_mode & 0o777) == "0o600"
    assert oct(os.stat(stack_dir / "ca" / "ca-key.pem").st_mode & 0o777) == "0o600"

    # it listens where asked and nowhere else
    table = listening()
    assert table.get(ports["tls"]) == {HOST}, table.get(ports["tls"])
    assert table.get(ports["data"]) == {HOST}, table.get(ports["data"])
    assert table.get(ports["mqtt"]) == {"127.0.0.1"}, table.get(ports["mqtt"])
    assert table.get(ports["control"]) == {"127.0.0.1"}, table.get(ports["control"])

    # the control plane wants the stack's key: an unsigned-looking client is refused
    anonymous = stack.boto3_client("iot", f"http://127.0.0.1:{ports['control']}")
    with pytest.raises(ClientError) as e:
        anonymous.list_things()
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    iot = signed(stack_dir, "iot", f"http://127.0.0.1:{ports['control']}")

    # a board: provisioned from the stack's CA, it connects over mutual TLS and runs a job
    thing = "stack-dev"
    device_dir = tmp_path / "device"
    r = run(PROVISION, thing, "--local", str(stack_dir / "ca"), "--endpoint",
            f"{HOST}:{ports['tls']}", "--acl", str(stack_dir / "things.acl"),
            "--out", str(device_dir / "flash"))
    assert "created" not in r.stdout  # the stack's CA, not a new one
    iot.create_thing(thingName=thing)
    dev = stack.Device(str(device_dir), thing, f"{HOST}:{ports['tls']}")
    procs.append(dev)
    iot.create_job(jobId="stack-job", targets=[iot.describe_thing(thingName=thing)["thingArn"]],
                   document=json.dumps({"operation": "demo", "steps": 2}))
    ex = wait_execution(iot, "stack-job", thing, {"SUCCEEDED", "FAILED", "REJECTED"}, device=dev)
    assert ex["status"] == "SUCCEEDED", ex

    # tools/jobs after `. DIR/env` signs with the stack's key and sees the job
    r = run(JOBS, "list", env=stack_env(stack_dir))
    assert "stack-job" in r.stdout, r.stdout

    # status, then down leaves no process behind
    assert run(STACK, "status", "--dir", str(stack_dir)).returncode == 0
    dev.stop()
    ca_before = (stack_dir / "ca" / "ca.pem").read_bytes()
    creds_before = (stack_dir / "credentials").read_bytes()
    r = run(STACK, "down", "--dir", str(stack_dir))
    assert "jobsd" in r.stdout and "mosquitto" in r.stdout
    assert not any(running(x["pid"]) for x in recs.values())
    assert not pids(stack_dir)
    assert run(STACK, "status", "--dir", str(stack_dir), check=False).returncode == 3

    # a second up, with no options: same settings, same CA and key, the thing and job kept
    r = run(STACK, "up", "--dir", str(stack_dir))
    assert f"{HOST}:{ports['tls']}" in r.stdout
    assert (stack_dir / "ca" / "ca.pem").read_bytes() == ca_before
    assert (stack_dir / "credentials").read_bytes() == creds_before
    assert "made" not in r.stdout  # nothing new: no CA, no broker certificate
    iot = signed(stack_dir, "iot", f"http://127.0.0.1:{ports['control']}")
    assert iot.describe_thing(thingName=thing)["thingName"] == thing
    assert iot.describe_job_execution(jobId="stack-job", thingName=thing)["execution"][
        "status"] == "SUCCEEDED"


def test_second_up_while_running_starts_nothing(stack_dir, ports):
    up(stack_dir, ports)
    first = pids(stack_dir)
    r = up(stack_dir, ports)
    assert "already running" in r.stdout
    assert pids(stack_dir) == first


def test_refused_before_anything_starts(stack_dir, ports):
    # TEST-NET-1: not an address of this machine
    r = run(STACK, "up", "--dir", str(stack_dir), "--endpoint", f"192.0.2.1:{ports['tls']}",
            check=False)
    assert r.returncode == 2 and "is not an address of this machine" in r.stderr, r.stderr
    assert not pids(stack_dir) and not (stack_dir / "ca").exists()

    # a port someone else holds
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", ports["control"]))
        s.listen()
        r = up(stack_dir, ports, check=False)
    assert r.returncode == 2 and f"127.0.0.1:{ports['control']} is already in use" in r.stderr
    assert not pids(stack_dir)

    r = run(STACK, "up", "--dir", str(stack_dir), "--endpoint", "127.0.0.1:99999", check=False)
    assert r.returncode == 2 and "1..65535" in r.stderr
    r = run(STACK, "up", "--dir", str(stack_dir), "--endpoint", "no-such-host.invalid", check=False)
    assert r.returncode == 2 and "cannot resolve" in r.stderr


def test_a_new_endpoint_gets_a_new_broker_certificate(stack_dir, ports):
    from cryptography import x509

    up(stack_dir, ports)
    run(STACK, "down", "--dir", str(stack_dir))
    ca = (stack_dir / "ca" / "ca.pem").read_bytes()
    r = run(STACK, "up", "--dir", str(stack_dir), "--endpoint", f"stack.test:{ports['tls']}",
            "--bind", HOST)
    assert "made the broker certificate for stack.test" in r.stdout
    cert = x509.load_pem_x509_certificate((stack_dir / "ca" / "broker" / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "stack.test" in names.get_values_for_type(x509.DNSName)
    assert (stack_dir / "ca" / "ca.pem").read_bytes() == ca
    assert listening().get(ports["tls"]) == {HOST}


def test_down_never_ends_a_process_it_did_not_start(stack_dir, ports):
    """A PID in pids.json that now belongs to another process (same PID, other start time)."""
    up(stack_dir, ports)
    recs = pids(stack_dir)
    run(STACK, "down", "--dir", str(stack_dir))
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        recs["jobsd"]["pid"] = stranger.pid  # as if the PID had been reused
        (stack_dir / "pids.json").write_text(json.dumps(recs))
        r = run(STACK, "down", "--dir", str(stack_dir))
        assert "not running" in r.stdout
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
