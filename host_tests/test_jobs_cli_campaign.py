"""tools/jobs and fleet campaigns: the options of create/ota/download that become CreateJob's
rollout, abort, retry, scheduling and template members (checked against what jobsd's DescribeJob
echoes), their syntax errors (exit 2, nothing asked of the service), the service's refusals
(passed through, exit 1), and what describe and watch show of a campaign, both on a real jobsd
(its clock moved by the advanceClock test hook, never waited for) and, for the formatting alone,
in-process on known DescribeJob answers."""
import datetime
import http.client
import json
import os
import subprocess

import pytest
from conftest import ROOT

from iotjobs_host import jobs_cli, stack

JOBS = os.path.join(ROOT, "tools", "jobs")
MANAGED_REBOOT = "arn:aws:iot:us-east-1::jobtemplate/AWS-Reboot:1.0"


# One jobsd for the module (per xdist worker), its test hooks on (advanceClock); every test
# works on names of its own (cc-, co-, cs-, ...), and the clock only ever moves one minute.
JOBSD_EXTRA = ["--test-hooks"]
JOBSD_FILES = "module_files"


@pytest.fixture(scope="module")
def module_files(tmp_path_factory):
    return tmp_path_factory.mktemp("campaign-files")


@pytest.fixture
def jobsd(module_jobsd) -> stack.Jobsd:
    return module_jobsd


@pytest.fixture
def files(module_files):
    return module_files


def jobs(jobsd, *args, timeout=60):
    """tools/jobs as a user runs it."""
    return subprocess.run([JOBS, "--endpoint", jobsd.control_url, *args], capture_output=True,
                          text=True, timeout=timeout)


