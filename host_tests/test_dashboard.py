"""jobsd's dashboard (issue 16): the JSON snapshot, its HTTP face and access rules in process,
and a real browser on a real jobsd.

In process (no broker): the snapshot's counts equal DescribeJob's jobProcessDetails and the
rollout's unreleased targets; abort progress uses campaign._check_abort's arithmetic; firmware
versions come from OTA results; nothing of a document, no URL query string, no signature shows;
"connected" follows the requests a thing makes; the page's headers (CSP, nosniff) and methods;
event streams free their thread when the client leaves and end when jobsd stops; with
--credentials, a presigned link opens a cookie session and nothing else gets in.

Real jobsd: `--dashboard-url` prints a signed link; jobsd stops (exit 0) with a stream open.

Browser (headless Chromium through chromium-driver and selenium; tools/setup installs them):
jobsd with --credentials and --test-hooks runs a staged OTA rollout driven through boto3
`iot-jobs-data` (devices) and `advanceClock` (minutes); the page, opened through a presigned
link, follows it live (no reload) and its counts match DescribeJob; an XSS payload in
statusDetails is shown as text and runs nothing; neither the page nor its data holds the secret
key or any presigned URL. The screenshot is build/dashboard.png.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import boto3
import paho.mqtt.client as paho
import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from paho.mqtt.enums import CallbackAPIVersion

from iotjobs_host import BUILD, TOOLS, stack
from iotjobs_host.jobsd import campaign, control, dashboard
from iotjobs_host.jobsd.auth import KeyPair, Verifier
from iotjobs_host.jobsd.dashboard import Dashboard, abort_progress, presign_url, redact
from iotjobs_host.jobsd.rest import RestServer
from iotjobs_host.jobsd.rules import DescribeRequest, StartNextRequest, UpdateRequest
from iotjobs_host.jobsd.service import Service
from iotjobs_host.jobsd.store import Store

REGION, ACCOUNT = "us-east-1", "123456789012"
KEY, SECRET = "AKIADASHBOARDTEST001", "dashboard/Secret+Key0123456789abcdefXYZ"
PLACEHOLDER = "${aws:iot:s3-presigned-url:https://s3.amazonaws.com/fw/fw-2.0.0.bin}"
XSS = "<img src=x onerror=window.__xss=1><script>window.__xss=2</script>"
COUNTERS = {"QUEUED": "numberOfQueuedThings", "IN_PROGRESS": "numberOfInProgressThings",
            "SUCCEEDED": "numberOfSucceededThings", "FAILED": "numberOfFailedThings",
            "REJECTED": "numberOfRejectedThings", "TIMED_OUT": "numberOfTimedOutThings",
            "CANCELED": "numberOfCanceledThings", "REMOVED": "numberOfRemovedThings"}
# what must never reach the page: the secret, the key id, signatures of either kind (SigV4 and
# the file server's), URL query strings, anything of a job document
FORBIDDEN = (SECRET, KEY, "X-Amz-", "X-Signature", "X-Expires", "s3.amazonaws.com",
             "s3-presigned-url", "token=abc", "sha256-of-the-image", "cfg.json")


def arn(thing: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}"


def ota_document(version: str = "2.0.0") -> str:
    return json.dumps({"operation": "ota", "url": PLACEHOLDER, "size": 1048576,
                       "sha256": "sha256-of-the-image", "version": version})


# -- in process -------------------------------------------------------------------------------------
class Local:
    """A Service on a temporary database, its Dashboard and (on demand) a control listener."""

    def __init__(self, tmp_path: Path, verifier: Optional[Verifier] = None) -> None:
        self.db = str(tmp_path / "jobsd.sqlite3")
        self.store = Store(self.db)
        self.service = Service(self.store, lambda topic, payload, delivery=None: None)
        self.service.test_hooks = True
        self.dashboard = Dashboard(self.service, self.db)
        self.server: Optional[RestServer] = None
        self.verifier = verifier

    def serve(self) -> str:
        self.server = RestServer(("127.0.0.1", 0), control.build_router(self.service),
                                 self.verifier)
        self.server.dashboard = self.dashboard
        self.server.start()
        return f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.dashboard.close()
        if self.server is not None:
            self.server.stop()
        self.store.close()

    def things(self, *names: str) -> None:
        for name in names:
            self.service.create_thing(name, {})

    def advance(self, seconds: float) -> None:
        self.service.set_test_hooks({"advanceClock": seconds})

    def job(self, job_id: str) -> dict[str, Any]:
        return next(j for j in self.dashboard.snapshot()["jobs"] if j["jobId"] == job_id)

    def thing(self, name: str) -> dict[str, Any]:
        return next(t for t in self.dashboard.snapshot()["things"] if t["name"] == name)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    lo = Local(tmp_path)
    try:
        yield lo
    finally:
        lo.close()


def api_counts(service: Service, job_id: str) -> dict[str, int]:
    details = service.describe_job(job_id)["job"]["jobProcessDetails"]
    return {status: details[name] for status, name in COUNTERS.items()}


def test_snapshot_counts_match_describe_job_and_the_rollout(local: Local) -> None:
    names = [f"c-{i}" for i in range(7)]
    local.things(*names)
    local.service.create_job("roll", {
        "targets": [arn(n) for n in names], "document": ota_document(),
        "jobExecutionsRolloutConfig": {"maximumPerMinute": 3},
        "jobExecutionsRetryConfig": {"criteriaList": [{"failureType": "FAILED",
                                                       "numberOfRetries": 1}]}})
    seen = []
    for step in range(4):
        job = local.job("roll")
        counts = {k: v for k, v in job["counts"].items() if k != dashboard.NOT_RELEASED}
        assert counts == api_counts(local.service, "roll")
        state = local.store.get_rollout("roll")
        assert job["counts"][dashboard.NOT_RELEASED] == len(state["pending"])
        assert job["total"] == sum(job["counts"].values())
        seen.append(job["counts"][dashboard.NOT_RELEASED])
        queued = [n for n in names if (ex := local.store.get_execution("roll", n)) is not None
                  and ex.status == "QUEUED"]
        if step == 0:
            local.service.start_next(queued[0], StartNextRequest())
            local.service.update(queued[1], "roll", UpdateRequest("FAILED", {"reason": "X"}))
        elif step == 1:
            local.service.update(queued[0], "roll", UpdateRequest("SUCCEEDED"))
        local.advance(60)
    assert seen == [4, 1, 0, 0]
    job = local.job("roll")
    assert job["counts"]["FAILED"] == 1 and job["retry"] == [
        {"failureType": "FAILED", "numberOfRetries": 1}]
    assert job["rollout"]["pending"] == 0 and job["rollout"]["released"] == 7


def test_rollout_rate_is_the_next_batch_s(local: Local) -> None:
    names = [f"r-{i:02d}" for i in range(40)]
    local.things(*names)
    rollout = {"maximumPerMinute": 20, "exponentialRate": {
        "baseRatePerMinute": 2, "incrementFactor": 2.0,
        "rateIncreaseCriteria": {"numberOfNotifiedThings": 4}}}
    local.service.create_job("ramp", {"targets": [arn(n) for n in names],
                                      "document": "{}", "jobExecutionsRolloutConfig": rollout})
    rates = []
    for _ in range(4):
        view = local.job("ramp")["rollout"]
        state = local.store.get_rollout("ramp")
        # what _release_batch will use: advance_step first, then rate_at
        step = campaign.advance_step(rollout, state["step"], state["released"], 0)
        assert view["ratePerMinute"] == campaign.rate_at(rollout, step)
        assert view["exponential"]["nextRatePerMinute"] == campaign.rate_at(rollout, step + 1)
        assert view["exponential"]["moreNotified"] == (step + 1) * 4 - state["released"]
        assert view["nextBatchIn"] == pytest.approx(60, abs=1)
        rates.append(view["ratePerMinute"])
        before = state["released"]
        local.advance(60)
        assert local.store.get_rollout("ramp")["released"] - before == rates[-1]
    assert rates == [2, 4, 8, 20]  # the first batch (2) went at creation; capped at 20


def fires(criterion: dict[str, Any], bad: int, executed: int) -> bool:
    """campaign._check_abort's condition, as written there."""
    return (executed >= criterion["minNumberOfExecutedThings"]
            and 100 * bad >= criterion["thresholdPercentage"] * executed and bad > 0)


