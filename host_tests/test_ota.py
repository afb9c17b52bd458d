"""Firmware OTA on a simulated ESP32 (devsim is the bootloader: two slots, pending-verify,
rollback) against jobsd's file server: signed images, failures that leave the running firmware
untouched, rollback of an image that fails its self-test, power cuts during the download."""
import base64
import hashlib
import json
import os
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import ROOT, stack, thing_arn, wait_execution
from iotjobs_host.fileserver import FlakyServer

sys.path.insert(0, os.path.join(ROOT, "tools"))
from iotjobs_host.devsim import make_image, ota_dir, read_otadata  # noqa: E402

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())


def sign(data, key=KEY):
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def presigned(key):
    return "${aws:iot:s3-presigned-url:https://s3.amazonaws.com/fw/%s}" % key


@pytest.fixture
def ota_device(tmp_path, device, iot):
    pub = tmp_path / "ota-pub.der"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))

    def start(thing, docs, extra=None):
        iot.create_thing(thingName=thing)
        for i, doc in enumerate(docs):
            iot.create_job(jobId=f"{thing}-{i}", targets=[thing_arn(thing)], document=json.dumps(doc))
        cfg = {"ota": {"pubkey": str(pub), "allow": ["http://127.0.0.1:"]}, "progress_min_ms": 0}
        cfg.update(extra or {})
        return device(thing, config=cfg, heap="176K")

    return start


def publish(files, name, image):
    p = files / "fw" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(image)


def native(name, image, version, **over):
    doc = {"operation": "ota", "url": presigned(name), "size": len(image),
           "sha256": hashlib.sha256(image).hexdigest(), "signature": sign(image), "version": version}
    doc.update(over)
    return doc


def result(iot, dev, thing, i, timeout=60):
    ex = wait_execution(iot, f"{thing}-{i}", thing, TERMINAL, timeout, device=dev)
    return ex["status"], ex.get("statusDetails", {}).get("detailsMap", {})


@pytest.mark.images()  # fleet32, stock32 and pip
def test_ota_happy_path_native_then_afr_ota(jobsd, iot, files, ota_device):
    img2 = make_image("2.0.0", size=256 * 1024)
    img3 = make_image("3.0.0", size=200 * 1024 + 123)
    publish(files, "v2.bin", img2)
    publish(files, "v3.bin", img3)
    afr = {"afr_ota": {"protocols": ["HTTP"], "files": [{"filepath": "v3.bin", "filesize": len(img3),
           "fileid": 0, "certfile": "signer", "update_data_url": presigned("v3.bin"),
           "auth_scheme": "aws.s3.presigned", "sig-sha256-ecdsa": sign(img3)}]}}
    dev = ota_device("ota-ok", [native("v2.bin", img2, "2.0.0"), afr])
    status, details = result(iot, dev, "ota-ok", 0)
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", details
    status, details = result(iot, dev, "ota-ok", 1)
    assert status == "SUCCEEDED" and details["version"] == "3.0.0", details
    log = dev.log_text(10**7)
    assert "firmware 3.0.0 confirmed" in log or "ota" in log


@pytest.mark.parametrize("name,mutate,reason", [
    ("hash", lambda d, img: d.update(sha256="0" * 64), "HASH_MISMATCH"),
    ("sig", lambda d, img: d.update(signature=sign(img, OTHER)), "BAD_SIGNATURE"),
    ("size", lambda d, img: d.update(size=len(img) - 10), "SIZE_MISMATCH"),
    ("404", lambda d, img: d.update(url=presigned("missing.bin")), "DOWNLOAD_FAILED"),
    ("allow", lambda d, img: d.update(url="http://example.com/v2.bin"), "URL_NOT_ALLOWED"),
    ("downgrade", lambda d, img: d.update(version="0.9.0"), "DOWNGRADE"),
    ("nosig", lambda d, img: d.pop("signature"), "NO_SIGNATURE"),
])
def test_ota_failures_keep_the_running_firmware(jobsd, iot, files, ota_device, name, mutate, reason):
    img = make_image("2.0.0", size=64 * 1024)
    publish(files, "v2.bin", img)
    doc = native("v2.bin", img, "2.0.0")
    mutate(doc, img)
    thing = "ota-" + name
    dev = ota_device(thing, [doc, {"operation": "demo", "steps": 0}])
    status, details = result(iot, dev, thing, 0)
    assert status in ("FAILED", "REJECTED") and details.get("reason") == reason, details
    assert result(iot, dev, thing, 1)[0] == "SUCCEEDED"
    assert len(dev.boots()) == 1, "a failed OTA never resets the device"
    od = read_otadata(ota_dir(dev.flash))
    assert not od or od.get("boot") in (None, "ota_0"), od  # still the factory slot


