"""Updates over MQTT when things go wrong in the middle of a stream: the link goes dead for 30 s,
the broker restarts, jobsd restarts, the stream is updated or deleted. The device talks mutual TLS
to mosquitto through tools/iotjobs_host/netproxy.py, which cuts the link once a chosen number of
bytes has gone down to the device (so every fault lands mid-transfer, whatever the machine's
speed); the fault is played while the link is dead, then the link comes back.

And the reason streams exist: a 1 MiB firmware update over MQTT is done with the one TLS
connection the device already has (the proxy counts them), and no other connection at all (the
document holds no URL and the device's HTTP allowlist is empty)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import ROOT, stack, thing_arn, wait_execution
from iotjobs_host.netproxy import Proxy

sys.path.insert(0, os.path.join(ROOT, "tools"))
from iotjobs_host.devsim import make_image, ota_dir, read_otadata  # noqa: E402

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}
ROLE = "arn:aws:iam::123456789012:role/stream-reader"
KEY = ec.generate_private_key(ec.SECP256R1())
SIZE = 1024 * 1024
CUT_AT = 300 * 1024  # bytes down to the device before the link dies: about a quarter of the file
KEEPALIVE = 5


def sign(data: bytes) -> str:
    return base64.b64encode(KEY.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


@pytest.fixture
def jobsd(tmp_path, mosquitto, procs, files) -> stack.Jobsd:
    """The usual jobsd, with its test hooks on (a silent stream service)."""
    j = stack.Jobsd(str(tmp_path / "jobsd"), mosquitto.broker, files=str(files),
                    extra=["--test-hooks"])
    procs.append(j)
    return j


def hooks(jobsd: stack.Jobsd, **body) -> dict:
    """jobsd's test hook (PUT /_jobsd/test-hooks)."""
    import http.client

    host, port = jobsd.control_url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("PUT", "/_jobsd/test-hooks", body=json.dumps(body).encode())
        reply = conn.getresponse()
        out = json.loads(reply.read())
        assert reply.status == 200, out
        return out
    finally:
        conn.close()


@pytest.fixture
def proxy(mosquitto):
    p = Proxy(mosquitto.tls_port)
    yield p
    p.stop()


@pytest.fixture
def stream_ota(tmp_path, iot, files, device, proxy):
    """stream_ota(thing) -> (device, image): a 1 MiB signed image in stream `<thing>-fw`, an OTA
    job `<thing>-0` naming only the stream, and a device (MQTT preferred, no HTTP allowed)
    connected through the proxy."""
    pub = tmp_path / "ota-pub.der"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))

    def start(thing: str, keepalive: int = 60, stream: dict | None = None,
              extra: dict | None = None):
        image = make_image("2.0.0", size=SIZE)
        (files / "fw").mkdir(parents=True, exist_ok=True)
        (files / "fw" / f"{thing}.bin").write_bytes(image)
        iot.create_stream(streamId=f"{thing}-fw", roleArn=ROLE, files=[
            {"fileId": 0, "s3Location": {"bucket": "fw", "key": f"{thing}.bin"}}])
        iot.create_thing(thingName=thing)
        doc = {"operation": "ota", "stream": {"id": f"{thing}-fw", "fileId": 0},
               "size": len(image), "sha256": hashlib.sha256(image).hexdigest(),
               "signature": sign(image), "version": "2.0.0"}
        iot.create_job(jobId=f"{thing}-0", targets=[thing_arn(thing)], document=json.dumps(doc))
        cfg = {"ota": {"pubkey": str(pub), "allow": []}, "progress_min_ms": 0,
               "transfer": "mqtt", "stream": stream or {"block": 4096, "idle_ms": 3000}}
        cfg.update(extra or {})
        return device(thing, config=cfg, broker=proxy.address, keepalive=keepalive), image

    return start


def outcome(iot, dev, thing: str, timeout: float = 120) -> tuple[str, dict]:
    ex = wait_execution(iot, f"{thing}-0", thing, TERMINAL, timeout, device=dev)
    return ex["status"], ex.get("statusDetails", {}).get("detailsMap", {})


