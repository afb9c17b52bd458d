"""System tests of tools/jobsd: a real mosquitto, a real jobsd process, a paho client acting as
the device and boto3 acting as the operator (and as an HTTPS device for iot-jobs-data).

No sleeps: every wait has a deadline and a condition. To prove that *no* event was published,
a test uses `Device.sync()`: jobsd publishes a request's events before its reply on one MQTT
connection, and mosquitto keeps that order, so everything received before the reply to a fresh
`get` is everything the earlier actions caused.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Union
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from botocore.exceptions import ClientError
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from iotjobs_host import stack  # noqa: E402
from iotjobs_host.jobsd.mqtt import route  # noqa: E402  (pure; no broker needed)
from iotjobs_host.pki import PKI  # noqa: E402
from iotjobs_host.stack import Jobsd  # noqa: E402

TIMEOUT = 5.0
REGION, ACCOUNT = "us-east-1", "123456789012"


# -- processes (tools/iotjobs_host/stack.py, shared with the other system tests) -------------

@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[int]:
    m = stack.Mosquitto(str(tmp_path_factory.mktemp("broker")), pki)
    try:
        yield m.port
    finally:
        m.stop()


@pytest.fixture(scope="module")
def jobsd(broker: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobsd]:
    """One jobsd for the module (each test works on fresh things and jobs)."""
    service = Jobsd(str(tmp_path_factory.mktemp("jobsd")), f"127.0.0.1:{broker}")
    try:
        yield service
    finally:
        service.stop()


# -- the device --------------------------------------------------------------------------------

Payload = Union[dict[str, Any], bytes]


class Device:
    """A paho client on one thing's jobs topics; messages kept in arrival order."""

    def __init__(self, port: int, thing: str) -> None:
        self.thing = thing
        self.prefix = f"$aws/things/{thing}/jobs/"
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        # small packets back to back: without this each waits ~40 ms for a delayed ACK
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.client.subscribe(self.prefix + "#", qos=1)
        assert subscribed.wait(TIMEOUT), "device subscription not acknowledged"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        if topic.endswith(("/accepted", "/rejected", "/notify", "/notify-next")):
            try:
                body = json.loads(msg.payload)
            except ValueError:
                body = msg.payload  # only a test's own junk; jobsd always sends JSON
            self.inbox.put((topic[len(self.prefix):], body))
        # anything else is our own request echoed by the `#` subscription

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, suffix: str, payload: Payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(self.prefix + suffix, data, qos=1).wait_for_publish(TIMEOUT)

    def request(self, suffix: str, payload: Payload,
                token: Optional[str] = None) -> tuple[str, dict[str, Any], list[tuple[str, Any]]]:
        """Publish and wait for the reply; returns (accepted|rejected, body, events before it)."""
        if isinstance(payload, dict) and token is None and "clientToken" not in payload:
            token = uuid.uuid4().hex
            payload = {**payload, "clientToken": token}
        self.publish(suffix, payload)
        events: list[tuple[str, Any]] = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            topic, body = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if topic in ("notify", "notify-next"):
                events.append((topic, body))
                continue
            outcome = topic.rsplit("/", 1)[1]
            assert topic == f"{suffix}/{outcome}", f"unexpected reply {topic}: {body}"
            if token is not None and body.get("clientToken") != token:
                raise AssertionError(f"reply for another request: {body}")
            return outcome, body, events

    def sync(self) -> list[tuple[str, Any]]:
        """Every event published since the last call (see the module docstring)."""
        outcome, _, events = self.request("get", {})
        assert outcome == "accepted"
        return events


@pytest.fixture
def thing(jobsd: Jobsd) -> str:
    name = f"thing-{uuid.uuid4().hex[:10]}"
    jobsd.iot.create_thing(thingName=name)
    return name


@pytest.fixture
def device(broker: int, thing: str) -> Iterator[Device]:
    dev = Device(broker, thing)
    try:
        yield dev
    finally:
        dev.close()


