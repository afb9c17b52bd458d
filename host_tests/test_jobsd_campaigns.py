"""jobsd fleet campaigns (issue 15): acceptance tests for FLEET.md section 9, scenarios 1-19
and 25, written against FLEET.md (its [P] proposals included, asserted loosely where it says
so), with boto3 as the operator (`iot`) and as HTTPS devices (`iot-jobs-data`).

Every test runs its own jobsd (`--test-hooks`, on the module's mosquitto) so that it owns
jobsd's clock: `PUT /_jobsd/test-hooks {"advanceClock": s}` moves the clock and does what is then
due before it answers. A rollout minute is 60 s of that clock and so is a timer minute
(`--minute-seconds` keeps its default 60). No test sleeps.

What devices receive is recorded by one paho client (`Fleet`) subscribed to every thing's
`notify`/`notify-next` and to `$aws/events/#`. To show that something was *not* published, the
test first synchronises with jobsd's MQTT connection (`Fleet.sync`: a `get` request of a thing of
its own, whose answer jobsd publishes after everything it published before).

Scenario -> test:
  1 test_s01_constant_pacing               11 test_s11_retry_on_timed_out
  2 test_s02_exponential_ramp              12 test_s12_not_retried
  3 test_s03_succeeded_driven_ramp         13 test_s13_retry_validation
  4 test_s04_rollout_validation            14 test_s14_update_job_retries
  5 test_s05_late_joiner                   15 test_s15_abort_drops_queued_retry
  6 test_s06_abort_fires                   16 test_s16_schedule_validation
  7 test_s07_abort_minimum                 17 test_s17_scheduled_start
  8 test_s08_criteria_order_and_all        18 test_s18_end_behaviours
  9 test_s09_after_abort                   19 test_s19_maintenance_window
 10 test_s10_retry_on_failed               25 test_s25_limits_targets, test_s25_eleventh_concurrent_delete
Beyond the list: restarts (test_restart_*), UpdateJob of a rollout
(test_update_job_rollout_takes_effect_next_minute), abort-config validation, rollout order and
de-duplication, completion waiting for the rollout, retries bypassing the rate, a SCHEDULED job
canceled, endTime alone.
"""

from __future__ import annotations

import calendar
import http.client
import json
import math
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional
from collections.abc import Callable, Iterator

import boto3
import paho.mqtt.client as mqtt
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from iotjobs_host import stack


REGION, ACCOUNT = "us-east-1", "123456789012"
MINUTE = 60.0
DAY = 86400.0
TIMEOUT = 20.0
COUNTERS = ("numberOfCanceledThings", "numberOfSucceededThings", "numberOfFailedThings",
            "numberOfRejectedThings", "numberOfQueuedThings", "numberOfInProgressThings",
            "numberOfRemovedThings", "numberOfTimedOutThings")
REASON_CODE = re.compile(r"[A-Z0-9_]+")
TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "REMOVED", "CANCELED"}
EVENTS_ON = {"JOB": {"Enabled": True}, "JOB_EXECUTION": {"Enabled": True}}


