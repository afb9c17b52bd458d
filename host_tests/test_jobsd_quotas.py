"""The account quotas FLEET.md 7 leaves configurable: active jobs and job concurrency.

AWS does not publish their defaults, so jobsd takes them as options (`--max-active-jobs`,
`--max-concurrent-jobs`, off by default). Real jobsd processes; the clock is moved through the
test hook, never waited for."""
from __future__ import annotations

import datetime
import json
import urllib.request

import pytest
from botocore.exceptions import ClientError

from iotjobs_host import stack


def advance(j: stack.Jobsd, seconds: float) -> float:
    req = urllib.request.Request(j.control_url + "/_jobsd/test-hooks", method="PUT",
                                 data=json.dumps({"advanceClock": seconds}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["now"]


def error(fn, **kw) -> tuple[str, int]:
    with pytest.raises(ClientError) as e:
        fn(**kw)
    return e.value.response["Error"]["Code"], e.value.response["ResponseMetadata"][
        "HTTPStatusCode"]


@pytest.fixture
def start(tmp_path, mosquitto, procs):
    def go(*flags: str) -> stack.Jobsd:
        j = stack.Jobsd(str(tmp_path / "jobsd"), mosquitto.broker, extra=["--test-hooks", *flags])
        procs.append(j)
        for i in range(4):
            j.iot.create_thing(thingName=f"q{i}")
        return j
    return go


def arns(j: stack.Jobsd, *names: str) -> list[str]:
    return [j.iot.describe_thing(thingName=n)["thingArn"] for n in names]


def test_active_jobs_quota(start):
    j = start("--max-active-jobs", "2")
    for job in ("a1", "a2"):
        j.iot.create_job(jobId=job, targets=arns(j, "q0"), document="{}")
    assert error(j.iot.create_job, jobId="a3", targets=arns(j, "q1"),
                 document="{}") == ("LimitExceededException", 410)
    with pytest.raises(ClientError):
        j.iot.describe_job(jobId="a3")  # nothing created
    j.iot.cancel_job(jobId="a1")  # no longer active: room for one more
    j.iot.create_job(jobId="a3", targets=arns(j, "q1"), document="{}")
    assert j.iot.describe_job(jobId="a3")["job"]["status"] == "IN_PROGRESS"


def test_job_concurrency_quota(start):
    j = start("--max-concurrent-jobs", "1")
    slow = {"maximumPerMinute": 1}
    j.iot.create_job(jobId="c1", targets=arns(j, "q0", "q1", "q2"), document="{}",
                     jobExecutionsRolloutConfig=slow)
    assert j.iot.describe_job(jobId="c1")["job"]["isConcurrent"] is True
    assert error(j.iot.create_job, jobId="c2", targets=arns(j, "q3"), document="{}",
                 jobExecutionsRolloutConfig=slow) == ("LimitExceededException", 410)
    # a job released at once is not rolling out: the quota does not apply
    j.iot.create_job(jobId="c3", targets=arns(j, "q3"), document="{}")

    # once c1 has released its 3 things (1 a minute), the slot is free again
    advance(j, 60)
    advance(j, 60)
    assert j.iot.describe_job(jobId="c1")["job"]["isConcurrent"] is False
    j.iot.create_job(jobId="c2", targets=arns(j, "q3"), document="{}",
                     jobExecutionsRolloutConfig=slow)


def test_scheduled_start_at_the_limit_is_canceled(start):
    j = start("--max-concurrent-jobs", "1")
    things = [f"r{i}" for i in range(40)]
    for t in things:
        j.iot.create_thing(thingName=t)
    now = advance(j, 0)
    start_at = (int(now) // 60 + 31) * 60
    when = datetime.datetime.fromtimestamp(start_at, datetime.UTC).strftime("%Y-%m-%dT%H:%M")
    j.iot.create_job(jobId="s1", targets=arns(j, "q0"), document="{}",
                     schedulingConfig={"startTime": when})
    # 40 things at 1 a minute: still rolling out when s1 starts, 31-32 minutes from now
    j.iot.create_job(jobId="long", targets=arns(j, *things), document="{}",
                     jobExecutionsRolloutConfig={"maximumPerMinute": 1})
    for _ in range(33):
        advance(j, 60)
    s1 = j.iot.describe_job(jobId="s1")["job"]
    assert s1["status"] == "CANCELED", s1
    assert s1["reasonCode"] == "JOB_CONCURRENCY_LIMIT_REACHED" and "concurrency" in s1["comment"]
    assert j.iot.list_job_executions_for_job(jobId="s1")["executionSummaries"] == []
    assert j.iot.describe_job(jobId="long")["job"]["isConcurrent"] is True
