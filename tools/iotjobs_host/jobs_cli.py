"""`tools/jobs`: create, list, describe, cancel and watch jobs, for people.

Talks to the AWS IoT control plane through boto3's `iot` client, so the same commands work
against jobsd (`--endpoint http://127.0.0.1:PORT`, or IOTJOBS_ENDPOINT) and against AWS IoT
(no endpoint: boto3's usual credentials and region)."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from decimal import Decimal
from fractions import Fraction
from typing import Any, Optional

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}


def client(args: argparse.Namespace, service: str = "iot", endpoint: Optional[str] = None):
    """boto3 `iot` on --endpoint (or `iot-jobs-data` on --data-endpoint); AWS without one."""
    import boto3

    kw: dict[str, Any] = {"region_name": args.region}
    endpoint = endpoint if service != "iot" else args.endpoint
    if endpoint:
        kw["endpoint_url"] = endpoint
        # jobsd with --credentials (tools/stack: `. build/stack/env`) checks the signature with
        # the key boto3 finds as usual; a jobsd without them checks nothing, but boto3 still
        # wants a key to sign with
        if boto3.Session(region_name=args.region).get_credentials() is None:
            kw["aws_access_key_id"] = kw["aws_secret_access_key"] = "local"
    return boto3.client(service, **kw)


def _targets(iot, things: list[str], groups: list[str]) -> list[str]:
    """ARNs as the service spells them (asked, not built: the account id is the service's)."""
    arns = [iot.describe_thing(thingName=t)["thingArn"] for t in things]
    arns += [iot.describe_thing_group(thingGroupName=g)["thingGroupArn"] for g in groups]
    return arns


# -- campaigns: rollout, abort, retries, scheduling, templates (FLEET.md 1-5) ----------------------
class UsageError(Exception):
    """A command line the service never sees: printed as `jobs: ...`, exit 2."""


FAILURE_TYPES = ("FAILED", "REJECTED", "TIMED_OUT", "ALL")  # abortConfig
RETRY_TYPES = ("FAILED", "TIMED_OUT", "ALL")  # jobExecutionsRetryConfig (REJECTED is never retried)
END_BEHAVIORS = ("STOP_ROLLOUT", "CANCEL", "FORCE_CANCEL")
TIME_FORMAT = "%Y-%m-%dT%H:%M"  # schedulingConfig times, UTC
_INT = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_RELATIVE = re.compile(r"\+(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?")
_COUNTER = {"FAILED": "numberOfFailedThings", "REJECTED": "numberOfRejectedThings",
            "TIMED_OUT": "numberOfTimedOutThings", "SUCCEEDED": "numberOfSucceededThings"}


def _int(text: str, what: str) -> int:
    if not _INT.fullmatch(text.strip()):
        raise UsageError(f"{what} must be a whole number, not {text!r}")
    return int(text)


def _number(text: str, what: str) -> float:
    if not _NUMBER.fullmatch(text.strip()):
        raise UsageError(f"{what} must be a number, not {text!r}")
    return float(text)


def _kind(text: str, kinds: tuple[str, ...], what: str, why: str = "") -> str:
    if text.strip().upper() not in kinds:
        raise UsageError(f"{what} must be {', '.join(kinds[:-1])} or {kinds[-1]}, not {text!r}"
                         + why)
    return text.strip().upper()


def parse_ramp(text: str) -> dict:
    """`BASE,FACTOR,notified=N[,succeeded=M]` (either criterion, or both) -> exponentialRate."""
    usage = ("--ramp wants BASE,FACTOR,notified=N or BASE,FACTOR,succeeded=N (or both, "
             "e.g. 2,2,notified=6,succeeded=3)")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4):
        raise UsageError(f"{usage}, not {text!r}")
    criteria: dict[str, int] = {}
    for part in parts[2:]:
        name, eq, value = part.partition("=")
        member = {"notified": "numberOfNotifiedThings",
                  "succeeded": "numberOfSucceededThings"}.get(name.strip().lower())
        if not eq or member is None:
            raise UsageError(f"{usage}: {part!r} is neither notified=N nor succeeded=N")
        if member in criteria:
            raise UsageError(f"{usage}: {name.strip()} given twice")
        criteria[member] = _int(value, f"--ramp {name.strip()}")
    return {"baseRatePerMinute": _int(parts[0], "--ramp BASE"),
            "incrementFactor": _number(parts[1], "--ramp FACTOR"),
            "rateIncreaseCriteria": criteria}


