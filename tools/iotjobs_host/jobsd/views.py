"""Wire shapes of executions and jobs, one function per shape.

The same stored execution is spelled three ways: MQTT (jobDocument as a JSON object, plain
statusDetails, `thingName`), the iot-jobs-data REST API (jobDocument as a JSON string), and the
`iot` control plane (`thingArn`, statusDetails wrapped in `detailsMap`). Keeping them side by
side makes the differences visible and keeps the service free of wire concerns.

AWS IoT commands and their executions follow at the end: control-plane timestamps are epoch
seconds with milliseconds (botocore's `timestamp` type), status events carry epoch
milliseconds (PROTOCOL.md 1.11, A1), blobs are base64 strings.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Optional

from .store import Command, CommandExecution, Execution, Job, Thing, ThingGroup


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def document_object(document: str) -> Any:
    """The job document as MQTT carries it; CreateJob guarantees it parses to an object."""
    return json.loads(document)


def summary(ex: Execution) -> dict[str, Any]:
    """JobExecutionSummary of the device APIs (notify, GetPending): no status member."""
    out: dict[str, Any] = {"jobId": ex.job_id, "queuedAt": ex.queued_at}
    if ex.started_at is not None:
        out["startedAt"] = ex.started_at
    out["lastUpdatedAt"] = ex.last_updated_at
    out["versionNumber"] = ex.version_number
    out["executionNumber"] = ex.execution_number
    return out


def execution_state(ex: Execution) -> dict[str, Any]:
    out: dict[str, Any] = {"status": ex.status}
    if ex.status_details is not None:
        out["statusDetails"] = ex.status_details
    out["versionNumber"] = ex.version_number
    return out


def device_execution(ex: Execution, document: Optional[str], as_string: bool,
                     seconds_left: Optional[int] = None) -> dict[str, Any]:
    """JobExecution of the device APIs; `as_string` selects the REST spelling of jobDocument,
    `seconds_left` is the REST-only approximateSecondsBeforeTimedOut (PROTOCOL.md 1.3)."""
    out: dict[str, Any] = {"jobId": ex.job_id, "thingName": ex.thing_name, "status": ex.status}
    if ex.status_details is not None:
        out["statusDetails"] = ex.status_details
    out["queuedAt"] = ex.queued_at
    if ex.started_at is not None:
        out["startedAt"] = ex.started_at
    out["lastUpdatedAt"] = ex.last_updated_at
    if seconds_left is not None:
        out["approximateSecondsBeforeTimedOut"] = seconds_left
    out["versionNumber"] = ex.version_number
    out["executionNumber"] = ex.execution_number
    if document is not None:
        out["jobDocument"] = document if as_string else document_object(document)
    return out


def execution_message(head: dict[str, Any], ex: Execution, document: Optional[str]) -> bytes:
    """An MQTT payload: `head` plus `execution` (JobExecution), encoded. The job document is
    spliced in as the stored JSON text (validated as an object at CreateJob) rather than decoded
    and re-encoded for every delivery; it is the last member of both objects."""
    data = _encode({**head, "execution": device_execution(ex, None, as_string=False)})
    if document is None:
        return data
    return b"".join((data[:-2], b',"jobDocument":', document.encode(), b"}}"))


def notify_payload(pending: list[Execution], timestamp: int, limit: int) -> dict[str, Any]:
    """JobExecutionsChanged: status name -> summaries, empty groups left out (PROTOCOL.md 1.9)."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for ex in pending[:limit]:
        jobs.setdefault(ex.status, []).append(summary(ex))
    return {"timestamp": timestamp, "jobs": jobs}


# -- control plane (`iot`) ---------------------------------------------------------------------

def thing_view(thing: Thing, arn: str) -> dict[str, Any]:
    out: dict[str, Any] = {"defaultClientId": thing.name, "thingName": thing.name,
                           "thingId": thing.thing_id, "thingArn": arn,
                           "attributes": thing.attributes, "version": thing.version}
    if thing.thing_type:
        out["thingTypeName"] = thing.thing_type
    return out


