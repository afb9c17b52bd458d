"""jobsd job events (FLEET.md 6.3, scenario 24; the AWS IoT developer guide's "Jobs events"):
UpdateEventConfigurations / DescribeEventConfigurations, and the `$aws/events/job/<id>/...` and
`$aws/events/jobExecution/<id>/...` messages with their documented payloads. A real mosquitto and
jobsd; boto3 is the operator (`iot`) and the devices (`iot-jobs-data`); a paho client on the
plain listener subscribes to `$aws/events/#`.

No sleeps. "Nothing else was published" is proven by order: jobsd publishes on one MQTT
connection and mosquitto keeps that order, so when a test has seen a later message, everything
published before it has been seen too. Each test checks the exact sequence of a job's events up to
a last one it waits for.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import boto3
import paho.mqtt.client as paho
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from paho.mqtt.enums import CallbackAPIVersion

from iotjobs_host import stack
from iotjobs_host.pki import PKI
from iotjobs_host.stack import Jobsd

TIMEOUT = 10.0
REGION, ACCOUNT = "us-east-1", "123456789012"
MINUTE = 0.2  # seconds per timer minute of the module's jobsd
JOBSD_EXTRA = ["--minute-seconds", str(MINUTE)]

EVENT_TYPES = ["CA_CERTIFICATE", "CERTIFICATE", "JOB", "JOB_EXECUTION", "POLICY", "THING",
               "THING_GROUP", "THING_GROUP_HIERARCHY", "THING_GROUP_MEMBERSHIP", "THING_TYPE",
               "THING_TYPE_ASSOCIATION"]
JOB_KEYS = {"eventType", "eventId", "timestamp", "operation", "jobId", "status",
            "targetSelection", "targets", "createdAt", "lastUpdatedAt"}
EXECUTION_KEYS = {"eventType", "eventId", "timestamp", "operation", "jobId", "thingArn",
                  "status", "statusDetails"}
COMPLETED_COUNTS = {"numberOfCanceledThings", "numberOfRejectedThings", "numberOfFailedThings",
                    "numberOfRemovedThings", "numberOfSucceededThings"}


def arn(thing: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}"


def group_arn(group: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/{group}"


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def error_of(err: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    return (err.value.response["Error"]["Code"],
            err.value.response["ResponseMetadata"]["HTTPStatusCode"])


def ms(when: Any) -> int:
    """A boto3 timestamp (datetime) as the epoch milliseconds of an event."""
    return int(round(when.timestamp() * 1000))


# -- watching $aws/events ----------------------------------------------------------------------

class Events:
    """A paho client on the plain listener recording every `$aws/events/#` message in order."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=fresh("events"))
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("$aws/events/#", qos=1)
        assert subscribed.wait(TIMEOUT), "events subscription not acknowledged"

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, json.loads(msg.payload)))
            self._cond.notify_all()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def of_job(self, job_id: str) -> list[tuple[str, dict[str, Any]]]:
        with self._cond:
            return [(t, p) for t, p in self.messages if t.split("/")[3] == job_id]

    def until(self, topic: str, timeout: float = TIMEOUT) -> list[tuple[str, dict[str, Any]]]:
        """Every message received up to the first one on `topic` (inclusive), all jobs."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, (t, _) in enumerate(self.messages):
                    if t == topic:
                        return list(self.messages[:i + 1])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {topic} within {timeout}s; saw "
                                         f"{[t for t, _ in self.messages]}")
                self._cond.wait(left)

    def job_until(self, job_id: str, topic: str) -> list[tuple[str, dict[str, Any]]]:
        """The job's messages up to the first one on `topic`; jobsd published nothing else of
        this job before it."""
        return [(t, p) for t, p in self.until(topic) if t.split("/")[3] == job_id]


def job_topic(job_id: str, operation: str) -> str:
    return f"$aws/events/job/{job_id}/{operation}"


def execution_topic(job_id: str, operation: str) -> str:
    return f"$aws/events/jobExecution/{job_id}/{operation}"


def leaves(messages: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """`job/<op>` or `jobExecution/<op>` of each message, in order."""
    return [f"{t.split('/')[2]}/{t.split('/')[4]}" for t, _ in messages]


def check_job_event(payload: dict[str, Any], job: dict[str, Any], operation: str,
                    status: str) -> None:
    """The fields every job event has, against DescribeJob (`job`)."""
    extra = {"description"} if "description" in job else set()
    if operation == "completed":
        extra |= {"completedAt", "jobProcessDetails"}
    if operation in ("deleted", "cancellation_in_progress", "deletion_in_progress") \
            and "comment" in job:
        extra.add("comment")
    assert set(payload) == JOB_KEYS | extra, payload
    assert payload["eventType"] == "JOB"
    assert str(uuid.UUID(payload["eventId"])) == payload["eventId"]
    assert isinstance(payload["timestamp"], int)
    assert abs(payload["timestamp"] - time.time()) < 60  # seconds, not milliseconds
    assert payload["operation"] == operation and payload["status"] == status
    assert payload["jobId"] == job["jobId"]
    assert payload["targetSelection"] == job["targetSelection"]
    assert payload["targets"] == job["targets"]
    assert payload.get("description") == job.get("description")
    assert payload["createdAt"] == ms(job["createdAt"])  # milliseconds
    assert payload["createdAt"] <= payload["lastUpdatedAt"] <= payload["timestamp"] * 1000 + 999


def check_execution_event(payload: dict[str, Any], job_id: str, thing: str, status: str,
                          details: Optional[dict[str, str]] = None) -> None:
    assert set(payload) == EXECUTION_KEYS, payload
    assert payload["eventType"] == "JOB_EXECUTION"
    assert str(uuid.UUID(payload["eventId"])) == payload["eventId"]
    assert isinstance(payload["timestamp"], int) and abs(payload["timestamp"] - time.time()) < 60
    assert payload["operation"] == status.lower() and payload["status"] == status
    assert payload["jobId"] == job_id and payload["thingArn"] == arn(thing)
    assert payload["statusDetails"] == (details or {})


# -- processes -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def svc(module_jobsd: Jobsd) -> Jobsd:
    """The module's jobsd (conftest) with JOB and JOB_EXECUTION events on; fresh names per test."""
    module_jobsd.iot.update_event_configurations(eventConfigurations={
        "JOB": {"Enabled": True}, "JOB_EXECUTION": {"Enabled": True}})
    return module_jobsd