def running_slot(dev) -> str:
    return read_otadata(ota_dir(dev.flash))["boot"]


def confirmed_new_image(dev) -> None:
    od = read_otadata(ota_dir(dev.flash))
    assert od["boot"] == "ota_1" and od["state"].get("ota_1") == "VALID", od


def cut_mid_stream(proxy: Proxy, dev) -> None:
    """Arm the cut, then wait until it has happened (the device is mid-download)."""
    assert proxy.cut_fired.wait(60), "the transfer never passed the cut point\n" + dev.log_text()
    assert proxy.is_cut


def test_ota_over_mqtt_uses_the_one_tls_connection_the_device_has(iot, stream_ota, proxy):
    proxy_before = proxy.accepted
    dev, _ = stream_ota("one-tls")
    status, details = outcome(iot, dev, "one-tls")
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
    confirmed_new_image(dev)
    # one connection per boot (the old firmware, then the new one after the reset), never two
    # at once; and the device had nowhere else to go (no URL, nothing allowed)
    assert proxy.accepted - proxy_before == len(dev.boots()) == 2, (proxy.accepted, dev.boots())
    assert proxy.max_open == 1


def test_a_dead_link_for_30_s_mid_stream_resumes_and_completes(iot, stream_ota, proxy):
    proxy.cut_after(CUT_AT)
    dev, _ = stream_ota("dead-link", keepalive=KEEPALIVE)
    cut_mid_stream(proxy, dev)
    t_cut = time.monotonic()
    stack.wait_until(lambda: "link lost" in dev.log_text(10**7), 30,
                     "the device to notice the dead link", 0.05)
    time.sleep(max(0.0, t_cut + 30 - time.monotonic()))  # the rest of the outage: the scenario
    proxy.restore()
    status, details = outcome(iot, dev, "dead-link")
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
    confirmed_new_image(dev)
    assert proxy.accepted >= 3  # the first link, at least one reconnect, the new firmware's


def test_broker_restart_mid_stream_resumes(iot, stream_ota, proxy, mosquitto):
    proxy.cut_after(CUT_AT)
    dev, _ = stream_ota("broker-restart")
    cut_mid_stream(proxy, dev)
    mosquitto.restart()  # every session is gone, the stream's subscriptions with them
    proxy.restore()
    status, details = outcome(iot, dev, "broker-restart")
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
    confirmed_new_image(dev)


def test_jobsd_restart_mid_stream_resumes(tmp_path, iot, stream_ota, proxy, jobsd, mosquitto,
                                          files, procs):
    proxy.cut_after(CUT_AT)
    dev, _ = stream_ota("jobsd-restart")
    cut_mid_stream(proxy, dev)
    jobsd.stop()
    second = stack.Jobsd(str(tmp_path / "jobsd"), mosquitto.broker, files=str(files),
                         db=str(tmp_path / "jobsd" / "jobsd.sqlite3"), log_name="jobsd2.log")
    procs.append(second)
    proxy.restore()
    status, details = outcome(second.iot, dev, "jobsd-restart")
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
    confirmed_new_image(dev)


@pytest.mark.parametrize("change,reason", [("update", "STREAM_CHANGED"),
                                           ("delete", "STREAM_NOT_FOUND")])
def test_stream_changed_or_deleted_mid_transfer_fails_and_keeps_the_firmware(
        iot, stream_ota, proxy, files, change, reason):
    thing = f"stream-{change}"
    proxy.cut_after(CUT_AT)
    dev, _ = stream_ota(thing)
    cut_mid_stream(proxy, dev)
    before = running_slot(dev)
    if change == "update":
        other = make_image("9.9.9", size=SIZE)
        (files / "fw" / "other.bin").write_bytes(other)
        iot.update_stream(streamId=f"{thing}-fw", files=[
            {"fileId": 0, "s3Location": {"bucket": "fw", "key": "other.bin"}}])
    else:
        iot.delete_stream(streamId=f"{thing}-fw")
    proxy.restore()
    status, details = outcome(iot, dev, thing)
    assert (status, details.get("reason")) == ("FAILED", reason), (details, dev.log_text())
    assert running_slot(dev) == before and len(dev.boots()) == 1  # nothing switched, no reset
    iot.create_job(jobId=f"{thing}-after", targets=[thing_arn(thing)],
                   document=json.dumps({"operation": "demo", "steps": 1}))
    ex = wait_execution(iot, f"{thing}-after", thing, TERMINAL, 60, device=dev)
    assert ex["status"] == "SUCCEEDED", ex  # and the device goes on