def jobs_here(jobsd, capsys, *args):
    """The same in this process (fast: no interpreter and boto3 start per call)."""
    rc = jobs_cli.main(["--endpoint", jobsd.control_url, *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def advance(jobsd, seconds: float) -> None:
    """jobsd's clock forward, and everything then due done before the reply."""
    host, port = jobsd.control_url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("PUT", "/_jobsd/test-hooks",
                     body=json.dumps({"advanceClock": seconds}).encode())
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()
    finally:
        conn.close()


def doc_file(tmp_path, doc=None) -> str:
    p = tmp_path / "doc.json"
    p.write_text(json.dumps(doc or {"operation": "demo"}))
    return str(p)


def things(iot, *names, group=None):
    if group:
        iot.create_thing_group(thingGroupName=group)
    for n in names:
        iot.create_thing(thingName=n)
        if group:
            iot.add_thing_to_thing_group(thingGroupName=group, thingName=n)


def in_minutes(t: datetime.datetime, minutes: int) -> str:
    """t + minutes, rounded up to a whole minute, as schedulingConfig spells it."""
    at = t + datetime.timedelta(minutes=minutes)
    if at.second or at.microsecond:
        at = at.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    return at.strftime("%Y-%m-%dT%H:%M")


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def job_ids(iot) -> list[str]:
    return [j["jobId"] for j in iot.list_jobs()["jobs"]]


# -- the request ----------------------------------------------------------------------------------
def test_create_sends_exactly_the_campaign_request(jobsd, iot, tmp_path, capsys):
    things(iot, "cc-a")
    things(iot, "cc-b", group="cc-g")
    before = utcnow()
    r = jobs(jobsd, "create", "cc-1", "--document", doc_file(tmp_path), "--thing", "cc-a",
             "--group", "cc-g", "--rate", "5", "--ramp", "2,1.5,notified=6,succeeded=3",
             "--abort", "FAILED:30:4", "--abort", "all:12.5%:10", "--retry", "FAILED:2",
             "--retry", "timed_out:1", "--timeout-minutes", "10", "--start", "+2h",
             "--end", "+1d2h", "--end-behavior", "FORCE_CANCEL",
             "--window", "cron(0 2 ? * MON,WED *),60", "--window", "cron(30 22 * * ? *),90")
    after = utcnow()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("created cc-1 (arn:aws:iot:us-east-1:123456789012:job/cc-1) for 2 "
                               "target(s), ramp from 2/min x1.5, at most 5/min, abort at 30% "
                               "FAILED once 4 done, abort at 12.5% ALL once 10 done, "), r.stdout
    job = iot.describe_job(jobId="cc-1")["job"]
    assert job["jobExecutionsRolloutConfig"] == {
        "maximumPerMinute": 5,
        "exponentialRate": {"baseRatePerMinute": 2, "incrementFactor": 1.5,
                            "rateIncreaseCriteria": {"numberOfNotifiedThings": 6,
                                                     "numberOfSucceededThings": 3}}}
    assert job["abortConfig"] == {"criteriaList": [
        {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 30,
         "minNumberOfExecutedThings": 4},
        {"failureType": "ALL", "action": "CANCEL", "thresholdPercentage": 12.5,
         "minNumberOfExecutedThings": 10}]}
    assert job["jobExecutionsRetryConfig"] == {"criteriaList": [
        {"failureType": "FAILED", "numberOfRetries": 2},
        {"failureType": "TIMED_OUT", "numberOfRetries": 1}]}
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 10}
    sched = job["schedulingConfig"]
    # relative times: from the clock when the CLI ran, rounded up to the minute
    assert sched.pop("startTime") in {in_minutes(before, 120), in_minutes(after, 120)}
    assert sched.pop("endTime") in {in_minutes(before, 26 * 60), in_minutes(after, 26 * 60)}
    assert sched == {"endBehavior": "FORCE_CANCEL", "maintenanceWindows": [
        {"startTime": "cron(0 2 ? * MON,WED *)", "durationInMinutes": 60},
        {"startTime": "cron(30 22 * * ? *)", "durationInMinutes": 90}]}
    assert "jobTemplateArn" not in job and "documentParameters" not in job
    assert job["status"] == "SCHEDULED"

    # absolute times pass unchanged (a space for the T will do); no options, no members
    start = (utcnow() + datetime.timedelta(days=3)).strftime("%Y-%m-%d %H:%M")
    rc, _, err = jobs_here(jobsd, capsys, "create", "cc-2", "--document", doc_file(tmp_path),
                           "--thing", "cc-a", "--start", start)
    assert rc == 0, err
    job = iot.describe_job(jobId="cc-2")["job"]
    assert job["schedulingConfig"] == {"startTime": start.replace(" ", "T")}
    for member in ("jobExecutionsRolloutConfig", "abortConfig", "jobExecutionsRetryConfig",
                   "timeoutConfig"):
        assert not job.get(member), member


def test_ota_and_download_take_the_campaign_options(jobsd, iot, files, tmp_path, capsys):
    """The same options on the commands that build their own document; a syntax error stops
    them before anything is signed or published."""
    from iotjobs_host import sign

    things(iot, "co-a")
    keys = tmp_path / "keys"
    sign.keygen(str(keys))
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(4096))
    ota = ["ota", "co-ota", "--image", str(image), "--key", str(keys / sign.KEY_FILE),
           "--files", str(files), "--version", "2.0.0", "--thing", "co-a"]
    rc, _, err = jobs_here(jobsd, capsys, *ota, "--abort", "FAILED:30")
    assert rc == 2 and "--abort wants TYPE:PERCENT:MIN" in err, err
    assert not (files / "firmware" / "fw.bin").exists()

    r = jobs(jobsd, *ota, "--rate", "5", "--abort", "FAILED:30:4", "--retry", "FAILED:1",
             "--timeout-minutes", "15")
    assert r.returncode == 0, r.stderr
    assert "created OTA job co-ota" in r.stdout and "at most 5/min" in r.stdout
    job = iot.describe_job(jobId="co-ota")["job"]
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 5}
    assert job["abortConfig"]["criteriaList"] == [
        {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 30,
         "minNumberOfExecutedThings": 4}]
    assert job["jobExecutionsRetryConfig"]["criteriaList"] == [
        {"failureType": "FAILED", "numberOfRetries": 1}]
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 15}
    assert json.loads(iot.get_job_document(jobId="co-ota")["document"])["size"] == 4096

    data = tmp_path / "table.csv"
    data.write_bytes(b"a,b\n")
    rc, _, err = jobs_here(jobsd, capsys, "download", "co-dl", "--file", str(data), "--path",
                           "t.csv", "--files", str(files), "--thing", "co-a",
                           "--ramp", "2,2,succeeded=4", "--window", "cron(0 3 * * ? *),120")
    assert rc == 0, err
    job = iot.describe_job(jobId="co-dl")["job"]
    assert job["jobExecutionsRolloutConfig"] == {"exponentialRate": {
        "baseRatePerMinute": 2, "incrementFactor": 2,
        "rateIncreaseCriteria": {"numberOfSucceededThings": 4}}}
    assert job["schedulingConfig"] == {"maintenanceWindows": [
        {"startTime": "cron(0 3 * * ? *)", "durationInMinutes": 120}]}


