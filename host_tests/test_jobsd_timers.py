"""jobsd timers (PROTOCOL.md 3.3): step timers, the job's in-progress timer, TIMED_OUT with its
events, and timers surviving a restart. A real mosquitto and jobsd with `--minute-seconds 0.2`
(one timer minute is 0.2 s); paho is the device, boto3 the operator.

No sleeps: to show that a timer has *not* fired, a test runs a second execution with a shorter
timer as a clock and checks the first one after the second has timed out.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Optional
from collections.abc import Callable, Iterator

import pytest
from botocore.exceptions import ClientError

from iotjobs_host import stack
from iotjobs_host.stack import Jobsd
from test_jobsd import Device, arn, error_code

MINUTE = 0.2  # seconds per timer minute in these tests


JOBSD_EXTRA = ["--minute-seconds", str(MINUTE)]


@pytest.fixture(scope="module")
def broker(module_broker: stack.Mosquitto) -> stack.Mosquitto:
    return module_broker


@pytest.fixture(scope="module")
def jobsd(module_jobsd: Jobsd) -> Jobsd:
    """One jobsd for the module (conftest); each test works on fresh names."""
    return module_jobsd


@pytest.fixture
def devices(jobsd: Jobsd, broker: stack.Mosquitto) -> Iterator[Callable[[], Device]]:
    opened: list[Device] = []

    def make() -> Device:
        name = f"timer-{uuid.uuid4().hex[:10]}"
        jobsd.iot.create_thing(thingName=name)
        dev = Device(broker.port, name)
        opened.append(dev)
        return dev

    yield make
    for dev in opened:
        dev.close()


def create_job(jobsd: Jobsd, things: list[str], **options: Any) -> str:
    job_id = f"job-{uuid.uuid4().hex[:12]}"
    jobsd.iot.create_job(jobId=job_id, targets=[arn(t) for t in things],
                         document=json.dumps({"operation": "test"}), **options)
    return job_id


def next_event(device: Device, timeout: float = 10.0) -> tuple[str, Any]:
    """The next notify / notify-next the device receives (replies are not expected here)."""
    topic, body = device.inbox.get(timeout=timeout)
    assert topic in ("notify", "notify-next"), f"unexpected {topic}: {body}"
    return topic, body


def wait_status(jobsd: Jobsd, job: str, thing: str, status: str, timeout: float = 10.0
                ) -> dict[str, Any]:
    def reached() -> Optional[dict[str, Any]]:
        ex = jobsd.iot.describe_job_execution(jobId=job, thingName=thing)["execution"]
        return ex if ex["status"] == status else None
    return stack.wait_until(reached, timeout, f"{job} on {thing} to become {status}", 0.02)


def status_of(jobsd: Jobsd, job: str, thing: str) -> str:
    return jobsd.iot.describe_job_execution(jobId=job, thingName=thing)["execution"]["status"]


# -- step timer --------------------------------------------------------------------------------

def test_step_timer_from_start_next_times_out(jobsd: Jobsd, devices: Callable[[], Device]
                                              ) -> None:
    dev = devices()
    job = create_job(jobsd, [dev.thing])
    dev.sync()
    started = time.monotonic()
    outcome, body, _ = dev.request("start-next", {"stepTimeoutInMinutes": 1})
    assert outcome == "accepted" and body["execution"]["versionNumber"] == 2
    # the expiry is a service transition: the execution leaves the pending list -> both events
    assert next_event(dev) == ("notify", {"timestamp": pytest.approx(time.time(), abs=5),
                                          "jobs": {}})
    topic, nxt = next_event(dev)
    assert topic == "notify-next" and set(nxt) == {"timestamp"}
    assert time.monotonic() - started >= MINUTE - 0.05
    ex = jobsd.iot.describe_job_execution(jobId=job, thingName=dev.thing)["execution"]
    assert ex["status"] == "TIMED_OUT" and ex["versionNumber"] == 3
    assert "approximateSecondsBeforeTimedOut" not in ex
    view = jobsd.iot.describe_job(jobId=job)["job"]
    assert view["status"] == "COMPLETED"
    assert view["jobProcessDetails"]["numberOfTimedOutThings"] == 1
    assert view["jobProcessDetails"]["numberOfInProgressThings"] == 0
    outcome, body, _ = dev.request(f"{job}/update", {"status": "SUCCEEDED"})
    assert outcome == "rejected" and body["code"] == "InvalidStateTransition"
    assert body["executionState"] == {"status": "TIMED_OUT", "versionNumber": 3}


def test_timed_out_first_job_moves_next_to_the_second(jobsd: Jobsd,
                                                      devices: Callable[[], Device]) -> None:
    dev = devices()
    first = create_job(jobsd, [dev.thing])
    second = create_job(jobsd, [dev.thing])
    dev.sync()
    outcome, body, _ = dev.request(f"{first}/update", {"status": "IN_PROGRESS",
                                                       "stepTimeoutInMinutes": 1})
    assert outcome == "accepted"
    topic, notify = next_event(dev)
    assert topic == "notify" and list(notify["jobs"]) == ["QUEUED"]
    assert [j["jobId"] for j in notify["jobs"]["QUEUED"]] == [second]
    topic, nxt = next_event(dev)
    assert topic == "notify-next" and nxt["execution"]["jobId"] == second
    assert nxt["execution"]["status"] == "QUEUED"
    assert jobsd.iot.describe_job(jobId=first)["job"]["status"] == "COMPLETED"


def test_update_replaces_and_cancels_the_step_timer(jobsd: Jobsd,
                                                    devices: Callable[[], Device]) -> None:
    dev, clock = devices(), devices()
    job = create_job(jobsd, [dev.thing, clock.thing])
    dev.request("start-next", {"stepTimeoutInMinutes": 2})
    # a new value replaces the old timer, measured from this update: 50 min = 10 s
    outcome, _, _ = dev.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                  "stepTimeoutInMinutes": 50})
    assert outcome == "accepted"
    left = jobsd.data.describe_job_execution(thingName=dev.thing, jobId=job)["execution"]
    assert 8 <= left["approximateSecondsBeforeTimedOut"] <= 10
    # the clock execution's 2-minute timer (0.4 s) runs out; the replaced one did not fire
    clock.request("start-next", {"stepTimeoutInMinutes": 2})
    wait_status(jobsd, job, clock.thing, "TIMED_OUT")
    assert status_of(jobsd, job, dev.thing) == "IN_PROGRESS"
    # -1 cancels the step timer: no timer runs, nothing to report over REST
    outcome, body, _ = dev.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                     "stepTimeoutInMinutes": -1,
                                                     "includeJobExecutionState": True})
    assert outcome == "accepted" and body["executionState"]["versionNumber"] == 4
    described = jobsd.data.describe_job_execution(thingName=dev.thing, jobId=job)["execution"]
    assert "approximateSecondsBeforeTimedOut" not in described
    started = jobsd.data.start_next_pending_job_execution(thingName=dev.thing)["execution"]
    assert started["jobId"] == job and "approximateSecondsBeforeTimedOut" not in started
    # an update without stepTimeoutInMinutes keeps whatever timer there is (none here)
    outcome, _, _ = dev.request(f"{job}/update", {"status": "SUCCEEDED"})
    assert outcome == "accepted"
    details = jobsd.iot.describe_job(jobId=job)["job"]["jobProcessDetails"]
    assert (details["numberOfSucceededThings"], details["numberOfTimedOutThings"]) == (1, 1)


def test_start_next_on_in_progress_execution_keeps_its_timer(jobsd: Jobsd,
                                                             devices: Callable[[], Device]
                                                             ) -> None:
    """stepTimeoutInMinutes on start-next applies when it moves QUEUED->IN_PROGRESS (as its
    statusDetails do, PROTOCOL.md 1.5); a start-next that returns the execution already
    IN_PROGRESS changes nothing."""
    dev = devices()
    job = create_job(jobsd, [dev.thing])
    dev.request("start-next", {"stepTimeoutInMinutes": 50})
    outcome, body, events = dev.request("start-next", {"stepTimeoutInMinutes": 1})
    assert outcome == "accepted" and body["execution"]["versionNumber"] == 2 and events == []
    left = jobsd.data.describe_job_execution(thingName=dev.thing, jobId=job)["execution"]
    assert left["approximateSecondsBeforeTimedOut"] >= 8


# -- in-progress timer -------------------------------------------------------------------------

def test_in_progress_timer_caps_step_timers_and_ignores_queued(jobsd: Jobsd,
                                                               devices: Callable[[], Device]
                                                               ) -> None:
    runner, waiter = devices(), devices()
    job = create_job(jobsd, [runner.thing, waiter.thing],
                     timeoutConfig={"inProgressTimeoutInMinutes": 3})  # 0.6 s
    runner.sync()
    started = time.monotonic()
    outcome, body, _ = runner.request("start-next", {"stepTimeoutInMinutes": 100})  # 20 s
    assert outcome == "accepted"
    rest = jobsd.data.describe_job_execution(thingName=runner.thing, jobId=job)["execution"]
    assert rest["approximateSecondsBeforeTimedOut"] <= 1  # capped by the in-progress deadline
    control = jobsd.iot.describe_job_execution(jobId=job, thingName=runner.thing)["execution"]
    assert control["approximateSecondsBeforeTimedOut"] <= 1
    # a later, longer step timer cannot extend past the in-progress deadline either
    outcome, _, _ = runner.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                     "stepTimeoutInMinutes": 200})
    assert outcome == "accepted"
    assert next_event(runner)[0] == "notify"
    assert next_event(runner)[0] == "notify-next"
    elapsed = time.monotonic() - started
    assert 3 * MINUTE - 0.05 <= elapsed < 10, elapsed
    assert status_of(jobsd, job, runner.thing) == "TIMED_OUT"
    # the waiter never started: no in-progress clock runs for a QUEUED execution
    assert status_of(jobsd, job, waiter.thing) == "QUEUED"
    view = jobsd.iot.describe_job(jobId=job)["job"]
    assert view["status"] == "IN_PROGRESS"  # not every execution is terminal yet
    assert view["jobProcessDetails"]["numberOfTimedOutThings"] == 1
    assert view["jobProcessDetails"]["numberOfQueuedThings"] == 1
    # the waiter's clock starts with its own start: it is IN_PROGRESS and then times out too
    outcome, body, _ = waiter.request("start-next", {})
    assert outcome == "accepted" and body["execution"]["jobId"] == job
    wait_status(jobsd, job, waiter.thing, "TIMED_OUT")
    assert jobsd.iot.describe_job(jobId=job)["job"]["status"] == "COMPLETED"


def test_terminal_update_stops_the_timers(jobsd: Jobsd, devices: Callable[[], Device]) -> None:
    done, clock = devices(), devices()
    job = create_job(jobsd, [done.thing, clock.thing],
                     timeoutConfig={"inProgressTimeoutInMinutes": 2})
    done.request("start-next", {"stepTimeoutInMinutes": 1})
    outcome, _, _ = done.request(f"{job}/update", {"status": "SUCCEEDED"})
    assert outcome == "accepted"
    clock.request("start-next", {})
    wait_status(jobsd, job, clock.thing, "TIMED_OUT")
    ex = jobsd.iot.describe_job_execution(jobId=job, thingName=done.thing)["execution"]
    assert ex["status"] == "SUCCEEDED" and ex["versionNumber"] == 3


# -- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 10081, -1, -2, "5", 1.5, True])
def test_bad_start_next_step_timeout(jobsd: Jobsd, devices: Callable[[], Device],
                                     value: Any) -> None:
    dev = devices()
    job = create_job(jobsd, [dev.thing])
    outcome, body, _ = dev.request("start-next", {"stepTimeoutInMinutes": value})
    assert outcome == "rejected" and body["code"] == "InvalidRequest", body
    assert status_of(jobsd, job, dev.thing) == "QUEUED"  # nothing applied


@pytest.mark.parametrize("value", [0, 10081, -2, "10"])
def test_bad_update_step_timeout(jobsd: Jobsd, devices: Callable[[], Device], value: Any
                                 ) -> None:
    dev = devices()
    job = create_job(jobsd, [dev.thing])
    outcome, body, _ = dev.request(f"{job}/update", {"status": "IN_PROGRESS",
                                                     "stepTimeoutInMinutes": value})
    assert outcome == "rejected" and body["code"] == "InvalidRequest", body


def test_step_timeout_limits_accepted(jobsd: Jobsd, devices: Callable[[], Device]) -> None:
    dev = devices()
    job = create_job(jobsd, [dev.thing])
    outcome, _, _ = dev.request("start-next", {"stepTimeoutInMinutes": 10080})
    assert outcome == "accepted"
    left = jobsd.data.describe_job_execution(thingName=dev.thing, jobId=job)["execution"]
    assert left["approximateSecondsBeforeTimedOut"] == pytest.approx(10080 * MINUTE, abs=2)
    with pytest.raises(ClientError) as err:
        jobsd.data.start_next_pending_job_execution(thingName=dev.thing, stepTimeoutInMinutes=0)
    assert error_code(err) == ("InvalidRequestException", 400)
    with pytest.raises(ClientError) as err:
        jobsd.data.update_job_execution(thingName=dev.thing, jobId=job, status="IN_PROGRESS",
                                        stepTimeoutInMinutes=10081)
    assert error_code(err) == ("InvalidRequestException", 400)


@pytest.mark.parametrize("minutes", [0, 10081, -1])
def test_bad_in_progress_timeout(jobsd: Jobsd, devices: Callable[[], Device],
                                 minutes: int) -> None:
    dev = devices()
    with pytest.raises(ClientError) as err:
        create_job(jobsd, [dev.thing], timeoutConfig={"inProgressTimeoutInMinutes": minutes})
    assert error_code(err) == ("InvalidRequestException", 400)
    assert jobsd.iot.list_job_executions_for_thing(thingName=dev.thing)["executionSummaries"] == []


# -- restart -----------------------------------------------------------------------------------

def test_timers_resume_after_restart(tmp_path: Path, mosquitto: stack.Mosquitto) -> None:
    broker = mosquitto  # a broker of its own: the module's jobsd would answer requests too
    db = str(tmp_path / "jobs.db")
    options = ["--minute-seconds", str(MINUTE)]
    first = Jobsd(str(tmp_path), broker.broker, db=db, extra=options, log_name="jobsd1.log")
    second: Optional[Jobsd] = None
    devs: list[Device] = []
    try:
        for name in ("early", "late"):
            first.iot.create_thing(thingName=f"{name}-{tmp_path.name}")
        early, late = (Device(broker.port, f"{n}-{tmp_path.name}") for n in ("early", "late"))
        devs += [early, late]
        job = create_job(first, [early.thing, late.thing])
        outcome, _, _ = early.request("start-next", {"stepTimeoutInMinutes": 1})  # 0.2 s
        assert outcome == "accepted"
        outcome, _, _ = late.request("start-next", {"stepTimeoutInMinutes": 12})  # 2.4 s
        assert outcome == "accepted"
        late_started = time.time()
        early.sync()  # drain the creation events
        late.sync()
        assert first.stop() == 0
        # the stored deadlines are absolute
        with sqlite3.connect(db) as conn:
            deadlines = dict(conn.execute(
                "SELECT thing_name, timeout_at FROM executions WHERE job_id=?", (job,)))
        assert deadlines[late.thing] == pytest.approx(late_started + 12 * MINUTE, abs=1)
        stack.wait_until(lambda: time.time() > deadlines[early.thing] + 0.1, 5,
                         "the early deadline to pass while jobsd is down")
        for dev in devs:  # nothing was published while jobsd was down
            assert dev.inbox.empty()
        second = Jobsd(str(tmp_path), broker.broker, db=db, extra=options,
                       log_name="jobsd2.log")
        # the deadline that passed while jobsd was down fires right after start
        assert next_event(early, timeout=5)[0] == "notify"
        assert status_of(second, job, early.thing) == "TIMED_OUT"
        assert status_of(second, job, late.thing) == "IN_PROGRESS"
        # the other one still fires on time after the restart
        assert next_event(late, timeout=15)[0] == "notify"
        assert time.time() >= deadlines[late.thing] - 0.05
        assert status_of(second, job, late.thing) == "TIMED_OUT"
        assert second.iot.describe_job(jobId=job)["job"]["status"] == "COMPLETED"
    finally:
        for dev in devs:
            dev.close()
        if second is not None:
            second.stop()
        first.stop()


def test_no_spurious_events_from_timer_thread(jobsd: Jobsd, devices: Callable[[], Device]
                                              ) -> None:
    """A job with an in-progress timeout that finishes in time publishes only what the device's
    own updates cause."""
    dev = devices()
    job = create_job(jobsd, [dev.thing], timeoutConfig={"inProgressTimeoutInMinutes": 1})
    dev.sync()
    dev.request("start-next", {"stepTimeoutInMinutes": 1})
    outcome, _, events = dev.request(f"{job}/update", {"status": "SUCCEEDED"})
    assert outcome == "accepted" and [t for t, _ in events] == ["notify", "notify-next"]
    # wait past both deadlines with another execution as the clock; nothing else arrives
    clock = devices()
    clock_job = create_job(jobsd, [clock.thing])
    clock.request("start-next", {"stepTimeoutInMinutes": 2})
    wait_status(jobsd, clock_job, clock.thing, "TIMED_OUT")
    assert dev.sync() == []
    with pytest.raises(queue.Empty):
        dev.inbox.get_nowait()