def arn(thing: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}"


def new_job(jobsd: Jobsd, thing: str, document: Optional[dict[str, Any]] = None) -> str:
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    jobsd.iot.create_job(jobId=job_id, targets=[arn(thing)],
                         document=json.dumps(document or {"operation": "test"}))
    return job_id


def error_code(err: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    return (err.value.response["Error"]["Code"],
            err.value.response["ResponseMetadata"]["HTTPStatusCode"])


# -- tests -------------------------------------------------------------------------------------

def test_create_job_sends_notify_and_notify_next(jobsd: Jobsd, device: Device) -> None:
    before = int(time.time())
    job = new_job(jobsd, device.thing, {"operation": "reboot"})
    events = device.sync()
    assert [topic for topic, _ in events] == ["notify", "notify-next"]
    notify, nxt = events[0][1], events[1][1]
    assert list(notify["jobs"]) == ["QUEUED"]
    [summary] = notify["jobs"]["QUEUED"]
    assert summary["jobId"] == job and summary["versionNumber"] == 1
    assert summary["executionNumber"] == 1 and "startedAt" not in summary
    assert isinstance(notify["timestamp"], int) and before <= notify["timestamp"] <= time.time()
    execution = nxt["execution"]
    assert execution["jobId"] == job and execution["status"] == "QUEUED"
    assert execution["thingName"] == device.thing
    assert execution["jobDocument"] == {"operation": "reboot"}


def test_job_lifecycle(jobsd: Jobsd, device: Device) -> None:
    job = new_job(jobsd, device.thing, {"operation": "test", "n": 1})
    device.sync()
    outcome, body, events = device.request("start-next", {"clientToken": "tok-1",
                                                          "statusDetails": {"step": "download"}})
    assert outcome == "accepted" and body["clientToken"] == "tok-1"
    assert events + device.sync() == []  # the next job only changed status: no events
    execution = body["execution"]
    assert execution["status"] == "IN_PROGRESS" and execution["versionNumber"] == 2
    assert execution["jobDocument"] == {"operation": "test", "n": 1}
    assert execution["statusDetails"] == {"step": "download"}
    assert isinstance(execution["startedAt"], int)

    outcome, body, events = device.request(f"{job}/update", {
        "status": "SUCCEEDED", "statusDetails": {"result": "ok"},
        "includeJobExecutionState": True, "includeJobDocument": True})
    assert outcome == "accepted"
    assert body["executionState"] == {"status": "SUCCEEDED", "statusDetails": {"result": "ok"},
                                      "versionNumber": 3}
    assert body["jobDocument"] == {"operation": "test", "n": 1}
    assert events == [("notify", {"timestamp": events[0][1]["timestamp"], "jobs": {}}),
                      ("notify-next", {"timestamp": events[1][1]["timestamp"]})]

    described = jobsd.iot.describe_job_execution(jobId=job, thingName=device.thing)["execution"]
    assert described["status"] == "SUCCEEDED" and described["versionNumber"] == 3
    assert described["statusDetails"]["detailsMap"] == {"result": "ok"}
    assert described["thingArn"] == arn(device.thing)
    job_view = jobsd.iot.describe_job(jobId=job)["job"]
    assert job_view["status"] == "COMPLETED"
    assert job_view["jobProcessDetails"]["numberOfSucceededThings"] == 1
    assert job_view["jobProcessDetails"]["numberOfQueuedThings"] == 0

    outcome, body, _ = device.request(f"{job}/update", {"clientToken": "tok-2",
                                                        "status": "IN_PROGRESS"})
    assert outcome == "rejected"
    assert body["code"] == "InvalidStateTransition" and body["clientToken"] == "tok-2"
    assert body["executionState"] == {"status": "SUCCEEDED", "statusDetails": {"result": "ok"},
                                      "versionNumber": 3}
    assert isinstance(body["timestamp"], int) and body["message"]

    outcome, body, _ = device.request(f"{job}/get", {})
    assert outcome == "accepted" and body["execution"]["status"] == "SUCCEEDED"


def test_queued_straight_to_succeeded_is_accepted(jobsd: Jobsd, device: Device) -> None:
    job = new_job(jobsd, device.thing)
    outcome, body, _ = device.request(f"{job}/update", {"status": "SUCCEEDED",
                                                        "includeJobExecutionState": True})
    assert outcome == "accepted" and body["executionState"]["versionNumber"] == 2


def test_version_mismatch(jobsd: Jobsd, device: Device) -> None:
    job = new_job(jobsd, device.thing)
    outcome, body, _ = device.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                        "expectedVersion": 7})
    assert outcome == "rejected" and body["code"] == "VersionMismatch"
    assert body["executionState"] == {"status": "QUEUED", "versionNumber": 1}
    outcome, body, _ = device.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                        "expectedVersion": "2"})
    assert outcome == "rejected" and body["code"] == "VersionMismatch"
    # the embedded C library's digit string and a JSON number both match when right
    outcome, _, _ = device.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                     "expectedVersion": "1"})
    assert outcome == "accepted"
    outcome, body, _ = device.request(f"{job}/update", {"status": "FAILED", "expectedVersion": 2,
                                                        "includeJobExecutionState": True})
    assert outcome == "accepted" and body["executionState"]["status"] == "FAILED"


