"""The AWS IoT Jobs state machine: device operations, operator operations and their events.

Every public method is one request: it takes the service lock, runs in one store transaction
and, only after the commit, hands the notify / notify-next events it caused to `publish`.
Holding the lock while publishing keeps the events of successive requests in request order on
the single MQTT connection, which is the order a device observes them in.

Events follow PROTOCOL.md 1.9: before a thing's executions change, the tracker records that
thing's pending set and its "next"; after the change it compares. `notify` goes out when the set
of pending executions changed, `notify-next` when the identity of the next one changed. A
status change that keeps membership and next (job1 QUEUED->IN_PROGRESS in the documented
example) publishes nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional
from collections.abc import Callable

from . import views
from .rules import (DEVICE_STATUSES, MAX_DESCRIPTION, MAX_DOCUMENT, MAX_PENDING_LISTED,
                    MAX_STEP_MINUTES, NEXT, TERMINAL, ApiError, DeviceError, DescribeRequest,
                    StartNextRequest, UpdateRequest, check_status_details, is_int,
                    valid_job_id, valid_thing_name)
from .store import Execution, Job, Store, Thing

log = logging.getLogger("jobsd.service")

Publish = Callable[[str, bytes], None]


def _not_found(message: str) -> ApiError:
    return ApiError("ResourceNotFoundException", 404, message)


def _invalid(message: str) -> ApiError:
    return ApiError("InvalidRequestException", 400, message)


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def jobs_topic(thing: str, suffix: str) -> str:
    return f"$aws/things/{thing}/jobs/{suffix}"


@dataclass
class _Snapshot:
    members: frozenset[tuple[str, int]]
    next_key: Optional[tuple[str, int]]


class _Tracker:
    """Remembers each touched thing's pending state as it was before the request changed it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._before: dict[str, _Snapshot] = {}

    def touch(self, thing: str) -> None:
        if thing not in self._before:
            self._before[thing] = self._snapshot(self._store.pending_for_thing(thing))

    @staticmethod
    def _snapshot(pending: list[Execution]) -> _Snapshot:
        return _Snapshot(frozenset(ex.key for ex in pending), pending[0].key if pending else None)

    def events(self, now: int) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for thing, before in self._before.items():
            pending = self._store.pending_for_thing(thing)
            after = self._snapshot(pending)
            if after.members != before.members:
                out.append((jobs_topic(thing, "notify"),
                            encode(views.notify_payload(pending, now, MAX_PENDING_LISTED))))
            if after.next_key != before.next_key:
                body: dict[str, Any] = {"timestamp": now}
                if pending:
                    job = self._store.get_job(pending[0].job_id)
                    body["execution"] = views.device_execution(
                        pending[0], job.document if job else None, as_string=False)
                out.append((jobs_topic(thing, "notify-next"), encode(body)))
        return out