def thing_arn(name: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/{name}"


def group_arn(name: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/{name}"


def name_of(arn: str) -> str:
    return arn.rsplit("/", 1)[1]


def fmt(t: float) -> str:
    """FLEET.md 4.2: schedule times as YYYY-MM-DDTHH:MM, UTC."""
    return time.strftime("%Y-%m-%dT%H:%M", time.gmtime(t))


def parse_fmt(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M")))


def ceil_minute(t: float) -> float:
    return math.ceil(t / 60.0) * 60.0


def error_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, int]:
    """(error code, HTTP status) of a call that must fail."""
    with pytest.raises(ClientError) as info:
        fn(*args, **kwargs)
    resp = info.value.response
    return resp["Error"]["Code"], resp["ResponseMetadata"]["HTTPStatusCode"]


INVALID = ("InvalidRequestException", 400)
NOT_FOUND = ("ResourceNotFoundException", 404)
LIMIT = ("LimitExceededException", 410)


# -- what devices and event subscribers see -----------------------------------------------------

class Fleet:
    """One paho client on the plain listener recording every thing's notify / notify-next and
    every `$aws/events/...` message, in arrival order."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.barrier = f"barrier-{uuid.uuid4().hex[:10]}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"fleet-{uuid.uuid4().hex[:10]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("$aws/things/+/jobs/notify", 1),
                               ("$aws/things/+/jobs/notify-next", 1),
                               ("$aws/events/#", 1),
                               (f"$aws/things/{self.barrier}/jobs/get/+", 1)])
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("fleet spy did not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = msg.payload
        with self._cond:
            self.messages.append((msg.topic, payload))
            self._cond.notify_all()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def sync(self, timeout: float = TIMEOUT) -> None:
        """Return once everything jobsd published before this call has arrived: jobsd answers
        the `get` after its earlier publishes, on the same connection."""
        token = uuid.uuid4().hex
        self.client.publish(f"$aws/things/{self.barrier}/jobs/get",
                            json.dumps({"clientToken": token}), qos=1)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(t.startswith(f"$aws/things/{self.barrier}/jobs/get/")
                          and isinstance(p, dict) and p.get("clientToken") == token
                          for t, p in self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("jobsd did not answer the fleet spy's get request")
                self._cond.wait(left)

    def _all(self) -> list[tuple[str, Any]]:
        with self._cond:
            return list(self.messages)

    def for_thing(self, thing: str) -> list[tuple[str, Any]]:
        prefix = f"$aws/things/{thing}/jobs/"
        return [(t[len(prefix):], p) for t, p in self._all() if t.startswith(prefix)]

    def next_messages(self, thing: str) -> list[Any]:
        return [p for leaf, p in self.for_thing(thing) if leaf == "notify-next"]

    def next_numbers(self, thing: str, job_id: str) -> list[int]:
        """executionNumbers of the notify-next messages announcing an execution of job_id."""
        return [p["execution"]["executionNumber"] for p in self.next_messages(thing)
                if isinstance(p, dict) and (p.get("execution") or {}).get("jobId") == job_id]

    def wait_next(self, thing: str, job_id: str, number: int = 1) -> None:
        deadline = time.monotonic() + TIMEOUT
        while number not in self.next_numbers(thing, job_id):
            if time.monotonic() > deadline:
                raise AssertionError(f"no notify-next of {job_id} #{number} for {thing}; saw "
                                     f"{self.for_thing(thing)}")
            with self._cond:
                self._cond.wait(0.05)

    def job_events(self, job_id: str) -> list[tuple[str, Any]]:
        """(operation, payload) of `$aws/events/job/<jobId>/<operation>`, in order."""
        prefix = f"$aws/events/job/{job_id}/"
        return [(t[len(prefix):], p) for t, p in self._all() if t.startswith(prefix)]

    def execution_events(self, job_id: str, operation: Optional[str] = None) -> list[Any]:
        prefix = f"$aws/events/jobExecution/{job_id}/"
        return [p for t, p in self._all() if t.startswith(prefix)
                and (operation is None or t[len(prefix):] == operation)]


# -- one jobsd per test, with its clock ---------------------------------------------------------

class Env:
    def __init__(self, tmp_path: Path, broker: stack.Mosquitto, procs: list,
                 fleet: Fleet) -> None:
        self.tmp_path, self.broker, self.procs, self.fleet = tmp_path, broker, procs, fleet
        self.prefix = "c" + uuid.uuid4().hex[:8]
        self.db = str(tmp_path / "jobsd.sqlite3")
        self.starts = 0
        self.start()

    # processes
    def start(self) -> None:
        self.starts += 1
        self.jobsd = stack.Jobsd(str(self.tmp_path / "jobsd"), self.broker.broker, db=self.db,
                                 extra=["--test-hooks", "--deletion-seconds", "60",
                                        "--client-id", f"jobsd-{self.prefix}"],
                                 log_name=f"jobsd-{self.starts}.log")
        self.procs.append(self.jobsd)
        self.iot = self.jobsd.iot
        self.data = self.jobsd.data
        self.raw = boto3.client("iot", endpoint_url=self.jobsd.control_url, region_name=REGION,
                                aws_access_key_id="local", aws_secret_access_key="local",
                                config=Config(retries={"max_attempts": 1},
                                              parameter_validation=False))

    def restart(self) -> None:
        """Stop jobsd and start a new one on the same --db. The clock offset of the test hook
        need not survive, so the new jobsd's clock is brought back to where the old one was
        (it never goes backwards) before the test goes on."""
        before = self.now()
        self.jobsd.stop()
        self.start()
        after = self.now()
        if after < before:
            self.advance(before - after)

    # the clock
    def hooks(self, **body: Any) -> dict[str, Any]:
        host, port = self.jobsd.control_url[len("http://"):].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("PUT", "/_jobsd/test-hooks", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            out = json.loads(reply.read() or b"{}")
            assert reply.status == 200, out
            return out
        finally:
            conn.close()

    def advance(self, seconds: float) -> float:
        """Move jobsd's clock forward; everything then due is done before this returns."""
        return float(self.hooks(advanceClock=max(0.0, seconds))["now"])

    def now(self) -> float:
        return self.advance(0)

    def minute(self) -> float:
        return self.advance(MINUTE)

    def advance_to(self, t: float) -> float:
        return self.advance(t - self.now())

    # registry
    def things(self, n: int, tag: str = "t") -> list[str]:
        names = [f"{self.prefix}-{tag}{i:03d}" for i in range(n)]
        for name in names:
            self.iot.create_thing(thingName=name)
        return names

    def group(self, things: list[str], tag: str = "g") -> str:
        name = f"{self.prefix}-{tag}"
        self.iot.create_thing_group(thingGroupName=name)
        for t in things:
            self.iot.add_thing_to_thing_group(thingGroupName=name, thingName=t)
        return name

    def events_on(self) -> None:
        self.iot.update_event_configurations(eventConfigurations=EVENTS_ON)

    # jobs
    def new_job_id(self, tag: str = "job") -> str:
        return f"{self.prefix}-{tag}-{uuid.uuid4().hex[:6]}"

    def create_job(self, things: Optional[list[str]] = None, *, targets: Optional[list[str]] = None,
                   tag: str = "job", client: Any = None, **options: Any) -> str:
        job_id = self.new_job_id(tag)
        (client or self.iot).create_job(
            jobId=job_id, targets=targets if targets is not None else [thing_arn(t) for t in things or []],
            document=json.dumps({"operation": "campaign"}), **options)
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        job = self.iot.describe_job(jobId=job_id)["job"]
        details = job.get("jobProcessDetails") or {}
        missing = [c for c in COUNTERS if c not in details]
        assert not missing, f"jobProcessDetails lacks {missing} (FLEET.md 6.2): {details}"
        return job

    def counters(self, job_id: str) -> dict[str, int]:
        details = self.job(job_id)["jobProcessDetails"]
        return {c: details[c] for c in COUNTERS}

    def executions(self, job_id: str) -> dict[str, list[dict[str, Any]]]:
        """thing -> its JobExecutionSummaries of the job (ListJobExecutionsForJob), oldest
        first."""
        out: dict[str, list[dict[str, Any]]] = {}
        kwargs: dict[str, Any] = {"jobId": job_id, "maxResults": 250}
        while True:
            page = self.iot.list_job_executions_for_job(**kwargs)
            for row in page["executionSummaries"]:
                out.setdefault(name_of(row["thingArn"]), []).append(row["jobExecutionSummary"])
            if not page.get("nextToken"):
                break
            kwargs["nextToken"] = page["nextToken"]
        for rows in out.values():
            rows.sort(key=lambda s: s["executionNumber"])
        return out

    def released(self, job_id: str) -> list[str]:
        return sorted(self.executions(job_id))

    def statuses(self, job_id: str) -> dict[str, list[str]]:
        return {t: [s["status"] for s in rows] for t, rows in self.executions(job_id).items()}

    def for_thing(self, thing: str, job_id: str) -> list[dict[str, Any]]:
        rows = self.iot.list_job_executions_for_thing(thingName=thing, jobId=job_id)
        return sorted((r["jobExecutionSummary"] for r in rows["executionSummaries"]),
                      key=lambda s: s["executionNumber"])

    def execution(self, job_id: str, thing: str, number: Optional[int] = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"jobId": job_id, "thingName": thing}
        if number is not None:
            kwargs["executionNumber"] = number
        return self.iot.describe_job_execution(**kwargs)["execution"]

    def pending_ids(self, thing: str) -> tuple[list[str], list[str]]:
        """(IN_PROGRESS, QUEUED) job ids GetPendingJobExecutions shows the device."""
        r = self.data.get_pending_job_executions(thingName=thing)
        return ([s["jobId"] for s in r.get("inProgressJobs", [])],
                [s["jobId"] for s in r.get("queuedJobs", [])])

    def device(self, thing: str, job_id: str, status: str, **kwargs: Any) -> dict[str, Any]:
        return self.data.update_job_execution(jobId=job_id, thingName=thing, status=status,
                                              **kwargs)

    def start_next(self, thing: str) -> Optional[dict[str, Any]]:
        return self.data.start_next_pending_job_execution(thingName=thing).get("execution")

    def assert_unreleased(self, job_id: str, thing: str) -> None:
        """FLEET.md 1.3: an unreleased target has no execution and sees nothing."""
        assert self.for_thing(thing, job_id) == [], thing
        assert error_of(self.iot.describe_job_execution, jobId=job_id,
                        thingName=thing) == NOT_FOUND, thing
        assert job_id not in sum(self.pending_ids(thing), []), thing
        assert self.fleet.next_numbers(thing, job_id) == [], thing
        seen = [p for leaf, p in self.fleet.for_thing(thing) if leaf == "notify"
                and job_id in json.dumps(p)]
        assert seen == [], f"{thing} was notified of {job_id}: {seen}"

    def assert_not_created(self, job_id: str) -> None:
        assert error_of(self.iot.describe_job, jobId=job_id) == NOT_FOUND, job_id


@pytest.fixture(scope="module")
def broker(module_broker: stack.Mosquitto) -> stack.Mosquitto:
    return module_broker


@pytest.fixture
def fleet(broker: stack.Mosquitto) -> Iterator[Fleet]:
    f = Fleet(broker.port)
    yield f
    f.close()


@pytest.fixture
def env(tmp_path: Path, broker: stack.Mosquitto, procs: list, fleet: Fleet) -> Env:
    return Env(tmp_path, broker, procs, fleet)


def rollout(max_per_minute: Optional[int] = None, base: Optional[int] = None,
            factor: Optional[float] = None, notified: Optional[int] = None,
            succeeded: Optional[int] = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if max_per_minute is not None:
        cfg["maximumPerMinute"] = max_per_minute
    if base is not None:
        criteria: dict[str, int] = {}
        if notified is not None:
            criteria["numberOfNotifiedThings"] = notified
        if succeeded is not None:
            criteria["numberOfSucceededThings"] = succeeded
        cfg["exponentialRate"] = {"baseRatePerMinute": base, "incrementFactor": factor,
                                  "rateIncreaseCriteria": criteria}
    return cfg


def abort(*criteria: tuple[str, float, int]) -> dict[str, Any]:
    return {"criteriaList": [{"failureType": kind, "action": "CANCEL",
                              "thresholdPercentage": pct, "minNumberOfExecutedThings": least}
                             for kind, pct, least in criteria]}


def retry(*criteria: tuple[str, int]) -> dict[str, Any]:
    return {"criteriaList": [{"failureType": kind, "numberOfRetries": n}
                             for kind, n in criteria]}


def assert_one_each(env: Env, job_id: str, things: list[str]) -> None:
    """Nothing released twice: at most one execution per thing (jobs without retries)."""
    execs = env.executions(job_id)
    twice = {t: [s["executionNumber"] for s in rows] for t, rows in execs.items() if len(rows) != 1}
    assert not twice, f"released twice: {twice}"
    assert set(execs) <= set(things)


# == 1-5: rollout ==================================================================================

def test_s01_constant_pacing(env: Env) -> None:
    things = env.things(25)
    job = env.create_job(things, jobExecutionsRolloutConfig=rollout(max_per_minute=10))

    def check(n: int, rolling: bool) -> None:
        execs = env.executions(job)
        # FLEET.md 1.4 [P]: released in `targets` order, one QUEUED execution #1 each
        assert sorted(execs) == sorted(things[:n])
        assert all([(s["status"], s["executionNumber"]) for s in rows] == [("QUEUED", 1)]
                   for rows in execs.values()), execs
        job_view = env.job(job)
        counters = {c: job_view["jobProcessDetails"][c] for c in COUNTERS}
        assert counters == {**dict.fromkeys(COUNTERS, 0), "numberOfQueuedThings": n}
        assert job_view["status"] == "IN_PROGRESS"
        assert job_view["isConcurrent"] is rolling
        processing = job_view["jobProcessDetails"].get("processingTargets")
        if rolling:
            # the targets still being rolled out: present, from `targets`, unreleased among them
            assert processing, job_view["jobProcessDetails"]
            assert set(processing) <= {thing_arn(t) for t in things}
            assert {thing_arn(t) for t in things[n:]} <= set(processing)
        else:
            assert "processingTargets" not in job_view["jobProcessDetails"], job_view
        env.fleet.sync()
        for t in things[:n]:
            assert env.fleet.next_numbers(t, job) == [1], t
            assert env.pending_ids(t) == ([], [job]), t
        for t in things[n:]:
            env.assert_unreleased(job, t)

    check(10, True)
    env.minute()
    check(20, True)
    env.minute()
    check(25, False)
    env.minute()
    check(25, False)


def test_s02_exponential_ramp(env: Env) -> None:
    things = env.things(30)
    job = env.create_job(things, jobExecutionsRolloutConfig=rollout(base=2, factor=2.0,
                                                                     notified=6))
    seen = []
    for minute in range(8):
        if minute:
            env.minute()
        execs = env.executions(job)
        seen.append(len(execs))
        assert sorted(execs) == sorted(things[:len(execs)]), "not released in targets order"
        assert env.counters(job)["numberOfQueuedThings"] == len(execs)
    assert seen == [2, 4, 6, 10, 14, 22, 30, 30]
    assert_one_each(env, job, things)
    job_view = env.job(job)
    assert job_view["isConcurrent"] is False
    assert "processingTargets" not in job_view["jobProcessDetails"]


def test_s03_succeeded_driven_ramp(env: Env) -> None:
    things = env.things(20)
    job = env.create_job(things, jobExecutionsRolloutConfig=rollout(base=2, factor=2.0,
                                                                     succeeded=2))
    assert len(env.released(job)) == 2
    env.device(things[0], job, "SUCCEEDED")
    env.minute()
    assert len(env.released(job)) == 4, "one success of two: the rate stays 2/min"
    env.minute()
    assert len(env.released(job)) == 6, "notified things do not raise a succeeded-driven rate"
    env.device(things[1], job, "SUCCEEDED")
    env.minute()
    assert len(env.released(job)) == 10, "two succeeded: the next minute releases 4"
    env.minute()
    assert len(env.released(job)) == 14, "still 4/min until four have succeeded"
    assert sorted(env.released(job)) == sorted(things[:14])


def test_s04_rollout_validation(env: Env) -> None:
    things = env.things(2)
    bad = [
        rollout(base=1001, factor=2.0, notified=1),
        rollout(base=2, factor=5.1, notified=1),
        rollout(base=2, factor=1.55, notified=1),
        rollout(max_per_minute=1001),
        rollout(base=2, factor=2.0),                     # rateIncreaseCriteria {}
    ]
    for cfg in bad:
        job_id = env.new_job_id("bad")
        assert error_of(env.iot.create_job, jobId=job_id, targets=[thing_arn(things[0])],
                        document="{}", jobExecutionsRolloutConfig=cfg) == INVALID, cfg
        env.assert_not_created(job_id)
    # what botocore itself stops (min bounds), sent as is
    raw_bad = [
        rollout(base=0, factor=2.0, notified=1),
        rollout(base=2, factor=1.0, notified=1),
        rollout(max_per_minute=0),
        rollout(base=2, factor=2.0, notified=0),
    ]
    for cfg in raw_bad:
        job_id = env.new_job_id("bad")
        assert error_of(env.raw.create_job, jobId=job_id, targets=[thing_arn(things[0])],
                        document="{}", jobExecutionsRolloutConfig=cfg) == INVALID, cfg
        env.assert_not_created(job_id)
    for t in things:
        assert env.iot.list_job_executions_for_thing(thingName=t)["executionSummaries"] == []
    # the bounds themselves are accepted
    for cfg in (rollout(max_per_minute=1000), rollout(max_per_minute=1),
                rollout(base=1000, factor=5.0, succeeded=1),
                rollout(base=1, factor=1.1, notified=1, succeeded=1)):
        job_id = env.create_job(things, jobExecutionsRolloutConfig=cfg)
        assert env.job(job_id)["jobExecutionsRolloutConfig"] == cfg


def test_s05_late_joiner(env: Env) -> None:
    things = env.things(6)
    group = env.group(things[:5])
    job = env.create_job(targets=[group_arn(group)], targetSelection="CONTINUOUS",
                         jobExecutionsRolloutConfig=rollout(max_per_minute=1))
    assert env.released(job) == [things[0]]
    job_view = env.job(job)
    assert job_view["isConcurrent"] is True
    assert job_view["jobProcessDetails"].get("processingTargets") == [group_arn(group)]
    env.advance(10)
    env.iot.add_thing_to_thing_group(thingGroupName=group, thingName=things[5])
    # the late joiner is QUEUED at once, outside the rate
    assert env.execution(job, things[5])["status"] == "QUEUED"
    assert sorted(env.released(job)) == sorted([things[0], things[5]])
    env.fleet.wait_next(things[5], job)
    env.fleet.sync()
    for t in things[1:5]:
        env.assert_unreleased(job, t)
    env.advance(50)   # one minute after creation: the rate goes on for the original members
    assert sorted(env.released(job)) == sorted([things[0], things[1], things[5]])
    for _ in range(4):
        env.minute()
    assert sorted(env.released(job)) == sorted(things)
    assert_one_each(env, job, things)


# == 6-9: abort ====================================================================================

def _abort_case_6(env: Env) -> tuple[str, list[str]]:
    """Scenario 6: 10 things, abort {FAILED, 50 %, min 4}; 2 SUCCEEDED, 2 IN_PROGRESS, 2 FAILED
    (the second FAILED makes 4 executed, 2/4 = 50 %)."""
    env.events_on()
    things = env.things(10)
    job = env.create_job(things, abortConfig=abort(("FAILED", 50.0, 4)))
    env.device(things[0], job, "SUCCEEDED")
    env.device(things[1], job, "SUCCEEDED")
    env.device(things[2], job, "IN_PROGRESS")
    env.device(things[3], job, "IN_PROGRESS")
    env.device(things[4], job, "FAILED")
    assert env.job(job)["status"] == "IN_PROGRESS", "3 executed < minNumberOfExecutedThings 4"
    env.device(things[5], job, "FAILED")
    return job, things


def test_s06_abort_fires(env: Env) -> None:
    job, things = _abort_case_6(env)
    job_view = env.job(job)
    assert job_view["status"] == "CANCELED"
    assert job_view["forceCanceled"] is False
    assert REASON_CODE.fullmatch(job_view.get("reasonCode") or ""), job_view.get("reasonCode")
    assert len(job_view["reasonCode"]) <= 128
    assert isinstance(job_view.get("comment"), str) and job_view["comment"].strip()
    assert "completedAt" not in job_view
    assert env.statuses(job) == {
        **{t: ["SUCCEEDED"] for t in things[:2]}, **{t: ["IN_PROGRESS"] for t in things[2:4]},
        **{t: ["FAILED"] for t in things[4:6]}, **{t: ["CANCELED"] for t in things[6:]}}
    for t in things[6:]:
        assert env.execution(job, t)["forceCanceled"] is False
        assert env.pending_ids(t) == ([], [])
    for t in things[2:4]:
        assert env.pending_ids(t) == ([job], [])
    assert env.counters(job) == {**dict.fromkeys(COUNTERS, 0), "numberOfSucceededThings": 2,
                                 "numberOfFailedThings": 2, "numberOfInProgressThings": 2,
                                 "numberOfCanceledThings": 4}
    env.fleet.sync()
    ops = [op for op, _ in env.fleet.job_events(job)]
    assert ops.count("cancellation_in_progress") == 1 and ops.count("canceled") == 1, ops
    assert ops.index("cancellation_in_progress") < ops.index("canceled"), ops
    assert "completed" not in ops
    for op, payload in env.fleet.job_events(job):
        assert payload["eventType"] == "JOB" and payload["jobId"] == job, payload
        assert payload["operation"] == op, payload
    statuses = {op: p["status"] for op, p in env.fleet.job_events(job)}
    assert statuses["cancellation_in_progress"] == "CANCELLATION_IN_PROGRESS"
    assert statuses["canceled"] == "CANCELED"
    canceled = env.fleet.execution_events(job, "canceled")
    assert sorted(p["thingArn"] for p in canceled) == sorted(thing_arn(t) for t in things[6:])
    for p in canceled:
        assert (p["eventType"], p["jobId"], p["status"]) == ("JOB_EXECUTION", job, "CANCELED")
    assert len(env.fleet.execution_events(job, "failed")) == 2
    assert len(env.fleet.execution_events(job, "succeeded")) == 2
    # the devices of the canceled executions are told: nothing next any more
    for t in things[6:]:
        last = env.fleet.next_messages(t)[-1]
        assert "execution" not in last, (t, last)


def test_s07_abort_minimum(env: Env) -> None:
    things = env.things(10)
    job = env.create_job(things, abortConfig=abort(("FAILED", 50.0, 4)))
    for t in things[:3]:
        env.device(t, job, "FAILED")
    job_view = env.job(job)
    assert job_view["status"] == "IN_PROGRESS", "3 FAILED of 3 executed: below the minimum of 4"
    assert job_view["jobProcessDetails"]["numberOfQueuedThings"] == 7
    env.device(things[3], job, "SUCCEEDED")           # 3/4 = 75 % once 4 executed
    job_view = env.job(job)
    assert job_view["status"] == "CANCELED"
    assert job_view["forceCanceled"] is False
    assert REASON_CODE.fullmatch(job_view.get("reasonCode") or "")
    assert job_view.get("comment")
    assert env.counters(job) == {**dict.fromkeys(COUNTERS, 0), "numberOfFailedThings": 3,
                                 "numberOfSucceededThings": 1, "numberOfCanceledThings": 6}


def test_s08_criteria_order_and_all(env: Env) -> None:
    things = env.things(8)
    criteria = (("REJECTED", 100.0, 2), ("ALL", 50.0, 2))
    job = env.create_job(things[:4], abortConfig=abort(*criteria),
                         timeoutConfig={"inProgressTimeoutInMinutes": 1})
    # control: the REJECTED criterion alone does not fire on 1 REJECTED + 1 TIMED_OUT (50 %)
    control = env.create_job(things[4:], abortConfig=abort(criteria[0]),
                             timeoutConfig={"inProgressTimeoutInMinutes": 1})
    for j, (a, b) in ((job, things[:2]), (control, things[4:6])):
        env.device(a, j, "REJECTED")
        assert env.job(j)["status"] == "IN_PROGRESS"
        env.device(b, j, "IN_PROGRESS")
    env.advance(30)
    assert env.execution(job, things[1])["status"] == "IN_PROGRESS"
    assert env.job(job)["status"] == "IN_PROGRESS"
    env.advance(31)
    assert env.execution(job, things[1])["status"] == "TIMED_OUT"
    assert env.execution(control, things[5])["status"] == "TIMED_OUT"
    job_view = env.job(job)
    assert job_view["status"] == "CANCELED"
    assert job_view["forceCanceled"] is False
    assert REASON_CODE.fullmatch(job_view.get("reasonCode") or "")
    assert job_view.get("comment")
    assert env.statuses(job) == {things[0]: ["REJECTED"], things[1]: ["TIMED_OUT"],
                                 things[2]: ["CANCELED"], things[3]: ["CANCELED"]}
    assert env.job(control)["status"] == "IN_PROGRESS"
    assert env.statuses(control)[things[6]] == ["QUEUED"]


def test_s09_after_abort(env: Env) -> None:
    job, things = _abort_case_6(env)
    assert env.job(job)["status"] == "CANCELED"
    env.device(things[2], job, "SUCCEEDED")           # a late result is accepted
    assert env.execution(job, things[2])["status"] == "SUCCEEDED"
    job_view = env.job(job)
    assert job_view["status"] == "CANCELED"
    assert job_view["jobProcessDetails"]["numberOfSucceededThings"] == 3
    env.device(things[3], job, "FAILED")              # every execution terminal now
    job_view = env.job(job)
    assert job_view["status"] == "CANCELED" and "completedAt" not in job_view
    assert job_view["jobProcessDetails"]["numberOfFailedThings"] == 3
    for _ in range(3):
        env.minute()
    assert env.job(job)["status"] == "CANCELED"
    assert_one_each(env, job, things)
    assert len(env.executions(job)) == 10
    env.fleet.sync()
    succeeded = env.fleet.execution_events(job, "succeeded")
    assert thing_arn(things[2]) in [p["thingArn"] for p in succeeded]
    assert len(succeeded) == 3
    assert len(env.fleet.execution_events(job, "failed")) == 3
    ops = [op for op, _ in env.fleet.job_events(job)]
    assert "completed" not in ops, ops
    assert ops.count("canceled") == 1, ops
    # FLEET.md 6.1 [P]: CancelJob of a CANCELED job
    assert error_of(env.iot.cancel_job, jobId=job) == INVALID


# == 10-15: retries ================================================================================

def test_s10_retry_on_failed(env: Env) -> None:
    env.events_on()
    [thing] = env.things(1)
    job = env.create_job([thing], jobExecutionsRetryConfig=retry(("FAILED", 2)))
    for attempt in (1, 2, 3):
        started = env.start_next(thing)
        assert started and started["jobId"] == job, started
        assert started["executionNumber"] == attempt
        env.device(thing, job, "FAILED", executionNumber=attempt)
        if attempt < 3:
            # the retry: a new QUEUED execution, announced, the job still running
            latest = env.execution(job, thing)
            assert latest["executionNumber"] == attempt + 1
            assert latest["status"] == "QUEUED"
            assert latest["versionNumber"] == 1
            assert "startedAt" not in latest
            assert not latest.get("statusDetails", {}).get("detailsMap")
            assert env.execution(job, thing, attempt)["status"] == "FAILED"
            assert env.pending_ids(thing) == ([], [job])
            env.fleet.wait_next(thing, job, attempt + 1)
            assert env.job(job)["status"] == "IN_PROGRESS", "a queued retry keeps it running"
    summaries = env.for_thing(thing, job)
    assert [s["executionNumber"] for s in summaries] == [1, 2, 3]
    assert [s.get("retryAttempt") for s in summaries] == [0, 1, 2]
    assert [s["status"] for s in summaries] == ["FAILED"] * 3
    assert len(env.executions(job)[thing]) == 3
    job_view = env.job(job)
    assert job_view["status"] == "COMPLETED"
    assert job_view.get("completedAt")
    assert env.counters(job) == {**dict.fromkeys(COUNTERS, 0), "numberOfFailedThings": 3}
    assert env.pending_ids(thing) == ([], [])
    # FLEET.md 3.4 [P]: an update to an older attempt meets a terminal record
    assert error_of(env.data.update_job_execution, jobId=job, thingName=thing,
                    status="IN_PROGRESS", executionNumber=1) == \
        ("InvalidStateTransitionException", 409)
    env.fleet.sync()
    assert env.fleet.next_numbers(thing, job) == [1, 2, 3]
    failed = env.fleet.execution_events(job, "failed")
    assert len(failed) == 3 and all(p["status"] == "FAILED" for p in failed)
    completed = [p for op, p in env.fleet.job_events(job) if op == "completed"]
    assert len(completed) == 1
    assert completed[0]["jobProcessDetails"]["numberOfFailedThings"] == 3


def test_s11_retry_on_timed_out(env: Env) -> None:
    [thing] = env.things(1)
    job = env.create_job([thing], timeoutConfig={"inProgressTimeoutInMinutes": 1},
                         jobExecutionsRetryConfig=retry(("TIMED_OUT", 1)))
    assert env.start_next(thing)["executionNumber"] == 1
    env.advance(30)
    assert env.execution(job, thing)["status"] == "IN_PROGRESS"
    env.advance(31)
    assert env.execution(job, thing, 1)["status"] == "TIMED_OUT"
    latest = env.execution(job, thing)
    assert (latest["executionNumber"], latest["status"]) == (2, "QUEUED")
    assert [s.get("retryAttempt") for s in env.for_thing(thing, job)] == [0, 1]
    env.fleet.wait_next(thing, job, 2)
    assert env.job(job)["status"] == "IN_PROGRESS"
    started = env.start_next(thing)
    assert started["executionNumber"] == 2
    env.device(thing, job, "SUCCEEDED", executionNumber=2)
    job_view = env.job(job)
    assert job_view["status"] == "COMPLETED"
    assert env.counters(job) == {**dict.fromkeys(COUNTERS, 0), "numberOfTimedOutThings": 1,
                                 "numberOfSucceededThings": 1}
    env.advance(120)
    assert len(env.for_thing(thing, job)) == 2


def test_s12_not_retried(env: Env) -> None:
    a, b, c1, c2, d = env.things(5)
    # REJECTED is never retried: the job completes
    rejected = env.create_job([a], jobExecutionsRetryConfig=retry(("FAILED", 3)))
    env.device(a, rejected, "REJECTED")
    assert [s["status"] for s in env.for_thing(a, rejected)] == ["REJECTED"]
    assert env.job(rejected)["status"] == "COMPLETED"
    assert env.counters(rejected)["numberOfRejectedThings"] == 1
    # a timeout without a TIMED_OUT criterion: no attempt
    timed = env.create_job([b], jobExecutionsRetryConfig=retry(("FAILED", 3)),
                           timeoutConfig={"inProgressTimeoutInMinutes": 1})
    env.start_next(b)
    env.advance(61)
    assert [s["status"] for s in env.for_thing(b, timed)] == ["TIMED_OUT"]
    assert env.job(timed)["status"] == "COMPLETED"
    # CANCELED (CancelJobExecution) is never retried
    canceled = env.create_job([c1, c2], jobExecutionsRetryConfig=retry(("FAILED", 3)))
    env.iot.cancel_job_execution(jobId=canceled, thingName=c1)
    assert [s["status"] for s in env.for_thing(c1, canceled)] == ["CANCELED"]
    env.device(c2, canceled, "SUCCEEDED")
    assert env.job(canceled)["status"] == "COMPLETED"
    assert len(env.for_thing(c1, canceled)) == 1
    # ALL means FAILED and TIMED_OUT, not REJECTED
    all_job = env.create_job([d], jobExecutionsRetryConfig=retry(("ALL", 2)))
    env.device(d, all_job, "REJECTED")
    assert [s["status"] for s in env.for_thing(d, all_job)] == ["REJECTED"]
    assert env.job(all_job)["status"] == "COMPLETED"
    env.advance(120)
    for thing, job in ((a, rejected), (b, timed), (c1, canceled), (d, all_job)):
        assert len(env.for_thing(thing, job)) == 1, job


def test_s13_retry_validation(env: Env) -> None:
    things = env.things(1)
    bad = [
        retry(("FAILED", 11)),
        retry(("REJECTED", 1)),
        retry(("FAILED", 1), ("TIMED_OUT", 1), ("ALL", 1)),
        retry(("FAILED", 6), ("TIMED_OUT", 5)),
        retry(("ALL", 1), ("FAILED", 1)),
        retry(("FAILED", 1), ("FAILED", 1)),             # FLEET.md 3.4 [P]: duplicate types
    ]
    for cfg in bad:
        job_id = env.new_job_id("bad")
        assert error_of(env.iot.create_job, jobId=job_id, targets=[thing_arn(things[0])],
                        document="{}", jobExecutionsRetryConfig=cfg) == INVALID, cfg
        env.assert_not_created(job_id)
    for cfg in (retry(("FAILED", -1)), {"criteriaList": []}):
        job_id = env.new_job_id("bad")
        assert error_of(env.raw.create_job, jobId=job_id, targets=[thing_arn(things[0])],
                        document="{}", jobExecutionsRetryConfig=cfg) == INVALID, cfg
        env.assert_not_created(job_id)
    assert env.iot.list_job_executions_for_thing(thingName=things[0])["executionSummaries"] == []
    for cfg in (retry(("FAILED", 5), ("TIMED_OUT", 5)), retry(("ALL", 10)),
                retry(("TIMED_OUT", 0))):
        job_id = env.create_job(things, jobExecutionsRetryConfig=cfg)
        assert env.job(job_id)["jobExecutionsRetryConfig"] == cfg


def test_s14_update_job_retries(env: Env) -> None:
    a, b = env.things(2)
    job = env.create_job([a], jobExecutionsRetryConfig=retry(("FAILED", 3)))
    assert error_of(env.iot.update_job, jobId=job,
                    jobExecutionsRetryConfig=retry(("FAILED", 5))) == INVALID
    assert env.job(job)["jobExecutionsRetryConfig"] == retry(("FAILED", 3))
    env.iot.update_job(jobId=job, jobExecutionsRetryConfig=retry(("FAILED", 0)))
    assert env.job(job)["jobExecutionsRetryConfig"] == retry(("FAILED", 0))
    env.device(a, job, "FAILED")
    assert [s["status"] for s in env.for_thing(a, job)] == ["FAILED"]
    assert env.job(job)["status"] == "COMPLETED"
    # no retries at creation: a non-zero count cannot be added later either
    plain = env.create_job([b])
    assert error_of(env.iot.update_job, jobId=plain,
                    jobExecutionsRetryConfig=retry(("FAILED", 2))) == INVALID


def test_s15_abort_drops_queued_retry(env: Env) -> None:
    a, b = env.things(2)
    job = env.create_job([a, b], jobExecutionsRetryConfig=retry(("FAILED", 5)),
                         abortConfig=abort(("FAILED", 50.0, 1)))
    env.start_next(a)
    env.device(a, job, "FAILED")
    job_view = env.job(job)
    assert job_view["status"] == "CANCELED"
    assert REASON_CODE.fullmatch(job_view.get("reasonCode") or "")

    def check() -> None:
        execs = env.executions(job)
        assert [s["status"] for s in execs[a]][0] == "FAILED"
        assert all(s["status"] == "CANCELED" for s in execs[a][1:]), execs[a]
        assert len(execs[a]) <= 2, "at most the one retry created before the abort"
        assert [s["status"] for s in execs[b]] == ["CANCELED"]
        assert env.pending_ids(a) == ([], []) and env.pending_ids(b) == ([], [])
        counters = env.counters(job)
        assert counters["numberOfFailedThings"] == 1
        assert counters["numberOfCanceledThings"] == len(execs[a]) - 1 + 1
        assert counters["numberOfQueuedThings"] == counters["numberOfInProgressThings"] == 0

    check()
    before = env.executions(job)
    for _ in range(3):
        env.minute()
    check()
    assert env.executions(job) == before, "no further attempts"


# == 16-19: scheduling =============================================================================

def test_s16_schedule_validation(env: Env) -> None:
    things = env.things(1)
    now = env.now()
    start = ceil_minute(now + 40 * MINUTE)
    bad = [
        {"startTime": fmt(ceil_minute(now + 10 * MINUTE))},
        {"startTime": fmt(ceil_minute(now + 366 * DAY) + MINUTE)},
        {"startTime": "2024/06/15 19:00"},
        {"startTime": "2024-06-15T19:00"},                                   # in the past
        {"startTime": fmt(start), "endTime": fmt(start + 20 * MINUTE)},
        {"startTime": fmt(ceil_minute(now + 31 * MINUTE)),
         "endTime": fmt(ceil_minute(now + 31 * MINUTE) + (2 * 366 + 1) * DAY)},  # span > 2 y
        {"maintenanceWindows": [{"startTime": "cron(0 12 * * ? *)",
                                 "durationInMinutes": 1431}]},
        {"startTime": fmt(start), "endTime": fmt(start + 60 * MINUTE), "endBehavior": "STOP"},
        {"maintenanceWindows": [{"startTime": "cron(not a cron)",                 # [P] 4.3
                                 "durationInMinutes": 60}]},
    ]
    for cfg in bad:
        job_id = env.new_job_id("bad")
        assert error_of(env.iot.create_job, jobId=job_id, targets=[thing_arn(things[0])],
                        document="{}", schedulingConfig=cfg) == INVALID, cfg
        env.assert_not_created(job_id)
    assert env.iot.list_job_executions_for_thing(thingName=things[0])["executionSummaries"] == []
    # the good neighbours of the bad values are accepted
    for cfg in ({"startTime": fmt(start)},
                {"startTime": fmt(start), "endTime": fmt(start + 30 * MINUTE),
                 "endBehavior": "FORCE_CANCEL"},
                {"maintenanceWindows": [{"startTime": "cron(0 12 * * ? *)",
                                         "durationInMinutes": 1430}]}):
        job_id = env.create_job(things, schedulingConfig=cfg)
        echoed = env.job(job_id)["schedulingConfig"]
        assert {k: echoed.get(k) for k in cfg} == cfg


def test_s17_scheduled_start(env: Env) -> None:
    things = env.things(3)
    group = env.group(things)
    start = ceil_minute(env.now() + 31 * MINUTE)
    job = env.create_job(targets=[group_arn(group)], schedulingConfig={"startTime": fmt(start)})
    job_view = env.job(job)
    assert job_view["status"] == "SCHEDULED"
    assert job_view["schedulingConfig"]["startTime"] == fmt(start)
    assert job_view["isConcurrent"] is False
    assert env.counters(job) == dict.fromkeys(COUNTERS, 0)
    assert env.executions(job) == {}
    env.fleet.sync()
    for t in things:
        env.assert_unreleased(job, t)
        assert env.data.get_pending_job_executions(thingName=t).get("queuedJobs", []) == []
    listed = [j["jobId"] for j in env.iot.list_jobs(status="SCHEDULED")["jobs"]]
    assert job in listed
    scheduled = [j for j in env.iot.list_jobs(thingGroupName=group)["jobs"] if j["jobId"] == job]
    assert scheduled and scheduled[0]["status"] == "SCHEDULED"
    assert job not in [j["jobId"] for j in env.iot.list_jobs(status="IN_PROGRESS")["jobs"]]

    env.advance_to(start - MINUTE)
    assert env.job(job)["status"] == "SCHEDULED"
    assert env.executions(job) == {}
    env.advance(90)                                        # 30 s past startTime
    job_view = env.job(job)
    assert job_view["status"] == "IN_PROGRESS"
    assert env.statuses(job) == {t: ["QUEUED"] for t in things}
    assert env.counters(job)["numberOfQueuedThings"] == 3
    for t in things:
        env.fleet.wait_next(t, job)
        assert env.pending_ids(t) == ([], [job])
    assert job in [j["jobId"] for j in env.iot.list_jobs(status="IN_PROGRESS")["jobs"]]
    assert job not in [j["jobId"] for j in env.iot.list_jobs(status="SCHEDULED")["jobs"]]


def test_schedule_end_time_alone_starts_now(env: Env) -> None:
    things = env.things(2)
    end = ceil_minute(env.now() + 40 * MINUTE)
    job = env.create_job(things, schedulingConfig={"endTime": fmt(end)})
    assert env.job(job)["status"] == "IN_PROGRESS"
    assert env.statuses(job) == {t: ["QUEUED"] for t in things}


def test_cancel_scheduled_job(env: Env) -> None:
    things = env.things(2)
    start = ceil_minute(env.now() + 31 * MINUTE)
    job = env.create_job(things, schedulingConfig={"startTime": fmt(start)})
    assert env.job(job)["status"] == "SCHEDULED"
    env.iot.cancel_job(jobId=job)
    assert env.job(job)["status"] == "CANCELED"
    env.advance_to(start + 2 * MINUTE)
    assert env.job(job)["status"] == "CANCELED"
    assert env.executions(job) == {}


def test_s18_end_behaviours(env: Env) -> None:
    things = env.things(100)
    start = ceil_minute(env.now() + 31 * MINUTE)
    end = start + 30 * MINUTE
    jobs: dict[str, str] = {}
    for behavior in ("STOP_ROLLOUT", "CANCEL", "FORCE_CANCEL", None):
        sched: dict[str, Any] = {"startTime": fmt(start), "endTime": fmt(end)}
        if behavior:
            sched["endBehavior"] = behavior
        jobs[behavior or "default"] = env.create_job(
            things, tag=(behavior or "default").lower().replace("_", ""),
            schedulingConfig=sched, jobExecutionsRolloutConfig=rollout(max_per_minute=1))
    for job in jobs.values():
        assert env.job(job)["status"] == "SCHEDULED"
    now = env.advance_to(start - 30)
    acted = False
    while now < end + 30:
        now = env.minute()
        if not acted and now >= start + 3 * MINUTE:
            # by now things[0..3] have their executions in every job
            for job in jobs.values():
                env.device(things[0], job, "SUCCEEDED")
                env.device(things[1], job, "IN_PROGRESS")
                env.device(things[2], job, "IN_PROGRESS")
            acted = True
        if now < end:
            for job in jobs.values():
                assert env.job(job)["status"] == "IN_PROGRESS"
    counts = {name: len(env.executions(job)) for name, job in jobs.items()}
    for name, n in counts.items():
        assert 29 <= n <= 31, f"{name}: {n} executions in a 30-minute schedule at 1/min"
    for _ in range(3):
        env.minute()
    assert {name: len(env.executions(job)) for name, job in jobs.items()} == counts, \
        "released after endTime"
    for name, job in jobs.items():
        execs = env.executions(job)
        n = counts[name]
        assert sorted(execs) == sorted(things[:n])
        assert_one_each(env, job, things)
        for t in things[n:]:
            assert env.for_thing(t, job) == []

    # STOP_ROLLOUT (and no endBehavior: STOP_ROLLOUT, FLEET.md 4.3 [P]): existing executions
    # run on; COMPLETED when they end
    for name in ("STOP_ROLLOUT", "default"):
        job, n = jobs[name], counts[name]
        job_view = env.job(job)
        assert job_view["status"] == "IN_PROGRESS", name
        assert env.statuses(job) == {
            things[0]: ["SUCCEEDED"], things[1]: ["IN_PROGRESS"], things[2]: ["IN_PROGRESS"],
            **{t: ["QUEUED"] for t in things[3:n]}}
        for t in things[1:n]:
            env.device(t, job, "SUCCEEDED")
        assert env.job(job)["status"] == "COMPLETED", name
        assert env.counters(job)["numberOfSucceededThings"] == n

    # CANCEL: QUEUED -> CANCELED, IN_PROGRESS go on, job CANCELED
    job, n = jobs["CANCEL"], counts["CANCEL"]
    job_view = env.job(job)
    assert job_view["status"] == "CANCELED"
    assert job_view["forceCanceled"] is False
    assert env.statuses(job) == {
        things[0]: ["SUCCEEDED"], things[1]: ["IN_PROGRESS"], things[2]: ["IN_PROGRESS"],
        **{t: ["CANCELED"] for t in things[3:n]}}
    assert env.counters(job)["numberOfCanceledThings"] == n - 3
    env.device(things[1], job, "SUCCEEDED")
    assert env.execution(job, things[1])["status"] == "SUCCEEDED"
    assert env.job(job)["status"] == "CANCELED"

    # FORCE_CANCEL: every non-terminal execution CANCELED, forceCanceled
    job, n = jobs["FORCE_CANCEL"], counts["FORCE_CANCEL"]
    job_view = env.job(job)
    assert job_view["status"] == "CANCELED"
    assert job_view["forceCanceled"] is True
    assert env.statuses(job) == {things[0]: ["SUCCEEDED"],
                                 **{t: ["CANCELED"] for t in things[1:n]}}
    for t in things[1:3]:
        assert env.execution(job, t)["forceCanceled"] is True
    assert env.counters(job)["numberOfCanceledThings"] == n - 1


def _window(now: float, lead_minutes: int = 5) -> tuple[float, str]:
    """A daily window starting `lead_minutes` (rounded up to the minute) from now:
    (its first start, its 6-field EventBridge cron expression, UTC)."""
    start = ceil_minute(now) + lead_minutes * MINUTE
    tm = time.gmtime(start)
    return start, f"cron({tm.tm_min} {tm.tm_hour} * * ? *)"


def test_s19_maintenance_window(env: Env) -> None:
    things = env.things(70)
    opens, expr = _window(env.now())
    job = env.create_job(things, jobExecutionsRolloutConfig=rollout(max_per_minute=1),
                         schedulingConfig={"maintenanceWindows": [
                             {"startTime": expr, "durationInMinutes": 60}]})
    job_view = env.job(job)
    assert job_view["status"] == "SCHEDULED", "created outside its window"
    starts = [parse_fmt(r["startTime"]) for r in job_view.get("scheduledJobRollouts", [])]
    assert starts == [opens + k * DAY for k in range(7)], job_view.get("scheduledJobRollouts")
    assert env.executions(job) == {}

    env.advance_to(opens + 30)
    assert env.job(job)["status"] == "IN_PROGRESS"
    assert env.released(job) == [things[0]]
    assert env.pending_ids(things[0]) == ([], [job])
    env.fleet.wait_next(things[0], job)
    for k in range(1, 60):
        env.minute()
        assert len(env.released(job)) == k + 1, f"minute {k} of the window"
    assert sorted(env.released(job)) == sorted(things[:60])

    env.minute()                                            # the window closed
    job_view = env.job(job)
    assert job_view["status"] == "SCHEDULED"
    assert len(env.released(job)) == 60
    starts = [parse_fmt(r["startTime"]) for r in job_view.get("scheduledJobRollouts", [])]
    assert starts == [opens + k * DAY for k in range(1, 8)]
    for t in (things[0], things[59]):
        assert env.execution(job, t)["status"] == "QUEUED"
        assert env.pending_ids(t) == ([], []), f"{t}: QUEUED execution visible outside window"
        assert env.start_next(t) is None
        assert env.execution(job, t)["status"] == "QUEUED"
    for _ in range(3):
        env.minute()
    assert len(env.released(job)) == 60, "released outside the window"

    env.advance_to(opens + DAY + 30)                       # the next day's window
    assert env.job(job)["status"] == "IN_PROGRESS"
    assert sorted(env.released(job)) == sorted(things[:61])
    for t in (things[0], things[60]):
        assert env.pending_ids(t) == ([], [job])
    assert_one_each(env, job, things)


# == 25: limits ====================================================================================

def test_s25_limits_targets(env: Env) -> None:
    things = env.things(102)
    snapshot = env.create_job(things[:1])
    assert error_of(env.iot.associate_targets_with_job, jobId=snapshot,
                    targets=[thing_arn(things[1])]) == INVALID
    assert env.job(snapshot)["targets"] == [thing_arn(things[0])]
    # more than 100 targets on a continuous job
    too_many = env.new_job_id("many")
    assert error_of(env.iot.create_job, jobId=too_many, targets=[thing_arn(t) for t in things[:101]],
                    document="{}", targetSelection="CONTINUOUS") == LIMIT
    env.assert_not_created(too_many)
    full = env.create_job(things[:100], targetSelection="CONTINUOUS")
    assert error_of(env.iot.associate_targets_with_job, jobId=full,
                    targets=[thing_arn(things[100])]) == LIMIT
    assert len(env.job(full)["targets"]) == 100
    assert env.for_thing(things[100], full) == []
    # room left: accepted, and the new target gets its execution
    room = env.create_job(things[:99], targetSelection="CONTINUOUS")
    env.iot.associate_targets_with_job(jobId=room, targets=[thing_arn(things[101])])
    assert len(env.job(room)["targets"]) == 100
    assert [s["status"] for s in env.for_thing(things[101], room)] == ["QUEUED"]
    # a continuous job that is not IN_PROGRESS
    env.iot.cancel_job(jobId=room)
    assert error_of(env.iot.associate_targets_with_job, jobId=room,
                    targets=[thing_arn(things[100])]) == INVALID


def test_s25_eleventh_concurrent_delete(env: Env) -> None:
    """At most 10 jobs in DELETION_IN_PROGRESS (FLEET.md 7). A deletion must therefore last
    some of jobsd's clock; this test assumes it ends within an hour of it."""
    [thing] = env.things(1)
    jobs = [env.create_job([thing], tag=f"del{i}") for i in range(11)]
    for job in jobs:
        env.iot.cancel_job(jobId=job)
    for job in jobs[:10]:
        env.iot.delete_job(jobId=job)
    for job in jobs[:10]:
        assert env.iot.describe_job(jobId=job)["job"]["status"] == "DELETION_IN_PROGRESS"
    assert error_of(env.iot.delete_job, jobId=jobs[10]) == LIMIT
    assert env.job(jobs[10])["status"] == "CANCELED"
    env.advance(3600)
    for job in jobs[:10]:
        assert error_of(env.iot.describe_job, jobId=job) == NOT_FOUND
    env.iot.delete_job(jobId=jobs[10])


# == beyond the list ==============================================================================

def test_abort_validation(env: Env) -> None:
    things = env.things(1)

    def one(kind: Any = "FAILED", action: Any = "CANCEL", pct: Any = 50.0,
            least: Any = 1) -> dict[str, Any]:
        return {"criteriaList": [{"failureType": kind, "action": action,
                                  "thresholdPercentage": pct, "minNumberOfExecutedThings": least}]}

    for cfg in (one(pct=100.01), one(pct=10.999), one(pct=-1.0), one(kind="BOGUS"),
                one(action="DELETE")):
        job_id = env.new_job_id("bad")
        assert error_of(env.iot.create_job, jobId=job_id, targets=[thing_arn(things[0])],
                        document="{}", abortConfig=cfg) == INVALID, cfg
        env.assert_not_created(job_id)
    for cfg in (one(least=0), {"criteriaList": []}):
        job_id = env.new_job_id("bad")
        assert error_of(env.raw.create_job, jobId=job_id, targets=[thing_arn(things[0])],
                        document="{}", abortConfig=cfg) == INVALID, cfg
        env.assert_not_created(job_id)
    for cfg in (one(pct=10.99), one(pct=100.0, kind="ALL"), one(kind="TIMED_OUT")):
        job_id = env.create_job(things, abortConfig=cfg)
        assert env.job(job_id)["abortConfig"] == cfg


def test_rollout_order_and_dedup(env: Env) -> None:
    """FLEET.md 1.4 [P]: targets order, groups in membership order, one execution per thing
    reached through several targets."""
    things = env.things(4)
    group = env.group([things[2], things[0], things[1]])
    job = env.create_job(targets=[thing_arn(things[3]), group_arn(group), thing_arn(things[0])],
                         jobExecutionsRolloutConfig=rollout(max_per_minute=1))
    order = [things[3], things[2], things[0], things[1]]
    for k in range(1, 6):
        assert sorted(env.released(job)) == sorted(order[:min(k, 4)]), f"minute {k - 1}"
        env.minute()
    assert_one_each(env, job, things)


def test_completed_waits_for_rollout(env: Env) -> None:
    """FLEET.md 6.1 [P]: COMPLETED only once the rollout is done."""
    things = env.things(2)
    job = env.create_job(things, jobExecutionsRolloutConfig=rollout(max_per_minute=1))
    env.device(things[0], job, "SUCCEEDED")
    assert env.job(job)["status"] == "IN_PROGRESS", "a thing is still to be released"
    env.minute()
    env.device(things[1], job, "SUCCEEDED")
    assert env.job(job)["status"] == "COMPLETED"


def test_retry_bypasses_rate(env: Env) -> None:
    """FLEET.md 1.4 [P]: a retry attempt is queued at once and does not use the minute's rate."""
    things = env.things(3)
    job = env.create_job(things, jobExecutionsRolloutConfig=rollout(max_per_minute=1),
                         jobExecutionsRetryConfig=retry(("FAILED", 1)))
    env.device(things[0], job, "FAILED")
    assert [s["status"] for s in env.for_thing(things[0], job)] == ["FAILED", "QUEUED"]
    assert env.released(job) == [things[0]]
    env.minute()
    assert sorted(env.released(job)) == sorted(things[:2])
    env.minute()
    assert sorted(env.released(job)) == sorted(things)


def test_update_job_rollout_takes_effect_next_minute(env: Env) -> None:
    things = env.things(30)
    job = env.create_job(things, jobExecutionsRolloutConfig=rollout(max_per_minute=2))
    env.minute()
    assert len(env.released(job)) == 4
    env.iot.update_job(jobId=job, jobExecutionsRolloutConfig=rollout(max_per_minute=5))
    assert env.job(job)["jobExecutionsRolloutConfig"] == rollout(max_per_minute=5)
    assert len(env.released(job)) == 4, "no burst at the update"
    env.minute()
    assert len(env.released(job)) == 9
    env.minute()
    assert len(env.released(job)) == 14
    env.iot.update_job(jobId=job, jobExecutionsRolloutConfig=rollout(max_per_minute=1))
    env.minute()
    assert len(env.released(job)) == 15
    assert error_of(env.iot.update_job, jobId=job,
                    jobExecutionsRolloutConfig=rollout(max_per_minute=1001)) == INVALID
    assert env.job(job)["jobExecutionsRolloutConfig"] == rollout(max_per_minute=1)
    env.minute()
    assert len(env.released(job)) == 16
    # an exponential ramp replaces the constant rate
    env.iot.update_job(jobId=job, jobExecutionsRolloutConfig=rollout(base=3, factor=2.0,
                                                                     notified=1000))
    env.minute()
    assert len(env.released(job)) == 19
    assert sorted(env.released(job)) == sorted(things[:19])
    assert_one_each(env, job, things)


# == restarts =====================================================================================

def test_restart_mid_rollout(env: Env) -> None:
    things = env.things(30)
    job = env.create_job(things, jobExecutionsRolloutConfig=rollout(base=2, factor=2.0,
                                                                     notified=6))
    seen = [len(env.released(job))]
    for _ in range(3):
        env.minute()
        seen.append(len(env.released(job)))
    assert seen == [2, 4, 6, 10]
    env.restart()
    assert len(env.released(job)) == 10, "released or lost at the restart"
    assert env.job(job)["isConcurrent"] is True
    for _ in range(4):
        env.minute()
        seen.append(len(env.released(job)))
    assert seen == [2, 4, 6, 10, 14, 22, 30, 30], "the ramp's step is kept across a restart"
    assert sorted(env.released(job)) == sorted(things)
    assert_one_each(env, job, things)


def test_restart_mid_window(env: Env) -> None:
    things = env.things(10)
    opens, expr = _window(env.now())
    job = env.create_job(things, jobExecutionsRolloutConfig=rollout(max_per_minute=1),
                         schedulingConfig={"maintenanceWindows": [
                             {"startTime": expr, "durationInMinutes": 5}]})
    env.advance_to(opens + 30)
    env.minute()
    assert sorted(env.released(job)) == sorted(things[:2])
    env.restart()                                          # inside the window
    assert env.job(job)["status"] == "IN_PROGRESS"
    assert sorted(env.released(job)) == sorted(things[:2])
    assert env.pending_ids(things[0]) == ([], [job])
    for k in (3, 4, 5):                                    # opens + 2.5, 3.5, 4.5 min
        env.minute()
        assert len(env.released(job)) == k
    env.minute()                                           # opens + 5.5 min: closed
    assert env.job(job)["status"] == "SCHEDULED"
    assert env.pending_ids(things[0]) == ([], [])
    env.restart()                                          # outside the window
    assert env.job(job)["status"] == "SCHEDULED"
    assert len(env.released(job)) == 5
    assert env.pending_ids(things[0]) == ([], []), "hidden execution visible after a restart"
    env.minute()
    assert len(env.released(job)) == 5
    env.advance_to(opens + DAY + 30)
    assert env.job(job)["status"] == "IN_PROGRESS"
    assert sorted(env.released(job)) == sorted(things[:6])
    assert env.pending_ids(things[0]) == ([], [job])
    assert_one_each(env, job, things)


def test_restart_with_retry_pending(env: Env) -> None:
    a, b = env.things(2)
    job = env.create_job([a, b], timeoutConfig={"inProgressTimeoutInMinutes": 1},
                         jobExecutionsRetryConfig=retry(("FAILED", 2), ("TIMED_OUT", 1)))
    env.start_next(a)
    env.device(a, job, "FAILED")                         # a: retry #2 queued
    env.start_next(b)                                    # b: its timer runs
    assert [s["status"] for s in env.for_thing(a, job)] == ["FAILED", "QUEUED"]
    env.restart()
    summaries = env.for_thing(a, job)
    assert [(s["executionNumber"], s["status"], s.get("retryAttempt")) for s in summaries] == \
        [(1, "FAILED", 0), (2, "QUEUED", 1)]
    assert env.pending_ids(a) == ([], [job])
    assert env.execution(job, b)["status"] == "IN_PROGRESS"
    env.advance(61)                                      # b times out after the restart
    assert [(s["executionNumber"], s["status"]) for s in env.for_thing(b, job)] == \
        [(1, "TIMED_OUT"), (2, "QUEUED")]
    env.restart()
    for _ in range(2):
        env.minute()
    assert len(env.for_thing(a, job)) == 2 and len(env.for_thing(b, job)) == 2, \
        "a retry created twice"
    for thing in (a, b):
        started = env.start_next(thing)
        assert started and started["executionNumber"] == 2
        env.device(thing, job, "SUCCEEDED", executionNumber=2)
    assert env.job(job)["status"] == "COMPLETED"
    assert env.counters(job) == {**dict.fromkeys(COUNTERS, 0), "numberOfFailedThings": 1,
                                 "numberOfTimedOutThings": 1, "numberOfSucceededThings": 2}