@pytest.mark.parametrize("payload", [b"{not json", b"\xff\xfe{}", b""])
def test_invalid_json(jobsd: Jobsd, device: Device, payload: bytes) -> None:
    job = new_job(jobsd, device.thing)
    outcome, body, _ = device.request(f"{job}/update", payload)
    assert outcome == "rejected" and body["code"] == "InvalidJson"
    assert "clientToken" not in body and "executionState" not in body
    assert isinstance(body["timestamp"], int)


@pytest.mark.parametrize("details", [
    "not-an-object", {"key": 1}, {"bad key": "v"}, {"": "v"}, {"k" * 129: "v"}, {"key": ""},
    {"key": "x" * 1025}, {"key": "line\nbreak"}, {"key": "nul\u0000"}, ["a"],
])
def test_bad_status_details_is_invalid_request(jobsd: Jobsd, device: Device, details: Any) -> None:
    job = new_job(jobsd, device.thing)
    outcome, body, _ = device.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                        "statusDetails": details})
    assert outcome == "rejected" and body["code"] == "InvalidRequest", body
    outcome, body, _ = device.request(f"{job}/get", {})
    assert body["execution"]["status"] == "QUEUED"  # nothing was applied


def test_status_details_limits_accepted(jobsd: Jobsd, device: Device) -> None:
    job = new_job(jobsd, device.thing)
    details = {"k" * 128: "v" * 1024, "a:b_c-d": "ünïcödé ok"}
    outcome, body, _ = device.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                        "statusDetails": details,
                                                        "includeJobExecutionState": True})
    assert outcome == "accepted" and body["executionState"]["statusDetails"] == details


