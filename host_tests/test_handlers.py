"""The reboot and download-file handlers on a simulated device against jobsd's file server
(presigned-URL placeholders, HTTP Range), including their failures and power cuts."""
import hashlib
import json
import os

import pytest

from conftest import stack, thing_arn, wait_execution

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}
ALLOW = {"download": {"allow": ["http://127.0.0.1:"], "root": "data"}, "progress_min_ms": 0}


def presigned(key, bucket="fw"):
    return "${aws:iot:s3-presigned-url:https://s3.amazonaws.com/%s/%s}" % (bucket, key)


def put(files, key, data, bucket="fw"):
    p = files / bucket / key
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def run(iot, device, thing, documents, config=None, heap="144K"):
    iot.create_thing(thingName=thing)
    for i, doc in enumerate(documents):
        iot.create_job(jobId=f"{thing}-{i}", targets=[thing_arn(thing)], document=json.dumps(doc))
    cfg = dict(ALLOW)
    cfg.update(config or {})
    return device(thing, config=cfg, heap=heap)  # the handlers add their code to the heap


def finished(iot, dev, thing, i, timeout=40):
    ex = wait_execution(iot, f"{thing}-{i}", thing, TERMINAL, timeout, device=dev)
    return ex["status"], ex.get("statusDetails", {}).get("detailsMap", {})


def test_reboot_native_and_managed_template(jobsd, iot, device):
    thing = "rb"
    aws_reboot = {"version": "1.0", "steps": [{"action": {"name": "Reboot", "type": "runHandler",
                  "input": {"handler": "reboot.sh", "path": "default"}, "runAsUser": "root"}}]}
    dev = run(iot, device, thing, [{"operation": "reboot"}, aws_reboot])
    status, details = finished(iot, dev, thing, 0)
    assert status == "SUCCEEDED" and details["rebooted"] == "yes", details
    status, details = finished(iot, dev, thing, 1)
    assert status == "SUCCEEDED" and details["rebooted"] == "yes", details
    assert len(dev.boots()) == 3, "each reboot job resets the device exactly once"


def test_download_native_with_presigned_url(jobsd, iot, device, files):
    data = os.urandom(200_000)
    sha = put(files, "blobs/data.bin", data)
    thing = "dl"
    dev = run(iot, device, thing, [{"operation": "download-file", "url": presigned("blobs/data.bin"),
                                    "path": "files/data.bin", "sha256": sha, "size": len(data)}])
    status, details = finished(iot, dev, thing, 0)
    assert status == "SUCCEEDED", details
    assert details["sha256"] == sha and details["size"] == str(len(data))
    placed = os.path.join(dev.flash, "data", "files", "data.bin")
    with open(placed, "rb") as f:
        assert f.read() == data
    assert not os.path.exists(placed + ".part")


def test_download_aws_template(jobsd, iot, device, files):
    data = b"hello from the AWS-Download-File template\n" * 100
    put(files, "t/hello.txt", data)
    thing = "dl-aws"
    doc = {"version": "1.0", "steps": [{"action": {"name": "Download-File", "type": "runHandler",
           "input": {"handler": "download-file.sh", "args": [presigned("t/hello.txt"), "hello.txt"],
                     "path": "default"}, "runAsUser": "root"}}]}
    dev = run(iot, device, thing, [doc])
    status, details = finished(iot, dev, thing, 0)
    assert status == "SUCCEEDED", details
    with open(os.path.join(dev.flash, "data", "hello.txt"), "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("doc_extra,status,reason", [
    ({"sha256": "0" * 64}, "FAILED", "HASH_MISMATCH"),
    ({"size": 12345}, "FAILED", "SIZE_MISMATCH"),
    ({"url": presigned("no/such.bin")}, "FAILED", "DOWNLOAD_FAILED"),
    ({"url": "http://example.com/x.bin"}, "REJECTED", "URL_NOT_ALLOWED"),
    ({"url": "ftp://127.0.0.1/x"}, "REJECTED", "URL_NOT_ALLOWED"),
    ({"path": "../escape.bin"}, "REJECTED", "BAD_PATH"),
    ({"path": "/etc/passwd"}, "REJECTED", "BAD_PATH"),
    ({"path": "a//b"}, "REJECTED", "BAD_PATH"),
    ({"sha256": "xyz"}, "REJECTED", "BAD_ARGUMENT"),
])
def test_download_failures_leave_nothing_behind(jobsd, iot, device, files, doc_extra, status, reason):
    data = os.urandom(5000)
    put(files, "ok.bin", data)
    doc = {"operation": "download-file", "url": presigned("ok.bin"), "path": "got.bin"}
    doc.update(doc_extra)
    thing = "dlf"
    dev = run(iot, device, thing, [doc, {"operation": "demo", "steps": 0}])
    got, details = finished(iot, dev, thing, 0)
    assert (got, details.get("reason")) == (status, reason), details
    assert not os.path.exists(os.path.join(dev.flash, "data", "got.bin"))
    assert not os.path.exists(os.path.join(dev.flash, "escape.bin"))
    assert finished(iot, dev, thing, 1)[0] == "SUCCEEDED", "the device goes on"