def parse_abort(text: str) -> dict:
    """`TYPE:PERCENT:MIN` -> one AbortCriteria (action CANCEL, the only one there is)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise UsageError(f"--abort wants TYPE:PERCENT:MIN, e.g. FAILED:30:4, not {text!r}")
    return {"failureType": _kind(parts[0], FAILURE_TYPES, "--abort TYPE"), "action": "CANCEL",
            "thresholdPercentage": _number(parts[1].strip().rstrip("%"), "--abort PERCENT"),
            "minNumberOfExecutedThings": _int(parts[2], "--abort MIN")}


def parse_retry(text: str) -> dict:
    """`TYPE:N` -> one RetryCriteria."""
    parts = text.split(":")
    if len(parts) != 2:
        raise UsageError(f"--retry wants TYPE:N, e.g. FAILED:2, not {text!r}")
    return {"failureType": _kind(parts[0], RETRY_TYPES, "--retry TYPE",
                                 " (REJECTED executions are never retried)"),
            "numberOfRetries": _int(parts[1], "--retry N")}


def parse_time(text: str, what: str, now: Optional[datetime.datetime] = None) -> str:
    """`YYYY-MM-DDTHH:MM` (UTC; a space for the T will do) as is, or `+45m`, `+2h`, `+1d`,
    `+1d2h30m` from now, rounded up to the next whole minute: a time as schedulingConfig
    spells it."""
    text = text.strip()
    m = _RELATIVE.fullmatch(text)
    if m and any(m.groups()):
        days, hours, minutes = (int(g or 0) for g in m.groups())
        now = now or datetime.datetime.now(datetime.UTC)
        at = now.replace(tzinfo=None) + datetime.timedelta(days=days, hours=hours, minutes=minutes)
        if at.second or at.microsecond:
            at = at.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
        return at.strftime(TIME_FORMAT)
    try:
        at = datetime.datetime.strptime(text.replace(" ", "T", 1), TIME_FORMAT)
    except ValueError:
        raise UsageError(f"{what} wants YYYY-MM-DDTHH:MM (UTC) or a time from now such as "
                         f"+45m, +2h, +1d, not {text!r}") from None
    return at.strftime(TIME_FORMAT)


def parse_window(text: str) -> dict:
    """`CRON,MINUTES` (the last comma splits: cron fields may hold commas) -> a maintenance
    window."""
    cron, comma, minutes = text.rpartition(",")
    if not comma or not cron.strip():
        raise UsageError(f"--window wants CRON,MINUTES, e.g. 'cron(0 2 * * ? *),60', not {text!r}")
    return {"startTime": cron.strip(), "durationInMinutes": _int(minutes, "--window MINUTES")}


def parse_params(items: list[str]) -> dict:
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--param wants KEY=VALUE, not {item!r}")
        if key in out:
            raise UsageError(f"--param {key} given twice")
        out[key] = value
    return out


def campaign_request(a: argparse.Namespace, now: Optional[datetime.datetime] = None) -> dict:
    """The CreateJob members the campaign options ask for (none of them: {}), checked for
    syntax only; ranges are the service's to check. The template stays a name here
    (`_template_arn` asks the service)."""
    kw: dict[str, Any] = {}
    if a.timeout_minutes is not None:
        kw["timeoutConfig"] = {"inProgressTimeoutInMinutes": a.timeout_minutes}
    rollout: dict[str, Any] = {}
    if a.rate is not None:
        rollout["maximumPerMinute"] = _int(a.rate, "--rate")
    if a.ramp is not None:
        rollout["exponentialRate"] = parse_ramp(a.ramp)
    if rollout:
        kw["jobExecutionsRolloutConfig"] = rollout
    if a.abort:
        kw["abortConfig"] = {"criteriaList": [parse_abort(x) for x in a.abort]}
    if a.retry:
        kw["jobExecutionsRetryConfig"] = {"criteriaList": [parse_retry(x) for x in a.retry]}
    sched: dict[str, Any] = {}
    if a.start is not None:
        sched["startTime"] = parse_time(a.start, "--start", now)
    if a.end is not None:
        sched["endTime"] = parse_time(a.end, "--end", now)
    if a.end_behavior is not None:
        if a.end is None:
            raise UsageError("--end-behavior needs --end (it says what happens then)")
        sched["endBehavior"] = a.end_behavior
    if a.window:
        sched["maintenanceWindows"] = [parse_window(x) for x in a.window]
    if sched:
        kw["schedulingConfig"] = sched
    params = parse_params(getattr(a, "param", []) or [])
    if params:
        if not getattr(a, "template", None):
            raise UsageError("--param needs --template (documentParameters fill in an AWS "
                             "managed template's ${aws:iot:parameter:KEY} placeholders)")
        kw["documentParameters"] = params
    return kw


def _code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


def _template_arn(iot, name: str) -> str:
    """--template: an ARN as is; `NAME:VERSION` an AWS managed template at that version; a bare
    NAME the account's template of that id, else the AWS managed template of that name."""
    from botocore.exceptions import ClientError

    if name.startswith("arn:"):
        return name
    if ":" in name:  # custom template ids have no colon
        base, _, version = name.partition(":")
        return iot.describe_managed_job_template(templateName=base,
                                                 templateVersion=version)["templateArn"]
    try:
        return iot.describe_job_template(jobTemplateId=name)["jobTemplateArn"]
    except ClientError as e:
        if _code(e) != "ResourceNotFoundException":
            raise
    try:
        return iot.describe_managed_job_template(templateName=name)["templateArn"]
    except ClientError as e:
        if _code(e) != "ResourceNotFoundException":
            raise
    raise UsageError(f"no job template {name}: neither a template of the account nor an AWS "
                     f"managed one (try `aws iot list-job-templates` / "
                     f"`list-managed-job-templates`)")


def add_campaign_args(p: argparse.ArgumentParser, template: bool = False) -> None:
    g = p.add_argument_group("campaign (staged rollout, abort, retries, scheduling)")
    g.add_argument("--timeout-minutes", type=int, metavar="MIN",
                   help="in-progress timeout, 1..10080 (TIMED_OUT retries need one)")
    g.add_argument("--rate", metavar="N",
                   help="release to at most N things a minute (maximumPerMinute, 1..1000; "
                        "with --ramp: its cap)")
    g.add_argument("--ramp", metavar="BASE,FACTOR,notified=N|succeeded=N",
                   help="exponential rollout: BASE things a minute, times FACTOR (1.1..5.0) each "
                        "time N more things were notified (or succeeded); both criteria may be "
                        "given: 2,2,notified=6,succeeded=3")
    g.add_argument("--abort", action="append", default=[], metavar="TYPE:PERCENT:MIN",
                   help="cancel the job when at least PERCENT %% of the done executions ended "
                        "TYPE (FAILED, REJECTED, TIMED_OUT or ALL), once MIN are done; "
                        "repeatable, the first that matches wins. E.g. FAILED:30:4")
    g.add_argument("--retry", action="append", default=[], metavar="TYPE:N",
                   help="retry a thing's execution up to N times when it ends TYPE (FAILED, "
                        "TIMED_OUT or ALL); repeatable (at most 10 retries in all)")
    g.add_argument("--start", metavar="TIME",
                   help="start then: YYYY-MM-DDTHH:MM UTC, or +45m, +2h, +1d from now "
                        "(rounded up to the minute; 30 min to 1 year ahead)")
    g.add_argument("--end", metavar="TIME", help="end then (as --start; 30 min after it at least)")
    g.add_argument("--end-behavior", choices=END_BEHAVIORS,
                   help="at --end: stop releasing (STOP_ROLLOUT, the default), cancel QUEUED "
                        "executions (CANCEL), or IN_PROGRESS ones too (FORCE_CANCEL)")
    g.add_argument("--window", action="append", default=[], metavar="CRON,MINUTES",
                   help="release only in this maintenance window: a cron start (UTC, e.g. "
                        "'cron(0 2 * * ? *)') and its length in minutes (1..1430); repeatable")
    if template:
        g.add_argument("--template", metavar="NAME_OR_ARN",
                       help="job template: an id of the account's, an AWS managed one "
                            "(AWS-Reboot, AWS-Download-File:1.0, ...) or an ARN; then --document "
                            "is optional (it overrides the template's)")
        g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a managed template's document parameter (repeatable), e.g. "
                            "--param downloadUrl=https://... --param filePath=/data/x")