class Service:
    """All jobsd behaviour behind one lock; front ends translate wire formats only."""

    def __init__(self, store: Store, publish: Publish, *, region: str = "us-east-1",
                 account: str = "123456789012", minute_seconds: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._publish = publish
        self._clock = clock
        self.region = region
        self.account = account
        self.minute_seconds = minute_seconds
        self.lock = threading.RLock()  # public so shutdown can wait for the current request

    # -- plumbing ------------------------------------------------------------------------------
    def set_publisher(self, publish: Publish) -> None:
        with self.lock:
            self._publish = publish

    def now(self) -> int:
        """Jobs timestamps are integer epoch seconds (PROTOCOL.md 8, A1)."""
        return int(self._clock())

    def _run(self, fn: Callable[[_Tracker, int], Any]) -> Any:
        with self.lock:
            tracker = _Tracker(self._store)
            now = self.now()
            with self._store.transaction():
                result = fn(tracker, now)
                events = tracker.events(now)
            for topic, payload in events:
                try:
                    self._publish(topic, payload)
                except Exception:  # a broker outage must not undo a committed change
                    log.exception("publishing %s failed", topic)
            return result

    def thing_arn(self, name: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:thing/{name}"

    def job_arn(self, job_id: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:job/{job_id}"

    def _document(self, job_id: str) -> str:
        job = self._store.get_job(job_id)
        return job.document if job else "{}"

    def _refresh_job(self, job_id: str, now: int) -> None:
        """A SNAPSHOT job completes when every execution is terminal."""
        job = self._store.get_job(job_id)
        if job is None or job.status != "IN_PROGRESS" or job.target_selection != "SNAPSHOT":
            return
        if all(ex.status in TERMINAL for ex in self._store.executions_for_job(job_id)):
            job.status = "COMPLETED"
            job.completed_at = now
            job.last_updated_at = now
            self._store.save_job(job)

    def _step_deadline(self, minutes: Optional[int], now: int) -> Optional[float]:
        return None if minutes is None else now + minutes * self.minute_seconds

    # -- device API (MQTT and iot-jobs-data) ---------------------------------------------------
    @staticmethod
    def _check_thing(thing: str) -> None:
        if not valid_thing_name(thing):
            raise DeviceError("InvalidRequest", "thingName must match [a-zA-Z0-9:_-]{1,128}")

    def get_pending(self, thing: str) -> tuple[list[Execution], list[Execution]]:
        self._check_thing(thing)

        def op(_: _Tracker, __: int) -> tuple[list[Execution], list[Execution]]:
            pending = self._store.pending_for_thing(thing)[:MAX_PENDING_LISTED]
            return ([ex for ex in pending if ex.status == "IN_PROGRESS"],
                    [ex for ex in pending if ex.status == "QUEUED"])
        return self._run(op)

    def start_next(self, thing: str, req: StartNextRequest) -> Optional[tuple[Execution, str]]:
        self._check_thing(thing)

        def op(tracker: _Tracker, now: int) -> Optional[tuple[Execution, str]]:
            pending = self._store.pending_for_thing(thing)
            if not pending:
                return None
            ex = pending[0]
            if ex.status == "QUEUED":
                tracker.touch(thing)
                ex.status = "IN_PROGRESS"
                ex.started_at = now
                ex.last_updated_at = now
                ex.version_number += 1
                if req.status_details is not None:
                    ex.status_details = req.status_details
                if req.step_timeout is not None:
                    ex.step_deadline = self._step_deadline(req.step_timeout, now)
                self._store.save_execution(ex)
            return ex, self._document(ex.job_id)
        return self._run(op)

    def describe(self, thing: str, job_id: str,
                 req: DescribeRequest) -> Optional[tuple[Execution, str]]:
        """None only for `$next` with nothing pending (PROTOCOL.md 8, A9)."""
        self._check_thing(thing)
        if job_id != NEXT and not valid_job_id(job_id):
            raise DeviceError("InvalidRequest", "jobId must match [a-zA-Z0-9_-]{1,64} or be $next")

        def op(_: _Tracker, __: int) -> Optional[tuple[Execution, str]]:
            if job_id == NEXT:
                pending = self._store.pending_for_thing(thing)
                if not pending:
                    return None
                ex: Optional[Execution] = pending[0]
            else:
                ex = self._store.get_execution(job_id, thing, req.execution_number)
            if ex is None:
                raise DeviceError("ResourceNotFound",
                                  f"Job execution {job_id} not found for thing {thing}")
            return ex, self._document(ex.job_id)
        return self._run(op)

    def update(self, thing: str, job_id: str, req: UpdateRequest) -> tuple[Execution, str]:
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
                ex.started_at = now
            ex.status = req.status
            if req.status_details is not None:
                ex.status_details = req.status_details
            ex.last_updated_at = now
            ex.version_number += 1
            if req.status in TERMINAL or req.step_timeout == -1:
                ex.step_deadline = None
            elif req.step_timeout is not None:
                ex.step_deadline = self._step_deadline(req.step_timeout, now)
            self._store.save_execution(ex)
            self._refresh_job(job_id, now)
            return ex, self._document(job_id)
        return self._run(op)

    # -- control plane: things -----------------------------------------------------------------
    def create_thing(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if not valid_thing_name(name):
            raise _invalid("thingName must match [a-zA-Z0-9:_-]{1,128}")
        payload = body.get("attributePayload") or {}
        attributes = payload.get("attributes") or {} if isinstance(payload, dict) else None
        if not isinstance(attributes, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()):
            raise _invalid("attributePayload.attributes must map strings to strings")
        thing_type = body.get("thingTypeName")
        if thing_type is not None and not isinstance(thing_type, str):
            raise _invalid("thingTypeName must be a string")

        def op(_: _Tracker, now: int) -> dict[str, Any]:
            existing = self._store.get_thing(name)
            if existing is not None:
                if existing.attributes == attributes and existing.thing_type == thing_type:
                    thing = existing  # CreateThing is idempotent for an identical request
                else:
                    raise ApiError("ResourceAlreadyExistsException", 409,
                                   f"Thing {name} already exists with different attributes",
                                   resourceId=existing.thing_id, resourceArn=self.thing_arn(name))
            else:
                thing = Thing(name, str(uuid.uuid4()), dict(attributes), thing_type, 1, now)
                self._store.insert_thing(thing)
            return {"thingName": name, "thingArn": self.thing_arn(name), "thingId": thing.thing_id}
        return self._run(op)

    def describe_thing(self, name: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            thing = self._store.get_thing(name)
            if thing is None:
                raise _not_found(f"Thing {name} cannot be found.")
            return views.thing_view(thing, self.thing_arn(name))
        return self._run(op)

    def list_things(self, max_results: Optional[int], token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            rows = [{"thingName": t.name, "thingArn": self.thing_arn(t.name),
                     "attributes": t.attributes, "version": t.version}
                    for t in self._store.list_things()]
            return _page(rows, "things", max_results, token)
        return self._run(op)

    # -- control plane: jobs -------------------------------------------------------------------
    def _thing_from_arn(self, arn: Any) -> str:
        if not isinstance(arn, str):
            raise _invalid("targets must be a list of ARNs")
        prefix = f"arn:aws:iot:{self.region}:{self.account}:"
        if ":thinggroup/" in arn:
            raise _invalid(f"Thing group targets are not supported by jobsd yet: {arn}")
        if not arn.startswith("arn:aws:iot:") or ":thing/" not in arn:
            raise _invalid(f"Target {arn} is not a thing ARN")
        if not arn.startswith(prefix + "thing/"):
            raise _not_found(f"Target {arn} does not exist in {self.region}/{self.account}")
        return arn[len(prefix) + len("thing/"):]

    def create_job(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not valid_job_id(job_id):
            raise _invalid("jobId must match [a-zA-Z0-9_-]{1,64}")
        for unsupported in ("documentSource", "jobTemplateArn", "destinationPackageVersions"):
            if body.get(unsupported) is not None:
                raise _invalid(f"{unsupported} is not supported by jobsd; send `document`")
        document = body.get("document")
        if not isinstance(document, str):
            raise _invalid("document is required (a JSON object as a string)")
        if len(document) > MAX_DOCUMENT:
            raise _invalid(f"document is longer than {MAX_DOCUMENT} characters")
        try:
            parsed = json.loads(document)
        except ValueError:
            raise _invalid("document is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise _invalid("document must be a JSON object")
        targets = body.get("targets")
        if not isinstance(targets, list) or not targets:
            raise _invalid("targets must be a non-empty list of thing ARNs")
        names = list(dict.fromkeys(self._thing_from_arn(arn) for arn in targets))
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
        # Options stored for later issues (timers, rollout, abort, retry) are kept verbatim.
        config = {k: body[k] for k in ("timeoutConfig", "presignedUrlConfig",
                                       "jobExecutionsRolloutConfig", "abortConfig",
                                       "jobExecutionsRetryConfig", "schedulingConfig",
                                       "documentParameters", "namespaceId", "tags")
                  if body.get(k) is not None}

        def op(tracker: _Tracker, now: int) -> dict[str, Any]:
            if self._store.get_job(job_id) is not None:
                raise ApiError("ResourceAlreadyExistsException", 409,
                               f"Job {job_id} already exists.", resourceId=job_id,
                               resourceArn=self.job_arn(job_id))
            for name in names:
                if self._store.get_thing(name) is None:
                    raise _not_found(f"Thing {name} cannot be found.")
            job = Job(job_id=job_id, seq=self._store.next_counter("job"), document=document,
                      description=description, target_selection=selection,
                      targets=[self.thing_arn(n) for n in names], status="IN_PROGRESS",
                      created_at=now, last_updated_at=now, config=config)
            self._store.insert_job(job)
            for name in names:
                tracker.touch(name)
                self._store.insert_execution(Execution(
                    job_id=job_id, thing_name=name, execution_number=1, status="QUEUED",
                    queued_at=now, last_updated_at=now, version_number=1))
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
            return {"job": views.job_view(job, self.job_arn(job_id),
                                          self._store.executions_for_job(job_id))}
        return self._run(op)

    def get_job_document(self, job_id: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            return {"document": self._job_or_404(job_id).document}
        return self._run(op)

    def list_jobs(self, status: Optional[str], selection: Optional[str],
                  max_results: Optional[int], token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            rows = [views.job_summary(j, self.job_arn(j.job_id)) for j in self._store.list_jobs()
                    if (status is None or j.status == status)
                    and (selection is None or j.target_selection == selection)]
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
            if job.status == "COMPLETED":
                raise _invalid(f"Job {job_id} is already completed and cannot be canceled.")
            job.status = "CANCELED"
            job.force_canceled = job.force_canceled or force
            job.reason_code = reason if reason is not None else job.reason_code
            job.comment = comment if comment is not None else job.comment
            job.last_updated_at = now
            self._store.save_job(job)
            for ex in self._store.executions_for_job(job_id):
                if ex.status == "QUEUED" or (force and ex.status == "IN_PROGRESS"):
                    tracker.touch(ex.thing_name)
                    ex.force_canceled = ex.status == "IN_PROGRESS"
                    ex.status = "CANCELED"
                    ex.last_updated_at = now
                    ex.version_number += 1
                    ex.step_deadline = None
                    self._store.save_execution(ex)
            out: dict[str, Any] = {"jobArn": self.job_arn(job_id), "jobId": job_id}
            if job.description is not None:
                out["description"] = job.description
            return out
        return self._run(op)

    def delete_job(self, job_id: str, force: bool) -> None:
        def op(tracker: _Tracker, _: int) -> None:
            job = self._job_or_404(job_id)
            if job.status not in ("COMPLETED", "CANCELED") and not force:
                raise ApiError("InvalidStateTransitionException", 409,
                               f"Job {job_id} is {job.status}; set force=true to delete it.")
            if not force and any(ex.status == "IN_PROGRESS"
                                 for ex in self._store.executions_for_job(job_id)):
                raise ApiError("InvalidStateTransitionException", 409,
                               f"Job {job_id} has executions IN_PROGRESS; set force=true.")
            for ex in self._store.executions_for_job(job_id):
                tracker.touch(ex.thing_name)
            self._store.delete_job(job_id)
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
            return {"execution": views.control_execution(ex, self.thing_arn(thing))}
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
            ex.step_deadline = None
            self._store.save_execution(ex)
            self._refresh_job(job_id, now)
        self._run(op)

    def delete_job_execution(self, job_id: str, thing: str, number: int, force: bool) -> None:
        def op(tracker: _Tracker, now: int) -> None:
            ex = self._execution_or_404(job_id, thing, number)
            if ex.status not in TERMINAL and not force:
                raise ApiError("InvalidStateTransitionException", 409,
                               f"Job execution is {ex.status}; set force=true to delete it.")
            tracker.touch(thing)
            self._store.delete_execution(ex)
            self._refresh_job(job_id, now)
        self._run(op)


def _page(rows: list[dict[str, Any]], key: str, max_results: Optional[int],
          token: Optional[str]) -> dict[str, Any]:
    """Offset pagination; the token is opaque to clients, an offset to us."""
    try:
        start = int(token) if token else 0
    except ValueError:
        raise _invalid("nextToken is invalid") from None
    if start < 0:
        raise _invalid("nextToken is invalid")
    size = max_results if max_results is not None else 250
    if not 1 <= size <= 250:
        raise _invalid("maxResults must be 1..250")
    out: dict[str, Any] = {key: rows[start:start + size]}
    if start + size < len(rows):
        out["nextToken"] = str(start + size)
    return out
