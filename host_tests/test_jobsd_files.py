"""jobsd `--files`: presigned-URL placeholders in delivered job documents, the signed file server
on the data listener (GET/HEAD, Range, 403/404/416, traversal), and CreateJob documentSource.
A real mosquitto and jobsd; paho is the device, boto3 the operator, http.client the downloader.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Optional
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError

from iotjobs_host import stack
from iotjobs_host.jobsd.files import FileStore
from iotjobs_host.stack import Jobsd
from test_jobsd import Device, arn, error_code

BUCKET = "fw-bucket"
IMAGE = bytes(range(256)) * 40 + b"tail"  # 10244 bytes, every offset distinguishable
SECRET_TEXT = b"outside the files folder"
PLACEHOLDER = ("${aws:iot:s3-presigned-url:https://s3.us-east-1.amazonaws.com/"
               f"{BUCKET}/images/app%20v2.bin}}")
URL_RE = re.compile(r"http://[^\"]+")


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("files")
    (base / "secret.txt").write_bytes(SECRET_TEXT)  # a sibling of the served folder
    root = base / "served"
    (root / BUCKET / "images").mkdir(parents=True)
    (root / BUCKET / "images" / "app v2.bin").write_bytes(IMAGE)
    (root / BUCKET / "empty.bin").write_bytes(b"")
    (root / BUCKET / "docs").mkdir()
    (root / BUCKET / "docs" / "job.json").write_text(json.dumps({"operation": "from-s3",
                                                                 "n": 7}))
    (root / BUCKET / "docs" / "list.json").write_text("[1, 2]")
    (root / BUCKET / "docs" / "broken.json").write_text("{oops")
    (root / BUCKET / "docs" / "big.json").write_text(json.dumps({"x": "y" * 33000}))
    (root / BUCKET / "escape").symlink_to(base / "secret.txt")
    (root / BUCKET / "inside").symlink_to(root / BUCKET / "docs" / "job.json")
    return root


JOBSD_FILES = "files_dir"


@pytest.fixture(scope="module")
def broker(module_broker: stack.Mosquitto) -> stack.Mosquitto:
    return module_broker


@pytest.fixture(scope="module")
def jobsd(module_jobsd: Jobsd) -> Jobsd:
    """One jobsd for the module (conftest); each test works on fresh names."""
    return module_jobsd


@pytest.fixture
def device(jobsd: Jobsd, broker: stack.Mosquitto) -> Iterator[Device]:
    name = f"dl-{uuid.uuid4().hex[:10]}"
    jobsd.iot.create_thing(thingName=name)
    dev = Device(broker.port, name)
    try:
        yield dev
    finally:
        dev.close()


def signer(jobsd: Jobsd, files_dir: Path, clock: Optional[float] = None) -> FileStore:
    """A FileStore with jobsd's own per-database secret (read from its SQLite file)."""
    db = os.path.join(os.path.dirname(jobsd.proc.log_path), "jobsd.sqlite3")
    with sqlite3.connect(db) as conn:
        (secret,) = conn.execute(
            "SELECT value FROM settings WHERE name='files-hmac-secret'").fetchone()
    return FileStore(str(files_dir), bytes.fromhex(secret), jobsd.data_url,
                     clock=(lambda: clock) if clock is not None else time.time)