def test_a_silent_stream_service_fails_the_update_and_the_device_stays_online(
        iot, jobsd, stream_ota, proxy):
    """STREAMS.md 11.23: the service stops answering mid-file: after `tries` requests without a
    block the job ends FAILED STREAM_TIMEOUT; the boot partition is untouched and the MQTT
    connection was never dropped."""
    thing = "silent"
    proxy.cut_after(CUT_AT)
    dev, _ = stream_ota(thing, stream={"block": 4096, "idle_ms": 1000, "tries": 3})
    cut_mid_stream(proxy, dev)
    before = running_slot(dev)
    hooks(jobsd, streamFault="Silent")
    proxy.restore()
    status, details = outcome(iot, dev, thing)
    assert (status, details.get("reason")) == ("FAILED", "STREAM_TIMEOUT"), (details, dev.log_text())
    assert running_slot(dev) == before and len(dev.boots()) == 1
    assert proxy.accepted == 1 and "link lost" not in dev.log_text(10**7)
    hooks(jobsd, streamFault=None)
    iot.create_job(jobId=f"{thing}-after", targets=[thing_arn(thing)],
                   document=json.dumps({"operation": "demo", "steps": 1}))
    ex = wait_execution(iot, f"{thing}-after", thing, TERMINAL, 60, device=dev)
    assert ex["status"] == "SUCCEEDED", ex


# Power cuts during a 1 MiB image over MQTT (4 KiB blocks: 256 of them, the bitmap journaled
# every EVERY blocks), beside the three of test_streams_device.py (block 100, checkpoint 3, the
# last block): the first block, the first journal write and the block right after it, between
# two journal writes, mid-window late in the file, the last journal write, the block before
# the last, and after the verification (hash and signature checked, set_boot not yet done).
EVERY = 16
POWER_CUTS = ["stream-block#1", "stream-checkpoint#1", "stream-block#17", "stream-block#58",
              "stream-block#203", "stream-checkpoint#16", "stream-block#255", "ota-verified"]


@pytest.mark.parametrize("point", POWER_CUTS)
def test_power_cut_during_an_update_over_mqtt_fetches_only_what_is_missing(
        iot, stream_ota, point):
    import re

    thing = "cut-" + point.replace("#", "-")
    dev, _ = stream_ota(thing, extra={"halt_at": point})
    stack.wait_until(lambda: f"@@HALT {point}" in dev.log_text(10**7), 90, "the halt")
    dev.power_cut()
    status, details = outcome(iot, dev, thing)
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
    confirmed_new_image(dev)
    log = dev.log_text(10**7)
    m = re.search(rf"stream {thing}-fw/0: resuming, (\d+) of 256 blocks missing", log)
    assert m, log[-3000:]
    missing = int(m.group(1))
    done = [(int(a), int(b)) for a, b in
            re.findall(rf"stream {thing}-fw/0: (\d+) blocks fetched of (\d+)", log)]
    assert done[-1] == (missing, 256), (done, missing)  # after the cut: only what was missing
    name, _, k = point.partition("#")
    if name == "stream-checkpoint":
        assert missing == 256 - int(k) * EVERY, missing
    elif name == "stream-block":
        assert 256 - int(k) <= missing <= 256 - int(k) + EVERY, missing
    else:
        assert missing == 0  # verified: nothing to fetch again, only the checks to redo