# -- errors ---------------------------------------------------------------------------------------
SYNTAX = [
    (["--rate", "fast"], "--rate must be a whole number, not 'fast'"),
    (["--ramp", "2,2"], "--ramp wants BASE,FACTOR,notified=N or BASE,FACTOR,succeeded=N"),
    (["--ramp", "2,2,6"], "'6' is neither notified=N nor succeeded=N"),
    (["--ramp", "2,x,notified=6"], "--ramp FACTOR must be a number, not 'x'"),
    (["--ramp", "2,2,notified=6,notified=3"], "notified given twice"),
    (["--ramp", "2,2,notified=six"], "--ramp notified must be a whole number, not 'six'"),
    (["--abort", "FAILED:30"], "--abort wants TYPE:PERCENT:MIN, e.g. FAILED:30:4"),
    (["--abort", "FAIL:30:4"], "--abort TYPE must be FAILED, REJECTED, TIMED_OUT or ALL, not 'FAIL'"),
    (["--abort", "FAILED:lots:4"], "--abort PERCENT must be a number, not 'lots'"),
    (["--abort", "FAILED:30:four"], "--abort MIN must be a whole number, not 'four'"),
    (["--retry", "REJECTED:2"], "--retry TYPE must be FAILED, TIMED_OUT or ALL, not 'REJECTED' "
                                "(REJECTED executions are never retried)"),
    (["--retry", "FAILED"], "--retry wants TYPE:N, e.g. FAILED:2"),
    (["--retry", "FAILED:2.5"], "--retry N must be a whole number, not '2.5'"),
    (["--start", "tomorrow"], "--start wants YYYY-MM-DDTHH:MM (UTC) or a time from now such as "
                              "+45m, +2h, +1d, not 'tomorrow'"),
    (["--start", "2031-02-30T10:00"], "--start wants YYYY-MM-DDTHH:MM"),
    (["--start", "2031-02-03T10:00:00"], "--start wants YYYY-MM-DDTHH:MM"),
    (["--end", "+5x"], "--end wants YYYY-MM-DDTHH:MM"),
    (["--end-behavior", "CANCEL"], "--end-behavior needs --end"),
    (["--window", "cron(0 2 * * ? *)"], "--window wants CRON,MINUTES"),
    (["--window", "cron(0 2 * * ? *),1h"], "--window MINUTES must be a whole number, not '1h'"),
    (["--param", "a=b"], "--param needs --template"),
    (["--template", "AWS-Reboot", "--param", "novalue"], "--param wants KEY=VALUE, not 'novalue'"),
    (["--template", "AWS-Reboot", "--param", "k=1", "--param", "k=2"], "--param k given twice"),
]


def test_syntax_errors_exit_2_and_ask_nothing(jobsd, iot, tmp_path, capsys):
    things(iot, "cs-a")
    doc = doc_file(tmp_path)
    for extra, message in SYNTAX:
        args = ["create", "cs-1", "--thing", "cs-a", *extra]
        if "--template" not in extra:
            args += ["--document", doc]
        rc, out, err = jobs_here(jobsd, capsys, *args)
        assert (rc, out) == (2, ""), (extra, out, err)
        assert err.startswith("jobs: ") and message in err, (extra, err)
    rc, _, err = jobs_here(jobsd, capsys, "create", "cs-1", "--thing", "cs-a")
    assert rc == 2 and "jobs: name a --document (or a --template)" in err
    with pytest.raises(SystemExit) as e:  # argparse's own choices
        jobs_cli.main(["--endpoint", jobsd.control_url, "create", "cs-1", "--document", doc,
                       "--thing", "cs-a", "--end", "+1d", "--end-behavior", "STOP"])
    assert e.value.code == 2 and "invalid choice: 'STOP'" in capsys.readouterr().err
    assert "cs-1" not in job_ids(iot)
    # and through the real tool
    r = jobs(jobsd, "create", "cs-1", "--document", doc, "--thing", "cs-a", "--retry", "FAILED")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "jobs: --retry wants TYPE:N, e.g. FAILED:2, not 'FAILED'\n"


REFUSED = [  # syntax fine, values out of range: the service says so
    (["--rate", "5000"], "maximumPerMinute"),
    (["--ramp", "1001,2,notified=6"], "baseRatePerMinute"),
    (["--ramp", "2,5.5,notified=6"], "incrementFactor"),
    (["--ramp", "2,1.55,notified=6"], "incrementFactor"),
    (["--abort", "FAILED:100.5:4"], "thresholdPercentage"),
    (["--retry", "FAILED:11"], "numberOfRetries"),
    (["--retry", "FAILED:6", "--retry", "TIMED_OUT:5"], ""),
    (["--retry", "ALL:1", "--retry", "FAILED:1"], ""),
    (["--start", "+10m"], "startTime"),
    (["--start", "+2h", "--end", "+2h20m"], ""),
    (["--window", "cron(0 2 * * ? *),1431"], "durationInMinutes"),
    (["--window", "cron(nonsense),60"], ""),
    (["--timeout-minutes", "20000"], "inProgressTimeoutInMinutes"),
]