def fetch(url: str, method: str = "GET",
          headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent exactly as written (no normalisation)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        target = parts.path + ("?" + parts.query if parts.query else "")
        conn.request(method, target, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def only_url(text: str) -> str:
    [url] = URL_RE.findall(text)
    return url


def create_job(jobsd: Jobsd, thing: str, document: dict[str, Any], **options: Any) -> str:
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    jobsd.iot.create_job(jobId=job_id, targets=[arn(thing)], document=json.dumps(document),
                         **options)
    return job_id


# -- placeholders ------------------------------------------------------------------------------

def test_placeholders_are_replaced_on_every_delivery(jobsd: Jobsd, device: Device) -> None:
    document = {"operation": "download-file", "url": PLACEHOLDER, "keep": "${not:a:placeholder}"}
    job = create_job(jobsd, device.thing, document, presignedUrlConfig={
        "roleArn": "arn:aws:iam::123456789012:role/jobs-s3", "expiresInSec": 120})
    # the operator sees the document as created
    assert json.loads(jobsd.iot.get_job_document(jobId=job)["document"]) == document
    delivered: list[str] = []

    def check(doc: dict[str, Any]) -> None:
        assert doc["operation"] == "download-file" and doc["keep"] == "${not:a:placeholder}"
        url = doc["url"]
        assert url.startswith(f"{jobsd.data_url}/files/{BUCKET}/images/app%20v2.bin?")
        expires = int(re.search(r"X-Expires=(\d+)", url).group(1))
        assert time.time() + 110 <= expires <= time.time() + 121
        status, headers, body = fetch(url)
        assert (status, body) == (200, IMAGE)
        assert headers["content-length"] == str(len(IMAGE))
        delivered.append(url)

    events = device.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    check(events[1][1]["execution"]["jobDocument"])
    outcome, body, _ = device.request("$next/get", {})
    check(body["execution"]["jobDocument"])
    outcome, body, _ = device.request(f"{job}/get", {"includeJobDocument": False})
    assert outcome == "accepted" and "jobDocument" not in body["execution"]
    check(json.loads(jobsd.data.describe_job_execution(thingName=device.thing,
                                                       jobId=job)["execution"]["jobDocument"]))
    outcome, body, _ = device.request("start-next", {})
    check(body["execution"]["jobDocument"])
    check(json.loads(jobsd.data.start_next_pending_job_execution(
        thingName=device.thing)["execution"]["jobDocument"]))
    outcome, body, _ = device.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                        "includeJobDocument": True})
    check(body["jobDocument"])
    check(json.loads(jobsd.data.update_job_execution(
        thingName=device.thing, jobId=job, status="SUCCEEDED",
        includeJobDocument=True)["jobDocument"]))
    assert len(delivered) == 7


def test_virtual_hosted_url_default_expiry_and_unknown_hosts(jobsd: Jobsd, device: Device
                                                             ) -> None:
    document = {
        "a": f"${{aws:iot:s3-presigned-url:https://{BUCKET}.s3.amazonaws.com/empty.bin}}",
        "b": "${aws:iot:s3-presigned-url:https://example.com/x/y}",
    }
    create_job(jobsd, device.thing, document)
    outcome, body, _ = device.request("start-next", {})
    doc = body["execution"]["jobDocument"]
    assert doc["b"] == document["b"]  # not an S3 object URL: left as it is
    expires = int(re.search(r"X-Expires=(\d+)", doc["a"]).group(1))
    assert abs(expires - (time.time() + 3600)) <= 5  # default expiresInSec
    status, headers, data = fetch(doc["a"])
    assert (status, headers["content-length"], data) == (200, "0", b"")


@pytest.mark.parametrize("expires", [3601, 10**6])
def test_bad_presigned_url_config(jobsd: Jobsd, device: Device, expires: int) -> None:
    with pytest.raises(ClientError) as err:
        create_job(jobsd, device.thing, {"url": PLACEHOLDER},
                   presignedUrlConfig={"expiresInSec": expires})
    assert error_code(err) == ("InvalidRequestException", 400)


# -- the file server ---------------------------------------------------------------------------

@pytest.mark.parametrize("range_header,status,content_range,part", [
    ("bytes=0-9", 206, "bytes 0-9/10244", IMAGE[0:10]),
    ("bytes=10000-", 206, "bytes 10000-10243/10244", IMAGE[10000:]),
    ("bytes=-4", 206, "bytes 10240-10243/10244", b"tail"),
    ("bytes=-99999", 206, "bytes 0-10243/10244", IMAGE),
    ("bytes=10240-99999", 206, "bytes 10240-10243/10244", b"tail"),
    ("bytes=5-5", 206, "bytes 5-5/10244", IMAGE[5:6]),
    ("bytes=10244-", 416, "bytes */10244", b""),
    ("bytes=-0", 416, "bytes */10244", b""),
    ("bytes=0-1,4-5", 200, None, IMAGE),  # multiple ranges: ignored
    ("items=0-1", 200, None, IMAGE),      # another unit: ignored
])
def test_ranges(jobsd: Jobsd, files_dir: Path, range_header: str, status: int,
                content_range: Optional[str], part: bytes) -> None:
    url = signer(jobsd, files_dir).sign(f"{BUCKET}/images/app v2.bin", 60)
    got_status, headers, body = fetch(url, headers={"Range": range_header})
    assert (got_status, body) == (status, part)
    assert headers.get("content-range") == content_range
    assert headers["content-length"] == str(len(part))
    if status != 416:
        assert headers["accept-ranges"] == "bytes" and headers["etag"]


