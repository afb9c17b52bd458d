"""tools/jobsd through the AWS SDKs, as independent clients of the local service.

* the AWS IoT Device SDK v2 for Python (`awsiot.iotjobs`, on an awscrt MQTT 3.1.1 connection to
  the broker's plain listener, PLATFORM.md "AWS SDKs as independent clients");
* boto3 `iot-jobs-data` (the HTTPS device API on `--data`, PROTOCOL.md section 2);
* boto3 `iot` (the control plane on `--control`, botocore's `iot` model).

Every expectation comes from PROTOCOL.md or the AWS API models, not from jobsd's code. No fixed
sleeps: every wait is a future or a queue with a deadline.
"""

from __future__ import annotations

import datetime
import json
import queue
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import pytest
from awscrt import io as crt_io
from awscrt import mqtt as crt_mqtt
from awscrt import mqtt_request_response
from awsiot import V2ServiceException, iotjobs
from botocore.exceptions import ClientError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from iotjobs_host import stack  # noqa: E402
from iotjobs_host.pki import PKI  # noqa: E402

TIMEOUT = 10.0
QOS = crt_mqtt.QoS.AT_LEAST_ONCE
REGION, ACCOUNT = "us-east-1", "123456789012"


# -- one broker and one jobsd for the module; every test uses fresh things and jobs ------------

class Service:
    def __init__(self, broker: stack.Mosquitto, jobsd: stack.Jobsd) -> None:
        self.broker, self.jobsd = broker, jobsd
        self.port = broker.port
        self.iot = jobsd.iot
        self.data = jobsd.data
        # the same clients without botocore's client-side checks (min lengths, required members):
        # what jobsd itself rejects, as AWS would for a client that does not validate
        self.raw_iot = unvalidated_client("iot", jobsd.control_url)
        self.raw_data = unvalidated_client("iot-jobs-data", jobsd.data_url)