def test_service_refusals_pass_through_with_exit_1(jobsd, iot, tmp_path, capsys):
    things(iot, "cr-a")
    doc = doc_file(tmp_path)
    for extra, word in REFUSED:
        rc, out, err = jobs_here(jobsd, capsys, "create", "cr-1", "--document", doc,
                                 "--thing", "cr-a", *extra)
        assert (rc, out) == (1, ""), (extra, out, err)
        assert err.startswith("jobs: InvalidRequestException: ") and word in err, (extra, err)
    # botocore's own minimums stop a request before it is sent: the same exit, its message
    rc, _, err = jobs_here(jobsd, capsys, "create", "cr-1", "--document", doc, "--thing", "cr-a",
                           "--retry", "FAILED:-1")
    assert rc == 1 and "numberOfRetries, value: -1, valid min value: 0" in err, err
    assert "cr-1" not in job_ids(iot)
    r = jobs(jobsd, "create", "cr-1", "--document", doc, "--thing", "cr-a", "--rate", "1001")
    assert r.returncode == 1 and r.stderr.startswith("jobs: InvalidRequestException: "), r.stderr
    # not-found and already-exists keep their exit 2
    rc, _, err = jobs_here(jobsd, capsys, "create", "cr-1", "--document", doc, "--thing",
                           "cr-nobody", "--rate", "5")
    assert rc == 2 and "ResourceNotFoundException" in err


# -- templates ------------------------------------------------------------------------------------
def test_template_by_name_managed_and_custom(jobsd, iot, tmp_path, capsys):
    things(iot, "ct-a")
    custom = iot.create_job_template(jobTemplateId="ct-tpl", description="a custom one",
                                     document=json.dumps({"operation": "demo"}),
                                     jobExecutionsRolloutConfig={"maximumPerMinute": 3})
    r = jobs(jobsd, "create", "ct-1", "--template", "ct-tpl", "--thing", "ct-a")
    assert r.returncode == 0, r.stderr
    assert f"template {custom['jobTemplateArn']}" in r.stdout
    assert iot.describe_job(jobId="ct-1")["job"]["jobTemplateArn"] == custom["jobTemplateArn"]

    managed = iot.describe_managed_job_template(templateName="AWS-Reboot")["templateArn"]
    assert managed == MANAGED_REBOOT
    rc, _, err = jobs_here(jobsd, capsys, "create", "ct-2", "--template", "AWS-Reboot",
                           "--thing", "ct-a")
    assert rc == 0, err
    assert iot.describe_job(jobId="ct-2")["job"]["jobTemplateArn"] == managed

    rc, _, err = jobs_here(jobsd, capsys, "create", "ct-3", "--template", "AWS-Download-File:1.0",
                           "--thing", "ct-a", "--param", "downloadUrl=https://example.com/x.bin",
                           "--param", "filePath=/data/x.bin", "--rate", "2")
    assert rc == 0, err
    job = iot.describe_job(jobId="ct-3")["job"]
    assert job["jobTemplateArn"] == "arn:aws:iot:us-east-1::jobtemplate/AWS-Download-File:1.0"
    assert job["documentParameters"] == {"downloadUrl": "https://example.com/x.bin",
                                         "filePath": "/data/x.bin"}
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 2}
    rc, out, err = jobs_here(jobsd, capsys, "describe", "ct-3")
    assert rc == 0, err
    assert ("  template: arn:aws:iot:us-east-1::jobtemplate/AWS-Download-File:1.0\n"
            '  parameters: {"downloadUrl": "https://example.com/x.bin", "filePath": "/data/x.bin"}\n'
            in out), out

    rc, _, err = jobs_here(jobsd, capsys, "create", "ct-4", "--template", "no-such-template",
                           "--thing", "ct-a")
    assert rc == 2
    assert err.startswith("jobs: no job template no-such-template: neither a template of "
                               "the account nor an AWS managed one"), err
    rc, _, err = jobs_here(jobsd, capsys, "create", "ct-5", "--template", "AWS-Download-File",
                           "--thing", "ct-a", "--param", "downloadUrl=https://example.com/x.bin")
    assert rc == 1 and "InvalidRequestException" in err, err  # filePath is required
    assert not {"ct-4", "ct-5"} & set(job_ids(iot))