@pytest.mark.images()  # fleet32, stock32 and pip
def test_image_failing_its_self_test_is_rolled_back(jobsd, iot, files, ota_device):
    img = make_image("2.0.0", size=64 * 1024, selftest="fail")
    publish(files, "bad.bin", img)
    dev = ota_device("ota-rb", [native("bad.bin", img, "2.0.0"), {"operation": "demo", "steps": 0}])
    status, details = result(iot, dev, "ota-rb", 0)
    assert status == "FAILED" and details["reason"] == "rolled_back", details
    assert details["version"] == "1.0.0"
    assert result(iot, dev, "ota-rb", 1)[0] == "SUCCEEDED"
    assert "rollback" in dev.log_text(10**7)


OTA_POINTS = (
    ["start-next-accepted", "journaled"]
    + [f"ota-block#{k}" for k in (1, 10, 20, 40, 70)]           # mid-download, between checkpoints
    + [f"ota-checkpoint#{k}" for k in (1, 2, 3, 4)]             # right after each offset checkpoint
    + ["ota-verified", "before-reset", "ota-confirmed", "handler-done", "outbox-written",
       "before-update", "update-sent", "update-answered", "outbox-cleared"]
)


@pytest.mark.parametrize("point", OTA_POINTS)
def test_ota_power_cut_resumes(jobsd, iot, files, ota_device, point):
    """A power cut at each of 20 points of a firmware update: it still ends SUCCEEDED with the
    new version running, confirmed, exactly once."""
    img = make_image("2.0.0", size=300 * 1024)
    publish(files, "v2.bin", img)
    thing = "ota-cut-" + point.replace("#", "-")
    dev = ota_device(thing, [native("v2.bin", img, "2.0.0")], {"test_handlers": True, "halt_at": point})
    stack.wait_until(lambda: f"@@HALT {point}" in dev.log_text(10**7), 60, "the halt")
    dev.power_cut()
    status, details = result(iot, dev, thing, 0, 90)
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
    od = read_otadata(ota_dir(dev.flash))
    assert od["boot"] == "ota_1" and od["state"].get("ota_1") == "VALID", od


# On the other images (stock32, pip), a cut at five of those points: mid-download, after the
# verification, before and after the reset, and before the outcome reaches jobsd (all 20 on
# fleet32 above; all of them on three images would take two more minutes of `make test`).
OTA_POINTS_EVERY_IMAGE = ("ota-checkpoint#2", "ota-verified", "before-reset", "ota-confirmed",
                          "update-sent")


@pytest.mark.images("stock32", "pip")
@pytest.mark.parametrize("point", OTA_POINTS_EVERY_IMAGE)
def test_ota_power_cut_resumes_on_the_other_images(jobsd, iot, files, ota_device, point):
    test_ota_power_cut_resumes(jobsd, iot, files, ota_device, point)


