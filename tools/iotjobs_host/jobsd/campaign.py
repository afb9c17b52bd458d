"""Fleet campaigns: staged rollout, abort, retries, scheduling and maintenance windows
(FLEET.md 1-4, 6, 7; its [P] proposals are followed where AWS documents nothing).

Where things happen:
- `_execution_ended`: the one place an execution's end has consequences, in this order: its
  event, the abort check, a retry, the job's completion.
- `_campaign_due`: what the clock brings (called by the timer thread and by the test hook
  `advanceClock`): a rollout minute, a scheduled start or end, a window opening or closing.
- `_begin_rollout`: CreateJob hands the resolved targets here; a job with no rollout config,
  no schedule and at most 1,000 targets gets all its executions at once, as before.

State: one `rollouts` row per staged job (store.py), a JSON object: `pending` (thing names not
yet released, in target order), `released`, `step` (exponential rate step), `last_batch`,
`start`/`end` (epoch seconds) and `endBehavior`, `windows` (the parsed config is re-read from
the job), `open_until` (the current window's end), `started`, `ended`; and `next_at`, the
earliest time the clock has work for the job. Everything is written in the same transaction as
the executions it creates, so a restart neither releases twice nor loses a release.

Time: a rollout minute is `minute_seconds` of the service clock (60 s unless jobsd runs with
--minute-seconds, like the job timers); schedules and windows are wall-clock times of the same
clock, which only the test hook moves.
"""
from __future__ import annotations

import datetime
import logging
import math
import re
from typing import Any, Optional

from . import cron
from .core import _invalid, _Tracker
from .rest import Request, Router
from .rules import ApiError, MAX_DESCRIPTION, MAX_STEP_MINUTES, is_int, is_number
from .store import Execution, Job

log = logging.getLogger("jobsd.campaign")

DEFAULT_RATE = 1000            # things notified per minute without a rollout config (AWS)
MAX_RATE = 1000
MAX_TARGETS = 100              # targets of a job, AssociateTargetsWithJob included
MAX_DELETING = 10              # jobs in DELETION_IN_PROGRESS at once
FAILURE_TYPES = {"FAILED": ("FAILED",), "REJECTED": ("REJECTED",), "TIMED_OUT": ("TIMED_OUT",),
                 "ALL": ("FAILED", "REJECTED", "TIMED_OUT")}
DONE = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT")
ABORT_REASON = "JOB_ABORT_CRITERIA_MET"
MIN_LEAD, MAX_START, MAX_END = 30 * 60, 365 * 86400, 2 * 365 * 86400
MIN_SPAN, MAX_SPAN = 30 * 60, 2 * 365 * 86400
END_BEHAVIORS = ("STOP_ROLLOUT", "CANCEL", "FORCE_CANCEL")
_TIME_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?Z?")


# -- validation (CreateJob, UpdateJob, CreateJobTemplate) -----------------------------------------
def _obj(body: dict[str, Any], key: str) -> Optional[dict[str, Any]]:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise _invalid(f"{key} must be an object")
    return value


def _decimals(value: float, places: int) -> bool:
    return abs(round(value, places) - value) < 1e-9


def validate_rollout(cfg: dict[str, Any]) -> None:
    top = cfg.get("maximumPerMinute")
    if top is not None and not (is_int(top) and 1 <= top <= MAX_RATE):
        raise _invalid(f"jobExecutionsRolloutConfig.maximumPerMinute must be 1..{MAX_RATE}")
    exp = cfg.get("exponentialRate")
    if exp is None:
        return
    if not isinstance(exp, dict):
        raise _invalid("exponentialRate must be an object")
    base = exp.get("baseRatePerMinute")
    if not (is_int(base) and 1 <= base <= MAX_RATE):
        raise _invalid(f"exponentialRate.baseRatePerMinute must be 1..{MAX_RATE}")
    factor = exp.get("incrementFactor")
    if not (is_number(factor) and 1.1 <= factor <= 5.0 and _decimals(factor, 1)):
        raise _invalid("exponentialRate.incrementFactor must be 1.1..5.0 with at most one "
                       "decimal digit")
    crit = exp.get("rateIncreaseCriteria")
    if not isinstance(crit, dict):
        raise _invalid("exponentialRate.rateIncreaseCriteria is required")
    given = 0
    for key in ("numberOfNotifiedThings", "numberOfSucceededThings"):
        v = crit.get(key)
        if v is not None:
            if not (is_int(v) and v >= 1):
                raise _invalid(f"rateIncreaseCriteria.{key} must be an integer >= 1")
            given += 1
    if not given:
        raise _invalid("rateIncreaseCriteria needs numberOfNotifiedThings or "
                       "numberOfSucceededThings")