def test_abort_progress_uses_check_abort_arithmetic() -> None:
    for pct, least, kind in itertools.product((0, 10, 14.29, 30, 33.33, 50, 99.99, 100),
                                              (1, 4, 9), ("FAILED", "ALL", "TIMED_OUT")):
        criterion = {"failureType": kind, "action": "CANCEL", "thresholdPercentage": pct,
                     "minNumberOfExecutedThings": least}
        for succeeded, failed, rejected, timed_out in itertools.product(range(4), repeat=4):
            counts = {"SUCCEEDED": succeeded, "FAILED": failed, "REJECTED": rejected,
                      "TIMED_OUT": timed_out, "QUEUED": 3, "CANCELED": 2}
            executed = succeeded + failed + rejected + timed_out
            bad = sum(counts[s] for s in campaign.FAILURE_TYPES[kind])
            got = abort_progress(criterion, counts)
            assert (got["executed"], got["matching"]) == (executed, bad)
            more = got["failuresToFire"]
            if fires(criterion, bad, executed):
                assert more == 0
            elif more is None:  # never: checked over the next 100 failures
                assert not any(fires(criterion, bad + k, executed + k) for k in range(1, 100))
            else:  # the share of failures only grows with each one: one before is enough
                assert fires(criterion, bad + more, executed + more)
                assert not fires(criterion, bad + more - 1, executed + more - 1)