def test_template_lookup_order():
    """A bare name: the account's template first, then the managed one; NAME:VERSION and ARNs
    go straight to what they name (stubbed: only the requests are checked)."""
    import boto3
    from botocore.stub import Stubber

    iot = boto3.client("iot", region_name="us-east-1", aws_access_key_id="k",
                       aws_secret_access_key="s")
    custom = "arn:aws:iot:us-east-1:123456789012:jobtemplate/mine"
    with Stubber(iot) as stub:
        stub.add_response("describe_job_template", {"jobTemplateArn": custom},
                          {"jobTemplateId": "mine"})
        assert jobs_cli._template_arn(iot, "mine") == custom
        stub.add_client_error("describe_job_template", "ResourceNotFoundException", http_status_code=404,
                              expected_params={"jobTemplateId": "AWS-Reboot"})
        stub.add_response("describe_managed_job_template", {"templateArn": MANAGED_REBOOT},
                          {"templateName": "AWS-Reboot"})
        assert jobs_cli._template_arn(iot, "AWS-Reboot") == MANAGED_REBOOT
        stub.add_response("describe_managed_job_template", {"templateArn": MANAGED_REBOOT},
                          {"templateName": "AWS-Reboot", "templateVersion": "1.0"})
        assert jobs_cli._template_arn(iot, "AWS-Reboot:1.0") == MANAGED_REBOOT
        assert jobs_cli._template_arn(iot, custom) == custom  # no request at all
        stub.assert_no_pending_responses()


# -- describe and watch on a real campaign ------------------------------------------------------
def counters_line(iot, job_id: str) -> str:
    counts = iot.describe_job(jobId=job_id)["job"]["jobProcessDetails"]
    return "  executions: " + json.dumps({k: v for k, v in counts.items()
                                          if v and k != "processingTargets"})


def released_things(iot, job_id: str) -> list[str]:
    rows = iot.list_job_executions_for_job(jobId=job_id)["executionSummaries"]
    return list(dict.fromkeys(r["thingArn"].rsplit("/", 1)[-1] for r in rows))


def describe(jobsd, capsys, job_id: str) -> list[str]:
    rc, out, err = jobs_here(jobsd, capsys, "describe", job_id)
    assert rc == 0, err
    return out.splitlines()


def test_describe_and_watch_follow_rollout_retry_and_abort(jobsd, iot, tmp_path, capsys):
    fleet = [f"cw-{n}" for n in range(6)]
    things(iot, *fleet, group="cw-g")
    r = jobs(jobsd, "create", "cw-1", "--document", doc_file(tmp_path), "--group", "cw-g",
             "--rate", "2", "--abort", "FAILED:50:3", "--retry", "FAILED:1")
    assert r.returncode == 0, r.stderr

    first = released_things(iot, "cw-1")
    assert len(first) == 2  # one minute's worth
    d = jobs(jobsd, "describe", "cw-1")  # the real tool once; in this process after that
    assert d.returncode == 0, d.stderr
    lines = d.stdout.splitlines()
    assert lines[0] == "job cw-1: IN_PROGRESS (SNAPSHOT)"
    assert counters_line(iot, "cw-1") in lines
    assert "  released 2/6 thing(s), 4 unreleased (rolling out to cw-g)" in lines, lines
    assert "  rollout: 2/min (maximumPerMinute)" in lines
    assert "  abort: FAILED 0/0 done = 0% (aborts at >= 50% once 3 done)" in lines
    assert "  retry: FAILED up to 1; 0 retry attempt(s) on 0 thing(s)" in lines
    assert sum(line.endswith("(not released)") for line in lines) == 4

    # the first thing fails once (retried), the second succeeds
    jobsd.data.update_job_execution(jobId="cw-1", thingName=first[0], status="FAILED")
    jobsd.data.update_job_execution(jobId="cw-1", thingName=first[1], status="SUCCEEDED")
    lines = describe(jobsd, capsys, "cw-1")
    assert counters_line(iot, "cw-1") in lines, lines
    assert "  abort: FAILED 1/2 done = 50% (aborts at >= 50% once 3 done)" in lines, lines
    assert "  retry: FAILED up to 1; 1 retry attempt(s) on 1 thing(s)" in lines
    assert f"  {first[0]:<32} QUEUED       2 attempts (retryAttempt 1): FAILED, QUEUED" in lines
    assert f"  {first[1]:<32} SUCCEEDED" in lines

    advance(jobsd, 60)  # the next minute: two more
    second = [t for t in released_things(iot, "cw-1") if t not in first]
    assert len(second) == 2
    assert "  released 4/6 thing(s), 2 unreleased (rolling out to cw-g)" in describe(jobsd, capsys,
                                                                                   "cw-1")

    # one more failure: 2 of 3 done FAILED >= 50 % once 3 done -> aborted
    jobsd.data.update_job_execution(jobId="cw-1", thingName=second[0], status="FAILED")
    job = iot.describe_job(jobId="cw-1")["job"]
    assert job["status"] == "CANCELED" and job["reasonCode"] == "JOB_ABORT_CRITERIA_MET"
    counts = job["jobProcessDetails"]
    done = sum(counts[k] for k in ("numberOfSucceededThings", "numberOfFailedThings",
                                   "numberOfRejectedThings", "numberOfTimedOutThings"))
    failed = counts["numberOfFailedThings"]
    n = len(released_things(iot, "cw-1"))  # 4, unless a real minute passed since the advance
    released = f"released {n}/6 thing(s)" + (f", {6 - n} unreleased" if n < 6 else "")
    lines = describe(jobsd, capsys, "cw-1")
    assert lines[0] == "job cw-1: CANCELED (SNAPSHOT)"
    assert counters_line(iot, "cw-1") in lines, lines
    pct = f"{round(100 * failed / done, 1):g}"
    assert f"  abort: FAILED {failed}/{done} done = {pct}% (aborts at >= 50% once 3 done) <- met" \
        in lines, lines
    assert f"  canceled: JOB_ABORT_CRITERIA_MET: {job['comment']}" in lines, lines
    assert f"  {released}" in lines
    assert "  rollout: 2/min (maximumPerMinute) - stopped (CANCELED)" in lines

    w = jobs(jobsd, "watch", "cw-1", "--interval", "0.05", "--timeout", "30")
    assert w.returncode == 1, w.stdout + w.stderr
    out = w.stdout.splitlines()
    assert out[-1].startswith(f"job CANCELED (JOB_ABORT_CRITERIA_MET: {job['comment']}): ")
    assert out[-1].endswith(f"{n} of {n} execution(s) terminal, 1 succeeded, {6 - n} thing(s) "
                            f"never released"), out[-1]
    mine = [line.split("s  ", 1)[1].split() for line in out if f" {first[0]} " in line]
    # its first attempt (FAILED, retried) and its retry (CANCELED by the abort), in that order
    assert [m[1] for m in mine] == ["FAILED", "CANCELED"] and mine[1][-2:] == ["(retry", "1)"], \
        w.stdout
    assert any(line.split("s  ", 1)[-1].startswith(f"job CANCELED; {released}; ")  # no rate
               and f"; abort FAILED {failed}/{done} done" in line for line in out), w.stdout