def test_one_command_ota_from_tools_jobs(jobsd, iot, files, device, tmp_path):
    """tools/sign keygen, then tools/jobs ota: signed, published to jobsd's files, job created,
    the device updates to the new version."""
    import subprocess

    keys = tmp_path / "keys"
    r = subprocess.run([os.path.join(ROOT, "tools", "sign"), "keygen", "--out", str(keys)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    image = tmp_path / "fw-2.1.0.bin"
    image.write_bytes(make_image("2.1.0", size=100 * 1024))
    iot.create_thing(thingName="ota-cli")
    dev = device("ota-cli", heap="176K", config={
        "ota": {"pubkey": str(keys / "signing-pub.der"), "allow": ["http://127.0.0.1:"]}})
    r = subprocess.run([os.path.join(ROOT, "tools", "jobs"), "--endpoint", jobsd.control_url, "ota",
                        "fw-210", "--image", str(image), "--key", str(keys / "signing-key.pem"),
                        "--files", str(files), "--version", "2.1.0", "--thing", "ota-cli"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "created OTA job fw-210" in r.stdout
    ex = wait_execution(iot, "fw-210", "ota-cli", TERMINAL, 60, device=dev)
    assert ex["status"] == "SUCCEEDED", ex
    assert ex["statusDetails"]["detailsMap"]["version"] == "2.1.0"


@pytest.mark.parametrize("cuts,keep,status", [(3, 50_000, "SUCCEEDED"), (99, 1_000, "FAILED")])
def test_download_cut_short_resumes_with_range(jobsd, iot, ota_device, cuts, keep, status):
    """Cut short 3 times, each time after 50 kB: the update resumes with Range and succeeds;
    cut short every time before a whole block arrives: FAILED TRUNCATED after the retries."""
    img = make_image("2.0.0", size=200 * 1024)
    srv = FlakyServer(img, cuts, keep=keep)
    try:
        doc = native("unused", img, "2.0.0", url=f"http://127.0.0.1:{srv.port}/fw.bin")
        thing = f"ota-flaky-{cuts}"
        dev = ota_device(thing, [doc])
        got, details = result(iot, dev, thing, 0, 90)
        assert got == status, details
        if status == "SUCCEEDED":
            assert details["version"] == "2.0.0"
            # each retry continued from the last whole 4 KB block it had written
            assert srv.ranges[0] == 0 and all(r > 0 and r % 4096 == 0 for r in srv.ranges[1:]), srv.ranges
            assert srv.ranges == sorted(srv.ranges) and len(srv.ranges) == cuts + 1
        else:
            assert details["reason"] == "TRUNCATED", details
            assert len(dev.boots()) == 1, "a failed download never switches the boot slot"
    finally:
        srv.stop()


def test_a_cut_after_the_last_checkpoint_asks_nothing_more(jobsd, iot, ota_device):
    """An image of whole checkpoints (256 KiB: the 4th offset checkpoint is its end): a power cut
    right after it resumes with the slot holding every byte. The device asks the server for
    nothing past the end and SUCCEEDS (soak seed 10: it asked, and failed on the 416)."""
    img = make_image("2.0.0", size=256 * 1024)
    srv = FlakyServer(img)
    try:
        doc = native("unused", img, "2.0.0", url=f"http://127.0.0.1:{srv.port}/fw.bin")
        thing = "ota-last-cp"
        dev = ota_device(thing, [doc], {"test_handlers": True, "halt_at": "ota-checkpoint#4"})
        stack.wait_until(lambda: "@@HALT ota-checkpoint#4" in dev.log_text(10**7), 60, "the halt")
        dev.power_cut()
        got, details = result(iot, dev, thing, 0, 90)
        assert got == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
        assert srv.ranges == [0], srv.ranges
    finally:
        srv.stop()


@pytest.mark.parametrize("fails,status", [(2, "SUCCEEDED"), (-1, "FAILED")])
def test_server_errors_are_retried(jobsd, iot, ota_device, fails, status):
    """503 twice, then the image: SUCCEEDED; 500 for ever: FAILED DOWNLOAD_FAILED after the first
    try and 4 retries, the running slot kept."""
    img = make_image("2.0.0", size=64 * 1024)
    srv = FlakyServer(img, fail_status=503 if fails > 0 else 500, fails=fails)
    try:
        thing = f"ota-5xx-{fails}"
        dev = ota_device(thing, [native("unused", img, "2.0.0", url=srv.url + "fw.bin")])
        got, details = result(iot, dev, thing, 0, 90)
        assert got == status, details
        if status == "FAILED":
            assert details["reason"] == "DOWNLOAD_FAILED" and len(srv.ranges) == 5, (details, srv.ranges)
            assert len(dev.boots()) == 1
        else:
            assert details["version"] == "2.0.0" and len(srv.ranges) == 3, srv.ranges
    finally:
        srv.stop()