def test_abort_fired_is_shown(local: Local) -> None:
    names = [f"a-{i}" for i in range(5)]
    local.things(*names)
    local.service.create_job("abort", {
        "targets": [arn(n) for n in names], "document": "{}",
        "abortConfig": {"criteriaList": [{"failureType": "FAILED", "action": "CANCEL",
                                          "thresholdPercentage": 50,
                                          "minNumberOfExecutedThings": 2}]}})
    local.service.update("a-0", "abort", UpdateRequest("FAILED"))
    job = local.job("abort")
    assert job["abort"][0]["failuresToFire"] == 1 and job["abort"][0]["percentage"] == 100
    local.service.update("a-1", "abort", UpdateRequest("FAILED"))
    job = local.job("abort")
    assert job["status"] == "CANCELED" and job["abortFired"]
    assert job["abort"][0]["failuresToFire"] == 0 and job["reasonCode"] == "JOB_ABORT_CRITERIA_MET"
    assert job["counts"]["CANCELED"] == 3


def test_things_firmware_current_job_and_details(local: Local) -> None:
    local.things("f-1", "f-2", "f-3")
    local.service.create_job("ota1", {"targets": [arn("f-1"), arn("f-2")],
                                      "document": ota_document("1.5.0")})
    local.service.create_job("app1", {"targets": [arn("f-1")], "document": json.dumps(
        {"operation": "app-update", "version": "3.1", "manifest": "https://h/m.json?sig=x"})})
    local.service.create_job("demo", {"targets": [arn("f-2")], "document": json.dumps(
        {"operation": "demo", "steps": 3})})
    local.service.update("f-1", "ota1", UpdateRequest("SUCCEEDED", {"version": "1.5.0",
                                                                    "slot": "ota_1"}))
    # a rolled-back image reports the version it still runs
    local.service.update("f-2", "ota1", UpdateRequest("FAILED", {
        "reason": "rolled_back", "version": "1.4.2", "image": "1.5.0"}))
    local.service.update("f-1", "app1", UpdateRequest("SUCCEEDED", {"version": "3.1"}))
    local.service.update("f-2", "demo", UpdateRequest("IN_PROGRESS", {"step": "1/3"}))
    f1, f2, f3 = (local.thing(n) for n in ("f-1", "f-2", "f-3"))
    assert (f1["firmware"], f1["app"], f1["currentJob"]) == ("1.5.0", "3.1", None)
    assert (f2["firmware"], f2["app"]) == ("1.4.2", None)
    assert f2["currentJob"] == {"jobId": "demo", "executionNumber": 1, "status": "IN_PROGRESS"}
    assert f2["latest"]["statusDetails"] == {"step": "1/3"}
    assert f3["firmware"] is None and f3["latest"] is None and not f3["connected"]
    kinds = {j["jobId"]: (j["kind"], j["version"]) for j in local.dashboard.snapshot()["jobs"]}
    assert kinds == {"ota1": ("ota", "1.5.0"), "app1": ("app-update", "3.1"),
                     "demo": ("demo", None)}


def test_connected_means_seen_recently(local: Local) -> None:
    clock = [1000.0]
    local.dashboard.presence = dashboard.Presence(clock=lambda: clock[0])
    local.dashboard.presence.watch(local.service)
    local.things("p-1", "p-2", "p-3")
    local.service.create_job("pj", {"targets": [arn("p-1")], "document": "{}"})
    local.service.get_pending("p-1")                     # MQTT get or GetPendingJobExecutions
    local.service.update("p-1", "pj", UpdateRequest("IN_PROGRESS"))
    clock[0] += 100
    local.service.start_next("p-2", StartNextRequest())  # nothing for it, but it asked
    snap = {t["name"]: t for t in local.dashboard.snapshot()["things"]}
    assert snap["p-1"]["connected"] and snap["p-1"]["lastSeenSecondsAgo"] == 100
    assert snap["p-2"]["connected"] and snap["p-2"]["lastSeenSecondsAgo"] == 0
    assert not snap["p-3"]["connected"] and snap["p-3"]["lastSeenSecondsAgo"] is None
    clock[0] += dashboard.ONLINE_SECONDS - 50
    snap = {t["name"]: t for t in local.dashboard.snapshot()["things"]}
    assert not snap["p-1"]["connected"] and snap["p-2"]["connected"]
    assert local.dashboard.snapshot()["connected"] == 1
    # DescribeJobExecution, and a command report from a thing (even one jobsd refuses: it was
    # answered), count; a report for a client target is no thing's
    from iotjobs_host.jobsd import commands as cmds
    from iotjobs_host.jobsd.rules import DeviceError

    local.service.describe("p-3", "$next", DescribeRequest())
    report = cmds.parse_update({"status": "SUCCEEDED"})
    with pytest.raises(DeviceError):
        local.service.update_command_execution("thing", "p-1", "no-such-execution", report)
    with pytest.raises(DeviceError):
        local.service.update_command_execution("client", "p-2", "no-such-execution", report)
    clock[0] += 60
    snap = {t["name"]: t for t in local.dashboard.snapshot()["things"]}
    assert snap["p-3"]["lastSeenSecondsAgo"] == 60 and snap["p-1"]["lastSeenSecondsAgo"] == 60
    assert snap["p-2"]["lastSeenSecondsAgo"] == dashboard.ONLINE_SECONDS + 10