def validate_abort(cfg: dict[str, Any]) -> None:
    crit = cfg.get("criteriaList")
    if not isinstance(crit, list) or not crit:
        raise _invalid("abortConfig.criteriaList must be a non-empty list")
    for c in crit:
        if not isinstance(c, dict):
            raise _invalid("abortConfig.criteriaList items must be objects")
        if c.get("failureType") not in FAILURE_TYPES:
            raise _invalid("abort failureType must be FAILED, REJECTED, TIMED_OUT or ALL")
        if c.get("action") != "CANCEL":
            raise _invalid("abort action must be CANCEL")
        pct = c.get("thresholdPercentage")
        if not (is_number(pct) and 0 <= pct <= 100 and _decimals(pct, 2)):
            raise _invalid("abort thresholdPercentage must be 0..100 with at most two decimals")
        least = c.get("minNumberOfExecutedThings")
        if not (is_int(least) and least >= 1):
            raise _invalid("abort minNumberOfExecutedThings must be an integer >= 1")


def validate_retry(cfg: dict[str, Any]) -> None:
    crit = cfg.get("criteriaList")
    if not isinstance(crit, list) or not 1 <= len(crit) <= 2:
        raise _invalid("jobExecutionsRetryConfig.criteriaList must hold 1 or 2 criteria")
    seen, total = set(), 0
    for c in crit:
        if not isinstance(c, dict):
            raise _invalid("retry criteria must be objects")
        kind, n = c.get("failureType"), c.get("numberOfRetries")
        if kind not in ("FAILED", "TIMED_OUT", "ALL"):
            raise _invalid("retry failureType must be FAILED, TIMED_OUT or ALL")
        if not (is_int(n) and 0 <= n <= 10):
            raise _invalid("retry numberOfRetries must be 0..10")
        if kind in seen:
            raise _invalid(f"retry failureType {kind} is given twice")
        seen.add(kind)
        total += n
    if "ALL" in seen and len(seen) > 1:
        raise _invalid("retry failureType ALL cannot be combined with another criterion")
    if total > 10:
        raise _invalid("retries of all criteria together must be at most 10")


def parse_time(text: Any, what: str) -> float:
    """`YYYY-MM-DDTHH:MM` (`:SS` and `Z` tolerated), UTC, as epoch seconds."""
    m = _TIME_RE.fullmatch(text) if isinstance(text, str) and len(text) <= 64 else None
    if m is None:
        raise _invalid(f"{what} must be a date and time as YYYY-MM-DDTHH:MM (UTC)")
    y, mo, d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    try:
        return datetime.datetime(y, mo, d, h, mi, s, tzinfo=datetime.UTC).timestamp()
    except ValueError:
        raise _invalid(f"{what} {text!r} is not a valid date and time") from None


def format_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M")


def validate_windows(windows: Any) -> list[tuple[cron.Cron, int]]:
    if not isinstance(windows, list):
        raise _invalid("maintenanceWindows must be a list")
    out = []
    for w in windows:
        if not isinstance(w, dict):
            raise _invalid("maintenance windows must be objects")
        minutes = w.get("durationInMinutes")
        if not (is_int(minutes) and 1 <= minutes <= 1430):
            raise _invalid("maintenance window durationInMinutes must be 1..1430")
        try:
            out.append((cron.parse(w.get("startTime")), minutes))
        except cron.CronError as e:
            raise _invalid(f"maintenance window startTime: {e}") from None
    return out


