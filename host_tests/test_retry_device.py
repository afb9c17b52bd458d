"""A retried job on a simulated device, end to end (issue 15, FLEET.md 3.4): a download-file
job with `jobExecutionsRetryConfig` whose file server answers 404 once. Attempt 1 (execution 1)
ends FAILED; jobsd retries it as execution 2 (QUEUED, retryAttempt 1, notify-next); the device
must run that as a new execution, not answer it ALREADY_DONE from its journal of finished
executions, and the job ends COMPLETED with execution 2 SUCCEEDED.

With power cuts where a retry can go wrong on the device: right after the service accepted
attempt 1's FAILED (the outbox still holds it: resent to execution 1, refused as terminal, never
applied to execution 2), and in the middle of attempt 2's download (the journal holds attempt 2:
it resumes with HTTP Range from its checkpoint, and attempt 1 is left alone)."""
import hashlib
import json
import os

import pytest

from conftest import stack, thing_arn

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}
RETRY = {"criteriaList": [{"failureType": "FAILED", "numberOfRetries": 2}]}
CONFIG = {"download": {"allow": ["http://127.0.0.1:"], "root": "data"}, "progress_min_ms": 0}
SIZE = 200_000  # three 64 KB checkpoints


def executions(iot, thing, job_id):
    """{executionNumber: JobExecutionSummary} of the job on the thing."""
    out = {}
    for s in iot.list_job_executions_for_thing(thingName=thing)["executionSummaries"]:
        if s["jobId"] == job_id:
            e = s["jobExecutionSummary"]
            out[e["executionNumber"]] = e
    return out


def wait_attempt(iot, thing, job_id, n, statuses, dev, timeout=60):
    """DescribeJobExecution of execution n once it has one of `statuses`."""
    last = {}

    def reached():
        nonlocal last
        last = executions(iot, thing, job_id)
        if last.get(n, {}).get("status") not in statuses:
            return None
        return iot.describe_job_execution(jobId=job_id, thingName=thing,
                                          executionNumber=n)["execution"]

    try:
        return stack.wait_until(reached, timeout, f"execution {n} of {job_id} in {statuses}", 0.05)
    except TimeoutError as e:
        raise AssertionError(f"{e}; executions {last}\ndevice log:\n{dev.log_text()}") from None


def assert_retried(iot, thing, job_id):
    """Attempt 1 has ended FAILED: jobsd queued attempt 2 in the same step, and the job is not
    over while it is pending (FLEET.md 3.4)."""
    job = iot.describe_job(jobId=job_id)["job"]  # first: the job can only move on meanwhile
    ex = executions(iot, thing, job_id)
    assert 2 in ex, ("no retry of attempt 1", ex, job["status"])
    assert ex[2].get("retryAttempt") == 1, ex[2]
    if job["status"] != "IN_PROGRESS":
        assert ex[2]["status"] in TERMINAL, (job["status"], ex)


def terminal_requests(watch, thing, job_id):
    """The device's terminal update requests for the job, in order."""
    topic = f"$aws/things/{thing}/jobs/{job_id}/update"
    return [p for t, p in list(watch.messages)
            if t == topic and isinstance(p, dict) and p.get("status") in TERMINAL]


@pytest.mark.parametrize("cut", [None, "update-answered", "download-checkpoint"])
def test_a_retried_job_runs_again_as_a_new_execution(cut, jobsd, iot, device, spy):
    from iotjobs_host.fileserver import FlakyServer

    data = os.urandom(SIZE)
    sha = hashlib.sha256(data).hexdigest()
    srv = FlakyServer(data, fail_status=404, fails=1)  # the file is missing once: attempt 1
    try:
        thing = "retry-" + (cut or "plain")
        job_id = "fetch-1"
        iot.create_thing(thingName=thing)
        iot.create_job(jobId=job_id, targets=[thing_arn(thing)], jobExecutionsRetryConfig=RETRY,
                       document=json.dumps({"operation": "download-file", "url": srv.url + "f.bin",
                                            "path": "f.bin", "sha256": sha, "size": SIZE}))
        watch = spy(thing)
        cfg = dict(CONFIG)
        if cut:
            cfg.update(test_handlers=True, halt_at=cut)
        dev = device(thing, config=cfg, heap="144K")

        first = wait_attempt(iot, thing, job_id, 1, TERMINAL, dev)
        assert first["status"] == "FAILED", first
        d1 = first["statusDetails"]["detailsMap"]
        assert (d1["reason"], d1.get("http")) == ("DOWNLOAD_FAILED", "404"), d1
        assert_retried(iot, thing, job_id)

        if cut:
            stack.wait_until(lambda: f"@@HALT {cut}" in dev.log_text(10**7)
                             or not dev.proc.alive(), 30, f"the device to halt at {cut}")
            assert dev.proc.alive(), dev.log_text()
            if cut == "download-checkpoint":  # attempt 2 holds part of the file
                part = os.path.join(dev.flash, "data", "f.bin.part")
                assert 0 < os.path.getsize(part) < SIZE
            dev.power_cut()

        second = wait_attempt(iot, thing, job_id, 2, TERMINAL, dev)
        assert second["status"] == "SUCCEEDED", (second, dev.log_text())
        d2 = second["statusDetails"]["detailsMap"]
        assert (d2["reason"], d2["sha256"], d2["size"]) == ("OK", sha, str(SIZE)), d2

        ex = executions(iot, thing, job_id)
        assert sorted(ex) == [1, 2], ex
        assert (ex[1]["status"], ex[1].get("retryAttempt")) == ("FAILED", 0), ex[1]
        assert (ex[2]["status"], ex[2].get("retryAttempt")) == ("SUCCEEDED", 1), ex[2]
        job = stack.wait_until(lambda: (lambda j: j if j["status"] == "COMPLETED" else None)(
            iot.describe_job(jobId=job_id)["job"]), 20, "the job to complete")
        assert job["status"] == "COMPLETED"

        with open(os.path.join(dev.flash, "data", "f.bin"), "rb") as f:
            assert f.read() == data
        assert not os.path.exists(os.path.join(dev.flash, "data", "f.bin.part"))

        # Each attempt's outcome went to its own execution; nothing answered ALREADY_DONE.
        sent = terminal_requests(watch, thing, job_id)
        assert all(p.get("statusDetails", {}).get("reason") != "ALREADY_DONE" for p in sent), sent
        failed = [p for p in sent if p["status"] == "FAILED"]
        succeeded = [p for p in sent if p["status"] == "SUCCEEDED"]
        assert failed and all(p.get("executionNumber") == 1 for p in failed), sent
        assert [p.get("executionNumber") for p in succeeded] == [2], sent
        assert len(failed) == (2 if cut == "update-answered" else 1), sent  # + the resend

        # Attempt 1 asked once and got 404; attempt 2 from the start, and after a cut in its
        # download on from its checkpoint (Range), never from the beginning again.
        assert srv.ranges[:2] == [0, 0], srv.ranges
        if cut == "download-checkpoint":
            assert len(srv.ranges) == 3 and srv.ranges[2] >= 65536, srv.ranges
        else:
            assert len(srv.ranges) == 2, srv.ranges
        assert len(dev.boots()) == (2 if cut else 1)
        assert "already finished" not in dev.log_text(10**7)
    finally:
        srv.stop()