@pytest.mark.parametrize("payload,code", [
    ({}, "InvalidRequest"),                                    # status missing
    ({"status": "DONE"}, "InvalidRequest"),
    ({"status": "IN_PROGRESS", "expectedVersion": "1.0.1"}, "InvalidRequest"),
    ({"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}, "InvalidRequest"),
    ({"status": "IN_PROGRESS", "includeJobDocument": "yes"}, "InvalidRequest"),
    ({"status": "QUEUED"}, "InvalidStateTransition"),
])
def test_bad_update_requests(jobsd: Jobsd, device: Device, payload: dict[str, Any],
                             code: str) -> None:
    job = new_job(jobsd, device.thing)
    outcome, body, _ = device.request(f"{job}/update", payload)
    assert outcome == "rejected" and body["code"] == code


def test_invalid_topic_and_not_found(device: Device) -> None:
    outcome, body, _ = device.request("no-such-api", {"clientToken": "t"})
    assert outcome == "rejected" and body["code"] == "InvalidTopic" and body["clientToken"] == "t"
    outcome, body, _ = device.request("$next/update", {"status": "SUCCEEDED"})
    assert outcome == "rejected" and body["code"] == "InvalidTopic"
    outcome, body, _ = device.request("missing-job/get", {})
    assert outcome == "rejected" and body["code"] == "ResourceNotFound"
    outcome, body, _ = device.request("missing-job/update", {"status": "SUCCEEDED"})
    assert outcome == "rejected" and body["code"] == "ResourceNotFound"
    outcome, body, _ = device.request("get", b"[1, 2]")
    assert outcome == "rejected" and body["code"] == "InvalidRequest"


def test_nothing_pending(device: Device) -> None:
    outcome, body, _ = device.request("get", {"clientToken": "g"})
    assert outcome == "accepted"
    assert body["inProgressJobs"] == [] and body["queuedJobs"] == [] and body["clientToken"] == "g"
    outcome, body, _ = device.request("start-next", {})
    assert outcome == "accepted" and "execution" not in body
    outcome, body, _ = device.request("$next/get", {})
    assert outcome == "accepted" and "execution" not in body


def test_responses_are_not_answered(device: Device) -> None:
    """jobsd hears its own replies through its wildcard; it must not treat them as requests."""
    fakes = [("get/accepted", {"clientToken": "x"}), ("notify", {"jobs": {}}),
             ("abc/update/rejected", b"not json"), ("start-next/rejected", {})]
    for suffix, payload in fakes:
        device.publish(suffix, payload)
    device.publish("get", {"clientToken": "barrier"})
    seen = []
    while True:
        topic, body = device.inbox.get(timeout=TIMEOUT)
        if topic == "get/accepted" and body.get("clientToken") == "barrier":
            break
        seen.append(topic)
    # only the device's own publications came back (its `#` subscription), no answer to them
    assert sorted(seen) == sorted(suffix for suffix, _ in fakes)


def test_pending_order_and_describe_next(jobsd: Jobsd, device: Device) -> None:
    first, second, third = (new_job(jobsd, device.thing) for _ in range(3))
    device.request(f"{third}/update", {"status": "IN_PROGRESS"})
    _, body, _ = device.request("get", {})
    assert [j["jobId"] for j in body["inProgressJobs"]] == [third]
    assert [j["jobId"] for j in body["queuedJobs"]] == [first, second]
    _, body, _ = device.request("$next/get", {"includeJobDocument": False})
    assert body["execution"]["jobId"] == third and "jobDocument" not in body["execution"]
    _, body, _ = device.request("start-next", {"statusDetails": {"ignored": "yes"}})
    assert body["execution"]["jobId"] == third and "statusDetails" not in body["execution"]


def test_documented_notification_sequence(jobsd: Jobsd, device: Device) -> None:
    """PROTOCOL.md 1.9, all eight steps, asserting every event and that nothing else came."""
    suffix = uuid.uuid4().hex[:6]
    job1, job2, job3 = (f"job{i}-{suffix}" for i in (1, 2, 3))

    def create(job_id: str) -> None:
        jobsd.iot.create_job(jobId=job_id, targets=[arn(device.thing)],
                             document='{"operation":"test"}')

    def ids(summaries: list[dict[str, Any]]) -> list[str]:
        return [s["jobId"] for s in summaries]

    # 1. job1 created -> notify QUEUED [job1] and notify-next job1
    create(job1)
    events = device.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    assert events[0][1]["jobs"].keys() == {"QUEUED"}
    assert ids(events[0][1]["jobs"]["QUEUED"]) == [job1]
    assert events[0][1]["jobs"]["QUEUED"][0]["versionNumber"] == 1
    assert events[1][1]["execution"]["jobId"] == job1
    assert events[1][1]["execution"]["status"] == "QUEUED"
    assert events[1][1]["execution"]["jobDocument"] == {"operation": "test"}

    # 2. job2 created -> notify QUEUED [job1, job2]; next unchanged
    create(job2)
    events = device.sync()
    assert [t for t, _ in events] == ["notify"]
    assert events[0][1]["jobs"].keys() == {"QUEUED"}
    assert ids(events[0][1]["jobs"]["QUEUED"]) == [job1, job2]

    # 3. job1 QUEUED -> IN_PROGRESS -> nothing at all
    outcome, _, events = device.request(f"{job1}/update", {"status": "IN_PROGRESS"})
    assert outcome == "accepted"
    assert events + device.sync() == []

    # 4. job3 created -> notify IN_PROGRESS [job1 v2 with startedAt], QUEUED [job2, job3]
    create(job3)
    events = device.sync()
    assert [t for t, _ in events] == ["notify"]
    jobs = events[0][1]["jobs"]
    assert list(jobs) == ["IN_PROGRESS", "QUEUED"]
    assert ids(jobs["IN_PROGRESS"]) == [job1] and ids(jobs["QUEUED"]) == [job2, job3]
    assert jobs["IN_PROGRESS"][0]["versionNumber"] == 2 and "startedAt" in jobs["IN_PROGRESS"][0]

    # 5. job1 SUCCEEDED -> notify QUEUED [job2, job3]; notify-next job2
    outcome, _, events = device.request(f"{job1}/update", {"status": "SUCCEEDED"})
    assert outcome == "accepted"
    events += device.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    assert events[0][1]["jobs"].keys() == {"QUEUED"}
    assert ids(events[0][1]["jobs"]["QUEUED"]) == [job2, job3]
    assert events[1][1]["execution"]["jobId"] == job2
    assert events[1][1]["execution"]["status"] == "QUEUED"

    # 6. job3 set IN_PROGRESS -> notify-next job3 (IN_PROGRESS, v2); no notify
    outcome, _, events = device.request(f"{job3}/update", {"status": "IN_PROGRESS"})
    assert outcome == "accepted"
    events += device.sync()
    assert [t for t, _ in events] == ["notify-next"]
    execution = events[0][1]["execution"]
    assert execution["jobId"] == job3 and execution["status"] == "IN_PROGRESS"
    assert execution["versionNumber"] == 2

    # 7. job2 REJECTED -> notify IN_PROGRESS [job3]; next unchanged
    outcome, _, events = device.request(f"{job2}/update", {"status": "REJECTED"})
    assert outcome == "accepted"
    events += device.sync()
    assert [t for t, _ in events] == ["notify"]
    assert events[0][1]["jobs"].keys() == {"IN_PROGRESS"}
    assert ids(events[0][1]["jobs"]["IN_PROGRESS"]) == [job3]

    # 8. job3 force-deleted -> notify with empty jobs and an empty notify-next
    with pytest.raises(ClientError) as err:
        jobsd.iot.delete_job(jobId=job3)  # IN_PROGRESS needs force
    assert error_code(err) == ("InvalidStateTransitionException", 409)
    assert device.sync() == []
    jobsd.iot.delete_job(jobId=job3, force=True)
    events = device.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    assert set(events[0][1]) == {"timestamp", "jobs"} and events[0][1]["jobs"] == {}
    assert set(events[1][1]) == {"timestamp"}
    outcome, body, _ = device.request(f"{job3}/get", {})
    assert outcome == "rejected" and body["code"] == "ResourceNotFound"


def test_cancel_job(jobsd: Jobsd, device: Device) -> None:
    running, waiting = new_job(jobsd, device.thing), new_job(jobsd, device.thing)
    device.request("start-next", {})
    device.sync()
    jobsd.iot.cancel_job(jobId=waiting, reasonCode="OPERATOR", comment="not needed")
    events = device.sync()
    assert [t for t, _ in events] == ["notify"]
    assert events[0][1]["jobs"] == {"IN_PROGRESS": [events[0][1]["jobs"]["IN_PROGRESS"][0]]}
    jobsd.iot.cancel_job(jobId=running)  # without force, IN_PROGRESS executions keep running
    assert device.sync() == []
    assert jobsd.iot.describe_job(jobId=running)["job"]["status"] == "CANCELED"
    jobsd.iot.cancel_job(jobId=running, force=True)
    events = device.sync()
    assert [t for t, _ in events] == ["notify", "notify-next"]
    outcome, body, _ = device.request(f"{running}/update", {"status": "SUCCEEDED"})
    assert outcome == "rejected" and body["code"] == "InvalidStateTransition"
    assert body["executionState"]["status"] == "CANCELED"
    view = jobsd.iot.describe_job(jobId=waiting)["job"]
    assert view["status"] == "CANCELED" and view["reasonCode"] == "OPERATOR"
    assert view["jobProcessDetails"]["numberOfCanceledThings"] == 1


def test_control_plane_reads(jobsd: Jobsd, thing: str) -> None:
    job = f"job-{uuid.uuid4().hex[:8]}"
    created = jobsd.iot.create_job(jobId=job, targets=[arn(thing)], document="{}",
                                   description="a test job",
                                   timeoutConfig={"inProgressTimeoutInMinutes": 30})
    assert created["jobArn"] == f"arn:aws:iot:{REGION}:{ACCOUNT}:job/{job}"
    assert created["description"] == "a test job"
    view = jobsd.iot.describe_job(jobId=job)["job"]
    assert view["status"] == "IN_PROGRESS" and view["targetSelection"] == "SNAPSHOT"
    assert view["targets"] == [arn(thing)]
    assert view["timeoutConfig"] == {"inProgressTimeoutInMinutes": 30}
    assert view["jobProcessDetails"]["numberOfQueuedThings"] == 1
    assert view["createdAt"].timestamp() <= time.time()
    assert jobsd.iot.get_job_document(jobId=job)["document"] == "{}"
    assert job in [j["jobId"] for j in jobsd.iot.list_jobs(status="IN_PROGRESS")["jobs"]]
    assert job not in [j["jobId"] for j in jobsd.iot.list_jobs(status="COMPLETED")["jobs"]]
    for_job = jobsd.iot.list_job_executions_for_job(jobId=job)["executionSummaries"]
    assert [(e["thingArn"], e["jobExecutionSummary"]["status"])
            for e in for_job] == [(arn(thing), "QUEUED")]
    for_thing = jobsd.iot.list_job_executions_for_thing(thingName=thing)["executionSummaries"]
    assert [e["jobId"] for e in for_thing] == [job]
    done = jobsd.iot.list_job_executions_for_thing(thingName=thing, status="SUCCEEDED")
    assert done["executionSummaries"] == []
    assert jobsd.iot.describe_thing(thingName=thing)["thingArn"] == arn(thing)


def test_control_plane_errors(jobsd: Jobsd, thing: str) -> None:
    job = new_job(jobsd, thing)
    cases = [
        (lambda: jobsd.iot.create_job(jobId=job, targets=[arn(thing)], document="{}"),
         ("ResourceAlreadyExistsException", 409)),
        (lambda: jobsd.iot.create_job(jobId="j-list", targets=[arn(thing)], document="[1]"),
         ("InvalidRequestException", 400)),
        (lambda: jobsd.iot.create_job(jobId="j-bad", targets=[arn(thing)], document="{oops"),
         ("InvalidRequestException", 400)),
        (lambda: jobsd.iot.create_job(jobId="j-big", targets=[arn(thing)],
                                      document=json.dumps({"x": "y" * 32768})),
         ("InvalidRequestException", 400)),
        (lambda: jobsd.iot.create_job(jobId="j-nothing", targets=[arn("no-such-thing")],
                                      document="{}"),
         ("ResourceNotFoundException", 404)),
        (lambda: jobsd.iot.create_job(jobId="bad!id", targets=[arn(thing)], document="{}"),
         ("InvalidRequestException", 400)),
        (lambda: jobsd.iot.describe_job(jobId="no-such-job"), ("ResourceNotFoundException", 404)),
        (lambda: jobsd.iot.describe_job_execution(jobId="no-such-job", thingName=thing),
         ("ResourceNotFoundException", 404)),
        (lambda: jobsd.iot.describe_thing(thingName="no-such-thing"),
         ("ResourceNotFoundException", 404)),
        (lambda: jobsd.iot.create_thing(thingName=thing,
                                        attributePayload={"attributes": {"a": "b"}}),
         ("ResourceAlreadyExistsException", 409)),
        (lambda: jobsd.iot.delete_job(jobId=job), ("InvalidStateTransitionException", 409)),
    ]
    for call, expected in cases:
        with pytest.raises(ClientError) as err:
            call()
        assert error_code(err) == expected
        assert err.value.response["Error"]["Message"]
    # a document of exactly 32768 characters is fine
    doc = json.dumps({"x": "y" * (32768 - 9)})
    assert len(doc) == 32768
    jobsd.iot.create_job(jobId=f"big-{uuid.uuid4().hex[:8]}", targets=[arn(thing)], document=doc)
    # an identical CreateThing is idempotent
    assert jobsd.iot.create_thing(thingName=thing)["thingArn"] == arn(thing)


def test_data_plane_api(jobsd: Jobsd, device: Device) -> None:
    thing = device.thing
    job = new_job(jobsd, thing, {"operation": "https"})
    device.sync()
    pending = jobsd.data.get_pending_job_executions(thingName=thing)
    assert [j["jobId"] for j in pending["queuedJobs"]] == [job] and pending["inProgressJobs"] == []
    described = jobsd.data.describe_job_execution(thingName=thing, jobId="$next")["execution"]
    assert described["jobId"] == job
    assert json.loads(described["jobDocument"]) == {"operation": "https"}
    started = jobsd.data.start_next_pending_job_execution(thingName=thing,
                                                          statusDetails={"via": "rest"})
    assert started["execution"]["status"] == "IN_PROGRESS"
    assert started["execution"]["versionNumber"] == 2
    with pytest.raises(ClientError) as err:
        jobsd.data.update_job_execution(thingName=thing, jobId=job, status="SUCCEEDED",
                                        expectedVersion=9)
    assert error_code(err) == ("InvalidStateTransitionException", 409)
    updated = jobsd.data.update_job_execution(thingName=thing, jobId=job, status="SUCCEEDED",
                                              expectedVersion=2, includeJobExecutionState=True,
                                              includeJobDocument=True)
    assert updated["executionState"]["status"] == "SUCCEEDED"
    assert json.loads(updated["jobDocument"]) == {"operation": "https"}
    # REST updates notify MQTT devices too
    assert [t for t, _ in device.sync()] == ["notify", "notify-next"]
    with pytest.raises(ClientError) as err:
        jobsd.data.update_job_execution(thingName=thing, jobId=job, status="FAILED")
    assert error_code(err) == ("InvalidStateTransitionException", 409)
    with pytest.raises(ClientError) as err:
        jobsd.data.describe_job_execution(thingName=thing, jobId="nope")
    assert error_code(err) == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as err:
        jobsd.data.update_job_execution(thingName=thing, jobId=job, status="IN_PROGRESS",
                                        statusDetails={"bad key": "v"})
    assert error_code(err) == ("InvalidRequestException", 400)
    assert "execution" not in jobsd.data.start_next_pending_job_execution(thingName=thing)


def test_restart_reconnect_and_sigterm(tmp_path: Path, pki: PKI) -> None:
    """State survives a restart; jobsd resubscribes after a broker restart; SIGTERM exits 0."""
    db = str(tmp_path / "jobs.db")
    broker = stack.Mosquitto(str(tmp_path / "broker"), pki)
    second = None
    try:
        first = Jobsd(str(tmp_path), broker.broker, db=db, log_name="jobsd1.log")
        first.iot.create_thing(thingName="persist")
        job = new_job(first, "persist")
        assert first.stop() == 0
        second = Jobsd(str(tmp_path), broker.broker, db=db, log_name="jobsd2.log")
        assert second.iot.describe_job(jobId=job)["job"]["status"] == "IN_PROGRESS"
        broker.restart()  # the broker comes back on the same port
        dev = Device(broker.port, "persist")
        try:
            deadline = time.monotonic() + 10
            while True:  # until jobsd has reconnected and resubscribed
                dev.publish("get", {"clientToken": "after-restart"})
                try:
                    topic, body = dev.inbox.get(timeout=0.2)
                    break
                except queue.Empty:  # jobsd not back yet; ask again
                    assert time.monotonic() < deadline, "jobsd did not resubscribe"
            assert topic == "get/accepted"
            assert [j["jobId"] for j in body["queuedJobs"]] == [job]
        finally:
            dev.close()
        assert second.stop() == 0
    finally:
        if second is not None:
            second.stop()
        broker.stop()


@pytest.mark.parametrize("topic,expected", [
    ("$aws/things/foobar/jobs/get", ("get", "foobar", None)),
    ("$aws/things/foobar/jobs/start-next", ("start-next", "foobar", None)),
    ("$aws/things/foobar/jobs/1234/get", ("describe", "foobar", "1234")),
    ("$aws/things/foobar/jobs/$next/get", ("describe", "foobar", "$next")),
    ("$aws/things/foobar/jobs/ab224-z/update", ("update", "foobar", "ab224-z")),
    ("$aws/things/a:b_c-d/jobs/get", ("get", "a:b_c-d", None)),
    ("$aws/things/foobar/jobs/$next/update", ("invalid", "foobar", None)),
    ("$aws/things/foobar/jobs/a:b/update", ("invalid", "foobar", None)),
    ("$aws/things/foobar/jobs/" + "j" * 65 + "/get", ("invalid", "foobar", None)),
    ("$aws/things/foo!bar/jobs/get", ("invalid", "foo!bar", None)),
    ("$aws/things/foobar/jobs/notifyzz", ("invalid", "foobar", None)),
    ("$aws/things/foobar/jobs/1234/update/rejectedzz", ("invalid", "foobar", None)),
    ("$aws/things/foobar/jobs/get/accepted", None),
    ("$aws/things/foobar/jobs/12345/update/rejected", None),
    ("$aws/things/foobar/jobs/notify", None),
    ("$aws/things/foobar/jobs/notify-next", None),
    ("$aws/things/foobar/jobz/notify", None),
    ("$awz/thingz/foobar/jobs/get", None),
])
def test_topic_routing(topic: str, expected: Any) -> None:
    assert route(topic) == expected


def test_hostile_http(jobsd: Jobsd) -> None:
    host, port = jobsd.control_url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        for method, path, body, status, kind in [
            ("PUT", "/jobs/x1", b"{not json", 400, "InvalidRequestException"),
            ("PUT", "/jobs/x2", b"[1]", 400, "InvalidRequestException"),
            ("PUT", "/jobs/x3", b'{"targets": "nope", "document": "{}"}', 400,
             "InvalidRequestException"),
            ("GET", "/no/such/path", b"", 404, "UnknownOperationException"),
            ("GET", "/jobs?maxResults=abc", b"", 400, "InvalidRequestException"),
            ("GET", "/jobs?nextToken=zz", b"", 400, "InvalidRequestException"),
        ]:
            conn.request(method, path, body=body)
            reply = conn.getresponse()
            data = json.loads(reply.read())
            assert (reply.status, reply.getheader("x-amzn-ErrorType")) == (status, kind), path
            assert data["message"]
    finally:
        conn.close()
    assert jobsd.proc.alive()