# -- describing a campaign ------------------------------------------------------------------------
def _name(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def _pct(x: float) -> str:
    return f"{round(x, 1):g}"


def _target_things(iot, job: dict) -> list[str]:
    """The things the job's targets resolve to now: its things and the members of its groups
    (child groups included, as jobsd and AWS expand them)."""
    from botocore.exceptions import ClientError

    names: list[str] = []
    for arn in job.get("targets", []):
        if ":thinggroup/" in arn:
            try:
                for page in iot.get_paginator("list_things_in_thing_group").paginate(
                        thingGroupName=_name(arn), recursive=True):
                    names += page["things"]
            except ClientError as e:
                if _code(e) != "ResourceNotFoundException":
                    raise
        else:
            names.append(_name(arn))
    return list(dict.fromkeys(names))


def attempts_by_thing(executions: list[dict]) -> dict[str, list[dict]]:
    """ListJobExecutionsForJob rows grouped by thing, each thing's summaries oldest first
    (one per attempt: a retry is a new execution with the next executionNumber)."""
    out: dict[str, list[dict]] = {}
    for row in executions:
        out.setdefault(_name(row["thingArn"]), []).append(row["jobExecutionSummary"])
    for rows in out.values():
        rows.sort(key=lambda s: s.get("executionNumber", 0))
    return out


def ramp_step(ramp: dict, cap: Optional[int], released: int, succeeded: int) -> tuple[int, int]:
    """(k, rate_k) of an exponential rollout (FLEET.md 1.4): rate_k = min(cap or 1000,
    floor(base * factor^k)), k advancing while released >= (k+1)*numberOfNotifiedThings or
    succeeded >= (k+1)*numberOfSucceededThings. Exact arithmetic (5 x 1.1^2 is 6.05, not
    6.050000000000001)."""
    crit = ramp.get("rateIncreaseCriteria") or {}
    notified, succ = crit.get("numberOfNotifiedThings"), crit.get("numberOfSucceededThings")
    k = 0
    while ((notified and released >= (k + 1) * notified)
           or (succ and succeeded >= (k + 1) * succ)):
        k += 1
    factor = Fraction(Decimal(str(ramp["incrementFactor"])))
    rate = math.floor(ramp["baseRatePerMinute"] * factor ** k)
    return k, min(cap or 1000, rate)


def current_rate(rollout: dict, released: int, succeeded: int) -> Optional[int]:
    """Things a minute the rollout releases now; None without a rollout config."""
    cap = rollout.get("maximumPerMinute")
    if rollout.get("exponentialRate"):
        return ramp_step(rollout["exponentialRate"], cap, released, succeeded)[1]
    return cap


def rollout_text(rollout: dict, released: int, succeeded: int) -> Optional[str]:
    """`5/min` or `exponential ...: now 8/min (step 2; ...)`; None without a rollout config."""
    cap = rollout.get("maximumPerMinute")
    ramp = rollout.get("exponentialRate")
    if not ramp:
        return f"{cap}/min (maximumPerMinute)" if cap else None
    crit = ramp.get("rateIncreaseCriteria") or {}
    notified, succ = crit.get("numberOfNotifiedThings"), crit.get("numberOfSucceededThings")
    k, rate = ramp_step(ramp, cap, released, succeeded)
    when = " or ".join(x for x in (notified and f"{notified} notified",
                                   succ and f"{succ} succeeded") if x)
    nxt = " or ".join(x for x in (notified and f"{(k + 1) * notified} notified",
                                  succ and f"{(k + 1) * succ} succeeded") if x)
    return (f"exponential from {ramp['baseRatePerMinute']}/min, x{ramp['incrementFactor']:g} "
            f"every {when}, at most {cap or 1000}/min: now {rate}/min (step {k}; "
            f"next at {nxt})")


def abort_text(criterion: dict, counts: dict) -> str:
    """`FAILED 2/6 done = 33.3% (aborts at >= 30% once 4 done)`, and ` <- met` when it holds:
    done = executions SUCCEEDED, FAILED, REJECTED or TIMED_OUT (jobProcessDetails counts each
    attempt), bad = those of the criterion's type (ALL: FAILED, REJECTED and TIMED_OUT)."""
    kind = criterion["failureType"]
    done = sum(counts.get(c, 0) for c in _COUNTER.values())
    kinds = ("FAILED", "REJECTED", "TIMED_OUT") if kind == "ALL" else (kind,)
    bad = sum(counts.get(_COUNTER[k], 0) for k in kinds)
    pct = 100.0 * bad / done if done else 0.0
    threshold, least = criterion["thresholdPercentage"], criterion["minNumberOfExecutedThings"]
    met = done >= least and 100 * bad >= threshold * done
    return (f"{kind} {bad}/{done} done = {_pct(pct)}% (aborts at >= {_pct(threshold)}% "
            f"once {least} done)" + (" <- met" if met else ""))


def attempts_text(rows: list[dict]) -> str:
    """A thing's attempts beyond the first: `3 attempts (retryAttempt 2): FAILED, FAILED,
    SUCCEEDED`; "" for one."""
    if len(rows) < 2 and not rows[-1].get("retryAttempt"):
        return ""
    return (f"{len(rows)} attempts (retryAttempt {rows[-1].get('retryAttempt', len(rows) - 1)}): "
            + ", ".join(r["status"] for r in rows))


def _unreleased(attempts: dict[str, list[dict]], targets: list[str]) -> list[str]:
    return [t for t in targets if t not in attempts]


def _releasing(job: dict, attempts: dict[str, list[dict]], targets: list[str]) -> bool:
    """Whether the rollout still has things to release (so its rate matters)."""
    return job["status"] in ("IN_PROGRESS", "SCHEDULED") and bool(_unreleased(attempts, targets))


def released_text(job: dict, attempts: dict[str, list[dict]], targets: list[str]) -> str:
    """`released 12/20 thing(s), 8 unreleased`: released = things with an execution, total =
    the things the targets resolve to now (and any released thing that left its group since)."""
    released = len(attempts)
    waiting = len(_unreleased(attempts, targets))
    out = f"released {released}/{released + waiting} thing(s)"
    if waiting:
        out += f", {waiting} unreleased"
    processing = (job.get("jobProcessDetails") or {}).get("processingTargets")
    if processing:
        out += f" (rolling out to {', '.join(_name(t) for t in processing)})"
    return out


def campaign_lines(job: dict, executions: list[dict], targets: list[str]) -> list[str]:
    """What describe prints about the campaign, from DescribeJob's `job`, the
    ListJobExecutionsForJob rows and the target things (`_target_things`)."""
    counts = job.get("jobProcessDetails") or {}
    attempts = attempts_by_thing(executions)
    lines = [released_text(job, attempts, targets)]
    rollout = rollout_text(job.get("jobExecutionsRolloutConfig") or {}, len(attempts),
                           counts.get("numberOfSucceededThings", 0))
    if rollout:
        if not _unreleased(attempts, targets):
            rollout += " - all released"
        elif not _releasing(job, attempts, targets):
            rollout += f" - stopped ({job['status']})"
        lines.append(f"rollout: {rollout}")
    for c in (job.get("abortConfig") or {}).get("criteriaList", []):
        lines.append(f"abort: {abort_text(c, counts)}")
    retry = (job.get("jobExecutionsRetryConfig") or {}).get("criteriaList", [])
    if retry:
        retried = {t: len(rows) - 1 for t, rows in attempts.items() if len(rows) > 1}
        lines.append("retry: " + ", ".join(f"{c['failureType']} up to {c['numberOfRetries']}"
                                           for c in retry)
                     + f"; {sum(retried.values())} retry attempt(s) on {len(retried)} thing(s)")
    timeout = (job.get("timeoutConfig") or {}).get("inProgressTimeoutInMinutes")
    if timeout:
        lines.append(f"timeout: {timeout} min in progress")
    sched = job.get("schedulingConfig") or {}
    if sched.get("startTime") or sched.get("endTime"):
        parts = [f"start {sched['startTime']}" if sched.get("startTime") else "start at creation"]
        if sched.get("endTime"):
            parts.append(f"end {sched['endTime']}, then "
                         f"{sched.get('endBehavior') or 'STOP_ROLLOUT'}")
        lines.append("schedule (UTC): " + ", ".join(parts))
    for w in sched.get("maintenanceWindows") or []:
        lines.append(f"window (UTC): {w['startTime']} for {w['durationInMinutes']} min")
    upcoming = [r["startTime"] for r in job.get("scheduledJobRollouts") or [] if r.get("startTime")]
    if upcoming:
        lines.append(f"next windows (UTC): {', '.join(upcoming)}")
    if job.get("jobTemplateArn"):
        lines.append(f"template: {job['jobTemplateArn']}")
    if job.get("documentParameters"):
        lines.append(f"parameters: {json.dumps(job['documentParameters'], sort_keys=True)}")
    if job.get("reasonCode") or job.get("comment"):
        lines.append(f"{job['status'].lower()}: "
                     + ": ".join(x for x in (job.get("reasonCode"), job.get("comment")) if x)
                     + (" (forced)" if job.get("forceCanceled") else ""))
    return lines


_SHORT = {"numberOfQueuedThings": "queued", "numberOfInProgressThings": "in progress",
          "numberOfSucceededThings": "succeeded", "numberOfFailedThings": "failed",
          "numberOfRejectedThings": "rejected", "numberOfTimedOutThings": "timed out",
          "numberOfCanceledThings": "canceled", "numberOfRemovedThings": "removed"}


def watch_line(job: dict, executions: list[dict], targets: list[str]) -> str:
    """One line of the job as a whole for `watch`: status, released/total, the rate, the
    counters and each abort criterion's progress."""
    counts = job.get("jobProcessDetails") or {}
    attempts = attempts_by_thing(executions)
    parts = [f"job {job['status']}", released_text(job, attempts, targets)]
    rate = current_rate(job.get("jobExecutionsRolloutConfig") or {}, len(attempts),
                        counts.get("numberOfSucceededThings", 0))
    if rate and _releasing(job, attempts, targets):
        parts.append(f"rate {rate}/min")
    parts.append(", ".join(f"{v} {_SHORT[k]}" for k, v in counts.items()
                           if k in _SHORT and v) or "no executions")
    parts += [f"abort {abort_text(c, counts)}"
              for c in (job.get("abortConfig") or {}).get("criteriaList", [])]
    return "; ".join(parts)


def cmd_create(iot, a: argparse.Namespace) -> int:
    if a.document is None and not a.template:
        raise UsageError("name a --document (or a --template)")
    doc = None
    if a.document is not None:
        with open(a.document, "rb") as f:
            raw = f.read()
        try:
            doc = json.loads(raw)
        except ValueError as e:
            print(f"jobs: {a.document} is not JSON: {e}", file=sys.stderr)
            return 2
        if not isinstance(doc, dict):
            print(f"jobs: {a.document} must hold a JSON object", file=sys.stderr)
            return 2
    if not a.thing and not a.group:
        print("jobs: name at least one --thing or --group", file=sys.stderr)
        return 2
    kw: dict[str, Any] = {
        "jobId": a.job_id,
        "targets": _targets(iot, a.thing, a.group),
        "targetSelection": "CONTINUOUS" if a.continuous else "SNAPSHOT",
    }
    if doc is not None:
        kw["document"] = json.dumps(doc, separators=(",", ":"))
    if a.template:
        kw["jobTemplateArn"] = _template_arn(iot, a.template)
    if a.description:
        kw["description"] = a.description
    kw.update(a.campaign)
    out = iot.create_job(**kw)
    print(f"created {out['jobId']} ({out['jobArn']}) for {len(kw['targets'])} target(s)"
          + _campaign_summary(kw))
    return 0


def _campaign_summary(kw: dict) -> str:
    """`, at most 5/min, abort at 30% FAILED once 4 done, ...` for the created line; "" without
    campaign options."""
    out = []
    rollout = kw.get("jobExecutionsRolloutConfig") or {}
    if rollout.get("exponentialRate"):
        ramp = rollout["exponentialRate"]
        out.append(f"ramp from {ramp['baseRatePerMinute']}/min x{ramp['incrementFactor']:g}")
    if rollout.get("maximumPerMinute"):
        out.append(f"at most {rollout['maximumPerMinute']}/min")
    for c in (kw.get("abortConfig") or {}).get("criteriaList", []):
        out.append(f"abort at {_pct(c['thresholdPercentage'])}% {c['failureType']} once "
                   f"{c['minNumberOfExecutedThings']} done")
    for c in (kw.get("jobExecutionsRetryConfig") or {}).get("criteriaList", []):
        out.append(f"retry {c['failureType']} up to {c['numberOfRetries']}")
    sched = kw.get("schedulingConfig") or {}
    if sched.get("startTime"):
        out.append(f"starts {sched['startTime']} UTC")
    if sched.get("endTime"):
        out.append(f"ends {sched['endTime']} UTC")
    if sched.get("maintenanceWindows"):
        out.append(f"{len(sched['maintenanceWindows'])} maintenance window(s)")
    if kw.get("jobTemplateArn"):
        out.append(f"template {kw['jobTemplateArn']}")
    return "".join(f", {x}" for x in out)


def _signed_job(iot, a: argparse.Namespace, argv: list[str], make) -> Optional[dict]:
    """Run a tools/sign command (`make` = sign.image or sign.bundle) and create the job with
    its document; the document, or None after printing why not."""
    from . import sign

    if not a.thing and not a.group:
        print("jobs: name at least one --thing or --group", file=sys.stderr)
        return None
    if a.force:
        argv += ["--force"]
    try:
        doc = make(sign.parser().parse_args(argv))
    except sign.SignError as e:
        print(f"jobs: {e}", file=sys.stderr)
        return None
    if getattr(a, "allow_downgrade", False):
        doc["allowDowngrade"] = True
    iot.create_job(jobId=a.job_id, targets=_targets(iot, a.thing, a.group),
                   document=json.dumps(doc, separators=(",", ":")),
                   targetSelection="CONTINUOUS" if a.continuous else "SNAPSHOT",
                   **a.campaign)
    return doc


STREAM_ROLE = "arn:aws:iam::123456789012:role/iotjobs-streams"  # jobsd does not check roles


def _stream(iot, a: argparse.Namespace, stream_id: str, files: list[tuple[int, str, str]]) -> str:
    """Create (or, with --force, update) a stream of (fileId, bucket, key) objects: the MQTT
    way to the same files (STREAMS.md 1). Returns its id."""
    from botocore.exceptions import ClientError

    spec = [{"fileId": fid, "s3Location": {"bucket": bucket, "key": key}}
            for fid, bucket, key in files]
    try:
        iot.create_stream(streamId=stream_id, files=spec, roleArn=a.role_arn,
                          description=f"tools/jobs {a.cmd} {a.job_id}")
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "ResourceAlreadyExistsException" or not a.force:
            raise
        iot.update_stream(streamId=stream_id, files=spec, roleArn=a.role_arn)
    return stream_id


def _over(doc: dict, protocol: str, stream_id: str, file_id: int = 0) -> dict:
    """A document that fetches over `protocol`: "http" as signed, "mqtt" (the stream instead of
    the URL) or "both" (the device picks by its `transfer` setting)."""
    if protocol == "http":
        return doc
    ota = doc.get("afr_ota")
    if isinstance(ota, dict):
        ota["protocols"] = ["MQTT", "HTTP"] if protocol == "both" else ["MQTT"]
        ota["streamname"] = stream_id
        if protocol == "mqtt":
            for f in ota["files"]:
                f.pop("update_data_url", None)
                f.pop("auth_scheme", None)
        return doc
    doc["stream"] = {"id": stream_id, "fileId": file_id}
    if protocol == "mqtt":
        doc.pop("url", None)
    return doc


def cmd_ota(iot, a: argparse.Namespace) -> int:
    """Sign a firmware image, place it in jobsd's files folder, create the OTA job: one step.
    `--protocol mqtt` also makes it a stream and sends the device there instead (one TLS
    session on the device)."""
    from . import sign

    argv = ["image", a.image, "--key", a.key, "--bucket", a.bucket, "--files", a.files]
    if a.version:
        argv += ["--version", a.version]
    if a.afr_ota:
        argv += ["--afr-ota"]
    key = os.path.basename(a.image)

    def make(args):
        doc = sign.image(args)
        if a.protocol != "http":
            _over(doc, a.protocol, _stream(iot, a, a.job_id, [(0, a.bucket, key)]))
        return doc

    doc = _signed_job(iot, a, argv, make)
    if doc is None:
        return 2
    print(f"created OTA job {a.job_id}: {os.path.basename(a.image)} "
          f"({doc.get('size') or doc['afr_ota']['files'][0]['filesize']} bytes, signed"
          + (f", stream {a.job_id}" if a.protocol != "http" else "") + ")"
          + _campaign_summary(a.campaign))
    return 0


def cmd_download(iot, a: argparse.Namespace) -> int:
    """Publish a file to jobsd's files folder and create a download-file job for it (its
    sha256 checked on the device), over HTTP (a presigned URL) or MQTT (a stream)."""
    import hashlib

    from . import sign

    if not a.thing and not a.group:
        print("jobs: name at least one --thing or --group", file=sys.stderr)
        return 2
    if not os.path.isfile(a.file):
        print(f"jobs: {a.file} is not a regular file", file=sys.stderr)
        return 2
    try:
        sign.check_bucket(a.bucket)
        key = sign.check_key(a.key_name or os.path.basename(a.file))
        sign.put_object(os.path.join(a.files, a.bucket), key, src=a.file, force=a.force)
    except sign.SignError as e:
        print(f"jobs: {e}", file=sys.stderr)
        return 2
    with open(a.file, "rb") as f:
        data = f.read()
    doc: dict[str, Any] = {"operation": "download-file", "url": sign.presigned(a.bucket, key),
                           "path": a.path, "sha256": hashlib.sha256(data).hexdigest(),
                           "size": len(data)}
    if a.protocol != "http":
        _over(doc, a.protocol, _stream(iot, a, a.job_id, [(0, a.bucket, key)]))
    iot.create_job(jobId=a.job_id, targets=_targets(iot, a.thing, a.group),
                   document=json.dumps(doc, separators=(",", ":")),
                   targetSelection="CONTINUOUS" if a.continuous else "SNAPSHOT",
                   **a.campaign)
    print(f"created download job {a.job_id}: {os.path.basename(a.file)} -> {a.path} "
          f"({len(data)} bytes, {a.protocol})" + _campaign_summary(a.campaign))
    return 0


def cmd_app(iot, a: argparse.Namespace) -> int:
    """Sign an application folder, publish it to jobsd's files folder, create the app-update
    job (one presigned URL per file): one step. `--protocol mqtt`: the bundle as one stream
    named after the job (the manifest file 0, the k-th file of the manifest file k + 1)."""
    from . import sign

    argv = ["bundle", a.dir, "--key", a.key, "--bucket", a.bucket, "--files", a.files,
            "--version", a.version, "--presign-files"]
    for pattern in a.exclude:
        argv += ["--exclude", pattern]

    def make(args):
        doc = sign.bundle(args)
        if a.protocol == "http":
            return doc
        prefix = f"app/{a.version}"  # sign's default key prefix
        paths = list(doc["urls"])  # manifest order
        if len(paths) + 1 > 50:
            raise sign.SignError(f"a stream holds at most 50 files; this bundle has "
                                 f"{len(paths)} and its manifest (use --protocol http)")
        objs = [(0, a.bucket, f"{prefix}/{sign.MANIFEST}")]
        objs += [(k + 1, a.bucket, f"{prefix}/{sign.FILES_DIR}/{p}") for k, p in enumerate(paths)]
        doc["stream"] = {"id": _stream(iot, a, a.job_id, objs), "manifest": 0}
        if a.protocol == "mqtt":
            for key in ("manifest", "base", "urls"):
                doc.pop(key, None)
        return doc

    doc = _signed_job(iot, a, argv, make)
    if doc is None:
        return 2
    n = len(doc["urls"]) if "urls" in doc else "all"
    print(f"created app-update job {a.job_id}: version {a.version}, {n} file(s), signed"
          + (f", stream {a.job_id}" if a.protocol != "http" else "") + _campaign_summary(a.campaign))
    return 0


def cmd_command(iot, a: argparse.Namespace) -> int:
    """Start an AWS IoT command on one thing and wait for its outcome (exit 0 on SUCCEEDED)."""
    from botocore.exceptions import ClientError

    payload = a.payload or json.dumps({"command": a.command_id})
    try:
        body = json.loads(payload)
    except ValueError as e:
        print(f"jobs: --payload is not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(body, dict):
        print("jobs: --payload must be a JSON object", file=sys.stderr)
        return 2
    content = json.dumps(body, separators=(",", ":")).encode()
    try:
        cmd = iot.get_command(commandId=a.command_id)
        have = (cmd.get("payload") or {}).get("content")
        if a.payload and have is not None and have != content:
            print(f"jobs: command {a.command_id} exists with another payload; pick another id",
                  file=sys.stderr)
            return 2
        arn = cmd["commandArn"]
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise
        arn = iot.create_command(commandId=a.command_id, payload={
            "content": content, "contentType": "application/json"})["commandArn"]
    target = iot.describe_thing(thingName=a.thing)["thingArn"]
    data = client(a, "iot-jobs-data", a.data_endpoint)
    eid = data.start_command_execution(targetArn=target, commandArn=arn,
                                       executionTimeoutSeconds=a.timeout)["executionId"]
    print(f"started {a.command_id} on {a.thing}: execution {eid}")
    deadline = time.monotonic() + a.timeout + 5
    while True:
        ex = iot.get_command_execution(executionId=eid, targetArn=target)
        if ex["status"] in ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"):
            break
        if time.monotonic() > deadline:
            print(f"{eid}: still {ex['status']}", file=sys.stderr)
            return 3
        time.sleep(0.2)  # polling the service
    result = {k: next(iter(v.values())) for k, v in (ex.get("result") or {}).items()}
    reason = ex.get("statusReason") or {}
    print(f"{ex['status']}" + (f" {reason.get('reasonCode')}" if reason else "")
          + (f" {json.dumps(result, sort_keys=True)}" if result else ""))
    return 0 if ex["status"] == "SUCCEEDED" else 1


def cmd_list(iot, a: argparse.Namespace) -> int:
    kw: dict[str, Any] = {"status": a.status} if a.status else {}
    rows = []
    for page in iot.get_paginator("list_jobs").paginate(**kw):
        rows += page["jobs"]
    for j in rows:
        print(f"{j['jobId']:<40} {j['status']:<12} {j.get('targetSelection', ''):<10} "
              f"{_ts(j.get('createdAt'))}")
    if not rows:
        print("no jobs")
    return 0


def _ts(t: Any) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if hasattr(t, "strftime") else str(t or "")


def _executions(iot, job_id: str) -> list[dict]:
    out = []
    for page in iot.get_paginator("list_job_executions_for_job").paginate(jobId=job_id):
        out += page["executionSummaries"]
    return out


def cmd_describe(iot, a: argparse.Namespace) -> int:
    job = iot.describe_job(jobId=a.job_id)["job"]
    doc = iot.get_job_document(jobId=a.job_id)["document"]
    executions = _executions(iot, a.job_id)
    for line in describe_lines(job, doc, executions, _target_things(iot, job)):
        print(line)
    return 0


def describe_lines(job: dict, doc: str, executions: list[dict], targets: list[str]) -> list[str]:
    """`describe`'s output from DescribeJob's `job`, the document, the ListJobExecutionsForJob
    rows and the target things: the job, its campaign, then one line per thing (its latest
    execution, its attempts when retried, or "(not released)")."""
    out = [f"job {job['jobId']}: {job['status']} ({job.get('targetSelection')})"]
    if job.get("description"):
        out.append(f"  description: {job['description']}")
    out.append(f"  document: {doc}")
    counts = {k: v for k, v in (job.get("jobProcessDetails") or {}).items()
              if v and k != "processingTargets"}
    out.append(f"  executions: {json.dumps(counts)}")
    out += [f"  {line}" for line in campaign_lines(job, executions, targets)]
    attempts = attempts_by_thing(executions)
    for thing, rows in attempts.items():
        out.append(f"  {thing:<32} {rows[-1]['status']:<12} {attempts_text(rows)}".rstrip())
    for thing in targets:
        if thing not in attempts:
            out.append(f"  {thing:<32} (not released)")
    return out


def cmd_cancel(iot, a: argparse.Namespace) -> int:
    kw: dict[str, Any] = {"jobId": a.job_id, "force": a.force}
    if a.reason:
        kw["reasonCode"] = a.reason
    if a.comment:
        kw["comment"] = a.comment
    iot.cancel_job(**kw)
    print(f"cancelled {a.job_id}" + (" (in-progress executions too)" if a.force else ""))
    return 0


def _watch_thing(t0: float, thing: str, ex: dict, retry: int) -> None:
    details = json.dumps(ex.get("statusDetails", {}).get("detailsMap", {}), sort_keys=True)
    print(f"{time.monotonic() - t0:7.1f}s  {thing:<32} {ex['status']:<12} {details}"
          + (f"  (retry {retry})" if retry else ""), flush=True)


def cmd_watch(iot, a: argparse.Namespace) -> int:
    """One line per change of any thing's status or statusDetails (and of the job's status,
    release, rate, counters and abort progress), until the job is COMPLETED or CANCELED, or
    every released execution is terminal with nothing left to release (a continuous job)."""
    seen: dict[str, tuple] = {}
    last_job = ""
    targets: Optional[list[str]] = None
    t0 = time.monotonic()
    while True:
        job = iot.describe_job(jobId=a.job_id)["job"]
        executions = _executions(iot, a.job_id)
        if targets is None or job.get("targetSelection") == "CONTINUOUS":
            targets = _target_things(iot, job)  # a snapshot's targets are asked once
        attempts = attempts_by_thing(executions)
        states = {}
        for thing, rows in attempts.items():
            last = seen.get(thing)
            for old in rows[:-1]:  # attempts that ended (and were retried) between two polls
                n = old.get("executionNumber", 0)
                if last is None or n > last[2] or (n == last[2] and old["status"] != last[0]):
                    ex = iot.describe_job_execution(jobId=a.job_id, thingName=thing,
                                                    executionNumber=n)["execution"]
                    _watch_thing(t0, thing, ex, old.get("retryAttempt") or 0)
            ex = iot.describe_job_execution(jobId=a.job_id, thingName=thing)["execution"]
            details = ex.get("statusDetails", {}).get("detailsMap", {})
            states[thing] = (ex["status"], json.dumps(details, sort_keys=True))
            key = (*states[thing], ex.get("executionNumber", 0))
            if last != key:
                seen[thing] = key
                _watch_thing(t0, thing, ex, rows[-1].get("retryAttempt") or 0)
        line = watch_line(job, executions, targets)
        if line != last_job:
            last_job = line
            print(f"{time.monotonic() - t0:7.1f}s  {line}", flush=True)
        terminal = [s for s, _ in states.values() if s in TERMINAL]
        succeeded = sum(s == "SUCCEEDED" for s, _ in states.values())
        waiting = _unreleased(attempts, targets)
        if job["status"] == "CANCELED":
            why = ": ".join(x for x in (job.get("reasonCode"), job.get("comment")) if x)
            print(f"job CANCELED{f' ({why})' if why else ''}: {len(terminal)} of {len(states)} "
                  f"execution(s) terminal, {succeeded} succeeded, {len(waiting)} thing(s) never "
                  f"released")
            return 1
        if (job["status"] == "COMPLETED"
                or (states and len(terminal) == len(states) and not waiting
                    and job["status"] != "SCHEDULED"
                    and not (job.get("jobProcessDetails") or {}).get("processingTargets"))):
            print(f"all {len(states)} execution(s) terminal: {succeeded} succeeded")
            return 0 if succeeded == len(states) else 1
        if a.timeout and time.monotonic() - t0 > a.timeout:
            print(f"jobs: not finished after {a.timeout}s", file=sys.stderr)
            return 3
        time.sleep(a.interval)  # polling the service: the interval is the user's choice


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/jobs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", default=os.environ.get("IOTJOBS_ENDPOINT"),
                    help="control-plane URL of jobsd (default: $IOTJOBS_ENDPOINT, else AWS)")
    ap.add_argument("--data-endpoint", default=os.environ.get("IOTJOBS_DATA_ENDPOINT"),
                    help="jobsd's --data URL for `command` (default: $IOTJOBS_DATA_ENDPOINT, "
                         "else AWS)")
    ap.add_argument("--region", default=os.environ.get("AWS_REGION", "us-east-1"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create a job from a JSON document file or a job template")
    c.add_argument("job_id")
    c.add_argument("--document", help="file holding the job document (JSON object); optional "
                                       "with --template")
    c.add_argument("--thing", action="append", default=[], help="target thing (repeatable)")
    c.add_argument("--group", action="append", default=[], help="target thing group (repeatable)")
    c.add_argument("--continuous", action="store_true",
                   help="CONTINUOUS: things added to a target group later get the job too")
    c.add_argument("--description")
    add_campaign_args(c, template=True)
    o = sub.add_parser("ota", help="sign a firmware image, publish it to jobsd's files folder "
                                   "and create the OTA job")
    o.add_argument("job_id")
    o.add_argument("--image", required=True, help="the firmware image file")
    o.add_argument("--key", required=True, metavar="KEY.pem", help="signing key (tools/sign keygen)")
    o.add_argument("--files", required=True, metavar="DIR", help="jobsd's --files folder")
    o.add_argument("--bucket", default="firmware", help="bucket (first folder under --files)")
    o.add_argument("--version", help="the image's version (the device refuses downgrades)")
    o.add_argument("--afr-ota", action="store_true", help="AWS OTA (afr_ota) document")
    o.add_argument("--force", action="store_true", help="replace an object (and stream) that differs")
    o.add_argument("--thing", action="append", default=[])
    o.add_argument("--group", action="append", default=[])
    o.add_argument("--continuous", action="store_true")
    o.add_argument("--protocol", choices=["http", "mqtt", "both"], default="http",
                   help="http: a presigned URL; mqtt: a stream named after the job (one TLS "
                        "session on the device); both: the device picks (default http)")
    o.add_argument("--role-arn", default=STREAM_ROLE, help="the stream's role (AWS)")
    add_campaign_args(o)
    dl = sub.add_parser("download", help="publish a file to jobsd's files folder and create a "
                                         "download-file job for it, over HTTP or MQTT")
    dl.add_argument("job_id")
    dl.add_argument("--file", required=True, help="the file to send")
    dl.add_argument("--path", required=True, help="where it goes on the device (relative to its "
                                                  "download folder)")
    dl.add_argument("--files", required=True, metavar="DIR", help="jobsd's --files folder")
    dl.add_argument("--bucket", default="files", help="bucket (first folder under --files)")
    dl.add_argument("--key-name", metavar="K", help="object key (default: the file's name)")
    dl.add_argument("--protocol", choices=["http", "mqtt", "both"], default="http")
    dl.add_argument("--role-arn", default=STREAM_ROLE, help="the stream's role (AWS)")
    dl.add_argument("--force", action="store_true", help="replace an object (and stream) that differs")
    dl.add_argument("--thing", action="append", default=[])
    dl.add_argument("--group", action="append", default=[])
    dl.add_argument("--continuous", action="store_true")
    add_campaign_args(dl)
    p = sub.add_parser("app", help="sign an application folder, publish it to jobsd's files "
                                   "folder and create the app-update job")
    p.add_argument("job_id")
    p.add_argument("--dir", required=True, help="the application folder (application.py, ...)")
    p.add_argument("--version", required=True, help="its version (the device refuses downgrades)")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="signing key (tools/sign keygen)")
    p.add_argument("--files", required=True, metavar="DIR", help="jobsd's --files folder")
    p.add_argument("--bucket", default="apps", help="bucket (first folder under --files)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out matching paths or names (repeatable), e.g. '__pycache__'")
    p.add_argument("--allow-downgrade", action="store_true")
    p.add_argument("--force", action="store_true", help="replace a published bundle")
    p.add_argument("--protocol", choices=["http", "mqtt", "both"], default="http",
                   help="http: presigned URLs; mqtt: one stream named after the job; both")
    p.add_argument("--role-arn", default=STREAM_ROLE, help="the stream's role (AWS)")
    p.add_argument("--thing", action="append", default=[])
    p.add_argument("--group", action="append", default=[])
    p.add_argument("--continuous", action="store_true")
    add_campaign_args(p)
    k = sub.add_parser("command", help="run an AWS IoT command on a thing and print its outcome")
    k.add_argument("command_id", help="the command (created with --payload if it is new)")
    k.add_argument("--thing", required=True)
    k.add_argument("--payload", help='JSON object (default: {"command": COMMAND_ID})')
    k.add_argument("--timeout", type=int, default=10, help="executionTimeoutSeconds (default 10)")
    ls = sub.add_parser("list", help="list jobs")
    ls.add_argument("--status", choices=["IN_PROGRESS", "SCHEDULED", "CANCELED", "COMPLETED",
                                         "DELETION_IN_PROGRESS"])
    d = sub.add_parser("describe", help="a job, its document, its campaign (released/total, "
                                        "rate, abort progress, retries, schedule) and each "
                                        "thing's status")
    d.add_argument("job_id")
    x = sub.add_parser("cancel", help="cancel a job")
    x.add_argument("job_id")
    x.add_argument("--force", action="store_true", help="also cancel IN_PROGRESS executions")
    x.add_argument("--reason", help="reason code")
    x.add_argument("--comment")
    w = sub.add_parser("watch", help="live progress per thing and of the job until it is COMPLETED "
                                     "or CANCELED (or, continuous, every execution is terminal); "
                                     "exit 0 only if all SUCCEEDED")
    w.add_argument("job_id")
    w.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    w.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (exit 3)")
    a = ap.parse_args(argv)
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

    try:
        if a.cmd in ("create", "ota", "app", "download"):
            a.campaign = campaign_request(a)  # before anything is signed, published or asked
        return run(client(a), a)
    except UsageError as e:
        print(f"jobs: {e}", file=sys.stderr)
        return 2
    except ClientError as e:
        err = e.response.get("Error", {})
        print(f"jobs: {err.get('Code')}: {err.get('Message')}", file=sys.stderr)
        # the service refused a value (a rate, a threshold, a time...): 1; as before, 2 for the
        # rest (a thing, group, job or template that does not exist, or already does)
        return 1 if err.get("Code") in REFUSED else 2
    except ParamValidationError as e:  # botocore's own range checks (minimums), before sending
        print(f"jobs: {e}", file=sys.stderr)
        return 1
    except (BotoCoreError, OSError) as e:
        print(f"jobs: {e}", file=sys.stderr)
        return 2


REFUSED = {"InvalidRequestException", "LimitExceededException"}


def run(iot, a: argparse.Namespace) -> int:
    """The command `a` names, on the `iot` client (tests hand in a stubbed one)."""
    return {"create": cmd_create, "ota": cmd_ota, "app": cmd_app, "download": cmd_download,
            "command": cmd_command, "list": cmd_list, "describe": cmd_describe,
            "cancel": cmd_cancel, "watch": cmd_watch}[a.cmd](iot, a)
