"""AWS IoT commands end to end: boto3 `iot` creates the command, boto3 `iot-jobs-data`
StartCommandExecution starts it, jobsd delivers it over MQTT to a simulated device, the device
runs its handler and reports, boto3 `iot` GetCommandExecution shows the outcome. Built-in
handlers, rejections, idempotency, timeouts while the device is off, and a device killed in the
middle of a command."""
import json
import os

import pytest

from conftest import ACCOUNT_ARN, stack, thing_arn

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"}


def command(iot, name, payload, content_type="application/json"):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    iot.create_command(commandId=name, payload={"content": body, "contentType": content_type})
    return f"{ACCOUNT_ARN}:command/{name}"


def start(jobsd, thing, command_arn, **kw):
    return jobsd.data.start_command_execution(targetArn=thing_arn(thing), commandArn=command_arn,
                                              **kw)["executionId"]


def outcome(iot, thing, eid, dev=None, timeout=30):
    def done():
        ex = iot.get_command_execution(executionId=eid, targetArn=thing_arn(thing))
        return ex if ex["status"] in TERMINAL else None

    try:
        return stack.wait_until(done, timeout, f"command execution {eid}", 0.1)
    except TimeoutError:
        raise AssertionError("no terminal status" + ("\n" + dev.log_text() if dev else "")) from None


def result(ex):
    return {k: next(iter(v.values())) for k, v in (ex.get("result") or {}).items()}


@pytest.fixture
def online(iot, device):
    """A device that is up and subscribed (it has answered one job)."""

    def make(thing, config=None):
        iot.create_thing(thingName=thing)
        dev = device(thing, config=config)
        stack.wait_until(lambda: "heap free=" in dev.log_text(10**6), 30, "the device online")
        return dev

    return make


@pytest.mark.images()  # fleet32, stock32 and pip
def test_ping(jobsd, iot, online):
    dev = online("cmd-ping")
    arn = command(iot, "ping", {"command": "ping"})
    eid = start(jobsd, "cmd-ping", arn)
    ex = outcome(iot, "cmd-ping", eid, dev)
    assert ex["status"] == "SUCCEEDED", ex
    r = result(ex)
    assert r["pong"] is True and int(r["heap_free"]) > 0 and int(r["uptime_ms"]) >= 0, r
    assert r["boot"] == "1"


def test_get_config_leaves_secrets_out(jobsd, iot, online):
    dev = online("cmd-cfg", config={"download": {"token": "s3cr3t", "allow": ["https://x/"]},
                                    "wifi_password": "hunter2"})
    arn = command(iot, "get-config", {"command": "get-config"})
    ex = outcome(iot, "cmd-cfg", start(jobsd, "cmd-cfg", arn), dev)
    assert ex["status"] == "SUCCEEDED", ex
    r = result(ex)
    assert r["thing"] == "cmd-cfg" and json.loads(r["keepalive"]) > 0, r
    assert "tls" not in r and "wifi_password" not in r, r
    assert json.loads(r["download"]) == {"allow": ["https://x/"]}, r["download"]
    text = json.dumps(r)
    assert "key.der" not in text and "hunter2" not in text and "s3cr3t" not in text
    arn2 = command(iot, "get-port", {"command": "get-config", "keys": ["port"]})
    ex = outcome(iot, "cmd-cfg", start(jobsd, "cmd-cfg", arn2), dev)
    assert set(result(ex)) == {"port"}, result(ex)


def test_set_log_level(jobsd, iot, online):
    dev = online("cmd-log")
    quiet = command(iot, "quiet", {"command": "set-log-level", "level": "error"})
    ex = outcome(iot, "cmd-log", start(jobsd, "cmd-log", quiet), dev)
    assert ex["status"] == "SUCCEEDED" and result(ex) == {"level": "error", "previous": "info"}
    # with level "error" a job no longer prints its info lines
    iot.create_job(jobId="after-quiet", targets=[thing_arn("cmd-log")],
                   document=json.dumps({"operation": "demo", "steps": 0}))
    stack.wait_until(lambda: iot.describe_job_execution(jobId="after-quiet", thingName="cmd-log")[
        "execution"]["status"] == "SUCCEEDED", 30, "the job")
    assert "job after-quiet" not in dev.log_text(10**6)
    bad = command(iot, "loud", {"command": "set-log-level", "level": "shouting"})
    ex = outcome(iot, "cmd-log", start(jobsd, "cmd-log", bad), dev)
    assert ex["status"] == "REJECTED" and ex["statusReason"]["reasonCode"] == "BAD_ARGUMENT", ex