def unvalidated_client(service: str, url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(service, endpoint_url=url, region_name=REGION,
                        aws_access_key_id="local", aws_secret_access_key="local",
                        config=Config(retries={"max_attempts": 1}, parameter_validation=False))


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[Service]:
    broker = stack.Mosquitto(str(tmp_path_factory.mktemp("sdk-broker")), pki)
    try:
        jobsd = stack.Jobsd(str(tmp_path_factory.mktemp("sdk-jobsd")), broker.broker)
        try:
            yield Service(broker, jobsd)
            assert jobsd.proc.alive(), "jobsd died during the module:\n" + jobsd.proc.log_text()
        finally:
            jobsd.stop()
    finally:
        broker.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def arn(thing: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{thing}"


def group_arn(group: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/{group}"


@pytest.fixture
def thing(svc: Service) -> str:
    name = unique("sdk-thing")
    svc.iot.create_thing(thingName=name)
    return name


def new_things(svc: Service, n: int) -> list[str]:
    names = [unique("sdk-thing") for _ in range(n)]
    for name in names:
        svc.iot.create_thing(thingName=name)
    return names


def new_job(svc: Service, things: list[str], document: Optional[dict[str, Any]] = None,
            **kwargs: Any) -> str:
    job_id = unique("job")
    svc.iot.create_job(jobId=job_id, targets=[arn(t) for t in things],
                       document=json.dumps(document if document is not None else {"op": "test"}),
                       **kwargs)
    return job_id


def error_of(err: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    response = err.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def expect_error(call: Callable[[], Any], code: str, status: int) -> ClientError:
    with pytest.raises(ClientError) as err:
        call()
    assert error_of(err) == (code, status), err.value.response
    headers = err.value.response["ResponseMetadata"]["HTTPHeaders"]
    assert headers.get("x-amzn-errortype", "").split(":")[0] == code
    assert err.value.response["Error"]["Message"], "an error must explain itself"
    return err.value


# -- the AWS IoT Device SDK v2 -------------------------------------------------------------------

def crt_connection(port: int, client_id: str) -> crt_mqtt.Connection:
    elg = crt_io.EventLoopGroup(1)
    bootstrap = crt_io.ClientBootstrap(elg, crt_io.DefaultHostResolver(elg))
    conn = crt_mqtt.Connection(client=crt_mqtt.Client(bootstrap, tls_ctx=None),
                               host_name="127.0.0.1", port=port, client_id=client_id,
                               clean_session=True, keep_alive_secs=30)
    conn.connect().result(TIMEOUT)
    return conn


class SdkDevice:
    """One thing driven through `awsiot.iotjobs.IotJobsClient`: the four response topic pairs
    (job-id topics with the `+` wildcard, as the older SDK sample does), both event streams,
    and request/response correlation by clientToken."""

    def __init__(self, port: int, thing: str) -> None:
        self.thing = thing
        self.conn = crt_connection(port, unique("sdk"))
        self.jobs = iotjobs.IotJobsClient(self.conn)
        self._waiting: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.next_events: queue.Queue[iotjobs.NextJobExecutionChangedEvent] = queue.Queue()
        self.list_events: queue.Queue[iotjobs.JobExecutionsChangedEvent] = queue.Queue()
        j = self.jobs
        by_thing = {"thing_name": thing}
        by_job = {"thing_name": thing, "job_id": "+"}
        subscriptions = [
            (j.subscribe_to_next_job_execution_changed_events,
             iotjobs.NextJobExecutionChangedSubscriptionRequest(**by_thing), self.next_events.put),
            (j.subscribe_to_job_executions_changed_events,
             iotjobs.JobExecutionsChangedSubscriptionRequest(**by_thing), self.list_events.put),
            (j.subscribe_to_get_pending_job_executions_accepted,
             iotjobs.GetPendingJobExecutionsSubscriptionRequest(**by_thing), self._reply("accepted")),
            (j.subscribe_to_get_pending_job_executions_rejected,
             iotjobs.GetPendingJobExecutionsSubscriptionRequest(**by_thing), self._reply("rejected")),
            (j.subscribe_to_start_next_pending_job_execution_accepted,
             iotjobs.StartNextPendingJobExecutionSubscriptionRequest(**by_thing),
             self._reply("accepted")),
            (j.subscribe_to_start_next_pending_job_execution_rejected,
             iotjobs.StartNextPendingJobExecutionSubscriptionRequest(**by_thing),
             self._reply("rejected")),
            (j.subscribe_to_describe_job_execution_accepted,
             iotjobs.DescribeJobExecutionSubscriptionRequest(**by_job), self._reply("accepted")),
            (j.subscribe_to_describe_job_execution_rejected,
             iotjobs.DescribeJobExecutionSubscriptionRequest(**by_job), self._reply("rejected")),
            (j.subscribe_to_update_job_execution_accepted,
             iotjobs.UpdateJobExecutionSubscriptionRequest(**by_job), self._reply("accepted")),
            (j.subscribe_to_update_job_execution_rejected,
             iotjobs.UpdateJobExecutionSubscriptionRequest(**by_job), self._reply("rejected")),
        ]
        for subscribe, request, callback in subscriptions:
            granted, _topic = subscribe(request, QOS, callback)
            granted.result(TIMEOUT)

    def _reply(self, outcome: str) -> Callable[[Any], None]:
        def deliver(response: Any) -> None:
            with self._lock:
                waiting = self._waiting.pop(response.client_token, None)
            if waiting is not None:
                waiting.set_result((outcome, response))
        return deliver

    def _call(self, publish: Callable[[Any, crt_mqtt.QoS], Future], request: Any) -> tuple[str, Any]:
        request.thing_name = self.thing
        request.client_token = uuid.uuid4().hex
        reply: Future = Future()
        with self._lock:
            self._waiting[request.client_token] = reply
        publish(request, QOS).result(TIMEOUT)
        outcome, response = reply.result(TIMEOUT)
        assert response.client_token == request.client_token
        assert isinstance(response.timestamp, datetime.datetime)
        return outcome, response

    def get_pending(self) -> tuple[str, Any]:
        return self._call(self.jobs.publish_get_pending_job_executions,
                          iotjobs.GetPendingJobExecutionsRequest())

    def start_next(self, **kwargs: Any) -> tuple[str, Any]:
        return self._call(self.jobs.publish_start_next_pending_job_execution,
                          iotjobs.StartNextPendingJobExecutionRequest(**kwargs))

    def describe(self, job_id: str, **kwargs: Any) -> tuple[str, Any]:
        return self._call(self.jobs.publish_describe_job_execution,
                          iotjobs.DescribeJobExecutionRequest(job_id=job_id, **kwargs))

    def update(self, job_id: str, status: str, **kwargs: Any) -> tuple[str, Any]:
        return self._call(self.jobs.publish_update_job_execution,
                          iotjobs.UpdateJobExecutionRequest(job_id=job_id, status=status, **kwargs))

    def next_event(self) -> iotjobs.NextJobExecutionChangedEvent:
        return self.next_events.get(timeout=TIMEOUT)

    def list_event(self) -> iotjobs.JobExecutionsChangedEvent:
        return self.list_events.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.conn.disconnect().result(TIMEOUT)


@pytest.fixture
def sdk(svc: Service, thing: str) -> Iterator[SdkDevice]:
    device = SdkDevice(svc.port, thing)
    try:
        yield device
    finally:
        device.close()


def test_sdk_job_cycle(svc: Service, sdk: SdkDevice) -> None:
    outcome, pending = sdk.get_pending()
    assert outcome == "accepted" and pending.in_progress_jobs == [] and pending.queued_jobs == []

    job = new_job(svc, [sdk.thing], {"operation": "sdk", "n": 7})
    event = sdk.next_event()
    assert event.execution is not None
    assert event.execution.job_id == job and event.execution.status == "QUEUED"
    assert event.execution.thing_name == sdk.thing
    assert event.execution.job_document == {"operation": "sdk", "n": 7}
    assert isinstance(event.execution.queued_at, datetime.datetime)
    assert event.execution.started_at is None
    listed = sdk.list_event()
    assert [s.job_id for s in listed.jobs["QUEUED"]] == [job]

    outcome, pending = sdk.get_pending()
    assert outcome == "accepted" and pending.in_progress_jobs == []
    [summary] = pending.queued_jobs
    assert summary.job_id == job and summary.version_number == 1 and summary.execution_number == 1

    outcome, described = sdk.describe(job)
    assert outcome == "accepted" and described.execution.status == "QUEUED"
    assert described.execution.job_document == {"operation": "sdk", "n": 7}  # default true
    outcome, described = sdk.describe("$next", include_job_document=False)
    assert outcome == "accepted" and described.execution.job_id == job
    assert described.execution.job_document is None

    outcome, started = sdk.start_next(status_details={"step": "download"})
    assert outcome == "accepted"
    execution = started.execution
    assert execution.job_id == job and execution.status == "IN_PROGRESS"
    assert isinstance(execution.job_document, dict)
    assert execution.job_document == {"operation": "sdk", "n": 7}
    assert execution.status_details == {"step": "download"}
    assert execution.version_number == 2 and execution.execution_number == 1
    assert isinstance(execution.started_at, datetime.datetime)

    outcome, described = sdk.describe(job, execution_number=1)
    assert outcome == "accepted" and described.execution.status == "IN_PROGRESS"

    outcome, rejected = sdk.update(job, "SUCCEEDED", expected_version=1)
    assert outcome == "rejected" and rejected.code == iotjobs.RejectedErrorCode.VERSION_MISMATCH
    assert rejected.message
    assert rejected.execution_state is not None
    assert rejected.execution_state.status == "IN_PROGRESS"
    assert rejected.execution_state.version_number == 2
    assert rejected.execution_state.status_details == {"step": "download"}

    outcome, updated = sdk.update(job, "SUCCEEDED", expected_version=2,
                                  status_details={"result": "ok"},
                                  include_job_execution_state=True, include_job_document=True)
    assert outcome == "accepted"
    assert updated.execution_state.status == "SUCCEEDED"
    assert updated.execution_state.version_number == 3
    assert updated.execution_state.status_details == {"result": "ok"}
    assert updated.job_document == {"operation": "sdk", "n": 7}

    final = sdk.next_event()
    assert final.execution is None and isinstance(final.timestamp, datetime.datetime)
    assert not sdk.list_event().jobs  # nothing pending: `jobs` empty (or absent)

    outcome, pending = sdk.get_pending()
    assert pending.in_progress_jobs == [] and pending.queued_jobs == []
    outcome, described = sdk.describe(job)
    assert outcome == "accepted" and described.execution.status == "SUCCEEDED"
    outcome, nothing = sdk.start_next()
    assert outcome == "accepted" and nothing.execution is None
    view = svc.iot.describe_job(jobId=job)["job"]
    assert view["status"] == "COMPLETED"


def test_sdk_rejections(svc: Service, sdk: SdkDevice) -> None:
    outcome, rejected = sdk.describe("no-such-job")
    assert outcome == "rejected" and rejected.code == iotjobs.RejectedErrorCode.RESOURCE_NOT_FOUND
    assert rejected.execution_state is None
    outcome, rejected = sdk.update("no-such-job", "IN_PROGRESS")
    assert outcome == "rejected" and rejected.code == iotjobs.RejectedErrorCode.RESOURCE_NOT_FOUND

    job = new_job(svc, [sdk.thing])
    outcome, _ = sdk.update(job, "REJECTED")  # QUEUED -> REJECTED is a documented transition
    assert outcome == "accepted"
    outcome, rejected = sdk.update(job, "IN_PROGRESS")
    assert outcome == "rejected"
    assert rejected.code == iotjobs.RejectedErrorCode.INVALID_STATE_TRANSITION
    assert rejected.execution_state.status == "REJECTED"
    assert rejected.execution_state.version_number == 2

    job2 = new_job(svc, [sdk.thing])
    outcome, rejected = sdk.update(job2, "IN_PROGRESS", status_details={"bad key": "v"})
    assert outcome == "rejected" and rejected.code == iotjobs.RejectedErrorCode.INVALID_REQUEST
    outcome, rejected = sdk.start_next(step_timeout_in_minutes=0)
    assert outcome == "rejected" and rejected.code == iotjobs.RejectedErrorCode.INVALID_REQUEST
    outcome, rejected = sdk.describe(job2, execution_number=2)
    assert outcome == "rejected" and rejected.code == iotjobs.RejectedErrorCode.RESOURCE_NOT_FOUND


def test_sdk_v2_request_response_client(svc: Service, thing: str) -> None:
    """IotJobsClientV2 (awscrt request-response: `<request>/+` subscriptions, UUID tokens)."""
    conn = crt_connection(svc.port, unique("sdk-v2"))
    try:
        client = iotjobs.IotJobsClientV2(conn, mqtt_request_response.ClientOptions(
            max_request_response_subscriptions=4, max_streaming_subscriptions=2,
            operation_timeout_in_seconds=int(TIMEOUT)))
        job = new_job(svc, [thing], {"v2": True})
        pending = client.get_pending_job_executions(
            iotjobs.GetPendingJobExecutionsRequest(thing_name=thing)).result(TIMEOUT)
        assert [s.job_id for s in pending.queued_jobs] == [job]
        started = client.start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing)).result(TIMEOUT)
        assert started.execution.job_id == job and started.execution.status == "IN_PROGRESS"
        assert started.execution.job_document == {"v2": True}
        described = client.describe_job_execution(
            iotjobs.DescribeJobExecutionRequest(thing_name=thing, job_id=job)).result(TIMEOUT)
        assert described.execution.status == "IN_PROGRESS"
        with pytest.raises(V2ServiceException) as err:
            client.update_job_execution(iotjobs.UpdateJobExecutionRequest(
                thing_name=thing, job_id=job, status="SUCCEEDED", expected_version=5)).result(TIMEOUT)
        assert err.value.modeled_error is not None
        assert err.value.modeled_error.code == "VersionMismatch"
        assert err.value.modeled_error.execution_state.version_number == 2
        updated = client.update_job_execution(iotjobs.UpdateJobExecutionRequest(
            thing_name=thing, job_id=job, status="SUCCEEDED",
            include_job_execution_state=True)).result(TIMEOUT)
        assert updated.execution_state.status == "SUCCEEDED"
        with pytest.raises(V2ServiceException) as err:
            client.describe_job_execution(iotjobs.DescribeJobExecutionRequest(
                thing_name=thing, job_id="missing")).result(TIMEOUT)
        assert err.value.modeled_error.code == "ResourceNotFound"
    finally:
        conn.disconnect().result(TIMEOUT)


# -- boto3 iot-jobs-data (the HTTPS device API) ---------------------------------------------------

SUMMARY_KEYS = {"jobId", "queuedAt", "lastUpdatedAt", "versionNumber", "executionNumber"}


class TestDataPlane:
    def test_get_pending_job_executions(self, svc: Service, thing: str) -> None:
        empty = svc.data.get_pending_job_executions(thingName=thing)
        assert empty["inProgressJobs"] == [] and empty["queuedJobs"] == []
        first, second, third = (new_job(svc, [thing]) for _ in range(3))
        svc.data.update_job_execution(thingName=thing, jobId=second, status="IN_PROGRESS")
        pending = svc.data.get_pending_job_executions(thingName=thing)
        assert [s["jobId"] for s in pending["inProgressJobs"]] == [second]
        assert [s["jobId"] for s in pending["queuedJobs"]] == [first, third]
        for s in pending["queuedJobs"]:
            assert set(s) == SUMMARY_KEYS  # no status member, no startedAt while QUEUED
            assert isinstance(s["queuedAt"], int) and s["versionNumber"] == 1
        [running] = pending["inProgressJobs"]
        assert set(running) == SUMMARY_KEYS | {"startedAt"} and running["versionNumber"] == 2
        # REST carries no clientToken or timestamp
        assert "timestamp" not in pending and "clientToken" not in pending

    def test_describe_job_execution(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing], {"op": "describe"})
        execution = svc.data.describe_job_execution(thingName=thing, jobId=job)["execution"]
        assert execution["jobId"] == job and execution["thingName"] == thing
        assert execution["status"] == "QUEUED" and execution["versionNumber"] == 1
        assert execution["executionNumber"] == 1 and "startedAt" not in execution
        assert "statusDetails" not in execution
        assert isinstance(execution["jobDocument"], str)  # a JSON string over REST
        assert json.loads(execution["jobDocument"]) == {"op": "describe"}

        bare = svc.data.describe_job_execution(thingName=thing, jobId=job,
                                               includeJobDocument=False)["execution"]
        assert "jobDocument" not in bare and bare["jobId"] == job
        with_doc = svc.data.describe_job_execution(thingName=thing, jobId=job,
                                                   includeJobDocument=True)["execution"]
        assert json.loads(with_doc["jobDocument"]) == {"op": "describe"}

        numbered = svc.data.describe_job_execution(thingName=thing, jobId=job,
                                                   executionNumber=1)["execution"]
        assert numbered["executionNumber"] == 1
        expect_error(lambda: svc.data.describe_job_execution(thingName=thing, jobId=job,
                                                             executionNumber=2),
                     "ResourceNotFoundException", 404)

        nxt = svc.data.describe_job_execution(thingName=thing, jobId="$next")["execution"]
        assert nxt["jobId"] == job and json.loads(nxt["jobDocument"]) == {"op": "describe"}
        later = new_job(svc, [thing])
        svc.data.update_job_execution(thingName=thing, jobId=later, status="IN_PROGRESS")
        nxt = svc.data.describe_job_execution(thingName=thing, jobId="$next",
                                              includeJobDocument=False)["execution"]
        assert nxt["jobId"] == later and "jobDocument" not in nxt  # IN_PROGRESS comes first

    def test_describe_next_with_nothing_pending(self, svc: Service, thing: str) -> None:
        assert "execution" not in svc.data.describe_job_execution(thingName=thing, jobId="$next")

    def test_describe_terminal_execution(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing])
        svc.data.update_job_execution(thingName=thing, jobId=job, status="SUCCEEDED")
        execution = svc.data.describe_job_execution(thingName=thing, jobId=job)["execution"]
        assert execution["status"] == "SUCCEEDED" and execution["versionNumber"] == 2

    def test_start_next_pending_job_execution(self, svc: Service, thing: str) -> None:
        first, second = new_job(svc, [thing], {"n": 1}), new_job(svc, [thing], {"n": 2})
        started = svc.data.start_next_pending_job_execution(
            thingName=thing, statusDetails={"step": "one"}, stepTimeoutInMinutes=10)["execution"]
        assert started["jobId"] == first and started["status"] == "IN_PROGRESS"
        assert started["statusDetails"] == {"step": "one"}
        assert started["versionNumber"] == 2 and isinstance(started["startedAt"], int)
        assert json.loads(started["jobDocument"]) == {"n": 1}
        # already IN_PROGRESS: the same execution again, its statusDetails left unchanged
        again = svc.data.start_next_pending_job_execution(
            thingName=thing, statusDetails={"step": "ignored"})["execution"]
        assert again["jobId"] == first and again["statusDetails"] == {"step": "one"}
        assert again["versionNumber"] == 2
        svc.data.update_job_execution(thingName=thing, jobId=first, status="FAILED")
        following = svc.data.start_next_pending_job_execution(thingName=thing)["execution"]
        assert following["jobId"] == second and "statusDetails" not in following
        svc.data.update_job_execution(thingName=thing, jobId=second, status="SUCCEEDED")
        assert "execution" not in svc.data.start_next_pending_job_execution(thingName=thing)

    def test_start_next_invalid_requests(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing])
        for kwargs in ({"statusDetails": {"bad key": "v"}}, {"statusDetails": {"k": ""}},
                       {"stepTimeoutInMinutes": 0}, {"stepTimeoutInMinutes": 10081},
                       {"stepTimeoutInMinutes": -1}):
            expect_error(lambda kw=kwargs: svc.raw_data.start_next_pending_job_execution(
                thingName=thing, **kw), "InvalidRequestException", 400)
        # nothing was applied
        execution = svc.data.describe_job_execution(thingName=thing, jobId=job)["execution"]
        assert execution["status"] == "QUEUED" and execution["versionNumber"] == 1

    def test_update_job_execution(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing], {"op": "update"})
        plain = svc.data.update_job_execution(thingName=thing, jobId=job, status="IN_PROGRESS",
                                              statusDetails={"progress": "10"})
        assert "executionState" not in plain and "jobDocument" not in plain
        state = svc.data.update_job_execution(thingName=thing, jobId=job, status="IN_PROGRESS",
                                              includeJobExecutionState=True)["executionState"]
        # statusDetails omitted -> unchanged
        assert state == {"status": "IN_PROGRESS", "statusDetails": {"progress": "10"},
                         "versionNumber": 3}
        doc_only = svc.data.update_job_execution(thingName=thing, jobId=job, status="IN_PROGRESS",
                                                 statusDetails={"progress": "50"},
                                                 includeJobDocument=True)
        assert "executionState" not in doc_only
        assert isinstance(doc_only["jobDocument"], str)
        assert json.loads(doc_only["jobDocument"]) == {"op": "update"}
        err = expect_error(lambda: svc.data.update_job_execution(
            thingName=thing, jobId=job, status="SUCCEEDED", expectedVersion=3),
            "InvalidStateTransitionException", 409)
        assert "version" in err.response["Error"]["Message"].lower()  # PROTOCOL.md 8, A3
        both = svc.data.update_job_execution(thingName=thing, jobId=job, status="SUCCEEDED",
                                             expectedVersion=4, executionNumber=1,
                                             statusDetails={"progress": "100"},
                                             includeJobExecutionState=True,
                                             includeJobDocument=True)
        assert both["executionState"] == {"status": "SUCCEEDED",
                                          "statusDetails": {"progress": "100"},
                                          "versionNumber": 5}
        assert json.loads(both["jobDocument"]) == {"op": "update"}
        control = svc.iot.describe_job_execution(jobId=job, thingName=thing)["execution"]
        assert control["status"] == "SUCCEEDED" and control["versionNumber"] == 5
        assert control["statusDetails"]["detailsMap"] == {"progress": "100"}

    def test_update_step_timeout_values(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing])
        for minutes in (1, 10080, -1):
            svc.data.update_job_execution(thingName=thing, jobId=job, status="IN_PROGRESS",
                                          stepTimeoutInMinutes=minutes)
        for minutes in (0, 10081, -2):
            expect_error(lambda m=minutes: svc.raw_data.update_job_execution(
                thingName=thing, jobId=job, status="IN_PROGRESS", stepTimeoutInMinutes=m),
                "InvalidRequestException", 400)

    def test_invalid_request_exception(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing])
        d = svc.raw_data
        calls = [
            lambda: d.get_pending_job_executions(thingName="bad!thing"),
            lambda: d.get_pending_job_executions(thingName="t" * 129),
            lambda: d.describe_job_execution(thingName="bad thing", jobId=job),
            lambda: d.describe_job_execution(thingName=thing, jobId="bad.job"),
            lambda: d.describe_job_execution(thingName=thing, jobId="j" * 65),
            lambda: d.start_next_pending_job_execution(thingName="bad!thing"),
            lambda: d.update_job_execution(thingName=thing, jobId="bad.job", status="SUCCEEDED"),
            lambda: d.update_job_execution(thingName=thing, jobId="$next", status="SUCCEEDED"),
            lambda: d.update_job_execution(thingName=thing, jobId=job, status="DONE"),
            lambda: d.update_job_execution(thingName=thing, jobId=job, status="IN_PROGRESS",
                                           statusDetails={"k": "x" * 1025}),
            lambda: d.update_job_execution(thingName=thing, jobId=job, status="IN_PROGRESS",
                                           statusDetails={"k": "tab\there"}),
            lambda: d.update_job_execution(thingName=thing, jobId=job, status="IN_PROGRESS",
                                           statusDetails={"k" * 129: "v"}),
        ]
        for call in calls:
            expect_error(call, "InvalidRequestException", 400)
        execution = d.describe_job_execution(thingName=thing, jobId=job)["execution"]
        assert execution["status"] == "QUEUED" and execution["versionNumber"] == 1

    def test_resource_not_found_exception(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing])
        other = unique("ghost")
        d = svc.data
        for call in [
            lambda: d.describe_job_execution(thingName=thing, jobId="no-such-job"),
            lambda: d.describe_job_execution(thingName=other, jobId=job),
            lambda: d.update_job_execution(thingName=thing, jobId="no-such-job",
                                           status="IN_PROGRESS"),
            lambda: d.update_job_execution(thingName=thing, jobId=job, status="IN_PROGRESS",
                                           executionNumber=2),
        ]:
            expect_error(call, "ResourceNotFoundException", 404)
        # after the execution is deleted the device API no longer finds it
        svc.iot.delete_job_execution(jobId=job, thingName=thing, executionNumber=1, force=True)
        expect_error(lambda: d.describe_job_execution(thingName=thing, jobId=job),
                     "ResourceNotFoundException", 404)

    def test_invalid_state_transition_exception(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing])
        svc.data.update_job_execution(thingName=thing, jobId=job, status="SUCCEEDED")
        for status in ("IN_PROGRESS", "FAILED", "SUCCEEDED", "REJECTED"):
            expect_error(lambda s=status: svc.data.update_job_execution(
                thingName=thing, jobId=job, status=s), "InvalidStateTransitionException", 409)
        canceled = new_job(svc, [thing])
        svc.iot.cancel_job_execution(jobId=canceled, thingName=thing)
        expect_error(lambda: svc.data.update_job_execution(thingName=thing, jobId=canceled,
                                                           status="IN_PROGRESS"),
                     "InvalidStateTransitionException", 409)

    def test_start_command_execution(self, svc: Service, thing: str) -> None:
        with pytest.raises(ClientError) as err:  # no such command yet
            svc.data.start_command_execution(
                targetArn=arn(thing), commandArn=f"arn:aws:iot:{REGION}:{ACCOUNT}:command/reboot",
                parameters={"delay": {"I": 5}}, executionTimeoutSeconds=60)
        assert error_of(err) == ("ResourceNotFoundException", 404)
        command = unique("sdk-cmd")
        svc.iot.create_command(commandId=command, payload={"content": b"{}",
                                                           "contentType": "application/json"})
        execution = svc.data.start_command_execution(
            targetArn=arn(thing), commandArn=f"arn:aws:iot:{REGION}:{ACCOUNT}:command/{command}",
            parameters={"delay": {"I": 5}}, executionTimeoutSeconds=60)["executionId"]
        got = svc.iot.get_command_execution(executionId=execution, targetArn=arn(thing))
        assert got["status"] == "CREATED" and got["parameters"] == {"delay": {"I": 5}}