def test_nothing_secret_and_no_document(local: Local) -> None:
    local.things("s-1")
    local.service.create_job("sec", {
        "targets": [arn("s-1")], "document": ota_document(),
        "description": "notes at https://example.com/notes?token=abc&X-Amz-Signature=def"})
    local.service.update("s-1", "sec", UpdateRequest("FAILED", {
        "message": "GET http://127.0.0.1:8441/files/fw/a.bin?X-Expires=1&X-Signature=abcd: 403",
        "raw": "X-Amz-Credential=AKIA/x&X-Amz-Signature=0123"}))
    text = json.dumps(local.dashboard.snapshot())
    for word in ("token=abc", "X-Signature=abcd", "Signature=0123", "X-Amz-Signature=def",
                 "s3.amazonaws.com", "sha256-of-the-image", "X-Expires=1"):
        assert word not in text, word
    assert "https://example.com/notes?[redacted]" in text
    assert redact("see https://h/p?a=1 and X-Amz-Signature=9f, Signature=7") == \
        "see https://h/p?[redacted] and X-Amz-Signature=[redacted], Signature=[redacted]"
    assert len(redact("x" * 5000)) == dashboard.MAX_TEXT


def test_commands_are_listed_newest_first(local: Local) -> None:
    local.things("k-1")
    local.service.create_command("ping", {"payload": {"content": "eyJhIjoxfQ==",
                                                      "contentType": "application/json"}})
    ids = [local.service.start_command_execution({
        "targetArn": arn("k-1"), "commandArn": f"arn:aws:iot:{REGION}:{ACCOUNT}:command/ping"}
    )["executionId"] for _ in range(2)]
    from iotjobs_host.jobsd import commands as cmds
    local.service.update_command_execution("thing", "k-1", ids[0], cmds.parse_update(
        {"status": "SUCCEEDED", "result": {"pong": {"b": True}}}))
    shown = local.dashboard.snapshot()["commands"]
    assert [c["executionId"] for c in shown] == ids[::-1]
    assert shown[1]["status"] == "SUCCEEDED" and shown[1]["result"] == "pong=True"
    assert shown[0]["target"] == "thing/k-1"
    assert local.thing("k-1")["connected"]  # the report was a request of k-1


def test_one_read_a_tick_and_none_while_idle(local: Local) -> None:
    """However many watch, the state is read at most once a tick; with nothing committed since
    (PRAGMA data_version unchanged) the last rows are reused and no query runs."""
    local.things("i-1")
    first = local.dashboard.snapshot_json()
    assert local.dashboard.snapshot_json() is first  # the same tick: the cached bytes
    rows = local.dashboard._read()[0]
    assert local.dashboard._read()[0] is rows        # idle: not read again
    local.things("i-2")                              # a commit by jobsd's connection
    assert local.dashboard._read()[0] is not rows
    assert [t["name"] for t in local.dashboard.snapshot()["things"]] == ["i-1", "i-2"]
    # the dashboard's connection cannot write
    with pytest.raises(Exception, match="readonly|read-only|query_only"):
        local.dashboard._connection().execute("DELETE FROM things")