@pytest.mark.parametrize("payload,content_type,reason", [
    ({"command": "format-disk"}, "application/json", "UNKNOWN_COMMAND"),
    ({"no": "command"}, "application/json", "BAD_PAYLOAD"),
    (b"[1, 2", "application/json", "BAD_PAYLOAD"),
    (b"ping", "text/plain", "UNSUPPORTED_PAYLOAD"),
    (b"\xa1\x67command\x64ping", "application/cbor", "UNSUPPORTED_PAYLOAD"),
])
def test_rejected_commands(jobsd, iot, online, payload, content_type, reason):
    dev = online("cmd-rej")
    arn = command(iot, "c1", payload, content_type)
    ex = outcome(iot, "cmd-rej", start(jobsd, "cmd-rej", arn), dev)
    assert ex["status"] == "REJECTED" and ex["statusReason"]["reasonCode"] == reason, ex
    ping = command(iot, "ping", {"command": "ping"})
    assert outcome(iot, "cmd-rej", start(jobsd, "cmd-rej", ping), dev)["status"] == "SUCCEEDED"


@pytest.mark.images()  # fleet32, stock32 and pip
def test_reboot_command(jobsd, iot, online):
    dev = online("cmd-boot")
    arn = command(iot, "reboot", {"command": "reboot"})
    ex = outcome(iot, "cmd-boot", start(jobsd, "cmd-boot", arn), dev)
    assert ex["status"] == "SUCCEEDED" and result(ex) == {"rebooted": True}, ex
    assert len(dev.boots()) == 2, "exactly one reset"


def test_idempotent_start_runs_once(jobsd, iot, online):
    dev = online("cmd-idem", config={"test_handlers": True})
    arn = command(iot, "effect", {"command": "effect"})
    a = start(jobsd, "cmd-idem", arn, clientToken="tok-1")
    b = start(jobsd, "cmd-idem", arn, clientToken="tok-1")
    assert a == b
    assert outcome(iot, "cmd-idem", a, dev)["status"] == "SUCCEEDED"
    with pytest.raises(jobsd.data.exceptions.ConflictException):
        start(jobsd, "cmd-idem", arn, clientToken="tok-1", executionTimeoutSeconds=99)
    with open(os.path.join(dev.flash, "command-effects.log")) as f:
        assert f.read().split() == [a]


def test_times_out_while_the_device_is_off(jobsd, iot):
    iot.create_thing(thingName="cmd-off")
    arn = command(iot, "ping", {"command": "ping"})
    eid = start(jobsd, "cmd-off", arn, executionTimeoutSeconds=1)
    assert outcome(iot, "cmd-off", eid)["status"] == "TIMED_OUT"


@pytest.mark.parametrize("point,status", [
    ("command-journaled", "FAILED"),
    ("command-before-effect", "FAILED"),
    ("command-after-effect", "FAILED"),
    ("command-finished", "SUCCEEDED"),
    ("command-answered", "SUCCEEDED"),
])
@pytest.mark.images()  # fleet32, stock32 and pip
def test_killed_mid_command_never_runs_it_twice(jobsd, iot, device, point, status):
    """The device is killed at a point of a command's life and boots again: the execution ends
    once, the handler's side effect happened at most once, and the device takes the next one."""
    thing = "cmd-kill-" + point.split("-", 1)[1]
    iot.create_thing(thingName=thing)
    dev = device(thing, config={"test_handlers": True, "halt_at": point})
    stack.wait_until(lambda: "heap free=" in dev.log_text(10**6), 30, "the device online")
    arn = command(iot, "effect", {"command": "effect"})
    eid = start(jobsd, thing, arn, executionTimeoutSeconds=60)
    stack.wait_until(lambda: f"@@HALT {point}" in dev.log_text(10**7), 30, "the halt")
    dev.power_cut()
    ex = outcome(iot, thing, eid, dev)
    assert ex["status"] == status, (ex, dev.log_text())
    if status == "FAILED":
        assert ex["statusReason"]["reasonCode"] == "INTERRUPTED", ex
    try:
        with open(os.path.join(dev.flash, "command-effects.log")) as f:
            effects = f.read().split()
    except FileNotFoundError:
        effects = []
    assert effects.count(eid) <= 1, effects
    assert effects.count(eid) == (0 if point in ("command-journaled", "command-before-effect")
                                  else 1)
    # a request published while nothing is subscribed is lost (clean sessions, as on AWS):
    # wait until the rebooted device is back online
    def online_again():
        before, boot2, after = dev.log_text(10**7).partition("devsim: boot 2 ")
        return boot2 and "heap free=" in after

    stack.wait_until(online_again, 30, "the device online again")
    ping = command(iot, "ping", {"command": "ping"})
    assert outcome(iot, thing, start(jobsd, thing, ping), dev)["status"] == "SUCCEEDED"