def validate_schedule(cfg: dict[str, Any], now: float) -> None:
    start = end = None
    if cfg.get("startTime") is not None:
        start = parse_time(cfg["startTime"], "schedulingConfig.startTime")
        if not now + MIN_LEAD <= start <= now + MAX_START:
            raise _invalid("schedulingConfig.startTime must be between 30 minutes and one year "
                           "from now")
    if cfg.get("endTime") is not None:
        end = parse_time(cfg["endTime"], "schedulingConfig.endTime")
        if not now + MIN_LEAD <= end <= now + MAX_END:
            raise _invalid("schedulingConfig.endTime must be between 30 minutes and two years "
                           "from now")
        if start is not None and not MIN_SPAN <= end - start <= MAX_SPAN:
            raise _invalid("schedulingConfig endTime must be 30 minutes to two years after "
                           "startTime")
    behavior = cfg.get("endBehavior")
    if behavior is not None and behavior not in END_BEHAVIORS:
        raise _invalid("schedulingConfig.endBehavior must be STOP_ROLLOUT, CANCEL or "
                       "FORCE_CANCEL")
    if cfg.get("maintenanceWindows") is not None:
        validate_windows(cfg["maintenanceWindows"])


def validate_configs(body: dict[str, Any], now: float, *, scheduling: bool = True) -> None:
    """The campaign configs of a CreateJob (or CreateJobTemplate) body; InvalidRequest on the
    first bad field, before anything is created."""
    rollout = _obj(body, "jobExecutionsRolloutConfig")
    if rollout is not None:
        validate_rollout(rollout)
    abort = _obj(body, "abortConfig")
    if abort is not None:
        validate_abort(abort)
    retry = _obj(body, "jobExecutionsRetryConfig")
    if retry is not None:
        validate_retry(retry)
    sched = _obj(body, "schedulingConfig")
    if sched is not None:
        if not scheduling:
            raise _invalid("schedulingConfig is not accepted here")
        validate_schedule(sched, now)
    if body.get("maintenanceWindows") is not None:
        validate_windows(body["maintenanceWindows"])


# -- the rate -------------------------------------------------------------------------------------
def rate_at(rollout: dict[str, Any], step: int) -> int:
    """Things released per minute at exponential step `step` (FLEET.md 1.4: from the base each
    time, floored, capped by maximumPerMinute, never below the base)."""
    top = rollout.get("maximumPerMinute") or DEFAULT_RATE
    exp = rollout.get("exponentialRate")
    if not exp:
        return top
    base = exp["baseRatePerMinute"]
    return min(top, max(base, math.floor(base * exp["incrementFactor"] ** step + 1e-9)))


def advance_step(rollout: dict[str, Any], step: int, notified: int, succeeded: int) -> int:
    exp = rollout.get("exponentialRate")
    if not exp:
        return step
    crit = exp["rateIncreaseCriteria"]
    nn, ns = crit.get("numberOfNotifiedThings"), crit.get("numberOfSucceededThings")
    while (nn and notified >= (step + 1) * nn) or (ns and succeeded >= (step + 1) * ns):
        step += 1
    return step