# -- boto3 iot (the control plane) ----------------------------------------------------------------

class TestControlPlane:
    def test_create_and_describe_thing(self, svc: Service) -> None:
        name = unique("ctl-thing")
        created = svc.iot.create_thing(thingName=name,
                                       attributePayload={"attributes": {"model": "esp32"}})
        assert created["thingName"] == name and created["thingArn"] == arn(name)
        assert created["thingId"]
        described = svc.iot.describe_thing(thingName=name)
        assert described["thingName"] == name and described["thingArn"] == arn(name)
        assert described["thingId"] == created["thingId"]
        assert described["attributes"] == {"model": "esp32"}
        assert isinstance(described["version"], int)
        again = svc.iot.create_thing(thingName=name,
                                     attributePayload={"attributes": {"model": "esp32"}})
        assert again["thingId"] == created["thingId"]  # identical request: idempotent
        expect_error(lambda: svc.iot.create_thing(thingName=name), "ResourceAlreadyExistsException",
                     409)
        expect_error(lambda: svc.iot.create_thing(thingName="bad name"),
                     "InvalidRequestException", 400)
        expect_error(lambda: svc.iot.describe_thing(thingName=unique("ghost")),
                     "ResourceNotFoundException", 404)
        colon = "a:b_c-" + uuid.uuid4().hex[:6]
        assert svc.iot.create_thing(thingName=colon)["thingArn"] == arn(colon)

    def test_create_job_errors(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing])
        iot = svc.iot

        def create(**kwargs: Any) -> Callable[[], Any]:
            args = {"jobId": unique("j"), "targets": [arn(thing)], "document": "{}", **kwargs}
            return lambda: iot.create_job(**args)

        expect_error(create(targets=[arn(unique("ghost"))]), "ResourceNotFoundException", 404)
        expect_error(create(jobId=job), "ResourceAlreadyExistsException", 409)
        for document in ("[1]", '"text"', "42", "null", "true", "{oops", ""):
            expect_error(create(document=document), "InvalidRequestException", 400)
        big = json.dumps({"x": "y" * 32768})
        expect_error(create(document=big), "InvalidRequestException", 400)
        exact = json.dumps({"x": "y" * (32768 - 9)})
        assert len(exact) == 32768
        iot.create_job(**{"jobId": unique("j"), "targets": [arn(thing)], "document": exact})
        expect_error(create(jobId="bad.id"), "InvalidRequestException", 400)
        expect_error(create(jobId="j" * 65), "InvalidRequestException", 400)
        expect_error(create(targets=["not-an-arn"]), "InvalidRequestException", 400)
        # nothing half-created: the failed job ids are unknown
        expect_error(lambda: iot.describe_job(jobId="bad.id"), "ResourceNotFoundException", 404)

    def test_describe_job_process_details(self, svc: Service) -> None:
        things = new_things(svc, 4)
        job = new_job(svc, things)
        counts = {"numberOfQueuedThings": 4}

        def check(expected_status: str) -> dict[str, Any]:
            view = svc.iot.describe_job(jobId=job)["job"]
            details = view["jobProcessDetails"]
            for key in ("numberOfQueuedThings", "numberOfInProgressThings",
                        "numberOfSucceededThings", "numberOfFailedThings",
                        "numberOfRejectedThings", "numberOfCanceledThings"):
                assert details.get(key, 0) == counts.get(key, 0), (key, details)
            assert view["status"] == expected_status
            return view

        view = check("IN_PROGRESS")
        assert view["jobArn"] == f"arn:aws:iot:{REGION}:{ACCOUNT}:job/{job}"
        assert sorted(view["targets"]) == sorted(arn(t) for t in things)
        assert "completedAt" not in view
        svc.data.start_next_pending_job_execution(thingName=things[0])
        svc.data.update_job_execution(thingName=things[1], jobId=job, status="IN_PROGRESS")
        counts = {"numberOfQueuedThings": 2, "numberOfInProgressThings": 2}
        check("IN_PROGRESS")
        svc.data.update_job_execution(thingName=things[0], jobId=job, status="SUCCEEDED")
        svc.data.update_job_execution(thingName=things[1], jobId=job, status="FAILED")
        svc.data.update_job_execution(thingName=things[2], jobId=job, status="REJECTED")
        counts = {"numberOfQueuedThings": 1, "numberOfSucceededThings": 1,
                  "numberOfFailedThings": 1, "numberOfRejectedThings": 1}
        check("IN_PROGRESS")
        svc.iot.cancel_job_execution(jobId=job, thingName=things[3])
        counts = {"numberOfSucceededThings": 1, "numberOfFailedThings": 1,
                  "numberOfRejectedThings": 1, "numberOfCanceledThings": 1}
        view = check("COMPLETED")  # every execution terminal
        assert view["completedAt"] >= view["createdAt"]
        assert svc.iot.get_job_document(jobId=job)["document"] == json.dumps({"op": "test"})

    def test_list_jobs(self, svc: Service) -> None:
        [a, b] = new_things(svc, 2)
        running, done, canceled = new_job(svc, [a]), new_job(svc, [b]), new_job(svc, [a])
        svc.data.update_job_execution(thingName=b, jobId=done, status="SUCCEEDED")
        svc.iot.cancel_job(jobId=canceled)

        def ids(**kwargs: Any) -> list[str]:
            out: list[str] = []
            for page in svc.iot.get_paginator("list_jobs").paginate(**kwargs,
                                                                   PaginationConfig={"PageSize": 2}):
                out += [j["jobId"] for j in page["jobs"]]
            return out

        everything = ids()
        assert {running, done, canceled} <= set(everything)
        assert len(everything) == len(set(everything))  # pagination neither skips nor repeats
        in_progress, completed, cancel = (ids(status="IN_PROGRESS"), ids(status="COMPLETED"),
                                          ids(status="CANCELED"))
        assert running in in_progress and running not in completed + cancel
        assert done in completed and done not in in_progress + cancel
        assert canceled in cancel and canceled not in in_progress + completed
        assert running in ids(targetSelection="SNAPSHOT")
        summary = [j for j in svc.iot.list_jobs(status="COMPLETED")["jobs"] if j["jobId"] == done]
        assert summary[0]["status"] == "COMPLETED" and summary[0]["targetSelection"] == "SNAPSHOT"
        expect_error(lambda: svc.iot.list_jobs(status="RUNNING"), "InvalidRequestException", 400)

    def test_cancel_job(self, svc: Service) -> None:
        [a, b] = new_things(svc, 2)
        job = new_job(svc, [a, b])
        svc.data.start_next_pending_job_execution(thingName=a)
        out = svc.iot.cancel_job(jobId=job, reasonCode="OPERATOR", comment="stop")
        assert out["jobId"] == job and out["jobArn"].endswith(f":job/{job}")
        view = svc.iot.describe_job(jobId=job)["job"]
        assert view["status"] == "CANCELED" and view["reasonCode"] == "OPERATOR"
        assert view["comment"] == "stop" and view["forceCanceled"] is False
        # without force the IN_PROGRESS execution keeps running; the QUEUED one is canceled
        assert svc.iot.describe_job_execution(jobId=job, thingName=a)["execution"]["status"] == \
            "IN_PROGRESS"
        queued = svc.iot.describe_job_execution(jobId=job, thingName=b)["execution"]
        assert queued["status"] == "CANCELED"
        svc.iot.cancel_job(jobId=job, force=True)
        running = svc.iot.describe_job_execution(jobId=job, thingName=a)["execution"]
        assert running["status"] == "CANCELED" and running["forceCanceled"] is True
        view = svc.iot.describe_job(jobId=job)["job"]
        assert view["forceCanceled"] is True
        assert view["jobProcessDetails"]["numberOfCanceledThings"] == 2
        expect_error(lambda: svc.iot.cancel_job(jobId="no-such-job"), "ResourceNotFoundException",
                     404)

    def test_delete_job(self, svc: Service) -> None:
        [a] = new_things(svc, 1)
        job = new_job(svc, [a])
        svc.data.start_next_pending_job_execution(thingName=a)
        expect_error(lambda: svc.iot.delete_job(jobId=job), "InvalidStateTransitionException", 409)
        assert svc.iot.describe_job(jobId=job)["job"]["status"] == "IN_PROGRESS"
        svc.iot.delete_job(jobId=job, force=True)
        expect_error(lambda: svc.iot.describe_job(jobId=job), "ResourceNotFoundException", 404)
        expect_error(lambda: svc.iot.describe_job_execution(jobId=job, thingName=a),
                     "ResourceNotFoundException", 404)
        assert "execution" not in svc.data.start_next_pending_job_execution(thingName=a)
        finished = new_job(svc, [a])
        svc.data.update_job_execution(thingName=a, jobId=finished, status="SUCCEEDED")
        svc.iot.delete_job(jobId=finished)  # COMPLETED: no force needed
        expect_error(lambda: svc.iot.describe_job(jobId=finished), "ResourceNotFoundException", 404)
        expect_error(lambda: svc.iot.delete_job(jobId=finished), "ResourceNotFoundException", 404)
        assert finished not in [j["jobId"] for j in svc.iot.list_jobs()["jobs"]]

    def test_list_job_executions(self, svc: Service) -> None:
        [a, b] = new_things(svc, 2)
        job, other = new_job(svc, [a, b]), new_job(svc, [a])
        svc.data.update_job_execution(thingName=a, jobId=job, status="SUCCEEDED")
        for_job = svc.iot.list_job_executions_for_job(jobId=job)["executionSummaries"]
        assert sorted((e["thingArn"], e["jobExecutionSummary"]["status"]) for e in for_job) == \
            sorted([(arn(a), "SUCCEEDED"), (arn(b), "QUEUED")])
        for e in for_job:
            assert e["jobExecutionSummary"]["executionNumber"] == 1
        succeeded = svc.iot.list_job_executions_for_job(jobId=job, status="SUCCEEDED")
        assert [e["thingArn"] for e in succeeded["executionSummaries"]] == [arn(a)]
        for_thing = svc.iot.list_job_executions_for_thing(thingName=a)["executionSummaries"]
        assert sorted((e["jobId"], e["jobExecutionSummary"]["status"]) for e in for_thing) == \
            sorted([(job, "SUCCEEDED"), (other, "QUEUED")])
        queued = svc.iot.list_job_executions_for_thing(thingName=a, status="QUEUED")
        assert [e["jobId"] for e in queued["executionSummaries"]] == [other]
        page = svc.iot.list_job_executions_for_thing(thingName=a, maxResults=1)
        assert len(page["executionSummaries"]) == 1 and page["nextToken"]
        rest = svc.iot.list_job_executions_for_thing(thingName=a, maxResults=1,
                                                     nextToken=page["nextToken"])
        assert {page["executionSummaries"][0]["jobId"],
                rest["executionSummaries"][0]["jobId"]} == {job, other}
        expect_error(lambda: svc.iot.list_job_executions_for_job(jobId="no-such-job"),
                     "ResourceNotFoundException", 404)
        expect_error(lambda: svc.iot.list_job_executions_for_job(jobId=job, status="DONE"),
                     "InvalidRequestException", 400)

    def test_describe_job_execution(self, svc: Service, thing: str) -> None:
        job = new_job(svc, [thing])
        svc.data.start_next_pending_job_execution(thingName=thing, statusDetails={"s": "1"})
        execution = svc.iot.describe_job_execution(jobId=job, thingName=thing)["execution"]
        assert execution["jobId"] == job and execution["thingArn"] == arn(thing)
        assert execution["status"] == "IN_PROGRESS" and execution["versionNumber"] == 2
        assert execution["executionNumber"] == 1
        assert execution["statusDetails"] == {"detailsMap": {"s": "1"}}
        assert execution["startedAt"] >= execution["queuedAt"]
        assert execution["forceCanceled"] is False
        numbered = svc.iot.describe_job_execution(jobId=job, thingName=thing, executionNumber=1)
        assert numbered["execution"]["executionNumber"] == 1
        expect_error(lambda: svc.iot.describe_job_execution(jobId=job, thingName=thing,
                                                            executionNumber=2),
                     "ResourceNotFoundException", 404)

    def test_cancel_job_execution(self, svc: Service, thing: str) -> None:
        queued, running, done = (new_job(svc, [thing]) for _ in range(3))
        svc.data.update_job_execution(thingName=thing, jobId=running, status="IN_PROGRESS")
        svc.data.update_job_execution(thingName=thing, jobId=done, status="SUCCEEDED")

        svc.iot.cancel_job_execution(jobId=queued, thingName=thing,
                                     statusDetails={"why": "operator"})
        execution = svc.iot.describe_job_execution(jobId=queued, thingName=thing)["execution"]
        assert execution["status"] == "CANCELED" and execution["forceCanceled"] is False
        assert execution["statusDetails"]["detailsMap"] == {"why": "operator"}
        # the device sees it as no longer pending
        pending = svc.data.get_pending_job_executions(thingName=thing)
        assert queued not in [s["jobId"] for s in pending["queuedJobs"]]

        expect_error(lambda: svc.iot.cancel_job_execution(jobId=running, thingName=thing),
                     "InvalidStateTransitionException", 409)
        expect_error(lambda: svc.iot.cancel_job_execution(jobId=running, thingName=thing,
                                                          force=True, expectedVersion=1),
                     "VersionConflictException", 409)
        svc.iot.cancel_job_execution(jobId=running, thingName=thing, force=True, expectedVersion=2)
        execution = svc.iot.describe_job_execution(jobId=running, thingName=thing)["execution"]
        assert execution["status"] == "CANCELED" and execution["forceCanceled"] is True
        expect_error(lambda: svc.iot.cancel_job_execution(jobId=done, thingName=thing, force=True),
                     "InvalidStateTransitionException", 409)
        expect_error(lambda: svc.iot.cancel_job_execution(jobId="no-such-job", thingName=thing),
                     "ResourceNotFoundException", 404)
        # each job's only execution is terminal now, so each job is COMPLETED
        for job in (queued, running, done):
            assert svc.iot.describe_job(jobId=job)["job"]["status"] == "COMPLETED"

    def test_delete_job_execution(self, svc: Service, thing: str) -> None:
        done, running = new_job(svc, [thing]), new_job(svc, [thing])
        svc.data.update_job_execution(thingName=thing, jobId=done, status="FAILED")
        svc.data.update_job_execution(thingName=thing, jobId=running, status="IN_PROGRESS")
        svc.iot.delete_job_execution(jobId=done, thingName=thing, executionNumber=1)
        expect_error(lambda: svc.iot.describe_job_execution(jobId=done, thingName=thing),
                     "ResourceNotFoundException", 404)
        expect_error(lambda: svc.iot.delete_job_execution(jobId=done, thingName=thing,
                                                          executionNumber=1),
                     "ResourceNotFoundException", 404)
        expect_error(lambda: svc.iot.delete_job_execution(jobId=running, thingName=thing,
                                                          executionNumber=1),
                     "InvalidStateTransitionException", 409)
        expect_error(lambda: svc.iot.delete_job_execution(jobId=running, thingName=thing,
                                                          executionNumber=2, force=True),
                     "ResourceNotFoundException", 404)
        svc.iot.delete_job_execution(jobId=running, thingName=thing, executionNumber=1, force=True)
        expect_error(lambda: svc.data.update_job_execution(thingName=thing, jobId=running,
                                                           status="SUCCEEDED"),
                     "ResourceNotFoundException", 404)
        assert svc.data.get_pending_job_executions(thingName=thing)["inProgressJobs"] == []
        assert svc.iot.list_job_executions_for_thing(thingName=thing)["executionSummaries"] == []


