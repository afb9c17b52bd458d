"""Updates over MQTT on a simulated device (devsim) against jobsd's stream responder: a signed
1 MiB firmware image and an AWS OTA `afr_ota` MQTT document end SUCCEEDED with the image
confirmed; download-file over a stream, its failures with the same reasons as over HTTP; power
cuts in the middle of a stream resume and fetch only the blocks the journal says are missing."""
import base64
import hashlib
import json
import os
import re
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import ROOT, stack, thing_arn, wait_execution

sys.path.insert(0, os.path.join(ROOT, "tools"))
from iotjobs_host.devsim import make_image, ota_dir, read_otadata  # noqa: E402

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}
ROLE = "arn:aws:iam::123456789012:role/stream-reader"
KEY = ec.generate_private_key(ec.SECP256R1())
BLOCK = 4096
EVERY = 65536 // BLOCK  # blocks between two checkpoints of the bitmap (iotjobs.stream)


def sign(data):
    return base64.b64encode(KEY.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def put_stream(iot, files, stream_id, blobs):
    """Files into jobsd's --files folder (bucket fw) and a stream over them: fileId = index."""
    (files / "fw").mkdir(parents=True, exist_ok=True)
    entries = []
    for fid, data in enumerate(blobs):
        key = f"{stream_id}-{fid}.bin"
        (files / "fw" / key).write_bytes(data)
        entries.append({"fileId": fid, "s3Location": {"bucket": "fw", "key": key}})
    iot.create_stream(streamId=stream_id, roleArn=ROLE, files=entries)


@pytest.fixture
def mqtt_device(tmp_path, device, iot):
    """A device that prefers MQTT (the ESP32 default), with the OTA key and a fixed block size
    (4 KiB, so the checkpoint spacing is known)."""
    pub = tmp_path / "ota-pub.der"
    pub.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))

    def start(thing, docs, extra=None, heap="176K"):
        iot.create_thing(thingName=thing)
        for i, doc in enumerate(docs):
            iot.create_job(jobId=f"{thing}-{i}", targets=[thing_arn(thing)], document=json.dumps(doc))
        cfg = {"ota": {"pubkey": str(pub), "allow": ["http://127.0.0.1:"]}, "progress_min_ms": 0,
               "transfer": "mqtt", "stream": {"block": BLOCK, "idle_ms": 3000}}
        cfg.update(extra or {})
        return device(thing, config=cfg, heap=heap)

    return start


def result(iot, dev, thing, i, timeout=90):
    ex = wait_execution(iot, f"{thing}-{i}", thing, TERMINAL, timeout, device=dev)
    return ex["status"], ex.get("statusDetails", {}).get("detailsMap", {})


def ota_doc(stream_id, image, version):
    return {"operation": "ota", "stream": {"id": stream_id, "fileId": 0}, "size": len(image),
            "sha256": hashlib.sha256(image).hexdigest(), "signature": sign(image),
            "version": version}


def fetched(log):
    """(blocks fetched, blocks of the file) of each finished stream fetch in a device log."""
    return [(int(a), int(b)) for a, b in re.findall(r"stream \S+: (\d+) blocks fetched of (\d+)", log)]


def test_signed_1mib_firmware_over_mqtt_then_afr_ota(jobsd, iot, files, mqtt_device):
    img2 = make_image("2.0.0", size=1024 * 1024)
    img3 = make_image("3.0.0", size=100 * 1024 + 77)
    put_stream(iot, files, "fw-2", [img2])
    put_stream(iot, files, "AFR_OTA-fw-3", [b"unused", img3])
    afr = {"afr_ota": {"protocols": ["MQTT"], "streamname": "AFR_OTA-fw-3", "files": [{
        "filepath": "fw.bin", "filesize": len(img3), "fileid": 1, "certfile": "signer",
        "sig-sha256-ecdsa": sign(img3)}]}}
    dev = mqtt_device("mq-ota", [ota_doc("fw-2", img2, "2.0.0"), afr])
    status, details = result(iot, dev, "mq-ota", 0, 120)
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
    status, details = result(iot, dev, "mq-ota", 1)
    assert status == "SUCCEEDED" and details["version"] == "3.0.0", (details, dev.log_text())
    od = read_otadata(ota_dir(dev.flash))
    assert od["boot"] == "ota_0" and od["state"].get("ota_0") == "VALID", od
    log = dev.log_text(10**7)
    assert fetched(log) == [(256, 256), (26, 26)], fetched(log)
    assert "firmware 3.0.0 confirmed" in log