def test_resumed_download_with_ranges_and_head(jobsd: Jobsd, files_dir: Path) -> None:
    url = signer(jobsd, files_dir).sign(f"{BUCKET}/images/app v2.bin", 60)
    status, headers, body = fetch(url, method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == str(len(IMAGE)) and headers["accept-ranges"] == "bytes"
    got = b""
    while len(got) < len(IMAGE):  # a device resuming in 4 KB pieces
        status, part_headers, part = fetch(
            url, headers={"Range": f"bytes={len(got)}-{len(got) + 4095}"})
        assert status == 206 and part_headers["etag"] == headers["etag"]
        got += part
    assert hashlib.sha256(got).digest() == hashlib.sha256(IMAGE).digest()
    status, headers, body = fetch(url, method="HEAD", headers={"Range": "bytes=-4"})
    assert (status, headers["content-range"], body) == (206, "bytes 10240-10243/10244", b"")


def test_bad_signatures_and_expiry(jobsd: Jobsd, files_dir: Path) -> None:
    good = signer(jobsd, files_dir).sign(f"{BUCKET}/images/app v2.bin", 60)
    assert fetch(good)[0] == 200
    base, query = good.split("?")
    expires = re.search(r"X-Expires=(\d+)", query).group(1)
    signature = re.search(r"X-Signature=(\w+)", query).group(1)
    forged = "0" * 64
    cases = [
        f"{base}?X-Expires={expires}&X-Signature={forged}",
        f"{base}?X-Expires={int(expires) + 1000}&X-Signature={signature}",  # extended expiry
        f"{base}?X-Expires={expires}",
        f"{base}?X-Signature={signature}",
        base,
        good.replace("app%20v2.bin", "empty.bin").replace("images/", ""),  # another file
        # signed with another secret
        FileStore(str(files_dir), b"k" * 32, jobsd.data_url).sign(f"{BUCKET}/empty.bin", 60),
        # expired: correctly signed an hour ago for 60 s
        signer(jobsd, files_dir, clock=time.time() - 3600).sign(f"{BUCKET}/empty.bin", 60),
    ]
    for url in cases:
        status, headers, body = fetch(url)
        assert status == 403, url
        assert b"<Error>" in body and headers["content-type"] == "application/xml"
        assert IMAGE[:64] not in body
    assert fetch(cases[-1], method="HEAD")[0:3:2] == (403, b"")


def test_traversal_and_non_files_are_refused(jobsd: Jobsd, files_dir: Path) -> None:
    sign = signer(jobsd, files_dir)
    for rel in ["../secret.txt", f"{BUCKET}/../../secret.txt", "/etc/passwd",
                f"{BUCKET}//empty.bin", f"{BUCKET}/./empty.bin", "a\x00b", f"{BUCKET}\\x"]:
        # even a correctly signed URL for such a path is refused before the disk is touched
        status, _, body = fetch(sign.sign(rel, 60))
        assert status == 403, rel
        assert SECRET_TEXT not in body
    for path in ["/files/..%2fsecret.txt", "/files/%2e%2e/secret.txt", "/files/../secret.txt",
                 "/files//etc/passwd", "/files/fw-bucket/%00"]:
        status, _, body = fetch(jobsd.data_url + path)
        assert status in (403, 404), path
        assert SECRET_TEXT not in body
    # signed but not a regular file under the folder: a symlink out, a directory, a missing key
    for rel in [f"{BUCKET}/escape", f"{BUCKET}/docs", f"{BUCKET}/missing.bin", BUCKET]:
        status, _, body = fetch(sign.sign(rel, 60))
        assert status == 404, rel
        assert SECRET_TEXT not in body
    # a symlink that stays inside the folder is fine
    status, _, body = fetch(sign.sign(f"{BUCKET}/inside", 60))
    assert status == 200 and json.loads(body)["operation"] == "from-s3"
    assert jobsd.proc.alive()


# -- documentSource ----------------------------------------------------------------------------

@pytest.mark.parametrize("source", [
    f"https://s3.amazonaws.com/{BUCKET}/docs/job.json",
    f"https://s3.eu-west-1.amazonaws.com/{BUCKET}/docs/job.json",
    f"https://{BUCKET}.s3.amazonaws.com/docs/job.json",
    f"https://{BUCKET}.s3.us-east-1.amazonaws.com/docs/job.json",
])
def test_document_source(jobsd: Jobsd, device: Device, source: str) -> None:
    job = f"job-{uuid.uuid4().hex[:12]}"
    jobsd.iot.create_job(jobId=job, targets=[arn(device.thing)], documentSource=source)
    assert json.loads(jobsd.iot.get_job_document(jobId=job)["document"]) == {
        "operation": "from-s3", "n": 7}
    outcome, body, _ = device.request("start-next", {})
    assert body["execution"]["jobDocument"] == {"operation": "from-s3", "n": 7}


@pytest.mark.parametrize("source", [
    f"https://s3.amazonaws.com/{BUCKET}/docs/missing.json",
    f"https://s3.amazonaws.com/{BUCKET}/docs/list.json",
    f"https://s3.amazonaws.com/{BUCKET}/docs/broken.json",
    f"https://s3.amazonaws.com/{BUCKET}/docs/big.json",
    f"https://s3.amazonaws.com/{BUCKET}/escape",
    f"https://s3.amazonaws.com/{BUCKET}/docs/../../../secret.txt",
    f"https://s3.amazonaws.com/{BUCKET}",
    f"http://s3.amazonaws.com/{BUCKET}/docs/job.json",
    "https://example.com/docs/job.json",
    "not a url",
])
def test_bad_document_source(jobsd: Jobsd, device: Device, source: str) -> None:
    with pytest.raises(ClientError) as err:
        jobsd.iot.create_job(jobId=f"job-{uuid.uuid4().hex[:12]}", targets=[arn(device.thing)],
                             documentSource=source)
    assert error_code(err) == ("InvalidRequestException", 400)
    assert SECRET_TEXT.decode() not in err.value.response["Error"]["Message"]


def test_document_and_document_source_together(jobsd: Jobsd, device: Device) -> None:
    with pytest.raises(ClientError) as err:
        jobsd.iot.create_job(jobId=f"job-{uuid.uuid4().hex[:12]}", targets=[arn(device.thing)],
                             document="{}",
                             documentSource=f"https://s3.amazonaws.com/{BUCKET}/docs/job.json")
    assert error_code(err) == ("InvalidRequestException", 400)


def test_secret_survives_restart(tmp_path: Path, mosquitto: stack.Mosquitto,
                                 files_dir: Path) -> None:
    """URLs handed out before a restart still work after it (the secret is in the database)."""
    db = str(tmp_path / "jobs.db")
    first = Jobsd(str(tmp_path), mosquitto.broker, files=str(files_dir), db=db,
                  log_name="jobsd1.log")
    try:
        first.iot.create_thing(thingName="restarter")
        job = f"job-{uuid.uuid4().hex[:8]}"
        first.iot.create_job(jobId=job, targets=[arn("restarter")],
                             document=json.dumps({"url": PLACEHOLDER}))
        url = json.loads(first.data.describe_job_execution(
            thingName="restarter", jobId=job)["execution"]["jobDocument"])["url"]
        port = urlsplit(url).port
    finally:
        first.stop()
    second = Jobsd(str(tmp_path), mosquitto.broker, files=str(files_dir), db=db,
                   log_name="jobsd2.log")
    try:
        again = json.loads(second.data.describe_job_execution(
            thingName="restarter", jobId=job)["execution"]["jobDocument"])["url"]
        # the data port differs after a restart; the signed path and query do not depend on it
        moved = url.replace(f":{port}/", f":{urlsplit(again).port}/")
        assert fetch(moved)[0::2] == (200, IMAGE)
    finally:
        second.stop()