def test_watch_stops_on_a_canceled_scheduled_job(jobsd, iot, tmp_path, capsys):
    """Nothing was ever released: watch does not wait for executions that will not come."""
    things(iot, "cx-a", "cx-b")
    rc, _, err = jobs_here(jobsd, capsys, "create", "cx-1", "--document", doc_file(tmp_path),
                           "--thing", "cx-a", "--thing", "cx-b", "--start", "+1d")
    assert rc == 0, err
    lines = describe(jobsd, capsys, "cx-1")
    assert lines[0] == "job cx-1: SCHEDULED (SNAPSHOT)", lines
    assert "  released 0/2 thing(s), 2 unreleased" in lines, lines
    rc, out, _ = jobs_here(jobsd, capsys, "list", "--status", "SCHEDULED")
    assert rc == 0 and out.startswith("cx-1 "), out
    iot.cancel_job(jobId="cx-1", reasonCode="NOT_NEEDED", comment="changed our minds")
    w = jobs(jobsd, "watch", "cx-1", "--interval", "0.05", "--timeout", "30")
    assert w.returncode == 1, w.stdout + w.stderr
    assert w.stdout.splitlines()[-1] == ("job CANCELED (NOT_NEEDED: changed our minds): 0 of 0 "
                                         "execution(s) terminal, 0 succeeded, 2 thing(s) never "
                                         "released")


# -- the formatting, on known answers -------------------------------------------------------------
def test_ramp_follows_fleet_1_4():
    ramp = {"baseRatePerMinute": 2, "incrementFactor": 2.0,
            "rateIncreaseCriteria": {"numberOfNotifiedThings": 6}}
    # FLEET.md 9.2: released after each minute 2, 4, 6, 10, 14, 22, 30
    released, seen = 0, []
    while released < 30:
        released = min(30, released + jobs_cli.ramp_step(ramp, None, released, 0)[1])
        seen.append(released)
    assert seen == [2, 4, 6, 10, 14, 22, 30]
    assert jobs_cli.ramp_step(ramp, None, 12, 0) == (2, 8)
    assert jobs_cli.ramp_step(ramp, 5, 12, 0) == (2, 5)  # maximumPerMinute caps it
    assert jobs_cli.ramp_step(ramp, None, 6000, 0) == (1000, 1000)  # 1000 without one
    # FLEET.md 9.3: succeeded-driven
    succ = {"baseRatePerMinute": 2, "incrementFactor": 2,
            "rateIncreaseCriteria": {"numberOfSucceededThings": 2}}
    assert jobs_cli.ramp_step(succ, None, 10, 1) == (0, 2)
    assert jobs_cli.ramp_step(succ, None, 10, 2) == (1, 4)
    # either criterion advances the step; several steps may fire together
    both = {"baseRatePerMinute": 2, "incrementFactor": 2,
            "rateIncreaseCriteria": {"numberOfNotifiedThings": 6, "numberOfSucceededThings": 2}}
    assert jobs_cli.ramp_step(both, None, 6, 5)[0] == 2
    # exact: 25 x 1.4^2 is 49 (floating point says 48.99999999999999)
    assert jobs_cli.ramp_step({"baseRatePerMinute": 25, "incrementFactor": 1.4,
                               "rateIncreaseCriteria": {"numberOfNotifiedThings": 1}},
                              None, 2, 0) == (2, 49)
    assert jobs_cli.ramp_step({"baseRatePerMinute": 5, "incrementFactor": 1.1,
                               "rateIncreaseCriteria": {"numberOfNotifiedThings": 1}},
                              None, 2, 0) == (2, 6)