def test_a_document_offering_both_ways_follows_the_configuration(jobsd, iot, files, mqtt_device):
    img = make_image("2.0.0", size=64 * 1024)
    put_stream(iot, files, "fw-both", [img])
    doc = ota_doc("fw-both", img, "2.0.0")
    doc["url"] = "http://127.0.0.1:1/never-asked.bin"  # refused if it were used
    dev = mqtt_device("mq-both", [doc])
    status, details = result(iot, dev, "mq-both", 0)
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
    assert fetched(dev.log_text(10**7)) == [(16, 16)]


@pytest.mark.parametrize("name,mutate,reason", [
    ("hash", lambda d: d.update(sha256="0" * 64), "HASH_MISMATCH"),
    ("size", lambda d: d.update(size=d["size"] - 1), "SIZE_MISMATCH"),
    ("gone", lambda d: d.update(stream={"id": "no-such-stream", "fileId": 0}), "STREAM_NOT_FOUND"),
    ("file", lambda d: d.update(stream={"id": "dl-files", "fileId": 9}), "STREAM_NOT_FOUND"),
])
def test_download_file_over_mqtt_failures(jobsd, iot, files, mqtt_device, name, mutate, reason):
    data = os.urandom(20000)
    put_stream(iot, files, "dl-files", [data])
    doc = {"operation": "download-file", "stream": {"id": "dl-files", "fileId": 0},
           "path": "got.bin", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    mutate(doc)
    thing = "mq-dl-" + name
    dev = mqtt_device(thing, [doc, {"operation": "demo", "steps": 0}])
    status, details = result(iot, dev, thing, 0)
    assert status == "FAILED" and details["reason"] == reason, details
    assert result(iot, dev, thing, 1)[0] == "SUCCEEDED"  # the loop goes on
    assert not os.path.exists(os.path.join(dev.flash, "data", "got.bin"))
    assert not os.path.exists(os.path.join(dev.flash, "data", "got.bin.part"))


def test_download_file_over_mqtt(jobsd, iot, files, mqtt_device):
    data = os.urandom(150 * 1024 + 7)
    put_stream(iot, files, "dl-ok", [b"other", data])
    doc = {"operation": "download-file", "stream": {"id": "dl-ok", "fileId": 1},
           "path": "cfg/blob.bin", "sha256": hashlib.sha256(data).hexdigest()}
    dev = mqtt_device("mq-dl", [doc])
    status, details = result(iot, dev, "mq-dl", 0)
    assert status == "SUCCEEDED", (details, dev.log_text())
    assert details["size"] == str(len(data)) and details["sha256"] == hashlib.sha256(data).hexdigest()
    with open(os.path.join(dev.flash, "data", "cfg", "blob.bin"), "rb") as f:
        assert f.read() == data
    assert not os.path.exists(os.path.join(dev.flash, "data", "cfg", "blob.bin.part"))


@pytest.mark.parametrize("point", ["stream-block#100", "stream-checkpoint#3", "stream-block#256"])
def test_power_cut_mid_stream_fetches_only_missing_blocks(jobsd, iot, files, mqtt_device, point):
    """A power cut in the middle of a 1 MiB image over MQTT: after the boot the device reloads
    the journaled bitmap and asks only for what it says is missing (at most EVERY blocks that
    had arrived after the last checkpoint come again); the update ends SUCCEEDED, confirmed."""
    img = make_image("2.0.0", size=1024 * 1024)
    put_stream(iot, files, "fw-cut", [img])
    thing = "mq-cut-" + point.replace("#", "-")
    dev = mqtt_device(thing, [ota_doc("fw-cut", img, "2.0.0")], {"halt_at": point})
    stack.wait_until(lambda: f"@@HALT {point}" in dev.log_text(10**7), 90, "the halt")
    dev.power_cut()
    status, details = result(iot, dev, thing, 0, 120)
    assert status == "SUCCEEDED" and details["version"] == "2.0.0", (details, dev.log_text())
    log = dev.log_text(10**7)
    m = re.search(r"stream fw-cut/0: resuming, (\d+) of 256 blocks missing", log)
    assert m, log
    missing = int(m.group(1))
    done = fetched(log)
    assert len(done) == 1 and done[0][0] == missing, (done, missing)  # only what was missing
    if point == "stream-checkpoint#3":
        assert missing == 256 - 3 * EVERY
    else:
        k = int(point.split("#")[1])
        assert 256 - k <= missing <= 256 - k + EVERY, missing
    od = read_otadata(ota_dir(dev.flash))
    assert od["boot"] == "ota_1" and od["state"].get("ota_1") == "VALID", od


def test_power_cut_during_a_download_over_mqtt(jobsd, iot, files, mqtt_device):
    data = os.urandom(200 * 1024)
    put_stream(iot, files, "dl-cut", [data])
    doc = {"operation": "download-file", "stream": {"id": "dl-cut", "fileId": 0},
           "path": "big.bin", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    dev = mqtt_device("mq-dl-cut", [doc], {"halt_at": "stream-block#30"})
    stack.wait_until(lambda: "@@HALT stream-block#30" in dev.log_text(10**7), 60, "the halt")
    dev.power_cut()
    status, details = result(iot, dev, "mq-dl-cut", 0)
    assert status == "SUCCEEDED", (details, dev.log_text())
    with open(os.path.join(dev.flash, "data", "big.bin"), "rb") as f:
        assert f.read() == data
    log = dev.log_text(10**7)
    m = re.search(r"stream dl-cut/0: resuming, (\d+) of 50 blocks missing", log)
    assert m and 20 <= int(m.group(1)) <= 20 + EVERY, log


def app_bundle(version, ballast=30000):
    """An application (application.py registers `app-ping`, answering the version from another
    module of the bundle) as a signed manifest and its files, in manifest order."""
    files = {"application.py": (b"import helper\n\n\ndef start(api):\n    api.register('app-ping', "
                                b"lambda ctx, doc: {'app': helper.VERSION})\n"),
             "helper.py": f"VERSION = {version!r}\n".encode(),
             "data/ballast.bin": os.urandom(ballast)}
    manifest = json.dumps({"version": version, "files": [
        {"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for p, d in files.items()]}).encode()
    return manifest, list(files.items())


def test_app_update_over_mqtt(jobsd, iot, files, mqtt_device):
    """The bundle as one stream: the manifest is file 0, the files follow in manifest order
    (no `files` map); a second version names its files' ids explicitly, in another order."""
    m1, f1 = app_bundle("1.0")
    put_stream(iot, files, "app-1", [m1] + [d for _, d in f1])
    m2, f2 = app_bundle("2.0")
    put_stream(iot, files, "app-2", [d for _, d in reversed(f2)] + [m2])
    ids = {p: len(f2) - 1 - k for k, (p, _) in enumerate(f2)}
    docs = [{"operation": "app-update", "stream": {"id": "app-1"}, "signature": sign(m1),
             "version": "1.0"},
            {"operation": "app-ping"},
            {"operation": "app-update", "stream": {"id": "app-2", "manifest": len(f2),
                                                   "files": ids},
             "signature": sign(m2), "version": "2.0"},
            {"operation": "app-ping"}]
    dev = mqtt_device("mq-app", docs, heap="192K")  # as test_app_update: the app's code too
    for i, want in enumerate(("1.0", "1.0", "2.0", "2.0")):
        status, details = result(iot, dev, "mq-app", i)
        assert status == "SUCCEEDED" and details["app"] == want, (i, details, dev.log_text())
    with open(os.path.join(dev.flash, "app.d", "b", "data", "ballast.bin"), "rb") as f:
        assert f.read() == dict(f2)["data/ballast.bin"]


def test_power_cut_while_staging_an_app_over_mqtt(jobsd, iot, files, mqtt_device):
    """Cut in the middle of the bundle's third file (100 KB: 25 blocks, a checkpoint after 16):
    after the boot the stage goes on with that file's missing blocks only."""
    m, fs = app_bundle("1.0", ballast=100 * 1024)
    put_stream(iot, files, "app-cut", [m] + [d for _, d in fs])
    doc = {"operation": "app-update", "stream": {"id": "app-cut"}, "signature": sign(m),
           "version": "1.0"}
    # blocks: the manifest #1, application.py #2, helper.py #3, the ballast #4..#28
    dev = mqtt_device("mq-app-cut", [doc, {"operation": "app-ping"}], {"halt_at": "stream-block#22"},
                      heap="192K")
    stack.wait_until(lambda: "@@HALT stream-block#22" in dev.log_text(10**7), 60, "the halt")
    dev.power_cut()
    for i in (0, 1):
        status, details = result(iot, dev, "mq-app-cut", i)
        assert status == "SUCCEEDED" and details["app"] == "1.0", (i, details, dev.log_text())
    log = dev.log_text(10**7)
    assert "stream app-cut/3: resuming, 9 of 25 blocks missing" in log, log
    assert "stream app-cut/3: 9 blocks fetched of 25" in log
    with open(os.path.join(dev.flash, "app.d", "a", "data", "ballast.bin"), "rb") as f:
        assert f.read() == dict(fs)["data/ballast.bin"]
