"""Jobs: the device API (MQTT and iot-jobs-data), the control plane of jobs and executions,
and the execution timers.

Timers (PROTOCOL.md 3.3): the in-progress timer of a job (`timeoutConfig`) starts when an
execution goes IN_PROGRESS and is fixed from then on; a step timer (`stepTimeoutInMinutes`) is
set when start-next moves an execution QUEUED->IN_PROGRESS (the same rule as its statusDetails,
1.5) or by an update, replaces the previous one, is cancelled by -1 and is capped by the
in-progress deadline. Both are absolute deadlines in the store; `expire_due()` (called by the
timer thread, timers.py) turns what is due into TIMED_OUT, a service transition that bumps
versionNumber like cancellation does, with the events it causes.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from . import views
from .rules import (DEVICE_STATUSES, MAX_DESCRIPTION, MAX_DOCUMENT, MAX_PENDING_LISTED,
                    MAX_STEP_MINUTES, NEXT, TERMINAL, ApiError, DeviceError, DescribeRequest,
                    StartNextRequest, UpdateRequest, check_status_details, is_int,
                    parse_json, valid_job_id, valid_thing_name)
from .store import Execution, Job
from .campaign import MAX_TARGETS, validate_configs
from .core import MAX_PRESIGN, MIN_PRESIGN, _invalid, _not_found, _page, _Tracker

log = logging.getLogger("jobsd.service")


class JobsApi:
    def _start_execution(self, ex: Execution, now: int, tracker: _Tracker) -> None:
        """QUEUED -> IN_PROGRESS: startedAt, and the job's in-progress timer starts now."""
        ex.status = "IN_PROGRESS"
        ex.started_at = now
        minutes = self._job_doc(ex.job_id).progress_minutes
        ex.progress_deadline = (None if minutes is None
                                else self._clock() + minutes * self.minute_seconds)
        ex.step_deadline = None
        tracker.deadline(ex.timeout_at)

    def _set_step_timer(self, ex: Execution, minutes: Optional[int], tracker: _Tracker) -> None:
        if minutes is None or ex.status != "IN_PROGRESS":
            return
        if minutes == -1:
            ex.step_deadline = None
        else:
            deadline = self._clock() + minutes * self.minute_seconds
            if ex.progress_deadline is not None:
                deadline = min(deadline, ex.progress_deadline)
            ex.step_deadline = deadline
        tracker.deadline(ex.timeout_at)

    @staticmethod
    def _end_timers(ex: Execution) -> None:
        ex.step_deadline = None
        ex.progress_deadline = None


    # -- device API (MQTT and iot-jobs-data) ---------------------------------------------------
    @staticmethod
    def _check_thing(thing: str) -> None:
        if not valid_thing_name(thing):
            raise DeviceError("InvalidRequest", "thingName must match [a-zA-Z0-9:_-]{1,128}")

    def get_pending(self, thing: str) -> tuple[list[Execution], list[Execution]]:
        self._seen(thing)
        self._check_thing(thing)

        def op(_: _Tracker, __: int) -> tuple[list[Execution], list[Execution]]:
            pending = self._store.pending_for_thing(thing, MAX_PENDING_LISTED)
            return ([ex for ex in pending if ex.status == "IN_PROGRESS"],
                    [ex for ex in pending if ex.status == "QUEUED"])
        return self._run(op)

    def start_next(self, thing: str, req: StartNextRequest) -> Optional[tuple[Execution, str]]:
        self._seen(thing)
        self._check_thing(thing)

        def op(tracker: _Tracker, now: int) -> Optional[tuple[Execution, str]]:
            pending = self._store.pending_for_thing(thing, 1)
            if not pending:
                return None
            ex = pending[0]
            if ex.status == "QUEUED":
                tracker.touch(thing)
                self._start_execution(ex, now, tracker)
                ex.last_updated_at = now
                ex.version_number += 1
                if req.status_details is not None:
                    ex.status_details = req.status_details
                self._set_step_timer(ex, req.step_timeout, tracker)
                self._store.save_execution(ex)
            return ex, self._deliver(ex.job_id)
        return self._run(op)

    def describe(self, thing: str, job_id: str,
                 req: DescribeRequest) -> Optional[tuple[Execution, str]]:
        """None only for `$next` with nothing pending (PROTOCOL.md 8, A9)."""
        self._seen(thing)
        self._check_thing(thing)
        if job_id != NEXT and not valid_job_id(job_id):
            raise DeviceError("InvalidRequest", "jobId must match [a-zA-Z0-9_-]{1,64} or be $next")

        def op(_: _Tracker, __: int) -> Optional[tuple[Execution, str]]:
            if job_id == NEXT:
                pending = self._store.pending_for_thing(thing, 1)
                if not pending:
                    return None
                ex: Optional[Execution] = pending[0]
            else:
                ex = self._store.get_execution(job_id, thing, req.execution_number)
            if ex is None:
                raise DeviceError("ResourceNotFound",
                                  f"Job execution {job_id} not found for thing {thing}")
            return ex, (self._deliver(ex.job_id) if req.include_document else "")
        return self._run(op)

    def update(self, thing: str, job_id: str, req: UpdateRequest) -> tuple[Execution, str]:
        self._seen(thing)
        self._check_thing(thing)
        if not valid_job_id(job_id):
            raise DeviceError("InvalidRequest", "jobId must match [a-zA-Z0-9_-]{1,64}")

        def op(tracker: _Tracker, now: int) -> tuple[Execution, str]:
            ex = self._store.get_execution(job_id, thing, req.execution_number)
            if ex is None:
                raise DeviceError("ResourceNotFound",
                                  f"Job execution {job_id} not found for thing {thing}")
            if ex.status in TERMINAL:
                raise DeviceError("InvalidStateTransition",
                                  f"Job execution is already in terminal state {ex.status}", ex)
            if req.status not in DEVICE_STATUSES:
                raise DeviceError("InvalidStateTransition",
                                  f"A device cannot set status {req.status}", ex)
            if req.expected_version is not None and req.expected_version != ex.version_number:
                raise DeviceError("VersionMismatch",
                                  f"expectedVersion {req.expected_version} does not match the"
                                  f" current version {ex.version_number}", ex)
            tracker.touch(thing)
            if ex.status == "QUEUED" and req.status != "REJECTED":
                self._start_execution(ex, now, tracker)
            ex.status = req.status
            if req.status_details is not None:
                ex.status_details = req.status_details
            ex.last_updated_at = now
            ex.version_number += 1
            if req.status in TERMINAL:
                self._end_timers(ex)
            else:
                self._set_step_timer(ex, req.step_timeout, tracker)
            self._store.save_execution(ex)
            if req.status in TERMINAL:
                self._execution_ended(ex, now, tracker)
            return ex, (self._deliver(job_id) if req.include_document else "")
        return self._run(op)

    # -- control plane: things -----------------------------------------------------------------
    def _target_from_arn(self, arn: Any) -> tuple[str, str]:
        """("thing" | "thinggroup", name) of a CreateJob target ARN."""
        if not isinstance(arn, str):
            raise _invalid("targets must be a list of ARNs")
        prefix = f"arn:aws:iot:{self.region}:{self.account}:"
        for kind in ("thing", "thinggroup"):
            if arn.startswith("arn:aws:iot:") and f":{kind}/" in arn:
                if not arn.startswith(f"{prefix}{kind}/"):
                    raise _not_found(f"Target {arn} does not exist in {self.region}/"
                                     f"{self.account}")
                name = arn[len(prefix) + len(kind) + 1:]
                if not valid_thing_name(name):
                    raise _invalid(f"Target {arn} has an invalid name")
                return kind, name
        raise _invalid(f"Target {arn} is not a thing or thing-group ARN")

    def _document_from(self, body: dict[str, Any]) -> str:
        document, source = body.get("document"), body.get("documentSource")
        if source is not None:
            if document is not None:
                raise _invalid("Send either document or documentSource, not both")
            if not isinstance(source, str) or not 1 <= len(source) <= 1350:
                raise _invalid("documentSource must be a URL of 1..1350 characters")
            if self.files is None:
                raise _invalid("documentSource needs jobsd to run with --files")
            try:
                return self.files.read_document(source)
            except ValueError as err:
                raise _invalid(str(err)) from None
            except OSError as err:
                raise _invalid(f"documentSource {source} cannot be read: {err}") from None
        if not isinstance(document, str):
            raise _invalid("document or documentSource is required (a JSON object)")
        if len(document) > MAX_DOCUMENT:
            raise _invalid(f"document is longer than {MAX_DOCUMENT} characters")
        try:
            parsed = parse_json(document)
        except ValueError as e:
            raise _invalid(f"document is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise _invalid("document must be a JSON object")
        return document

    def create_job(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not valid_job_id(job_id):
            raise _invalid("jobId must match [a-zA-Z0-9_-]{1,64}")
        if body.get("destinationPackageVersions") is not None:
            raise _invalid("destinationPackageVersions is not supported by jobsd")
        # A template (jobTemplateArn) fills in what the body leaves out; documentParameters are
        # substituted (template_service.py). `before` is the document before substitution.
        body, before = self._resolve_template(body)
        document = self._document_from(body)
        targets = body.get("targets")
        if not isinstance(targets, list) or not targets:
            raise _invalid("targets must be a non-empty list of thing or thing-group ARNs")
        resolved = list(dict.fromkeys(self._target_from_arn(arn) for arn in targets))
        if len(resolved) > MAX_TARGETS:
            raise ApiError("LimitExceededException", 410,
                           f"A job can have at most {MAX_TARGETS} targets.")
        selection = body.get("targetSelection", "SNAPSHOT")
        if selection not in ("SNAPSHOT", "CONTINUOUS"):
            raise _invalid("targetSelection must be SNAPSHOT or CONTINUOUS")
        description = body.get("description")
        if description is not None and (not isinstance(description, str)
                                        or len(description) > MAX_DESCRIPTION):
            raise _invalid(f"description must be a string of at most {MAX_DESCRIPTION} characters")
        timeout = body.get("timeoutConfig")
        if timeout is not None:
            if not isinstance(timeout, dict):
                raise _invalid("timeoutConfig must be an object")
            minutes = timeout.get("inProgressTimeoutInMinutes")
            if minutes is not None and not (is_int(minutes) and 1 <= minutes <= MAX_STEP_MINUTES):
                raise _invalid(f"inProgressTimeoutInMinutes must be 1..{MAX_STEP_MINUTES}")
        presign = body.get("presignedUrlConfig")
        if presign is not None:
            if not isinstance(presign, dict):
                raise _invalid("presignedUrlConfig must be an object")
            expires = presign.get("expiresInSec")
            if expires is not None and not (is_int(expires)
                                            and MIN_PRESIGN <= expires <= MAX_PRESIGN):
                raise _invalid(f"presignedUrlConfig.expiresInSec must be"
                               f" {MIN_PRESIGN}..{MAX_PRESIGN}")
            role = presign.get("roleArn")
            if role is not None and (not isinstance(role, str) or not 20 <= len(role) <= 2048):
                raise _invalid("presignedUrlConfig.roleArn must be 20..2048 characters")
        validate_configs(body, self._clock())  # rollout, abort, retry, scheduling
        # Options kept verbatim for DescribeJob; campaign.py acts on them.
        config = {k: body[k] for k in ("timeoutConfig", "presignedUrlConfig",
                                       "jobExecutionsRolloutConfig", "abortConfig",
                                       "jobExecutionsRetryConfig", "schedulingConfig",
                                       "documentParameters", "namespaceId", "tags",
                                       "jobTemplateArn")
                  if body.get(k) is not None}
        if before is not None:
            config["documentBeforeSubstitution"] = before

        def op(tracker: _Tracker, now: int) -> dict[str, Any]:
            if self._store.get_job(job_id) is not None:
                raise ApiError("ResourceAlreadyExistsException", 409,
                               f"Job {job_id} already exists.", resourceId=job_id,
                               resourceArn=self.job_arn(job_id))
            self._check_quotas(body)  # campaign.py: --max-active-jobs, --max-concurrent-jobs
            names: list[str] = []
            for kind, name in resolved:
                if kind == "thing":
                    if self._store.get_thing(name) is None:
                        raise _not_found(f"Thing {name} cannot be found.")
                    names.append(name)
                else:
                    self._group_or_404(name)
                    names.extend(self._group_things(name))
            self._docs.pop(job_id, None)
            job = Job(job_id=job_id, seq=self._store.next_counter("job"), document=document,
                      description=description, target_selection=selection,
                      targets=[self.thing_arn(n) if k == "thing" else self.group_arn(n)
                               for k, n in resolved],
                      status="IN_PROGRESS", created_at=now, last_updated_at=now, config=config)
            self._store.insert_job(job)
            for kind, name in resolved:
                if kind == "thinggroup":
                    self._store.add_job_group(job_id, name)
            # released at once, or staged by the rollout config and schedule (campaign.py)
            self._begin_rollout(job, list(dict.fromkeys(names)), now, tracker)
            self._refresh_job(job_id, now, tracker)  # a SNAPSHOT of empty groups: nothing to do
            out: dict[str, Any] = {"jobArn": self.job_arn(job_id), "jobId": job_id}
            if description is not None:
                out["description"] = description
            return out
        return self._run(op)

    def _job_or_404(self, job_id: str) -> Job:
        job = self._store.get_job(job_id)
        if job is None:
            raise _not_found(f"Job {job_id} cannot be found.")
        return job

    def describe_job(self, job_id: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            job = self._job_or_404(job_id)
            return {"job": self._campaign_view(job, views.job_view(
                job, self.job_arn(job_id), self._store.executions_for_job(job_id)))}
        return self._run(op)

    def get_job_document(self, job_id: str, before_substitution: bool = False) -> dict[str, Any]:
        """The document as stored: presigned-URL placeholders are not replaced (as AWS); with
        `before_substitution`, a managed template's document with its `${aws:iot:parameter:...}`
        placeholders."""
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            job = self._job_or_404(job_id)
            if before_substitution and "documentBeforeSubstitution" in job.config:
                return {"document": job.config["documentBeforeSubstitution"]}
            return {"document": job.document}
        return self._run(op)

    def list_jobs(self, status: Optional[str], selection: Optional[str], group: Optional[str],
                  max_results: Optional[int], token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            group_arn = None if group is None else self.group_arn(group)
            rows = [views.job_summary(j, self.job_arn(j.job_id), self._rolling(j.job_id))
                    for j in self._store.list_jobs()
                    if (status is None or j.status == status)
                    and (selection is None or j.target_selection == selection)
                    and (group_arn is None or group_arn in j.targets)]
            return _page(rows, "jobs", max_results, token)
        return self._run(op)

    def cancel_job(self, job_id: str, force: bool, body: dict[str, Any]) -> dict[str, Any]:
        reason, comment = body.get("reasonCode"), body.get("comment")
        if reason is not None and not isinstance(reason, str):
            raise _invalid("reasonCode must be a string")
        if comment is not None and not isinstance(comment, str):
            raise _invalid("comment must be a string")

        def op(tracker: _Tracker, now: int) -> dict[str, Any]:
            job = self._job_or_404(job_id)
            if job.status in ("COMPLETED", "DELETION_IN_PROGRESS"):
                raise _invalid(f"Job {job_id} is {job.status} and cannot be canceled.")
            if job.status == "CANCELED" and not (force and not job.force_canceled):
                # FLEET.md 6.1 [P]; a forced cancel of a job canceled without force still
                # cancels its IN_PROGRESS executions
                raise _invalid(f"Job {job_id} is already canceled.")
            self._cancel_job(job, force, reason, comment, now, tracker)
            out: dict[str, Any] = {"jobArn": self.job_arn(job_id), "jobId": job_id}
            if job.description is not None:
                out["description"] = job.description
            return out
        return self._run(op)

    def delete_job(self, job_id: str, force: bool) -> None:
        def op(tracker: _Tracker, now: int) -> None:
            job = self._job_or_404(job_id)
            if job.status == "DELETION_IN_PROGRESS":
                raise ApiError("InvalidStateTransitionException", 409,
                               f"Job {job_id} is already being deleted.")
            if job.status not in ("COMPLETED", "CANCELED") and not force:
                raise ApiError("InvalidStateTransitionException", 409,
                               f"Job {job_id} is {job.status}; set force=true to delete it.")
            if not force and any(ex.status == "IN_PROGRESS"
                                 for ex in self._store.executions_for_job(job_id)):
                raise ApiError("InvalidStateTransitionException", 409,
                               f"Job {job_id} has executions IN_PROGRESS; set force=true.")
            self._delete_job(job, now, tracker)  # campaign.py: at once, or after a while
        self._run(op)

    # -- control plane: executions -------------------------------------------------------------
    def _execution_or_404(self, job_id: str, thing: str,
                          number: Optional[int] = None) -> Execution:
        ex = self._store.get_execution(job_id, thing, number)
        if ex is None:
            raise _not_found(f"Job execution {job_id} on thing {thing} cannot be found.")
        return ex

    def describe_job_execution(self, job_id: str, thing: str,
                               number: Optional[int]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            ex = self._execution_or_404(job_id, thing, number)
            return {"execution": views.control_execution(ex, self.thing_arn(thing),
                                                         self.seconds_left(ex))}
        return self._run(op)

    def list_executions_for_job(self, job_id: str, status: Optional[str],
                                max_results: Optional[int], token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            self._job_or_404(job_id)
            rows = [{"thingArn": self.thing_arn(ex.thing_name),
                     "jobExecutionSummary": views.control_execution_summary(ex)}
                    for ex in self._store.executions_for_job(job_id)
                    if status is None or ex.status == status]
            return _page(rows, "executionSummaries", max_results, token)
        return self._run(op)

    def list_executions_for_thing(self, thing: str, status: Optional[str], job_id: Optional[str],
                                  max_results: Optional[int],
                                  token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_thing(thing) is None:
                raise _not_found(f"Thing {thing} cannot be found.")
            rows = [{"jobId": ex.job_id, "jobExecutionSummary": views.control_execution_summary(ex)}
                    for ex in self._store.executions_for_thing(thing)
                    if (status is None or ex.status == status)
                    and (job_id is None or ex.job_id == job_id)]
            return _page(rows, "executionSummaries", max_results, token)
        return self._run(op)

    def cancel_job_execution(self, job_id: str, thing: str, force: bool,
                             body: dict[str, Any]) -> None:
        expected = body.get("expectedVersion")
        if expected is not None and not is_int(expected):
            raise _invalid("expectedVersion must be an integer")
        details = body.get("statusDetails")
        if details is not None:
            try:
                details = check_status_details(details)
            except DeviceError as err:
                raise _invalid(err.message) from None

        def op(tracker: _Tracker, now: int) -> None:
            ex = self._execution_or_404(job_id, thing)
            if ex.status in TERMINAL:
                raise ApiError("InvalidStateTransitionException", 409,
                               f"Job execution is already in terminal state {ex.status}.")
            if ex.status == "IN_PROGRESS" and not force:
                raise ApiError("InvalidStateTransitionException", 409,
                               "Job execution is IN_PROGRESS; set force=true to cancel it.")
            if expected is not None and expected != ex.version_number:
                raise ApiError("VersionConflictException", 409,
                               f"expectedVersion {expected} does not match {ex.version_number}.")
            tracker.touch(thing)
            ex.force_canceled = ex.status == "IN_PROGRESS"
            ex.status = "CANCELED"
            if details is not None:
                ex.status_details = details
            ex.last_updated_at = now
            ex.version_number += 1
            self._end_timers(ex)
            self._store.save_execution(ex)
            self._execution_ended(ex, now, tracker)
        self._run(op)

    def delete_job_execution(self, job_id: str, thing: str, number: int, force: bool) -> None:
        def op(tracker: _Tracker, now: int) -> None:
            ex = self._execution_or_404(job_id, thing, number)
            if ex.status not in TERMINAL and not force:
                raise ApiError("InvalidStateTransitionException", 409,
                               f"Job execution is {ex.status}; set force=true to delete it.")
            tracker.touch(thing)
            self._execution_event(tracker, ex, "deleted")
            self._store.delete_execution(ex)
            self._refresh_job(job_id, now, tracker)
        self._run(op)

    # -- AWS IoT commands: shared ---------------------------------------------------------------