def test_abort_progress():
    crit = {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 30.0,
            "minNumberOfExecutedThings": 4}
    c = {"numberOfSucceededThings": 4, "numberOfFailedThings": 2, "numberOfQueuedThings": 9,
         "numberOfInProgressThings": 3, "numberOfCanceledThings": 5}
    assert jobs_cli.abort_text(crit, c) == \
        "FAILED 2/6 done = 33.3% (aborts at >= 30% once 4 done) <- met"
    assert jobs_cli.abort_text(crit, {"numberOfFailedThings": 3}) == \
        "FAILED 3/3 done = 100% (aborts at >= 30% once 4 done)"
    assert jobs_cli.abort_text(crit, {}) == "FAILED 0/0 done = 0% (aborts at >= 30% once 4 done)"
    every = {"failureType": "ALL", "action": "CANCEL", "thresholdPercentage": 12.5,
             "minNumberOfExecutedThings": 2}
    mixed = {"numberOfSucceededThings": 6, "numberOfRejectedThings": 1,
             "numberOfTimedOutThings": 1}
    assert jobs_cli.abort_text(every, mixed) == \
        "ALL 2/8 done = 25% (aborts at >= 12.5% once 2 done) <- met"
    rejected = dict(every, failureType="REJECTED", thresholdPercentage=100)
    assert jobs_cli.abort_text(rejected, mixed) == \
        "REJECTED 1/8 done = 12.5% (aborts at >= 100% once 2 done)"


KNOWN_JOB = {  # DescribeJob's `job`, as AWS or jobsd answers it mid-campaign
    "jobArn": "arn:aws:iot:us-east-1:123456789012:job/fw-45", "jobId": "fw-45",
    "targetSelection": "SNAPSHOT", "status": "IN_PROGRESS",
    "targets": ["arn:aws:iot:us-east-1:123456789012:thinggroup/kitchen",
                "arn:aws:iot:us-east-1:123456789012:thing/dev9"],
    "description": "fw 2.1.0",
    "jobExecutionsRolloutConfig": {"maximumPerMinute": 20, "exponentialRate": {
        "baseRatePerMinute": 2, "incrementFactor": 2.0,
        "rateIncreaseCriteria": {"numberOfNotifiedThings": 2}}},
    "abortConfig": {"criteriaList": [
        {"failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 30.0,
         "minNumberOfExecutedThings": 4},
        {"failureType": "ALL", "action": "CANCEL", "thresholdPercentage": 50.0,
         "minNumberOfExecutedThings": 2}]},
    "jobExecutionsRetryConfig": {"criteriaList": [{"failureType": "FAILED",
                                                   "numberOfRetries": 2}]},
    "timeoutConfig": {"inProgressTimeoutInMinutes": 30},
    "schedulingConfig": {"startTime": "2031-06-14T20:00", "endTime": "2031-06-16T20:00",
                         "endBehavior": "CANCEL",
                         "maintenanceWindows": [{"startTime": "cron(0 2 * * ? *)",
                                                 "durationInMinutes": 60}]},
    "scheduledJobRollouts": [{"startTime": "2031-06-15T02:00"}, {"startTime": "2031-06-16T02:00"}],
    "jobProcessDetails": {"processingTargets": [
        "arn:aws:iot:us-east-1:123456789012:thinggroup/kitchen"],
        "numberOfCanceledThings": 0, "numberOfSucceededThings": 1, "numberOfFailedThings": 1,
        "numberOfRejectedThings": 0, "numberOfQueuedThings": 2, "numberOfInProgressThings": 1,
        "numberOfRemovedThings": 0, "numberOfTimedOutThings": 0},
}


def summary(thing: str, status: str, number: int = 1, retry: int = 0) -> dict:
    return {"thingArn": f"arn:aws:iot:us-east-1:123456789012:thing/{thing}",
            "jobExecutionSummary": {"status": status, "executionNumber": number,
                                    "retryAttempt": retry}}


KNOWN_EXECUTIONS = [summary("dev1", "SUCCEEDED"), summary("dev2", "FAILED"),
                    summary("dev3", "IN_PROGRESS"), summary("dev2", "QUEUED", 2, 1),
                    summary("dev4", "QUEUED")]
