"""Job and job-execution events (`$aws/events/job/...`, `$aws/events/jobExecution/...`), sent
only when UpdateEventConfigurations enabled them (FLEET.md 6.3).

UpdateEventConfigurations (`PATCH /event-configurations`) and DescribeEventConfigurations
(`GET /event-configurations`) keep one account-wide record in the store's settings table, so it
survives restarts. Every event type of the `iot` model is accepted and echoed; only JOB and
JOB_EXECUTION produce messages here (jobsd has no registry events).

Payloads follow the AWS IoT developer guide's "Jobs events" examples: `timestamp` in epoch
seconds, the job's `createdAt`, `lastUpdatedAt` and `completedAt` in epoch milliseconds (the
guide's examples give 10 and 13 digits; FLEET.md 6.3 [P]), `eventId` a UUID. `completed` adds
`completedAt` and five counters of `jobProcessDetails` (the same counting as DescribeJob);
`deleted` and the two `*_in_progress` events add the job's `comment` when it has one. An
execution event carries `thingArn`, `status` and `statusDetails` (`{}` when the execution has
none), on a topic named after the status in lower case.

Hot paths (every device report that ends an execution) must not read the store to learn whether
events are on: the enabled types are cached in memory, dropped by UpdateEventConfigurations and
read again on the next use. All of it runs under the service lock (`_run`).

Choices where AWS documents nothing [P]: the record is created (every type off, both dates set)
by the first Describe or Update; every accepted Update sets `lastModifiedDate`; a Configuration
without `Enabled` leaves that type as it was; an unknown event type, a non-object or a
non-boolean `Enabled` is InvalidRequestException and changes nothing.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from . import views
from .core import _invalid, _Tracker, encode
from .store import Execution, Job

# EventType of the `iot` model (botocore iot/2015-05-28), in the order Describe lists them
EVENT_TYPES = ("CA_CERTIFICATE", "CERTIFICATE", "JOB", "JOB_EXECUTION", "POLICY", "THING",
               "THING_GROUP", "THING_GROUP_HIERARCHY", "THING_GROUP_MEMBERSHIP", "THING_TYPE",
               "THING_TYPE_ASSOCIATION")
SETTING = "eventConfigurations"

# operation (topic leaf) -> the job status the event carries
JOB_OPERATIONS = {
    "completed": "COMPLETED",
    "canceled": "CANCELED",
    "deleted": "DELETED",
    "cancellation_in_progress": "CANCELLATION_IN_PROGRESS",
    "deletion_in_progress": "DELETION_IN_PROGRESS",
}
_WITH_COMMENT = ("deleted", "cancellation_in_progress", "deletion_in_progress")
# the counters a `completed` event carries (the guide's example)
_COMPLETED_COUNTS = ("numberOfCanceledThings", "numberOfRejectedThings", "numberOfFailedThings",
                     "numberOfRemovedThings", "numberOfSucceededThings")
# terminal execution status -> topic leaf; QUEUED and IN_PROGRESS have no event
EXECUTION_OPERATIONS = {status: status.lower() for status in
                        ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT", "REMOVED")}


def job_topic(job_id: str, operation: str) -> str:
    return f"$aws/events/job/{job_id}/{operation}"


def execution_topic(job_id: str, operation: str) -> str:
    return f"$aws/events/jobExecution/{job_id}/{operation}"


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _record(raw: Optional[str]) -> Optional[dict[str, Any]]:
    """The stored record: {"enabled": {type: bool}, "creationDate", "lastModifiedDate"}."""
    return None if raw is None else json.loads(raw)


class EventsApi:
    # the event types that are on, or None when they must be read from the store again
    _enabled_events: Optional[frozenset[str]] = None

    # -- the configuration ---------------------------------------------------------------------
    def _events_on(self, event_type: str) -> bool:
        """Whether `event_type` is enabled; a store read only after an Update or a restart."""
        enabled = self._enabled_events
        if enabled is None:
            record = _record(self._store.get_setting(SETTING))
            flags = {} if record is None else record["enabled"]
            enabled = frozenset(t for t, on in flags.items() if on)
            self._enabled_events = enabled
        return event_type in enabled

    def _event_record(self) -> dict[str, Any]:
        """The stored record, created (every type off) on first use."""
        record = _record(self._store.get_setting(SETTING))
        if record is None:
            now = round(self.clock(), 3)
            record = {"enabled": {t: False for t in EVENT_TYPES},
                      "creationDate": now, "lastModifiedDate": now}
            self._store.set_setting(SETTING, json.dumps(record))
        return record

    @staticmethod
    def _event_changes(body: dict[str, Any]) -> dict[str, bool]:
        """The Enabled flags an UpdateEventConfigurations body sets (validated, nothing else)."""
        configs = body.get("eventConfigurations")
        if configs is None:
            return {}
        if not isinstance(configs, dict):
            raise _invalid("eventConfigurations must be a map of event type to configuration")
        changes: dict[str, bool] = {}
        for event_type, config in configs.items():
            if event_type not in EVENT_TYPES:
                raise _invalid(f"{event_type!r} is not an event type; valid types: "
                               + ", ".join(EVENT_TYPES))
            if not isinstance(config, dict):
                raise _invalid(f"the configuration of {event_type} must be an object")
            if "Enabled" not in config or config["Enabled"] is None:
                continue
            if not isinstance(config["Enabled"], bool):
                raise _invalid(f"{event_type}.Enabled must be a boolean")
            changes[event_type] = config["Enabled"]
        return changes

    def update_event_configurations(self, body: dict[str, Any]) -> dict[str, Any]:
        changes = self._event_changes(body)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            record = self._event_record()
            record["enabled"].update(changes)
            record["lastModifiedDate"] = round(self.clock(), 3)
            self._store.set_setting(SETTING, json.dumps(record))
            # read again after this commit (or, should it fail, the value still stored)
            self._enabled_events = None
            return {}
        return self._run(op)

    def describe_event_configurations(self) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            record = self._event_record()
            return {"eventConfigurations": {t: {"Enabled": bool(record["enabled"].get(t, False))}
                                            for t in EVENT_TYPES},
                    "creationDate": record["creationDate"],
                    "lastModifiedDate": record["lastModifiedDate"]}
        return self._run(op)

    # -- the events ----------------------------------------------------------------------------
    def _job_event(self, tracker: Any, job: Job, operation: str,
                   extra: Optional[dict[str, Any]] = None) -> None:
        """`$aws/events/job/<jobId>/<operation>` after the commit, when JOB events are on.
        `extra` adds or overrides payload members (e.g. the `comment` of the operation)."""
        status = JOB_OPERATIONS.get(operation)
        if status is None:
            raise ValueError(f"no job event {operation!r}")
        if not self._events_on("JOB"):
            return
        payload: dict[str, Any] = {
            "eventType": "JOB", "eventId": str(uuid.uuid4()),
            "timestamp": self.now(),
            "operation": operation, "jobId": job.job_id, "status": status,
            "targetSelection": job.target_selection, "targets": list(job.targets)}
        if job.description is not None:
            payload["description"] = job.description
        if operation == "completed":
            completed = job.completed_at if job.completed_at is not None else job.last_updated_at
            payload["completedAt"] = _ms(completed)
        payload["createdAt"] = _ms(job.created_at)
        payload["lastUpdatedAt"] = _ms(job.last_updated_at)
        if operation == "completed":
            counts = views.process_details(
                self._store.executions_for_job(job.job_id))
            payload["jobProcessDetails"] = {name: counts[name] for name in _COMPLETED_COUNTS}
        if operation in _WITH_COMMENT and job.comment is not None:
            payload["comment"] = job.comment
        if extra:
            payload.update(extra)
        tracker.publish(job_topic(job.job_id, operation), encode(payload))

    def _execution_event(self, tracker: Any, ex: Execution,
                         operation: Optional[str] = None) -> None:
        """`$aws/events/jobExecution/<jobId>/<status>` for an execution that just turned
        terminal, when JOB_EXECUTION events are on. `operation` names another leaf (the
        guide's `deleted`, for DeleteJobExecution); a non-terminal execution sends nothing."""
        leaf = operation or EXECUTION_OPERATIONS.get(ex.status)
        if leaf is None or not self._events_on("JOB_EXECUTION"):
            return
        payload = {"eventType": "JOB_EXECUTION", "eventId": str(uuid.uuid4()),
                   "timestamp": self.now(),
                   "operation": leaf, "jobId": ex.job_id,
                   "thingArn": self.thing_arn(ex.thing_name),
                   "status": ex.status, "statusDetails": dict(ex.status_details or {})}
        tracker.publish(execution_topic(ex.job_id, leaf), encode(payload))


def add_routes(router: Any, service: Any) -> None:
    """UpdateEventConfigurations and DescribeEventConfigurations (control.py calls it)."""

    def update(req: Any) -> dict[str, Any]:
        return service.update_event_configurations(req.body)

    def describe(_: Any) -> dict[str, Any]:
        return service.describe_event_configurations()

    router.add("PATCH", "/event-configurations", update)
    router.add("GET", "/event-configurations", describe)