@pytest.fixture
def events(module_broker: stack.Mosquitto) -> Iterator[Events]:
    spy = Events(module_broker.port)
    yield spy
    spy.close()


@pytest.fixture
def things(svc: Jobsd) -> Callable[[int], list[str]]:
    def make(n: int) -> list[str]:
        names = [fresh("ev") for _ in range(n)]
        for name in names:
            svc.iot.create_thing(thingName=name)
        return names
    return make


def create_job(service: Jobsd, things: list[str], **options: Any) -> str:
    job_id = fresh("job")
    service.iot.create_job(jobId=job_id, targets=[arn(t) for t in things],
                           document=json.dumps({"operation": "test"}), **options)
    return job_id


def report(service: Jobsd, job_id: str, thing: str, status: str, **options: Any) -> None:
    """The device's UpdateJobExecution over HTTPS (iot-jobs-data)."""
    service.data.update_job_execution(jobId=job_id, thingName=thing, status=status, **options)


def unvalidated(service: Jobsd) -> Any:
    """A boto3 `iot` client that sends what it is given, so jobsd's own validation answers."""
    return boto3.client("iot", endpoint_url=service.control_url, region_name=REGION,
                        aws_access_key_id="local", aws_secret_access_key="local",
                        config=Config(retries={"max_attempts": 1}, parameter_validation=False))