def test_download_resumes_after_a_power_cut(jobsd, iot, device, files):
    data = os.urandom(300_000)
    sha = put(files, "big.bin", data)
    thing = "dl-cut"
    dev = run(iot, device, thing, [{"operation": "download-file", "url": presigned("big.bin"),
                                    "path": "big.bin", "sha256": sha}],
              {"test_handlers": True, "halt_at": "download-checkpoint"})
    stack.wait_until(lambda: "@@HALT download-checkpoint" in dev.log_text(10**7), 30, "the halt")
    part = os.path.join(dev.flash, "data", "big.bin.part")
    assert 0 < os.path.getsize(part) < len(data)
    dev.power_cut()
    status, details = finished(iot, dev, thing, 0)
    assert status == "SUCCEEDED" and details["sha256"] == sha, details
    with open(os.path.join(dev.flash, "data", "big.bin"), "rb") as f:
        assert f.read() == data


def test_download_over_https_checks_the_server_certificate(jobsd, iot, device, pki, tmp_path):
    """HTTPS with the configured CA: a server whose certificate that CA signed is trusted; one
    signed by another CA is refused (FAILED, nothing placed), and the device goes on."""
    from iotjobs_host.fileserver import FlakyServer
    from iotjobs_host.pki import PKI

    data = os.urandom(70_000)
    sha = hashlib.sha256(data).hexdigest()
    good = pki.server("localhost", name="https-files")
    rogue = PKI(str(tmp_path / "rogue-pki")).server("localhost")
    ok = FlakyServer(data, tls=(good["cert_pem"], good["key_pem"]))
    bad = FlakyServer(data, tls=(rogue["cert_pem"], rogue["key_pem"]))
    try:
        thing = "dl-tls"
        docs = [{"operation": "download-file", "url": ok.url + "a.bin", "path": "a.bin",
                 "sha256": sha},
                {"operation": "download-file", "url": bad.url + "b.bin", "path": "b.bin"},
                {"operation": "demo", "steps": 0}]
        # 176K: on the unix port mbedTLS takes its buffers from the MicroPython heap (on an
        # ESP32 from the IDF heap), and here two TLS sessions are open at once
        dev = run(iot, device, thing, docs,
                  {"download": {"allow": ["https://localhost:"], "root": "data"}}, heap="176K")
        status, details = finished(iot, dev, thing, 0)
        assert status == "SUCCEEDED" and details["sha256"] == sha, details
        status, details = finished(iot, dev, thing, 1)
        assert (status, details.get("reason")) == ("FAILED", "DOWNLOAD_FAILED"), details
        assert "TLS" in details.get("message", ""), details
        assert finished(iot, dev, thing, 2)[0] == "SUCCEEDED"
        assert not os.path.exists(os.path.join(dev.flash, "data", "b.bin"))
        assert not bad.ranges, "no request reached the server the device did not trust"
        assert bad.refused >= 1
    finally:
        ok.stop()
        bad.stop()


def test_download_cut_after_its_last_checkpoint_takes_the_416(jobsd, iot, device):
    """A 64 KiB file (its last chunk is also its checkpoint), power cut there: the resume asks
    from the end, the server answers 416 `bytes */65536`, and the device takes that as nothing
    left, not as a bad answer: SUCCEEDED with the file whole (soak seeds 10 and 8)."""
    from iotjobs_host.fileserver import FlakyServer

    data = os.urandom(64 * 1024)
    srv = FlakyServer(data)
    try:
        thing = "dl-416"
        dev = run(iot, device, thing, [{"operation": "download-file", "url": srv.url + "f.bin",
                                        "path": "f.bin", "sha256": hashlib.sha256(data).hexdigest()}],
                  {"halt_at": "download-checkpoint"})
        stack.wait_until(lambda: "@@HALT download-checkpoint" in dev.log_text(10**6), 60, "the halt")
        dev.power_cut()
        got, details = finished(iot, dev, thing, 0, 60)
        assert got == "SUCCEEDED", (details, dev.log_text(3000))
        assert srv.ranges == [0, len(data)], srv.ranges
        with open(os.path.join(dev.flash, "data", "f.bin"), "rb") as f:
            assert f.read() == data
    finally:
        srv.stop()


@pytest.mark.parametrize("faults,status,reason", [
    ({"cuts": 2, "keep": 70_000}, "SUCCEEDED", "OK"),
    ({"fail_status": 503, "fails": 2}, "SUCCEEDED", "OK"),
    ({"cuts": 99, "keep": 100}, "FAILED", "TRUNCATED"),
    ({"fail_status": 500, "fails": -1}, "FAILED", "DOWNLOAD_FAILED"),
])
def test_download_retries_a_lost_link_and_server_errors(jobsd, iot, device, faults, status, reason):
    """A body cut short or a 5xx answer: retried with Range from what arrived (4 times); then
    FAILED with the reason."""
    from iotjobs_host.fileserver import FlakyServer

    data = os.urandom(200_000)
    sha = hashlib.sha256(data).hexdigest()
    srv = FlakyServer(data, **faults)
    try:
        thing = "dl-retry"
        dev = run(iot, device, thing, [{"operation": "download-file", "url": srv.url + "f.bin",
                                        "path": "f.bin", "sha256": sha}])
        got, details = finished(iot, dev, thing, 0, 60)
        assert (got, details.get("reason")) == (status, reason), details
        placed = os.path.join(dev.flash, "data", "f.bin")
        if status == "SUCCEEDED":
            with open(placed, "rb") as f:
                assert f.read() == data
            if "cuts" in faults:  # each retry continued where the last one stopped
                assert srv.ranges[0] == 0 and srv.ranges[1:] == sorted(srv.ranges[1:])
                assert all(r >= faults["keep"] for r in srv.ranges[1:]), srv.ranges
        else:
            assert not os.path.exists(placed)
            assert len(srv.ranges) == 5, "the first try and 4 retries"
    finally:
        srv.stop()