def test_a_failing_snapshot_is_reported_not_fatal(local: Local,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise KeyError("surprise")

    monkeypatch.setattr(dashboard, "build_snapshot", broken)
    assert "error" in json.loads(local.dashboard.snapshot_json())
    monkeypatch.undo()
    local.dashboard._cache = (float("-inf"), None)
    assert "things" in json.loads(local.dashboard.snapshot_json())


# -- HTTP, in process ----------------------------------------------------------------------------
def get(address: str, path: str, headers: Optional[dict[str, str]] = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(address, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_page_headers_methods_and_host(local: Local) -> None:
    address = local.serve()
    status, headers, body = get(address, "/dashboard")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert b"<script src=\"/dashboard/app.js\"" in body and b"<script>" not in body
    assert get(address, "/dashboard/app.js")[0] == 200
    assert get(address, "/dashboard/app.css")[0] == 200
    status, headers, body = get(address, "/dashboard/state")
    assert status == 200 and json.loads(body)["things"] == []
    assert get(address, "/dashboard/nope")[0] == 404
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = get(address, "/dashboard/state", method=method)
        assert status == 405 and headers["allow"] == "GET, HEAD"
    assert get(address, "/dashboard", method="HEAD")[:1] == (200,)
    # a page on another site that rebinds its name to 127.0.0.1 gets nothing
    assert get(address, "/dashboard/state", {"Host": "attacker.example"})[0] == 403
    assert get(address, "/dashboard/state", {"Host": "localhost:1"})[0] == 200
    assert get(address, "/dashboard/state", {"Host": "[::1]:1"})[0] == 200
    # the AWS API is untouched
    assert get(address, "/things")[0] == 200


def open_stream(address: str, headers: Optional[dict[str, str]] = None
                ) -> tuple[socket.socket, bytes]:
    """A raw event-stream request; returns the socket and the first event's data."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"GET /dashboard/events HTTP/1.1\r\nHost: {address}\r\n{extra}\r\n".encode())
    data = b""
    while b"\ndata: " not in data or not data.endswith(b"\n\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return sock, data


def test_event_stream_and_its_thread(local: Local) -> None:
    address = local.serve()
    local.things("e-1")
    sock, head = open_stream(address)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    event = json.loads(head.split(b"\ndata: ", 1)[1].split(b"\n\n", 1)[0])
    assert [t["name"] for t in event["things"]] == ["e-1"]
    local.things("e-2")  # the next event has it
    data = b""
    deadline = time.monotonic() + 5
    while b'"e-2"' not in data and time.monotonic() < deadline:
        data += sock.recv(65536)
    assert b'"e-2"' in data
    assert local.dashboard.streams == 1
    sock.close()  # the client leaves: its thread is freed at once, not after a timeout
    stack.wait_until(lambda: local.dashboard.streams == 0, 3, "the stream's thread to end")
    # jobsd stopping ends open streams within a tick
    socks = [open_stream(address)[0] for _ in range(3)]
    assert local.dashboard.streams == 3
    started = time.monotonic()
    local.dashboard.close()
    stack.wait_until(lambda: local.dashboard.streams == 0, 3, "streams to end on close")
    assert time.monotonic() - started < 2.5
    for s in socks:
        s.close()


def test_stream_limit(local: Local, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard, "MAX_STREAMS", 2)
    address = local.serve()
    socks = [open_stream(address)[0] for _ in range(2)]
    status, headers, _ = get(address, "/dashboard/events")
    assert status == 503 and headers["retry-after"] == "5"
    socks.pop().close()
    stack.wait_until(lambda: local.dashboard.streams == 1, 3, "a stream to end")
    socks.append(open_stream(address)[0])
    for s in socks:
        s.close()


def cookie_of(headers: dict[str, str]) -> str:
    return headers["set-cookie"].split(";", 1)[0]


def test_signed_link_opens_a_session(tmp_path: Path) -> None:
    verifier = Verifier({KEY: KeyPair(KEY, SECRET, None, "default")}, "iot", REGION)
    lo = Local(tmp_path, verifier)
    try:
        address = lo.serve()
        base = f"http://{address}"
        for path in ("/dashboard", "/dashboard/state", "/dashboard/app.js", "/dashboard/events"):
            status, _, body = get(address, path)
            assert status == 403 and b"--dashboard-url" in body, path
        url = presign_url(base, KEY, SECRET, REGION, expires=60)
        target = url[len(base):]
        assert target.startswith("/dashboard?") and "X-Amz-Signature=" in target
        status, headers, _ = get(address, target)
        assert status == 303 and headers["location"] == "/dashboard"
        set_cookie = headers["set-cookie"]
        port = address.rsplit(":", 1)[1]
        assert set_cookie.startswith(f"jobsd_dashboard_{port}=")
        for attribute in ("HttpOnly", "SameSite=Lax", "Path=/dashboard", "Max-Age=43200"):
            assert attribute in set_cookie
        cookie = {"Cookie": cookie_of(headers)}
        for path in ("/dashboard", "/dashboard/state", "/dashboard/app.js"):
            assert get(address, path, cookie)[0] == 200, path
        sock, head = open_stream(address, cookie)
        assert head.startswith(b"HTTP/1.1 200")
        sock.close()
        # a forged or foreign cookie, a tampered link, other keys or regions: nothing
        forged = {"Cookie": f"jobsd_dashboard_{port}=" + "A" * 43}
        assert get(address, "/dashboard/state", forged)[0] == 403
        other_port = {"Cookie": cookie_of(headers).replace(f"_{port}=", "_1=")}
        assert get(address, "/dashboard/state", other_port)[0] == 403
        tampered = target.replace("X-Amz-Signature=", "X-Amz-Signature=0")
        status, headers, body = get(address, tampered)
        assert status == 403 and b"InvalidSignatureException" in body
        assert "set-cookie" not in headers
        wrong = [presign_url(base, KEY, "not-the-secret", REGION),
                 presign_url(base, "AKIAUNKNOWN000000000", SECRET, REGION),
                 presign_url(base, KEY, SECRET, "eu-west-1")]
        for link in wrong:
            assert get(address, link[len(base):])[0] == 403
        # a signature opens a session on the page only: a signed state request is refused
        req = AWSRequest(method="GET", url=base + "/dashboard/state")
        SigV4QueryAuth(Credentials(KEY, SECRET), "iot", REGION, expires=60).add_auth(req)
        assert get(address, req.url[len(base):])[0] == 403
        # the AWS API still wants its own signatures
        assert get(address, "/things")[0] == 403
    finally:
        lo.close()


# -- a real jobsd ----------------------------------------------------------------------------------
def test_dashboard_url_command(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    jobsd = os.path.join(TOOLS, "jobsd")
    out = subprocess.run([jobsd, "--dashboard-url", "--control", "127.0.0.1:8440"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "http://127.0.0.1:8440/dashboard"
    out = subprocess.run([jobsd, "--dashboard-url", "--control", "10.1.2.3:9000", "--credentials",
                          str(creds), "--expires", "120"], capture_output=True, text=True,
                         check=True).stdout.strip()
    parts = urlsplit(out)
    assert (parts.scheme, parts.netloc, parts.path) == ("http", "10.1.2.3:9000", "/dashboard")
    assert "X-Amz-Expires=120" in parts.query and "X-Amz-Signature=" in parts.query
    assert SECRET not in out
    bad = subprocess.run([jobsd, "--dashboard-url", "--credentials", str(creds), "--profile",
                          "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and "nope" in bad.stderr


def test_jobsd_stops_with_an_open_stream(module_broker: stack.Mosquitto, tmp_path: Path) -> None:
    j = stack.Jobsd(str(tmp_path / "jobsd"), module_broker.broker)
    try:
        address = j.control_url[len("http://"):]
        sock, head = open_stream(address)
        assert b"\ndata: {" in head
        started = time.monotonic()
        rc = j.stop()
        assert rc == 0 and time.monotonic() - started < 5, j.proc.log_text()
        sock.settimeout(5)
        rest = b""
        while chunk := sock.recv(65536):  # the stream ended: jobsd closed it
            rest += chunk
        sock.close()
    finally:
        j.stop()


# -- the browser -------------------------------------------------------------------------------------
def _chromium() -> tuple[str, str]:
    binary = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "")
                   if p and os.path.exists(p)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (tools/setup installs them "
                    "when run as root: apt-get install chromium chromium-driver)")
    return binary, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    binary, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--hide-scrollbars", "--no-first-run",
                "--disable-extensions", "--disable-background-networking",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console
    driver = webdriver.Chrome(service=DriverService(executable_path=driver_path),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def signed_jobsd(module_broker: stack.Mosquitto,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.Jobsd]:
    root = tmp_path_factory.mktemp("jobsd-dashboard")
    creds = root / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n")
    files = root / "files"
    (files / "fw").mkdir(parents=True)
    (files / "fw" / "fw-2.0.0.bin").write_bytes(b"\0" * 1024)
    j = stack.Jobsd(str(root / "jobsd"), module_broker.broker, files=str(files),
                    extra=["--credentials", str(creds), "--test-hooks"])
    try:
        yield j
    finally:
        j.stop()


def mqtt_report(broker: str, topic: str, payload: dict[str, Any]) -> None:
    """Publish one device report on the broker's plain listener (QoS 1, acknowledged)."""
    host, port = broker.rsplit(":", 1)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="dash-" + uuid.uuid4().hex[:8],
                         protocol=paho.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()
    try:
        client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def signed_client(service: str, url: str) -> Any:
    return boto3.client(service, endpoint_url=url, region_name=REGION, aws_access_key_id=KEY,
                        aws_secret_access_key=SECRET, config=Config(retries={"max_attempts": 1}))


PAGE_COUNTS = """
const card = document.querySelector('[data-job="' + arguments[0] + '"]');
if (!card) return null;
const out = {};
for (const b of card.querySelectorAll('[data-count]')) out[b.dataset.count] = Number(b.textContent);
return out;
"""


def test_browser_follows_a_rollout(browser: Any, signed_jobsd: stack.Jobsd,
                                   module_broker: stack.Mosquitto) -> None:
    iot = signed_client("iot", signed_jobsd.control_url)
    devices = signed_client("iot-jobs-data", signed_jobsd.data_url)
    # this module's jobsd is its own: plain names make a readable screenshot
    things = [f"dev-{i:02d}" for i in range(1, 9)]
    for t in things:
        iot.create_thing(thingName=t)
    job_id = "fw-2-0-0"
    iot.create_job(jobId=job_id, targets=[arn(t) for t in things], document=ota_document(),
                   description="firmware 2.0.0 (notes: https://example.com/n?token=abc)",
                   jobExecutionsRolloutConfig={"maximumPerMinute": 3},
                   abortConfig={"criteriaList": [{"failureType": "FAILED", "action": "CANCEL",
                                                  "thresholdPercentage": 50,
                                                  "minNumberOfExecutedThings": 4}]},
                   jobExecutionsRetryConfig={"criteriaList": [{"failureType": "FAILED",
                                                               "numberOfRetries": 1}]})
    cfg_id = "cfg-push"
    iot.create_job(jobId=cfg_id, targets=[arn(things[-1])], document=json.dumps(
        {"operation": "download-file", "url": PLACEHOLDER, "path": "cfg.json"}))

    def advance(seconds: float) -> None:
        """PUT /_jobsd/test-hooks, signed like any control request."""
        body = json.dumps({"advanceClock": seconds}).encode()
        req = AWSRequest(method="PUT", url=signed_jobsd.control_url + "/_jobsd/test-hooks",
                         data=body, headers={"Content-Type": "application/json"})
        SigV4Auth(Credentials(KEY, SECRET), "iot", REGION).add_auth(req)
        conn = http.client.HTTPConnection(signed_jobsd.control_url[len("http://"):], timeout=10)
        try:
            conn.request("PUT", "/_jobsd/test-hooks", body=body, headers=dict(req.headers.items()))
            reply = conn.getresponse()
            assert reply.status == 200, reply.read()
        finally:
            conn.close()

    def api() -> dict[str, int]:
        details = iot.describe_job(jobId=job_id)["job"]["jobProcessDetails"]
        counts = {status: details[name] for status, name in COUNTERS.items()}
        released = {e["thingArn"] for e in iot.list_job_executions_for_job(
            jobId=job_id)["executionSummaries"]}
        counts[dashboard.NOT_RELEASED] = len(things) - len(released)
        return counts

    def page_matches(what: str) -> dict[str, int]:
        last: dict[str, Any] = {}

        def same() -> bool:
            nonlocal last
            want, shown = api(), browser.execute_script(PAGE_COUNTS, job_id)
            last = {"api": want, "page": shown}
            return shown == want
        try:
            stack.wait_until(same, 15, what, 0.2)
        except TimeoutError as e:
            raise AssertionError(f"{e}: {last}") from None
        return last["page"]

    # the way in: a presigned link, then a cookie; the link does not stay in the address bar
    started = time.monotonic()
    browser.get(presign_url(signed_jobsd.control_url, KEY, SECRET, REGION, expires=120))
    assert urlsplit(browser.current_url).path == "/dashboard"
    assert not urlsplit(browser.current_url).query
    browser.execute_script("window.__loaded_once = true;")
    counts = page_matches("the first batch on the page")
    assert counts["QUEUED"] == 3 and counts[dashboard.NOT_RELEASED] == 5

    # devices work: one starts, one succeeds with its new firmware version, one fails with a
    # hostile message (and is retried)
    devices.start_next_pending_job_execution(thingName=things[0],
                                             statusDetails={"step": "download 40%"})
    devices.update_job_execution(jobId=job_id, thingName=things[1], status="SUCCEEDED",
                                 statusDetails={"version": "2.0.0", "slot": "ota_1"})
    devices.update_job_execution(jobId=job_id, thingName=things[2], status="FAILED",
                                 statusDetails={"reason": "HASH_MISMATCH", "message": XSS})
    counts = page_matches("device reports on the page")
    assert counts["SUCCEEDED"] == 1 and counts["FAILED"] == 1 and counts["QUEUED"] == 1

    advance(60)  # a rollout minute: three more released
    counts = page_matches("the second batch on the page")
    assert counts[dashboard.NOT_RELEASED] == 2
    devices.update_job_execution(jobId=job_id, thingName=things[3], status="SUCCEEDED",
                                 statusDetails={"version": "2.0.0", "slot": "ota_0"})
    devices.start_next_pending_job_execution(thingName=things[4],
                                             statusDetails={"step": "verify signature"})
    devices.update_job_execution(jobId=cfg_id, thingName=things[-1], status="REJECTED",
                                 statusDetails={"reason": "URL_NOT_ALLOWED",
                                                "message": "http://127.0.0.1:1/files/fw/x?"
                                                           "X-Expires=9&X-Signature=ab"})
    # an AWS IoT command, answered by the device over MQTT
    iot.create_command(commandId="ping", payload={
        "content": b'{"command": "ping"}', "contentType": "application/json"})
    execution_id = devices.start_command_execution(
        targetArn=arn(things[0]),
        commandArn=f"arn:aws:iot:{REGION}:{ACCOUNT}:command/ping")["executionId"]
    mqtt_report(module_broker.broker,
                f"$aws/commands/things/{things[0]}/executions/{execution_id}/response/json",
                {"status": "SUCCEEDED", "result": {"pong": {"b": True}}})
    counts = page_matches("the second batch's reports on the page")
    assert counts == {"QUEUED": 2, "IN_PROGRESS": 2, "SUCCEEDED": 2, "FAILED": 1,
                      "REJECTED": 0, "TIMED_OUT": 0, "CANCELED": 0, "REMOVED": 0,
                      dashboard.NOT_RELEASED: 2}
    stack.wait_until(lambda: browser.execute_script(
        "return document.querySelector('#commands [data-execution=\"' + arguments[0] + '\"]')"
        "?.textContent || ''", execution_id).find("succeeded") >= 0, 15,
        "the command's result on the page", 0.2)
    elapsed = time.monotonic() - started
    # live: the page was never reloaded
    assert browser.execute_script("return window.__loaded_once === true")

    # the hostile message is text: no element made from it, nothing run
    row = browser.execute_script(
        "return document.querySelector('[data-thing=\"' + arguments[0] + '\"]').textContent",
        things[2])
    assert XSS in row
    assert browser.execute_script("return window.__xss === undefined")
    assert browser.execute_script("return document.querySelectorAll('#things img, #things "
                                  "script, main img, main script').length") == 0

    def cell(thing: str, name: str) -> str:
        return browser.execute_script(
            "return document.querySelector('[data-thing=\"' + arguments[0] + '\"] .' + "
            "arguments[1]).textContent", thing, name)

    assert cell(things[1], "firmware") == "2.0.0" and cell(things[3], "firmware") == "2.0.0"
    assert cell(things[0], "firmware") == "?"
    assert browser.execute_script("return document.querySelector('[data-thing=\"' + arguments[0]"
                                  " + '\"]').className", things[0]) == "on"
    assert browser.execute_script("return document.querySelector('[data-thing=\"' + arguments[0]"
                                  " + '\"]').className", things[6]) == "off"
    assert cell(things[6], "seen") == "never"
    assert cell(things[4], "current").startswith(job_id)
    card = browser.execute_script(
        "return document.querySelector('[data-job=\"' + arguments[0] + '\"]').textContent", job_id)
    assert "released 6 of 8" in card and "rate 3/min" in card and "next batch in" in card
    assert "abort at \u2265 50% FAILED once 4 executed: 1 of 3 (33.33%)" in card
    assert "fires after 1 more failure in a row" in card
    assert "https://example.com/n?[redacted]" in card
    assert "http://127.0.0.1:1/files/fw/x?[redacted]" in cell(things[-1], "details")

    # nothing secret in the page or in what it loads
    source = browser.page_source
    cookie = next(c for c in browser.get_cookies() if c["name"].startswith("jobsd_dashboard_"))
    assert cookie["httpOnly"] and browser.execute_script("return document.cookie") == ""
    address = signed_jobsd.control_url[len("http://"):]
    state = get(address, "/dashboard/state", {"Cookie": f"{cookie['name']}={cookie['value']}"})[2]
    script = get(address, "/dashboard/app.js", {"Cookie": f"{cookie['name']}={cookie['value']}"})[2]
    for text in (source, state.decode(), script.decode()):
        for word in FORBIDDEN:
            assert word not in text, word

    # the page ran without a script error or a refused resource (CSP) in its console
    console = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not console, console

    os.makedirs(BUILD, exist_ok=True)
    shot = os.path.join(BUILD, "dashboard.png")
    browser.save_screenshot(shot)
    size = os.path.getsize(shot)
    assert 10_000 < size < 400_000
    print(f"dashboard: live page followed the rollout in {elapsed:.1f} s; screenshot {shot} "
          f"({size // 1024} KB)")


def test_unsigned_browser_is_refused(browser: Any, signed_jobsd: stack.Jobsd) -> None:
    browser.delete_all_cookies()
    browser.get(signed_jobsd.control_url + "/dashboard")
    assert "needs a signed link" in browser.page_source
    assert "jobsd" not in browser.title  # a text answer, not the page