def raw_patch(service: Jobsd, body: bytes) -> tuple[int, str, dict[str, Any]]:
    """PATCH /event-configurations with a body no SDK would send: (status, error type, body)."""
    host, port = service.control_url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("PATCH", "/event-configurations", body=body,
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        return reply.status, reply.getheader("x-amzn-ErrorType") or "", json.loads(data or b"{}")
    finally:
        conn.close()


def describe(service: Jobsd) -> dict[str, Any]:
    """DescribeEventConfigurations without boto3's ResponseMetadata."""
    out = service.iot.describe_event_configurations()
    out.pop("ResponseMetadata")
    return out


def enabled(service: Jobsd) -> dict[str, bool]:
    configs = describe(service)["eventConfigurations"]
    return {t: c["Enabled"] for t, c in configs.items()}


# -- configuration -------------------------------------------------------------------------------

def test_off_by_default_and_on_without_a_restart(jobsd: Jobsd, mosquitto: stack.Mosquitto
                                                 ) -> None:
    """A fresh jobsd sends no event; each type enabled takes effect at once (the cached
    configuration is dropped by the update): JOB_EXECUTION alone sends no job events."""
    spy = Events(mosquitto.port)
    try:
        described = describe(jobsd)
        assert described["eventConfigurations"] == {t: {"Enabled": False} for t in EVENT_TYPES}
        assert described["creationDate"] <= described["lastModifiedDate"]
        assert abs(described["creationDate"].timestamp() - time.time()) < 60
        for name in ("off-a", "off-b"):
            jobsd.iot.create_thing(thingName=name)
        # every kind of event, with events off
        done = create_job(jobsd, ["off-a"])
        report(jobsd, done, "off-a", "SUCCEEDED")
        assert jobsd.iot.describe_job(jobId=done)["job"]["status"] == "COMPLETED"
        jobsd.iot.delete_job(jobId=done)
        canceled = create_job(jobsd, ["off-a", "off-b"])
        report(jobsd, canceled, "off-b", "FAILED")
        jobsd.iot.cancel_job(jobId=canceled, comment="off")

        jobsd.iot.update_event_configurations(
            eventConfigurations={"JOB_EXECUTION": {"Enabled": True}})
        executions_only = create_job(jobsd, ["off-a"])
        report(jobsd, executions_only, "off-a", "SUCCEEDED")  # completes: no `completed`
        jobsd.iot.update_event_configurations(eventConfigurations={"JOB": {"Enabled": True}})
        assert enabled(jobsd) == {t: t in ("JOB", "JOB_EXECUTION") for t in EVENT_TYPES}
        both = create_job(jobsd, ["off-b"])
        report(jobsd, both, "off-b", "REJECTED")
        # nothing of the earlier jobs came before
        assert [t for t, _ in spy.until(job_topic(both, "completed"))] == [
            execution_topic(executions_only, "succeeded"), execution_topic(both, "rejected"),
            job_topic(both, "completed")]
    finally:
        spy.close()


def test_update_merges_and_describe_echoes_every_type(svc: Jobsd) -> None:
    before = describe(svc)
    assert set(before["eventConfigurations"]) == set(EVENT_TYPES)
    try:
        svc.iot.update_event_configurations(eventConfigurations={
            "THING": {"Enabled": True}, "CA_CERTIFICATE": {"Enabled": True},
            "THING_TYPE_ASSOCIATION": {"Enabled": True}})
        after = describe(svc)
        assert {t for t, on in enabled(svc).items() if on} == {
            "THING", "CA_CERTIFICATE", "THING_TYPE_ASSOCIATION", "JOB", "JOB_EXECUTION"}
        assert after["creationDate"] == before["creationDate"]
        assert after["lastModifiedDate"] >= before["lastModifiedDate"]
        # only the types named change; a configuration without Enabled changes nothing
        svc.iot.update_event_configurations(eventConfigurations={
            "THING": {"Enabled": False}, "CA_CERTIFICATE": {}})
        assert {t for t, on in enabled(svc).items() if on} == {
            "CA_CERTIFICATE", "THING_TYPE_ASSOCIATION", "JOB", "JOB_EXECUTION"}
        # an update without eventConfigurations is accepted and changes no type
        svc.iot.update_event_configurations()
        assert {t for t, on in enabled(svc).items() if on} == {
            "CA_CERTIFICATE", "THING_TYPE_ASSOCIATION", "JOB", "JOB_EXECUTION"}
    finally:
        svc.iot.update_event_configurations(eventConfigurations={
            "CA_CERTIFICATE": {"Enabled": False}, "THING_TYPE_ASSOCIATION": {"Enabled": False}})
    assert enabled(svc) == {t: t in ("JOB", "JOB_EXECUTION") for t in EVENT_TYPES}


@pytest.mark.parametrize("configs", [
    {"JOBS": {"Enabled": True}},                                  # not an event type
    {"job": {"Enabled": True}},                                   # case matters
    {"JOB_EXECUTION": {"Enabled": False}, "NOPE": {"Enabled": True}},  # all or nothing
    {"JOB_EXECUTION": {"Enabled": "false"}},
    {"JOB_EXECUTION": {"Enabled": 0}},
])
def test_bad_update_is_invalid_request_and_changes_nothing(svc: Jobsd, configs: Any) -> None:
    before = describe(svc)
    with pytest.raises(ClientError) as err:
        unvalidated(svc).update_event_configurations(eventConfigurations=configs)
    assert error_of(err) == ("InvalidRequestException", 400)
    assert describe(svc) == before


@pytest.mark.parametrize("body", [
    b'{"eventConfigurations": {"JOB_EXECUTION": null}}',
    b'{"eventConfigurations": {"JOB_EXECUTION": true}}',
    b'{"eventConfigurations": {"JOB_EXECUTION": {"Enabled": null}, "JOB": []}}',
    b'{"eventConfigurations": ["JOB_EXECUTION"]}',
    b'{"eventConfigurations": "JOB_EXECUTION"}',
])
def test_malformed_configuration_is_invalid_request(svc: Jobsd, body: bytes) -> None:
    """Shapes no SDK sends (botocore cannot serialize them)."""
    before = describe(svc)
    status, error, reply = raw_patch(svc, body)
    assert (status, error) == (400, "InvalidRequestException"), reply
    assert reply["message"]
    assert describe(svc) == before


def test_body_that_is_not_json_is_rejected(svc: Jobsd) -> None:
    before = describe(svc)
    status, error, body = raw_patch(svc, b"{not json")
    assert status == 400 and error and body["message"]
    assert describe(svc) == before


def test_configuration_survives_a_restart(tmp_path: Path, mosquitto: stack.Mosquitto) -> None:
    db = str(tmp_path / "jobs.db")
    first = Jobsd(str(tmp_path), mosquitto.broker, db=db, log_name="jobsd1.log")
    second: Optional[Jobsd] = None
    spy = Events(mosquitto.port)
    try:
        first.iot.update_event_configurations(eventConfigurations={
            "JOB": {"Enabled": True}, "THING": {"Enabled": True},
            "JOB_EXECUTION": {"Enabled": False}})
        described = describe(first)
        first.iot.create_thing(thingName="survivor")
        assert first.stop() == 0
        second = Jobsd(str(tmp_path), mosquitto.broker, db=db, log_name="jobsd2.log")
        assert describe(second) == described
        job_id = create_job(second, ["survivor"])
        report(second, job_id, "survivor", "SUCCEEDED")
        # JOB on, JOB_EXECUTION off: the `succeeded` event would have come first
        seen = spy.until(job_topic(job_id, "completed"))
        assert leaves(seen) == ["job/completed"]
    finally:
        spy.close()
        if second is not None:
            second.stop()
        first.stop()


# -- job and execution events ----------------------------------------------------------------------

def test_completion_event_scenario_24(svc: Jobsd, events: Events,
                                      things: Callable[[int], list[str]]) -> None:
    """FLEET.md 9.24: 3 things SUCCEED -> COMPLETED, `completed` with the counters, three
    `succeeded` events; then DeleteJob sends `deletion_in_progress` and `deleted`."""
    names = things(3)
    job_id = create_job(svc, names, description="three things")
    report(svc, job_id, names[0], "IN_PROGRESS")  # no event for a non-terminal status
    report(svc, job_id, names[0], "SUCCEEDED", statusDetails={"version": "2"})
    report(svc, job_id, names[1], "SUCCEEDED")
    report(svc, job_id, names[2], "SUCCEEDED")
    seen = events.job_until(job_id, job_topic(job_id, "completed"))
    assert leaves(seen) == ["jobExecution/succeeded"] * 3 + ["job/completed"]
    for (topic, payload), thing in zip(seen[:3], names, strict=True):
        assert topic == execution_topic(job_id, "succeeded")
        check_execution_event(payload, job_id, thing, "SUCCEEDED",
                              {"version": "2"} if thing == names[0] else None)
    job = svc.iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "COMPLETED" and "completedAt" in job
    completed = seen[3][1]
    check_job_event(completed, job, "completed", "COMPLETED")
    assert completed["completedAt"] == ms(job["completedAt"])
    assert completed["lastUpdatedAt"] == ms(job["lastUpdatedAt"])
    assert completed["jobProcessDetails"] == {
        "numberOfCanceledThings": 0, "numberOfRejectedThings": 0, "numberOfFailedThings": 0,
        "numberOfRemovedThings": 0, "numberOfSucceededThings": 3}
    assert set(completed["jobProcessDetails"]) == COMPLETED_COUNTS
    ids = [p["eventId"] for _, p in seen]
    assert len(set(ids)) == len(ids)

    svc.iot.delete_job(jobId=job_id)
    seen = events.job_until(job_id, job_topic(job_id, "deleted"))
    assert leaves(seen[4:]) == ["job/deletion_in_progress", "job/deleted"]
    check_job_event(seen[4][1], job, "deletion_in_progress", "DELETION_IN_PROGRESS")
    check_job_event(seen[5][1], job, "deleted", "DELETED")


def test_failed_rejected_and_timed_out(svc: Jobsd, events: Events,
                                       things: Callable[[int], list[str]]) -> None:
    failing, rejecting, silent = things(3)
    job_id = create_job(svc, [failing, rejecting, silent])
    report(svc, job_id, failing, "FAILED", statusDetails={"reason": "self-test"})
    report(svc, job_id, rejecting, "REJECTED", statusDetails={"reason": "busy"})
    events.until(execution_topic(job_id, "rejected"))
    # the service times this one out after one timer minute (MINUTE seconds)
    report(svc, job_id, silent, "IN_PROGRESS", statusDetails={"step": "download"},
           stepTimeoutInMinutes=1)
    seen = events.job_until(job_id, job_topic(job_id, "completed"))
    assert leaves(seen) == ["jobExecution/failed", "jobExecution/rejected",
                            "jobExecution/timed_out", "job/completed"]
    check_execution_event(seen[0][1], job_id, failing, "FAILED", {"reason": "self-test"})
    check_execution_event(seen[1][1], job_id, rejecting, "REJECTED", {"reason": "busy"})
    check_execution_event(seen[2][1], job_id, silent, "TIMED_OUT", {"step": "download"})
    job = svc.iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "COMPLETED"
    check_job_event(seen[3][1], job, "completed", "COMPLETED")
    assert seen[3][1]["jobProcessDetails"] == {
        "numberOfCanceledThings": 0, "numberOfRejectedThings": 1, "numberOfFailedThings": 1,
        "numberOfRemovedThings": 0, "numberOfSucceededThings": 0}


def test_cancel_job(svc: Jobsd, events: Events, things: Callable[[int], list[str]]) -> None:
    """CancelJob: `cancellation_in_progress`, `canceled` for each QUEUED execution, `canceled`;
    the IN_PROGRESS one finishes later (`succeeded`, no `completed`: FLEET.md 9.6, 9.9)."""
    working, waiting_a, waiting_b = things(3)
    job_id = create_job(svc, [working, waiting_a, waiting_b], description="to cancel")
    report(svc, job_id, working, "IN_PROGRESS")
    svc.iot.cancel_job(jobId=job_id, reasonCode="BAD_IMAGE", comment="stop the rollout")
    seen = events.job_until(job_id, job_topic(job_id, "canceled"))
    assert leaves(seen) == ["job/cancellation_in_progress", "jobExecution/canceled",
                            "jobExecution/canceled", "job/canceled"]
    assert {p["thingArn"] for _, p in seen[1:3]} == {arn(waiting_a), arn(waiting_b)}
    for _, payload in seen[1:3]:
        thing = payload["thingArn"].rsplit("/", 1)[1]
        check_execution_event(payload, job_id, thing, "CANCELED")
    job = svc.iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "CANCELED" and job["comment"] == "stop the rollout"
    in_progress = seen[0][1]
    assert in_progress["operation"] == "cancellation_in_progress"
    assert in_progress["status"] == "CANCELLATION_IN_PROGRESS"
    # the guide's example carries the operation's comment; until CancelJob hands it to the
    # event, the job had none yet when it was sent
    assert in_progress["comment"] == "stop the rollout"
    check_job_event(seen[3][1], job, "canceled", "CANCELED")
    assert seen[3][1]["lastUpdatedAt"] == ms(job["lastUpdatedAt"])

    report(svc, job_id, working, "SUCCEEDED")
    svc.iot.delete_job(jobId=job_id)
    seen = events.job_until(job_id, job_topic(job_id, "deleted"))
    assert leaves(seen[4:]) == ["jobExecution/succeeded", "job/deletion_in_progress",
                                "job/deleted"]
    check_execution_event(seen[4][1], job_id, working, "SUCCEEDED")
    check_job_event(seen[5][1], job, "deletion_in_progress", "DELETION_IN_PROGRESS")
    check_job_event(seen[6][1], job, "deleted", "DELETED")
    assert seen[6][1]["comment"] == "stop the rollout"


def test_force_cancel_and_cancel_one_execution(svc: Jobsd, events: Events,
                                               things: Callable[[int], list[str]]) -> None:
    one, running = things(2)
    job_id = create_job(svc, [one, running])
    svc.iot.cancel_job_execution(jobId=job_id, thingName=one,
                                 statusDetails={"why": "maintenance"})
    report(svc, job_id, running, "IN_PROGRESS")
    svc.iot.cancel_job(jobId=job_id, force=True)
    seen = events.job_until(job_id, job_topic(job_id, "canceled"))
    assert leaves(seen) == ["jobExecution/canceled", "job/cancellation_in_progress",
                            "jobExecution/canceled", "job/canceled"]
    check_execution_event(seen[0][1], job_id, one, "CANCELED", {"why": "maintenance"})
    check_execution_event(seen[2][1], job_id, running, "CANCELED")
    job = svc.iot.describe_job(jobId=job_id)["job"]
    check_job_event(seen[1][1], job, "cancellation_in_progress", "CANCELLATION_IN_PROGRESS")
    check_job_event(seen[3][1], job, "canceled", "CANCELED")


def test_removed_from_group(svc: Jobsd, events: Events,
                            things: Callable[[int], list[str]]) -> None:
    """A thing leaving the group of a CONTINUOUS job: its QUEUED execution REMOVED."""
    (member,) = things(1)
    group = fresh("evgroup")
    svc.iot.create_thing_group(thingGroupName=group)
    svc.iot.add_thing_to_thing_group(thingGroupName=group, thingName=member)
    job_id = fresh("job")
    svc.iot.create_job(jobId=job_id, targets=[group_arn(group)], targetSelection="CONTINUOUS",
                       document=json.dumps({"operation": "test"}))
    svc.iot.remove_thing_from_thing_group(thingGroupName=group, thingName=member)
    svc.iot.cancel_job(jobId=job_id)  # a continuous job never completes; end it
    seen = events.job_until(job_id, job_topic(job_id, "canceled"))
    assert leaves(seen) == ["jobExecution/removed", "job/cancellation_in_progress",
                            "job/canceled"]
    check_execution_event(seen[0][1], job_id, member, "REMOVED")
    job = svc.iot.describe_job(jobId=job_id)["job"]
    check_job_event(seen[2][1], job, "canceled", "CANCELED")
    assert seen[2][1]["targetSelection"] == "CONTINUOUS"
    assert seen[2][1]["targets"] == [group_arn(group)]


# -- who may read the events -----------------------------------------------------------------------

def test_devices_cannot_read_events(svc: Jobsd, module_broker: stack.Mosquitto, pki: PKI,
                                    events: Events) -> None:
    """On the TLS listener (the ACL of `tools/jobsd --write-acl`) a thing gets none of the
    `$aws/events/...` messages, its own jobs' included."""
    from test_acl import TlsThing  # a sibling test module's helper

    thing = fresh("nosy")
    svc.iot.create_thing(thingName=thing)
    device = TlsThing(module_broker, pki, thing)
    try:
        for topic in ("$aws/events/#", "$aws/events/job/+/canceled",
                      "$aws/events/jobExecution/#", "#"):
            assert device.subscribe(topic) in (0x80, 1)  # refused, or delivers nothing
        notify_next = f"$aws/things/{thing}/jobs/notify-next"
        assert device.subscribe(notify_next) == 1
        job_id = create_job(svc, [thing])
        assert device.next_message()[0] == notify_next
        svc.iot.cancel_job(jobId=job_id)
        # jobsd publishes the cancel's events before the thing's notify-next
        assert leaves(events.job_until(job_id, job_topic(job_id, "canceled"))) == [
            "job/cancellation_in_progress", "jobExecution/canceled", "job/canceled"]
        topic, payload = device.next_message()
        assert topic == notify_next, (topic, payload)
        assert device.inbox.empty()
    finally:
        device.close()


def test_enabled_set_is_cached(svc: Jobsd, events: Events,
                               things: Callable[[int], list[str]]) -> None:
    """Turning JOB_EXECUTION off and on again takes effect for the next report."""
    a, b, c = things(3)
    job_id = create_job(svc, [a, b, c])
    report(svc, job_id, a, "SUCCEEDED")
    events.until(execution_topic(job_id, "succeeded"))
    svc.iot.update_event_configurations(eventConfigurations={"JOB_EXECUTION": {"Enabled": False}})
    try:
        report(svc, job_id, b, "FAILED")
    finally:
        svc.iot.update_event_configurations(
            eventConfigurations={"JOB_EXECUTION": {"Enabled": True}})
    report(svc, job_id, c, "REJECTED")
    seen = events.job_until(job_id, job_topic(job_id, "completed"))
    assert leaves(seen) == ["jobExecution/succeeded", "jobExecution/rejected", "job/completed"]
    assert seen[2][1]["jobProcessDetails"]["numberOfFailedThings"] == 1


def test_reports_do_not_read_the_configuration(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the enabled types are read from the store once after an update, not once per
    device report (the hot path)."""
    from iotjobs_host.jobsd.events import SETTING
    from iotjobs_host.jobsd.rules import UpdateRequest
    from iotjobs_host.jobsd.service import Service
    from iotjobs_host.jobsd.store import Store

    published: list[str] = []
    store = Store(str(tmp_path / "jobs.db"))
    service = Service(store, lambda topic, payload, delivery=None: published.append(topic)
                      if topic.startswith("$aws/events/") else None)
    reads: list[str] = []
    get_setting = store.get_setting
    monkeypatch.setattr(store, "get_setting",
                        lambda name: reads.append(name) or get_setting(name))
    things = [f"hot-{i}" for i in range(6)]
    for thing in things:
        service.create_thing(thing, {})
    service.update_event_configurations(
        {"eventConfigurations": {"JOB_EXECUTION": {"Enabled": True}}})
    service.create_job("hot", {"targets": [arn(t) for t in things], "document": "{}"})
    reads.clear()
    for thing in things[:3]:
        service.update(thing, "hot", UpdateRequest("SUCCEEDED"))
    assert reads.count(SETTING) == 1  # the first event after the update
    service.update_event_configurations({"eventConfigurations": {"JOB": {"Enabled": True}}})
    reads.clear()
    for thing in things[3:]:
        service.update(thing, "hot", UpdateRequest("FAILED"))
    assert reads.count(SETTING) == 1
    assert published == ([execution_topic("hot", "succeeded")] * 3
                         + [execution_topic("hot", "failed")] * 3 + [job_topic("hot", "completed")])