def control_execution_summary(ex: Execution) -> dict[str, Any]:
    out: dict[str, Any] = {"status": ex.status, "queuedAt": ex.queued_at}
    if ex.started_at is not None:
        out["startedAt"] = ex.started_at
    out["lastUpdatedAt"] = ex.last_updated_at
    out["executionNumber"] = ex.execution_number
    out["retryAttempt"] = ex.retry_attempt
    return out


def control_execution(ex: Execution, thing_arn: str,
                      seconds_left: Optional[int] = None) -> dict[str, Any]:
    out: dict[str, Any] = {"jobId": ex.job_id, "status": ex.status,
                           "forceCanceled": ex.force_canceled, "thingArn": thing_arn,
                           "statusDetails": {"detailsMap": ex.status_details or {}},
                           "queuedAt": ex.queued_at}
    if ex.started_at is not None:
        out["startedAt"] = ex.started_at
    out["lastUpdatedAt"] = ex.last_updated_at
    out["executionNumber"] = ex.execution_number
    out["versionNumber"] = ex.version_number
    if seconds_left is not None:
        out["approximateSecondsBeforeTimedOut"] = seconds_left
    return out


def group_view(group: ThingGroup, arn: str, root_to_parent: list[tuple[str, str]]
               ) -> dict[str, Any]:
    """DescribeThingGroup; `root_to_parent` lists (name, ARN) of the ancestors, root first."""
    props: dict[str, Any] = {"attributePayload": {"attributes": group.attributes}}
    if group.description is not None:
        props["thingGroupDescription"] = group.description
    meta: dict[str, Any] = {"creationDate": group.created_at}
    if group.parent is not None:
        meta["parentGroupName"] = group.parent
        meta["rootToParentThingGroups"] = [{"groupName": n, "groupArn": a}
                                           for n, a in root_to_parent]
    return {"thingGroupName": group.name, "thingGroupId": group.group_id,
            "thingGroupArn": arn, "version": group.version,
            "thingGroupProperties": props, "thingGroupMetadata": meta}


_COUNT_NAMES = {
    "CANCELED": "numberOfCanceledThings", "SUCCEEDED": "numberOfSucceededThings",
    "FAILED": "numberOfFailedThings", "REJECTED": "numberOfRejectedThings",
    "QUEUED": "numberOfQueuedThings", "IN_PROGRESS": "numberOfInProgressThings",
    "REMOVED": "numberOfRemovedThings", "TIMED_OUT": "numberOfTimedOutThings",
}


def process_details(executions: list[Execution]) -> dict[str, int]:
    """Counts per status over every execution record: a retried thing counts once per attempt
    (FLEET.md 3.3, 6.2: boto3#4656 saw 3 failed for one thing retried twice)."""
    counts = {name: 0 for name in _COUNT_NAMES.values()}
    for ex in executions:
        counts[_COUNT_NAMES[ex.status]] += 1
    return counts


def job_summary(job: Job, arn: str, concurrent: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"jobArn": arn, "jobId": job.job_id,
                           "targetSelection": job.target_selection, "status": job.status,
                           "createdAt": job.created_at, "lastUpdatedAt": job.last_updated_at,
                           "isConcurrent": concurrent}
    if job.completed_at is not None:
        out["completedAt"] = job.completed_at
    return out