class CampaignApi:
    def _validate_campaign(self, body: dict[str, Any]) -> None:
        """The campaign configs of a CreateJobTemplate body (template_service.py)."""
        validate_configs(body, self._clock())

    # -- rollout -------------------------------------------------------------------------------
    def _begin_rollout(self, job: Job, names: list[str], now: int, tracker: _Tracker) -> None:
        """CreateJob's targets, resolved: released at once, or staged by a rollouts row."""
        cfg = job.config
        sched = cfg.get("schedulingConfig") or {}
        staged = (cfg.get("jobExecutionsRolloutConfig") or sched or len(names) > DEFAULT_RATE)
        if not staged:
            for name in names:
                self._release_one(job, name, now, tracker, hidden=False)
            return
        state: dict[str, Any] = {"pending": names, "released": 0, "step": 0,
                                 "last_batch": None, "started": False, "ended": False,
                                 "open_until": None}
        if sched.get("startTime") is not None:
            state["start"] = parse_time(sched["startTime"], "startTime")
        if sched.get("endTime") is not None:
            state["end"] = parse_time(sched["endTime"], "endTime")
            state["endBehavior"] = sched.get("endBehavior") or "STOP_ROLLOUT"
        if "start" in state:
            job.status = "SCHEDULED"
            self._store.save_job(job)
        self._store.save_rollout(job.job_id, state, None)
        self._advance(job, state, self._clock(), tracker)

    def _windows(self, job: Job) -> list[tuple[cron.Cron, int]]:
        sched = job.config.get("schedulingConfig") or {}
        return validate_windows(sched.get("maintenanceWindows") or [])

    def _window_at(self, job: Job, t: float) -> tuple[bool, Optional[float]]:
        """(inside a window at t, when that changes); (True, None) without windows."""
        windows = self._windows(job)
        if not windows:
            return True, None
        open_until, next_open = None, None
        for c, minutes in windows:
            began = c.next_after(t - minutes * 60)  # the first start whose window covers t
            if began is not None and began <= t:
                end = began + minutes * 60
                open_until = end if open_until is None else max(open_until, end)
            nxt = c.next_after(t) if began is None or began <= t else began
            if nxt is not None and (next_open is None or nxt < next_open):
                next_open = nxt
        if open_until is not None:
            return True, open_until
        return False, next_open

    def _advance(self, job: Job, state: dict[str, Any], t: float, tracker: _Tracker) -> None:
        """Bring one staged job up to time `t`: start, window, release, end; then save it
        with the next time it has work."""
        now = int(t)
        if job.status in ("CANCELED", "COMPLETED", "DELETION_IN_PROGRESS"):
            self._store.save_rollout(job.job_id, state, None)
            return
        if not state["started"] and ("start" not in state or t >= state["start"]):
            if "start" in state and self.max_concurrent_jobs and \
                    self._concurrent_jobs() >= self.max_concurrent_jobs:
                # FLEET.md 4.2: a scheduled job that starts at the concurrency limit is canceled
                self._cancel_job(job, False, "JOB_CONCURRENCY_LIMIT_REACHED",
                                 "The job reached its startTime while the account was at its "
                                 f"job concurrency limit ({self.max_concurrent_jobs}).", now,
                                 tracker)
                self._store.save_rollout(job.job_id, state, None)
                return
            state["started"] = True
            job.status = "IN_PROGRESS"
            job.last_updated_at = now
            self._store.save_job(job)
        if state["started"] and not state["ended"] and "end" in state and t >= state["end"]:
            self._end_schedule(job, state, now, tracker)
            if job.status == "CANCELED":
                self._store.save_rollout(job.job_id, state, None)
                return
        inside, change = (False, None)
        if state["started"]:
            inside, change = self._window_at(job, t)
            self._set_window(job, inside, now, tracker)
        if state["started"] and inside and not state["ended"] and state["pending"]:
            minute = self.minute_seconds
            if state["last_batch"] is None or t >= state["last_batch"] + minute - 1e-6:
                self._release_batch(job, state, now, tracker)
                state["last_batch"] = t if state["last_batch"] is None else max(
                    t, state["last_batch"] + minute)
        # when the clock next has work for this job
        times = []
        if not state["started"]:
            times.append(state["start"])
        else:
            if "end" in state and not state["ended"]:
                times.append(state["end"])
            if change is not None:
                times.append(change)
            if inside and state["pending"] and not state["ended"]:
                times.append(state["last_batch"] + self.minute_seconds)
        self._store.save_rollout(job.job_id, state, min(times) if times else None)
        self._refresh_job(job.job_id, now, tracker)

    def _set_window(self, job: Job, inside: bool, now: int, tracker: _Tracker) -> None:
        """Inside a window the job is IN_PROGRESS and its QUEUED executions visible; outside,
        SCHEDULED and hidden from devices (FLEET.md 4.3)."""
        if not self._windows(job):
            return
        want = "IN_PROGRESS" if inside else "SCHEDULED"
        if job.status != want:
            job.status = want
            job.last_updated_at = now
            self._store.save_job(job)
        for ex in self._store.executions_for_job(job.job_id):
            if ex.status == "QUEUED" and ex.hidden == inside:
                tracker.touch(ex.thing_name)
                ex.hidden = not inside
                self._store.save_execution(ex)

    def _release_batch(self, job: Job, state: dict[str, Any], now: int,
                       tracker: _Tracker) -> None:
        rollout = job.config.get("jobExecutionsRolloutConfig") or {}
        succeeded = self._count(job.job_id, ("SUCCEEDED",))
        state["step"] = advance_step(rollout, state["step"], state["released"], succeeded)
        rate = rate_at(rollout, state["step"])
        batch, state["pending"] = state["pending"][:rate], state["pending"][rate:]
        for name in batch:
            if self._store.get_thing(name) is None:
                continue  # deleted since the job was created
            if self._store.get_execution(job.job_id, name) is not None:
                continue  # already has one (a late joiner of a continuous job)
            self._release_one(job, name, now, tracker, hidden=False)
            state["released"] += 1
        state["step"] = advance_step(rollout, state["step"], state["released"], succeeded)
        log.info("job %s: released %d (rate %d/min, %d left)", job.job_id, len(batch), rate,
                 len(state["pending"]))

    def _release_one(self, job: Job, name: str, now: int, tracker: _Tracker, *,
                     hidden: bool, retry_attempt: int = 0) -> Execution:
        """A new QUEUED execution of the job on `name`: the next executionNumber, version 1."""
        latest = self._store.get_execution(job.job_id, name)
        tracker.touch(name)
        return self._store.insert_execution(Execution(
            job_id=job.job_id, thing_name=name,
            execution_number=1 if latest is None else latest.execution_number + 1,
            status="QUEUED", queued_at=now, last_updated_at=now, version_number=1,
            retry_attempt=retry_attempt, hidden=hidden))

    def _count(self, job_id: str, statuses: tuple[str, ...]) -> int:
        return sum(1 for ex in self._store.executions_for_job(job_id) if ex.status in statuses)

    def _end_schedule(self, job: Job, state: dict[str, Any], now: int,
                      tracker: _Tracker) -> None:
        state["ended"] = True
        state["pending"] = []
        behavior = state.get("endBehavior", "STOP_ROLLOUT")
        log.info("job %s reached its endTime: %s", job.job_id, behavior)
        if behavior in ("CANCEL", "FORCE_CANCEL"):
            self._cancel_job(job, behavior == "FORCE_CANCEL", None,
                             f"The job reached its scheduled endTime ({behavior}).", now,
                             tracker)

    def _rollout_done(self, job_id: str) -> bool:
        state = self._store.get_rollout(job_id)
        return state is None or state.get("deleting") or (state["started"] and
                                                          not state["pending"])

    def _rolling(self, job_id: str) -> bool:
        """isConcurrent / processingTargets: executions are still being created."""
        state = self._store.get_rollout(job_id)
        return state is not None and not state.get("deleting") and state["started"] and \
            bool(state["pending"]) and not state["ended"]

    def _campaign_due(self, tracker: _Tracker, now: int) -> None:
        t = self._clock()
        for job_id in self._store.due_rollouts(t):
            job = self._store.get_job(job_id)
            state = self._store.get_rollout(job_id)
            if job is None or state is None:
                continue
            if state.get("deleting"):
                self._store.delete_job(job_id)
                self._job_event(tracker, job, "deleted")
                continue
            self._advance(job, state, t, tracker)

    def _next_deadline(self) -> Optional[float]:
        return self._store.next_deadline()

    def _late_joiner(self, job_id: str, thing: str, latest: Optional[Execution], now: int,
                     tracker: _Tracker) -> None:
        """A thing joined a group a CONTINUOUS job targets: its execution at once, outside the
        rate (FLEET.md 1.2); queued for the start of a scheduled job; none after a schedule's
        end; hidden while the window is closed."""
        job = self._store.get_job(job_id)
        if job is None or job.status in ("CANCELED", "COMPLETED", "DELETION_IN_PROGRESS"):
            return
        state = self._store.get_rollout(job_id)
        if state is not None:
            if state["ended"]:
                return
            if not state["started"]:
                if thing not in state["pending"]:
                    state["pending"].append(thing)
                    self._store.save_rollout(job_id, state, state.get("start"))
                return
        hidden = job.status == "SCHEDULED"
        tracker.touch(thing)
        self._store.insert_execution(Execution(
            job_id=job_id, thing_name=thing,
            execution_number=1 if latest is None else latest.execution_number + 1,
            status="QUEUED", queued_at=now, last_updated_at=now, version_number=1,
            hidden=hidden))

    # -- an execution ended ----------------------------------------------------------------------
    def _execution_ended(self, ex: Execution, now: int, tracker: _Tracker) -> None:
        """`ex` just turned terminal (device report, timeout, cancel): its event, then what
        follows for the job."""
        self._execution_event(tracker, ex)
        job = self._store.get_job(ex.job_id)
        if job is None:
            return
        if job.status in ("IN_PROGRESS", "SCHEDULED") and ex.status in DONE:
            if self._check_abort(job, now, tracker):
                return
            self._maybe_retry(job, ex, now, tracker)
        self._refresh_job(ex.job_id, now, tracker)

    def _check_abort(self, job: Job, now: int, tracker: _Tracker) -> bool:
        crit = (job.config.get("abortConfig") or {}).get("criteriaList") or []
        if not crit:
            return False
        executions = self._store.executions_for_job(job.job_id)
        done = [ex.status for ex in executions if ex.status in DONE]
        for c in crit:
            bad = sum(1 for s in done if s in FAILURE_TYPES[c["failureType"]])
            if len(done) >= c["minNumberOfExecutedThings"] and \
                    100 * bad >= c["thresholdPercentage"] * len(done) and bad > 0:
                comment = (f"Job aborted: {bad} of {len(done)} executed things "
                           f"({100 * bad / len(done):.2f}%) ended {c['failureType']}, at or "
                           f"above the threshold of {c['thresholdPercentage']}% once "
                           f"{c['minNumberOfExecutedThings']} had executed.")
                log.info("job %s: %s", job.job_id, comment)
                state = self._store.get_rollout(job.job_id)
                if state is not None:
                    state["pending"] = []
                    self._store.save_rollout(job.job_id, state, None)
                self._cancel_job(job, False, ABORT_REASON, comment, now, tracker)
                return True
        return False

    def _maybe_retry(self, job: Job, ex: Execution, now: int, tracker: _Tracker) -> None:
        """FLEET.md 3.4: a FAILED or TIMED_OUT attempt with budget left gets a new execution."""
        if ex.status not in ("FAILED", "TIMED_OUT"):
            return
        crit = (job.config.get("jobExecutionsRetryConfig") or {}).get("criteriaList") or []
        budget = {c["failureType"]: c["numberOfRetries"] for c in crit}
        if not budget:
            return
        state = self._store.get_rollout(job.job_id)
        if state is not None and state.get("ended"):
            return
        mine = [e for e in self._store.executions_for_job(job.job_id)
                if e.thing_name == ex.thing_name]
        # a thing that left a continuous job's groups and came back starts again at zero
        removed = [e.execution_number for e in mine if e.status == "REMOVED"]
        if removed:
            mine = [e for e in mine if e.execution_number > max(removed)]
        if "ALL" in budget:
            used = sum(1 for e in mine if e.status in ("FAILED", "TIMED_OUT"))
            allowed = budget["ALL"]
        elif ex.status in budget:
            used = sum(1 for e in mine if e.status == ex.status)
            allowed = budget[ex.status]
        else:
            return
        if used > allowed:  # `used` counts this attempt: retries so far are used - 1
            return
        if any(e.status in ("QUEUED", "IN_PROGRESS") for e in mine):
            return
        new = self._release_one(job, ex.thing_name, now, tracker,
                                hidden=job.status == "SCHEDULED",
                                retry_attempt=ex.retry_attempt + 1)
        log.info("job %s on %s: attempt %d %s, retry #%d queued as execution %d", job.job_id,
                 ex.thing_name, ex.execution_number, ex.status, new.retry_attempt,
                 new.execution_number)

    # -- cancel ----------------------------------------------------------------------------------
    def _cancel_job(self, job: Job, force: bool, reason: Optional[str], comment: Optional[str],
                    now: int, tracker: _Tracker) -> None:
        """CancelJob, an abort, or a schedule's end: the job CANCELED, its QUEUED executions
        (queued retries among them) and with `force` its IN_PROGRESS ones CANCELED, nothing
        more released or retried."""
        self._job_event(tracker, job, "cancellation_in_progress",
                        {"comment": comment} if comment is not None else None)
        job.status = "CANCELED"
        job.force_canceled = job.force_canceled or force
        job.reason_code = reason if reason is not None else job.reason_code
        job.comment = comment if comment is not None else job.comment
        job.last_updated_at = now
        self._store.save_job(job)
        state = self._store.get_rollout(job.job_id)
        if state is not None:
            state["pending"] = []
            self._store.save_rollout(job.job_id, state, None)
        for ex in self._store.executions_for_job(job.job_id):
            if ex.status == "QUEUED" or (force and ex.status == "IN_PROGRESS"):
                tracker.touch(ex.thing_name)
                ex.force_canceled = ex.status == "IN_PROGRESS"
                ex.status = "CANCELED"
                ex.hidden = False
                ex.last_updated_at = now
                ex.version_number += 1
                self._end_timers(ex)
                self._store.save_execution(ex)
                self._execution_event(tracker, ex)
        self._job_event(tracker, job, "canceled")

    # -- account quotas ------------------------------------------------------------------------
    def _active_jobs(self) -> list[Job]:
        return [j for j in self._store.list_jobs() if j.status in ("IN_PROGRESS", "SCHEDULED")]

    def _concurrent_jobs(self) -> int:
        """Jobs still creating executions (isConcurrent): staged ones not done releasing."""
        return sum(1 for j in self._active_jobs() if self._rolling(j.job_id))

    def _check_quotas(self, body: dict[str, Any]) -> None:
        """CreateJob against the account quotas (FLEET.md 7 [P]: AWS's defaults are not
        published, so they are jobsd options and off unless given)."""
        if self.max_active_jobs and len(self._active_jobs()) >= self.max_active_jobs:
            raise ApiError("LimitExceededException", 410,
                           f"The account has {self.max_active_jobs} active jobs, its limit.")
        staged = body.get("jobExecutionsRolloutConfig") and not body.get("schedulingConfig")
        if staged and self.max_concurrent_jobs and \
                self._concurrent_jobs() >= self.max_concurrent_jobs:
            raise ApiError("LimitExceededException", 410,
                           f"The account has {self.max_concurrent_jobs} jobs rolling out, its "
                           "job concurrency limit.")

    # -- delete ----------------------------------------------------------------------------------
    def _delete_job(self, job: Job, now: int, tracker: _Tracker) -> None:
        """DeleteJob: its executions go at once (devices see nothing more of it); the job itself
        stays DELETION_IN_PROGRESS for `deletion_seconds` of jobsd's clock (--deletion-seconds,
        0 by default: gone at once), at most 10 jobs at a time (LimitExceededException 410)."""
        if self.deletion_seconds > 0:
            deleting = sum(1 for j in self._store.list_jobs()
                           if j.status == "DELETION_IN_PROGRESS")
            if deleting >= MAX_DELETING:
                raise ApiError("LimitExceededException", 410,
                               f"At most {MAX_DELETING} jobs can be in DELETION_IN_PROGRESS; "
                               "try again when one of them is deleted.")
        self._job_event(tracker, job, "deletion_in_progress")
        for ex in self._store.executions_for_job(job.job_id):
            tracker.touch(ex.thing_name)
            self._store.delete_execution(ex)
        self._docs.pop(job.job_id, None)
        if self.deletion_seconds > 0:
            job.status = "DELETION_IN_PROGRESS"
            job.last_updated_at = now
            self._store.save_job(job)
            self._store.save_rollout(job.job_id, {"deleting": True},
                                     self._clock() + self.deletion_seconds)
            return
        self._store.delete_job(job.job_id)
        self._job_event(tracker, job, "deleted")

    # -- views -------------------------------------------------------------------------------
    def _campaign_view(self, job: Job, out: dict[str, Any]) -> dict[str, Any]:
        """DescribeJob's campaign members: processingTargets, isConcurrent and the next seven
        window starts (scheduledJobRollouts)."""
        rolling = self._rolling(job.job_id)
        out["isConcurrent"] = rolling
        if rolling:
            out.setdefault("jobProcessDetails", {})["processingTargets"] = list(job.targets)
        windows = self._windows(job)
        if windows and job.status not in ("CANCELED", "COMPLETED"):
            starts: list[float] = []
            t = self._clock()
            for c, _ in windows:
                at = t
                for _ in range(7):
                    nxt = c.next_after(at)
                    if nxt is None:
                        break
                    starts.append(nxt)
                    at = nxt
            out["scheduledJobRollouts"] = [{"startTime": format_time(s)}
                                           for s in sorted(set(starts))[:7]]
        return out

    # -- UpdateJob, AssociateTargetsWithJob --------------------------------------------------
    def update_job(self, job_id: str, body: dict[str, Any]) -> None:
        allowed = {"description", "presignedUrlConfig", "jobExecutionsRolloutConfig",
                   "abortConfig", "timeoutConfig", "jobExecutionsRetryConfig"}
        unknown = set(body) - allowed
        if unknown:
            raise _invalid(f"UpdateJob does not take {sorted(unknown)[0]}")
        description = body.get("description")
        if description is not None and (not isinstance(description, str)
                                        or len(description) > MAX_DESCRIPTION):
            raise _invalid(f"description must be a string of at most {MAX_DESCRIPTION} "
                           "characters")
        validate_configs(body, self._clock())
        timeout = _obj(body, "timeoutConfig")
        if timeout is not None:
            minutes = timeout.get("inProgressTimeoutInMinutes")
            if minutes is not None and not (is_int(minutes) and 1 <= minutes <= MAX_STEP_MINUTES):
                raise _invalid(f"inProgressTimeoutInMinutes must be 1..{MAX_STEP_MINUTES}")

        def op(tracker: _Tracker, now: int) -> None:
            job = self._job_or_404(job_id)
            if job.status in ("CANCELED", "COMPLETED", "DELETION_IN_PROGRESS"):
                raise _invalid(f"Job {job_id} is {job.status} and cannot be updated.")
            retry = body.get("jobExecutionsRetryConfig")
            if retry is not None:
                old = {c["failureType"]: c["numberOfRetries"] for c in
                       (job.config.get("jobExecutionsRetryConfig") or {}).get(
                           "criteriaList", [])}
                for c in retry["criteriaList"]:
                    if c["numberOfRetries"] != 0 and old.get(c["failureType"]) != \
                            c["numberOfRetries"]:
                        raise _invalid("UpdateJob can only set numberOfRetries to 0 (no more "
                                       "retries); the count is fixed at creation")
            for key in allowed - {"description"}:
                if body.get(key) is not None:
                    job.config[key] = body[key]
            if description is not None:
                job.description = description
            job.last_updated_at = now
            self._store.save_job(job)
            self._docs.pop(job_id, None)
            # a new rollout config paces the next batch on (the rollouts row is unchanged)
        self._run(op)

    def associate_targets(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        targets = body.get("targets")
        if not isinstance(targets, list) or not targets:
            raise _invalid("targets must be a non-empty list of thing or thing-group ARNs")
        comment = body.get("comment")
        if comment is not None and (not isinstance(comment, str) or len(comment) > 2028):
            raise _invalid("comment must be a string of at most 2028 characters")
        resolved = list(dict.fromkeys(self._target_from_arn(arn) for arn in targets))

        def op(tracker: _Tracker, now: int) -> dict[str, Any]:
            job = self._job_or_404(job_id)
            if job.target_selection != "CONTINUOUS" or job.status != "IN_PROGRESS":
                raise _invalid("AssociateTargetsWithJob applies only to a CONTINUOUS job that "
                               "is IN_PROGRESS")
            arns = [self.thing_arn(n) if k == "thing" else self.group_arn(n)
                    for k, n in resolved]
            new = [a for a in arns if a not in job.targets]
            if len(job.targets) + len(new) > MAX_TARGETS:
                raise ApiError("LimitExceededException", 410,
                               f"A job can have at most {MAX_TARGETS} targets.")
            for kind, name in resolved:
                names = [name] if kind == "thing" else self._group_things(name)
                if kind == "thing" and self._store.get_thing(name) is None:
                    raise ApiError("ResourceNotFoundException", 404,
                                   f"Thing {name} cannot be found.")
                if kind == "thinggroup":
                    self._group_or_404(name)
                    self._store.add_job_group(job_id, name)
                for thing in names:
                    latest = self._store.get_execution(job_id, thing)
                    if latest is None or latest.status == "REMOVED":
                        self._late_joiner(job_id, thing, latest, now, tracker)
            job.targets = job.targets + new
            if comment is not None:
                job.comment = comment
            job.last_updated_at = now
            self._store.save_job_targets(job)
            out: dict[str, Any] = {"jobArn": self.job_arn(job_id), "jobId": job_id}
            if job.description is not None:
                out["description"] = job.description
            return out
        return self._run(op)


def add_routes(router: Router, service: Any) -> None:
    """UpdateJob and AssociateTargetsWithJob (control.py calls it)."""
    def update_job(req: Request) -> None:
        service.update_job(req.labels["jobId"], req.body)

    def associate(req: Request) -> dict[str, Any]:
        return service.associate_targets(req.labels["jobId"], req.body)

    router.add("PATCH", "/jobs/{jobId}", update_job)
    router.add("POST", "/jobs/{jobId}/targets", associate)