KNOWN_TARGETS = ["dev1", "dev2", "dev3", "dev4", "dev5", "dev6", "dev9"]


def test_describe_lines_of_a_known_job():
    lines = jobs_cli.describe_lines(KNOWN_JOB, '{"operation":"ota"}', KNOWN_EXECUTIONS,
                                    KNOWN_TARGETS)
    assert lines == [
        "job fw-45: IN_PROGRESS (SNAPSHOT)",
        "  description: fw 2.1.0",
        '  document: {"operation":"ota"}',
        '  executions: {"numberOfSucceededThings": 1, "numberOfFailedThings": 1, '
        '"numberOfQueuedThings": 2, "numberOfInProgressThings": 1}',
        "  released 4/7 thing(s), 3 unreleased (rolling out to kitchen)",
        # 4 released >= 2 x 2 notified: step 2, 2 x 2^2 = 8 a minute
        "  rollout: exponential from 2/min, x2 every 2 notified, at most 20/min: now 8/min "
        "(step 2; next at 6 notified)",
        "  abort: FAILED 1/2 done = 50% (aborts at >= 30% once 4 done)",
        "  abort: ALL 1/2 done = 50% (aborts at >= 50% once 2 done) <- met",
        "  retry: FAILED up to 2; 1 retry attempt(s) on 1 thing(s)",
        "  timeout: 30 min in progress",
        "  schedule (UTC): start 2031-06-14T20:00, end 2031-06-16T20:00, then CANCEL",
        "  window (UTC): cron(0 2 * * ? *) for 60 min",
        "  next windows (UTC): 2031-06-15T02:00, 2031-06-16T02:00",
        "  dev1                             SUCCEEDED",
        "  dev2                             QUEUED       2 attempts (retryAttempt 1): FAILED, QUEUED",
        "  dev3                             IN_PROGRESS",
        "  dev4                             QUEUED",
        "  dev5                             (not released)",
        "  dev6                             (not released)",
        "  dev9                             (not released)",
    ]
    canceled = dict(KNOWN_JOB, status="CANCELED", forceCanceled=False,
                    reasonCode="JOB_ABORT_CRITERIA_MET",
                    comment="abort criterion 2 (ALL >= 50% once 2 done) met")
    lines = jobs_cli.campaign_lines(canceled, KNOWN_EXECUTIONS, KNOWN_TARGETS)
    assert lines[-1] == ("canceled: JOB_ABORT_CRITERIA_MET: abort criterion 2 (ALL >= 50% once 2 "
                         "done) met")


def test_watch_line_of_a_known_job():
    assert jobs_cli.watch_line(KNOWN_JOB, KNOWN_EXECUTIONS, KNOWN_TARGETS) == (
        "job IN_PROGRESS; released 4/7 thing(s), 3 unreleased (rolling out to kitchen); "
        "rate 8/min; 1 succeeded, 1 failed, 2 queued, 1 in progress; "
        "abort FAILED 1/2 done = 50% (aborts at >= 30% once 4 done); "
        "abort ALL 1/2 done = 50% (aborts at >= 50% once 2 done) <- met")
    done = {"jobId": "j", "status": "COMPLETED", "targets": [],
            "jobExecutionsRolloutConfig": {"maximumPerMinute": 1},
            "jobProcessDetails": {"numberOfSucceededThings": 2}}
    both = [summary("a", "SUCCEEDED"), summary("b", "SUCCEEDED")]
    assert jobs_cli.watch_line(done, both, ["a", "b"]) == \
        "job COMPLETED; released 2/2 thing(s); 2 succeeded"  # no rate once all are released
    assert jobs_cli.campaign_lines(done, both, ["a", "b"])[:2] == [
        "released 2/2 thing(s)", "rollout: 1/min (maximumPerMinute) - all released"]


def test_times():
    now = datetime.datetime(2031, 1, 1, 10, 0, 20)
    assert jobs_cli.parse_time("+45m", "--start", now) == "2031-01-01T10:46"  # rounded up
    assert jobs_cli.parse_time("+2h", "--start", now.replace(second=0)) == "2031-01-01T12:00"
    assert jobs_cli.parse_time("+1d2h30m", "--end", now) == "2031-01-02T12:31"
    assert jobs_cli.parse_time("+1d", "--end", now) == "2031-01-02T10:01"
    assert jobs_cli.parse_time("2031-06-14 20:00", "--start") == "2031-06-14T20:00"
    assert jobs_cli.parse_time("2031-06-14T20:00", "--start") == "2031-06-14T20:00"
    for bad in ("+", "+45", "45m", "+2h45", "2031-06-14", "20:00", "2031-06-14T25:00"):
        with pytest.raises(jobs_cli.UsageError):
            jobs_cli.parse_time(bad, "--start", now)