# -- thing groups and CONTINUOUS jobs -------------------------------------------------------------

class TestGroups:
    def new_group(self, svc: Service, *things: str) -> str:
        name = unique("grp")
        created = svc.iot.create_thing_group(thingGroupName=name)
        assert created["thingGroupName"] == name and created["thingGroupArn"] == group_arn(name)
        assert created["thingGroupId"]
        for thing in things:
            svc.iot.add_thing_to_thing_group(thingGroupName=name, thingName=thing)
        return name

    def test_create_describe_and_membership(self, svc: Service) -> None:
        [a, b] = new_things(svc, 2)
        group = self.new_group(svc, a, b)
        described = svc.iot.describe_thing_group(thingGroupName=group)
        assert described["thingGroupName"] == group
        assert described["thingGroupArn"] == group_arn(group)
        members = svc.iot.list_things_in_thing_group(thingGroupName=group)["things"]
        assert sorted(members) == sorted([a, b])
        svc.iot.add_thing_to_thing_group(thingGroupName=group, thingName=a)  # idempotent
        assert sorted(svc.iot.list_things_in_thing_group(thingGroupName=group)["things"]) == \
            sorted([a, b])
        svc.iot.remove_thing_from_thing_group(thingGroupName=group, thingName=b)
        assert svc.iot.list_things_in_thing_group(thingGroupName=group)["things"] == [a]
        expect_error(lambda: svc.iot.describe_thing_group(thingGroupName=unique("nogrp")),
                     "ResourceNotFoundException", 404)
        expect_error(lambda: svc.iot.add_thing_to_thing_group(thingGroupName=unique("nogrp"),
                                                              thingName=a),
                     "ResourceNotFoundException", 404)
        expect_error(lambda: svc.iot.add_thing_to_thing_group(thingGroupName=group,
                                                              thingName=unique("ghost")),
                     "ResourceNotFoundException", 404)

    def test_snapshot_job_on_group(self, svc: Service) -> None:
        [a, b, late] = new_things(svc, 3)
        group = self.new_group(svc, a, b)
        job = unique("job")
        svc.iot.create_job(jobId=job, targets=[group_arn(group)], document="{}")
        view = svc.iot.describe_job(jobId=job)["job"]
        assert view["targetSelection"] == "SNAPSHOT" and view["targets"] == [group_arn(group)]
        assert view["jobProcessDetails"]["numberOfQueuedThings"] == 2
        svc.iot.add_thing_to_thing_group(thingGroupName=group, thingName=late)
        assert svc.data.get_pending_job_executions(thingName=late)["queuedJobs"] == []
        for thing in (a, b):
            svc.data.update_job_execution(thingName=thing, jobId=job, status="SUCCEEDED")
        assert svc.iot.describe_job(jobId=job)["job"]["status"] == "COMPLETED"

    def test_continuous_job_reaches_things_added_later(self, svc: Service) -> None:
        [a, late] = new_things(svc, 2)
        group = self.new_group(svc, a)
        job = unique("job")
        svc.iot.create_job(jobId=job, targets=[group_arn(group)], document='{"op": "cont"}',
                           targetSelection="CONTINUOUS")
        view = svc.iot.describe_job(jobId=job)["job"]
        assert view["targetSelection"] == "CONTINUOUS"
        assert [s["jobId"] for s in svc.data.get_pending_job_executions(thingName=a)[
            "queuedJobs"]] == [job]
        svc.data.update_job_execution(thingName=a, jobId=job, status="SUCCEEDED")
        # a continuous job never completes by itself
        assert svc.iot.describe_job(jobId=job)["job"]["status"] == "IN_PROGRESS"

        sdk = SdkDevice(svc.port, late)
        try:
            svc.iot.add_thing_to_thing_group(thingGroupName=group, thingName=late)
            event = sdk.next_event()
            assert event.execution.job_id == job and event.execution.status == "QUEUED"
            assert event.execution.job_document == {"op": "cont"}
            outcome, started = sdk.start_next()
            assert outcome == "accepted" and started.execution.job_id == job
            outcome, _ = sdk.update(job, "SUCCEEDED")
            assert outcome == "accepted"
            assert sdk.next_event().execution is None
        finally:
            sdk.close()
        details = svc.iot.describe_job(jobId=job)["job"]["jobProcessDetails"]
        assert details["numberOfSucceededThings"] == 2
        assert job in [j["jobId"] for j in
                       svc.iot.list_jobs(targetSelection="CONTINUOUS")["jobs"]]
        assert job in [j["jobId"] for j in svc.iot.list_jobs(thingGroupName=group)["jobs"]]

    def test_continuous_job_on_group_and_thing_targets(self, svc: Service) -> None:
        [member, direct] = new_things(svc, 2)
        group = self.new_group(svc, member)
        job = unique("job")
        svc.iot.create_job(jobId=job, targets=[group_arn(group), arn(direct)], document="{}",
                           targetSelection="CONTINUOUS")
        for thing in (member, direct):
            assert svc.data.describe_job_execution(thingName=thing, jobId=job)["execution"][
                "status"] == "QUEUED"

    def test_group_job_errors(self, svc: Service) -> None:
        [a] = new_things(svc, 1)
        group = self.new_group(svc, a)
        expect_error(lambda: svc.iot.create_job(jobId=unique("job"),
                                                targets=[group_arn(unique("nogrp"))],
                                                document="{}"),
                     "ResourceNotFoundException", 404)
        expect_error(lambda: svc.iot.create_thing_group(thingGroupName="bad name"),
                     "InvalidRequestException", 400)
        again = svc.iot.create_thing_group(thingGroupName=group)  # identical: idempotent
        assert again["thingGroupArn"] == group_arn(group)