def job_view(job: Job, arn: str, executions: list[Execution]) -> dict[str, Any]:
    out = job_summary(job, arn)
    del out["isConcurrent"]
    out["targets"] = job.targets
    if job.description is not None:
        out["description"] = job.description
    if job.status == "CANCELED":
        out["forceCanceled"] = job.force_canceled
    if job.reason_code is not None:
        out["reasonCode"] = job.reason_code
    if job.comment is not None:
        out["comment"] = job.comment
    out["jobProcessDetails"] = process_details(executions)
    for name in ("timeoutConfig", "presignedUrlConfig", "jobExecutionsRolloutConfig",
                 "abortConfig", "jobExecutionsRetryConfig", "schedulingConfig",
                 "documentParameters", "namespaceId", "jobTemplateArn"):
        if name in job.config:
            out[name] = job.config[name]
    out["isConcurrent"] = False
    return out


# -- AWS IoT commands --------------------------------------------------------------------------

def command_summary(cmd: Command, arn: str) -> dict[str, Any]:
    """CommandSummary (ListCommands)."""
    out: dict[str, Any] = {"commandArn": arn, "commandId": cmd.command_id}
    if cmd.display_name is not None:
        out["displayName"] = cmd.display_name
    out.update(deprecated=cmd.deprecated, createdAt=cmd.created_at,
               lastUpdatedAt=cmd.last_updated_at, pendingDeletion=cmd.pending_deletion)
    return out


def command_view(cmd: Command, arn: str) -> dict[str, Any]:
    """GetCommand."""
    out: dict[str, Any] = {"commandId": cmd.command_id, "commandArn": arn,
                           "namespace": cmd.namespace}
    if cmd.display_name is not None:
        out["displayName"] = cmd.display_name
    if cmd.description is not None:
        out["description"] = cmd.description
    if cmd.mandatory is not None:
        out["mandatoryParameters"] = cmd.mandatory
    if cmd.content is not None:
        payload: dict[str, Any] = {"content": base64.b64encode(cmd.content).decode()}
        if cmd.content_type is not None:
            payload["contentType"] = cmd.content_type
        out["payload"] = payload
    out.update(createdAt=cmd.created_at, lastUpdatedAt=cmd.last_updated_at,
               deprecated=cmd.deprecated, pendingDeletion=cmd.pending_deletion)
    return out


def command_execution_summary(cx: CommandExecution, command_arn: str,
                              target_arn: str) -> dict[str, Any]:
    """CommandExecutionSummary (ListCommandExecutions)."""
    out: dict[str, Any] = {"commandArn": command_arn, "executionId": cx.execution_id,
                           "targetArn": target_arn, "status": cx.status,
                           "createdAt": cx.created_at}
    if cx.started_at is not None:
        out["startedAt"] = cx.started_at
    if cx.completed_at is not None:
        out["completedAt"] = cx.completed_at
    return out


def command_execution(cx: CommandExecution, command_arn: str, target_arn: str,
                      include_result: bool) -> dict[str, Any]:
    """GetCommandExecution."""
    out: dict[str, Any] = {"executionId": cx.execution_id, "commandArn": command_arn,
                           "targetArn": target_arn, "status": cx.status}
    if cx.status_reason is not None:
        out["statusReason"] = cx.status_reason
    if include_result and cx.result is not None:
        out["result"] = cx.result
    if cx.parameters is not None:
        out["parameters"] = cx.parameters
    out["executionTimeoutSeconds"] = cx.timeout_seconds
    out["createdAt"] = cx.created_at
    out["lastUpdatedAt"] = cx.last_updated_at
    if cx.started_at is not None:
        out["startedAt"] = cx.started_at
    if cx.completed_at is not None:
        out["completedAt"] = cx.completed_at
    return out


def command_event(cx: CommandExecution, command_arn: str, target_arn: str,
                  when: float) -> bytes:
    """`$aws/events/commandExecution/<commandId>/<status>`: timestamp in epoch milliseconds."""
    out: dict[str, Any] = {"executionId": cx.execution_id, "status": cx.status}
    if cx.status_reason is not None:
        out["statusReason"] = cx.status_reason
    out.update(eventType="COMMAND_EXECUTION", commandArn=command_arn, targetArn=target_arn,
               timestamp=int(when * 1000))
    return _encode(out)
