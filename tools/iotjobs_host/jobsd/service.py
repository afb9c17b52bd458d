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

Timers (PROTOCOL.md 3.3): the in-progress timer of a job (`timeoutConfig`) starts when an
execution goes IN_PROGRESS and is fixed from then on; a step timer (`stepTimeoutInMinutes`) is
set when start-next moves an execution QUEUED->IN_PROGRESS (the same rule as its statusDetails,
1.5) or by an update, replaces the previous one, is cancelled by -1 and is capped by the
in-progress deadline. Both are absolute deadlines in the store; `expire_due()` (called by the
timer thread, timers.py) turns what is due into TIMED_OUT, a service transition that bumps
versionNumber like cancellation does, with the events it causes.

Thing groups: a job's thing-group targets cover the group's things and those of its
descendants. SNAPSHOT resolves them at creation. A CONTINUOUS job also queues an execution for a
thing added later (if it has none of the job yet, or its latest was REMOVED), and a thing that
leaves the groups so that it is no longer a target gets its QUEUED execution REMOVED. A
CONTINUOUS job stays IN_PROGRESS when all its executions are terminal (as AWS).

AWS IoT commands (commands.py has the rules and their sources): StartCommandExecution stores a
CREATED execution with an absolute deadline (creation + executionTimeoutSeconds, real seconds:
`--minute-seconds` is for job timers only) and, after the commit, publishes the command's payload
bytes to the target's request topic and a CREATED status event. Device reports move it through
IN_PROGRESS to a terminal status; the timer thread's `expire_due()` sets TIMED_OUT (reasonCode
`$NO_RESPONSE_FROM_DEVICE`) on executions still CREATED or IN_PROGRESS at their deadline, which
the device may still settle once. Every status change publishes an event on
`$aws/events/commandExecution/<commandId>/<status>`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Protocol
from collections.abc import Callable

from . import commands as cmds
from . import ota as otas
from . import streamfiles
from . import streams as sts
from . import views
from .files import PLACEHOLDER, FileStore
from .rules import (DEVICE_STATUSES, MAX_DESCRIPTION, MAX_DOCUMENT, MAX_PENDING_LISTED,
                    MAX_STEP_MINUTES, NEXT, TERMINAL, ApiError, DeviceError, DescribeRequest,
                    StartNextRequest, UpdateRequest, check_status_details, is_int,
                    parse_json, valid_job_id, valid_thing_name)
from .store import (Command, CommandExecution, Execution, Job, OtaUpdate, Store, Stream, Thing,
                    ThingGroup)

log = logging.getLogger("jobsd.service")


@dataclass(frozen=True)
class Delivery:
    """MQTT 5 properties of a command request: the SDKs read the content type as the payload's
    MIME type and the message expiry as the seconds left before the execution times out
    (PROTOCOL.md 1.11). Brokers drop the message when it expires, as AWS IoT does."""
    content_type: Optional[str]
    expiry_seconds: int


class Publish(Protocol):
    def __call__(self, topic: str, payload: bytes,
                 delivery: Optional[Delivery] = None) -> None: ...

MAX_GROUP_DEPTH = 7          # AWS: a thing-group hierarchy is at most 7 levels deep
MAX_GROUPS_PER_THING = 10    # AWS: a thing belongs to at most 10 thing groups
MIN_PRESIGN, MAX_PRESIGN = 60, 3600
_DOC_CACHE_MAX = 4096


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


@dataclass
class _JobDoc:
    """What delivering an execution needs of its job; immutable after CreateJob."""
    document: str
    presign: bool
    expires_in: int
    progress_minutes: Optional[int]


class _Tracker:
    """Remembers each touched thing's pending state as it was before the request changed it,
    and the earliest timer deadline the request set."""

    def __init__(self, store: Store, deliver: Callable[[str], str]) -> None:
        self._store = store
        self._deliver = deliver
        self._before: dict[str, _Snapshot] = {}
        self.earliest: Optional[float] = None
        # messages the request publishes as they are (commands), after the commit
        self.later: list[tuple[str, bytes, Optional[Delivery]]] = []

    def touch(self, thing: str, pending: Optional[list[Execution]] = None) -> None:
        """Call before changing the thing's executions; `pending` saves a query when the
        caller has just read the thing's pending list."""
        if thing not in self._before:
            keys = (self._store.pending_keys(thing) if pending is None
                    else [ex.key for ex in pending])
            self._before[thing] = self._snapshot(keys)

    def deadline(self, when: Optional[float]) -> None:
        if when is not None and (self.earliest is None or when < self.earliest):
            self.earliest = when

    def publish(self, topic: str, payload: bytes, delivery: Optional[Delivery] = None) -> None:
        self.later.append((topic, payload, delivery))

    @staticmethod
    def _snapshot(keys: list[tuple[str, int]]) -> _Snapshot:
        return _Snapshot(frozenset(keys), keys[0] if keys else None)

    def events(self, now: int) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for thing, before in self._before.items():
            after = self._snapshot(self._store.pending_keys(thing))
            notify, next_changed = after.members != before.members, after.next_key != before.next_key
            if not (notify or next_changed):
                continue
            pending = self._store.pending_for_thing(thing, MAX_PENDING_LISTED)
            if notify:
                out.append((jobs_topic(thing, "notify"),
                            encode(views.notify_payload(pending, now, MAX_PENDING_LISTED))))
            if next_changed:
                if pending:
                    out.append((jobs_topic(thing, "notify-next"), views.execution_message(
                        {"timestamp": now}, pending[0], self._deliver(pending[0].job_id))))
                else:
                    out.append((jobs_topic(thing, "notify-next"), encode({"timestamp": now})))
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
        self.files: Optional[FileStore] = None  # set by main when --files is given
        # called (under the lock) with the earliest deadline a request set; timers.py wakes
        self.on_deadline: Callable[[float], None] = lambda when: None
        self._docs: dict[str, _JobDoc] = {}
        # streams: what a device request needs of a stream, by id (None: no such stream);
        # filled from the store on first use, dropped by every change of the stream
        self._streams: dict[str, Optional[_StreamView]] = {}
        self._blocks: Optional[streamfiles.BlockSource] = None
        self.stream_strict_eof = True        # STREAMS.md 4: no `n` and past the end rejects
        self.stream_fault: Optional[str] = None  # test hook: every stream request fails so
        self.test_hooks = False              # --test-hooks: PUT /_jobsd/test-hooks works

    # -- plumbing ------------------------------------------------------------------------------
    def set_publisher(self, publish: Publish) -> None:
        with self.lock:
            self._publish = publish

    def now(self) -> int:
        """Jobs timestamps are integer epoch seconds (PROTOCOL.md 8, A1)."""
        return int(self._clock())

    def _run(self, fn: Callable[[_Tracker, int], Any]) -> Any:
        with self.lock:
            tracker = _Tracker(self._store, self._deliver)
            now = self.now()
            with self._store.transaction():
                result = fn(tracker, now)
                events = tracker.events(now)
            messages = tracker.later + [(topic, payload, None) for topic, payload in events]
            for topic, payload, delivery in messages:
                try:
                    self._publish(topic, payload, delivery)
                except Exception:  # a broker outage must not undo a committed change
                    log.exception("publishing %s failed", topic)
            if tracker.earliest is not None:
                self.on_deadline(tracker.earliest)
            return result

    def thing_arn(self, name: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:thing/{name}"

    def job_arn(self, job_id: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:job/{job_id}"

    def group_arn(self, name: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:thinggroup/{name}"

    def command_arn(self, command_id: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:command/{command_id}"

    def target_arn(self, kind: str, name: str) -> str:
        """A command target: `thing/<name>` or `client/<client id>`."""
        return f"arn:aws:iot:{self.region}:{self.account}:{kind}/{name}"

    def _job_doc(self, job_id: str) -> _JobDoc:
        cached = self._docs.get(job_id)
        if cached is None:
            row = self._store.job_document(job_id)
            document, config = row if row is not None else ("{}", "{}")
            cfg = json.loads(config)
            cached = _JobDoc(document, PLACEHOLDER in document,
                             (cfg.get("presignedUrlConfig") or {}).get("expiresInSec",
                                                                       MAX_PRESIGN),
                             (cfg.get("timeoutConfig") or {}).get("inProgressTimeoutInMinutes"))
            if len(self._docs) >= _DOC_CACHE_MAX:
                self._docs.clear()
            self._docs[job_id] = cached
        return cached

    def _deliver(self, job_id: str) -> str:
        """The job document as a device receives it: presigned-URL placeholders replaced by
        fresh URLs of the file server (left as they are without --files)."""
        doc = self._job_doc(job_id)
        if doc.presign and self.files is not None:
            return self.files.presign_document(doc.document, doc.expires_in)
        return doc.document

    def seconds_left(self, ex: Execution) -> Optional[int]:
        """REST `approximateSecondsBeforeTimedOut`: None when no timer runs."""
        deadline = ex.timeout_at
        return None if deadline is None else max(0, round(deadline - self._clock()))

    def _refresh_job(self, job_id: str, now: int) -> None:
        """A SNAPSHOT job completes when every execution is terminal; CONTINUOUS never does."""
        if not self._store.job_can_complete(job_id):
            return
        job = self._store.get_job(job_id)
        assert job is not None
        job.status = "COMPLETED"
        job.completed_at = now
        job.last_updated_at = now
        self._store.save_job(job)

    # -- timers --------------------------------------------------------------------------------
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

    def next_deadline(self) -> Optional[float]:
        with self.lock:
            return self._store.next_deadline()

    def expire_due(self) -> Optional[float]:
        """Time out every execution whose deadline has passed, remove commands whose pending
        deletion is due; return the next deadline."""
        def op(tracker: _Tracker, now: int) -> Optional[float]:
            at = self._clock()
            for cx in self._store.due_command_executions(at):
                log.info("command execution %s on %s/%s timed out", cx.execution_id,
                         cx.target_kind, cx.target_name)
                cx.status = "TIMED_OUT"
                cx.status_reason = {"reasonCode": cmds.NO_RESPONSE}
                cx.last_updated_at = self._stamp()
                cx.timeout_at = None
                self._store.save_command_execution(cx)
                self._command_event(cx, tracker)
            for command_id in self._store.due_command_deletions(at):
                log.info("command %s deleted (its pending deletion is due)", command_id)
                self._store.delete_command(command_id)
            jobs: dict[str, None] = {}
            for ex in self._store.due_executions(self._clock()):
                log.info("execution %s #%d on %s timed out", ex.job_id, ex.execution_number,
                         ex.thing_name)
                tracker.touch(ex.thing_name)
                ex.status = "TIMED_OUT"
                ex.last_updated_at = now
                ex.version_number += 1
                self._end_timers(ex)
                self._store.save_execution(ex)
                jobs[ex.job_id] = None
            for job_id in jobs:
                self._refresh_job(job_id, now)
            return self._store.next_deadline()
        return self._run(op)

    # -- device API (MQTT and iot-jobs-data) ---------------------------------------------------
    @staticmethod
    def _check_thing(thing: str) -> None:
        if not valid_thing_name(thing):
            raise DeviceError("InvalidRequest", "thingName must match [a-zA-Z0-9:_-]{1,128}")

    def get_pending(self, thing: str) -> tuple[list[Execution], list[Execution]]:
        self._check_thing(thing)

        def op(_: _Tracker, __: int) -> tuple[list[Execution], list[Execution]]:
            pending = self._store.pending_for_thing(thing, MAX_PENDING_LISTED)
            return ([ex for ex in pending if ex.status == "IN_PROGRESS"],
                    [ex for ex in pending if ex.status == "QUEUED"])
        return self._run(op)

    def start_next(self, thing: str, req: StartNextRequest) -> Optional[tuple[Execution, str]]:
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
                self._refresh_job(job_id, now)
            return ex, (self._deliver(job_id) if req.include_document else "")
        return self._run(op)

    # -- control plane: things -----------------------------------------------------------------
    def create_thing(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if not valid_thing_name(name):
            raise _invalid("thingName must match [a-zA-Z0-9:_-]{1,128}")
        attributes = _attributes(body.get("attributePayload"))
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

    # -- control plane: thing groups -----------------------------------------------------------
    def _group_or_404(self, name: str) -> ThingGroup:
        group = self._store.get_group(name)
        if group is None:
            raise _not_found(f"Thing group {name} cannot be found.")
        return group

    def _ancestors(self, name: str) -> list[str]:
        """Parent, grandparent, ... of a group (nearest first)."""
        out: list[str] = []
        group = self._store.get_group(name)
        while group is not None and group.parent is not None and group.parent not in out:
            out.append(group.parent)
            group = self._store.get_group(group.parent)
        return out

    def _subtree(self, name: str) -> list[str]:
        """The group and all its descendants, breadth first."""
        out, i = [name], 0
        while i < len(out):
            out.extend(c for c in self._store.child_groups(out[i]) if c not in out)
            i += 1
        return out

    def _group_things(self, name: str, recursive: bool = True) -> list[str]:
        groups = self._subtree(name) if recursive else [name]
        return list(dict.fromkeys(t for g in groups for t in self._store.members(g)))

    def _is_target(self, job_id: str, thing: str) -> bool:
        """Whether the thing is (still) a target of the job, directly or through a group."""
        job = self._store.get_job(job_id)
        if job is None:
            return False
        if self.thing_arn(thing) in job.targets:
            return True
        targeted = set(self._store.job_groups(job_id))
        return any(g in targeted or targeted.intersection(self._ancestors(g))
                   for g in self._store.groups_of_thing(thing))

    def _group_from(self, body: dict[str, Any]) -> str:
        """The group named by `thingGroupName` or `thingGroupArn` (AddThingToThingGroup)."""
        name, arn = body.get("thingGroupName"), body.get("thingGroupArn")
        if arn is not None:
            prefix = self.group_arn("")
            if not isinstance(arn, str) or not arn.startswith(prefix):
                raise _invalid(f"thingGroupArn must look like {prefix}<name>")
            if name is not None and name != arn[len(prefix):]:
                raise _invalid("thingGroupName and thingGroupArn name different groups")
            name = arn[len(prefix):]
        if not isinstance(name, str) or not valid_thing_name(name):
            raise _invalid("thingGroupName or thingGroupArn is required")
        return name

    def _thing_from(self, body: dict[str, Any]) -> str:
        name, arn = body.get("thingName"), body.get("thingArn")
        if arn is not None:
            prefix = self.thing_arn("")
            if not isinstance(arn, str) or not arn.startswith(prefix):
                raise _invalid(f"thingArn must look like {prefix}<name>")
            if name is not None and name != arn[len(prefix):]:
                raise _invalid("thingName and thingArn name different things")
            name = arn[len(prefix):]
        if not isinstance(name, str) or not valid_thing_name(name):
            raise _invalid("thingName or thingArn is required")
        return name

    def create_thing_group(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if not valid_thing_name(name):
            raise _invalid("thingGroupName must match [a-zA-Z0-9:_-]{1,128}")
        parent = body.get("parentGroupName")
        if parent is not None and (not isinstance(parent, str) or not valid_thing_name(parent)):
            raise _invalid("parentGroupName must match [a-zA-Z0-9:_-]{1,128}")
        props = body.get("thingGroupProperties") or {}
        if not isinstance(props, dict):
            raise _invalid("thingGroupProperties must be an object")
        description = props.get("thingGroupDescription")
        if description is not None and (not isinstance(description, str)
                                        or len(description) > MAX_DESCRIPTION):
            raise _invalid(f"thingGroupDescription must be at most {MAX_DESCRIPTION} characters")
        attributes = _attributes(props.get("attributePayload"))

        def op(_: _Tracker, now: int) -> dict[str, Any]:
            existing = self._store.get_group(name)
            if existing is not None:
                if (existing.parent, existing.description, existing.attributes) != (
                        parent, description, attributes):
                    raise ApiError("ResourceAlreadyExistsException", 409,
                                   f"Thing group {name} already exists with different"
                                   " properties", resourceId=existing.group_id,
                                   resourceArn=self.group_arn(name))
                group = existing  # idempotent for an identical request
            else:
                if parent is not None:
                    if self._store.get_group(parent) is None:
                        raise _invalid(f"Parent thing group {parent} does not exist.")
                    if len(self._ancestors(parent)) + 2 > MAX_GROUP_DEPTH:
                        raise _invalid(f"A thing-group hierarchy is at most {MAX_GROUP_DEPTH}"
                                       " levels deep.")
                group = ThingGroup(name, str(uuid.uuid4()), parent, description,
                                   dict(attributes), 1, now)
                self._store.insert_group(group)
            return {"thingGroupName": name, "thingGroupArn": self.group_arn(name),
                    "thingGroupId": group.group_id}
        return self._run(op)

    def describe_thing_group(self, name: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            group = self._group_or_404(name)
            chain = list(reversed(self._ancestors(name)))  # root first
            return views.group_view(group, self.group_arn(name),
                                    [(g, self.group_arn(g)) for g in chain])
        return self._run(op)

    def delete_thing_group(self, name: str, expected_version: Optional[int]) -> None:
        def op(tracker: _Tracker, now: int) -> None:
            group = self._store.get_group(name)
            if group is None:
                return  # DeleteThingGroup is idempotent
            if expected_version is not None and expected_version != group.version:
                raise ApiError("VersionConflictException", 409,
                               f"expectedVersion {expected_version} does not match"
                               f" {group.version}.")
            if self._store.child_groups(name):
                raise _invalid(f"Thing group {name} has child groups; delete them first.")
            for thing in self._store.members(name):
                self._leave_group(name, thing, tracker, now)
            self._store.delete_group(name)
        self._run(op)

    def list_thing_groups(self, parent: Optional[str], prefix: Optional[str],
                          recursive: bool, max_results: Optional[int],
                          token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            groups = self._store.list_groups()
            if parent is not None:
                self._group_or_404(parent)
                allowed = set(self._subtree(parent)[1:]) if recursive else {
                    g.name for g in groups if g.parent == parent}
                groups = [g for g in groups if g.name in allowed]
            elif not recursive:
                groups = [g for g in groups if g.parent is None]
            if prefix is not None:
                groups = [g for g in groups if g.name.startswith(prefix)]
            rows = [{"groupName": g.name, "groupArn": self.group_arn(g.name)} for g in groups]
            return _page(rows, "thingGroups", max_results, token)
        return self._run(op)

    def list_thing_groups_for_thing(self, thing: str, max_results: Optional[int],
                                    token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_thing(thing) is None:
                raise _not_found(f"Thing {thing} cannot be found.")
            rows = [{"groupName": g, "groupArn": self.group_arn(g)}
                    for g in self._store.groups_of_thing(thing)]
            return _page(rows, "thingGroups", max_results, token)
        return self._run(op)

    def add_thing_to_thing_group(self, body: dict[str, Any]) -> None:
        group_name, thing = self._group_from(body), self._thing_from(body)

        def op(tracker: _Tracker, now: int) -> None:
            self._group_or_404(group_name)
            if self._store.get_thing(thing) is None:
                raise _not_found(f"Thing {thing} cannot be found.")
            if self._store.is_member(group_name, thing):
                return
            if len(self._store.groups_of_thing(thing)) >= MAX_GROUPS_PER_THING:
                raise _invalid(f"Thing {thing} already belongs to {MAX_GROUPS_PER_THING}"
                               " thing groups.")
            self._store.add_member(group_name, thing)
            groups = [group_name, *self._ancestors(group_name)]
            for job_id in self._store.jobs_targeting_groups(groups):
                latest = self._store.get_execution(job_id, thing)
                if latest is not None and latest.status != "REMOVED":
                    continue  # one execution per thing; a REMOVED one is queued afresh
                tracker.touch(thing)
                self._store.insert_execution(Execution(
                    job_id=job_id, thing_name=thing,
                    execution_number=1 if latest is None else latest.execution_number + 1,
                    status="QUEUED", queued_at=now, last_updated_at=now, version_number=1))
        self._run(op)

    def remove_thing_from_thing_group(self, body: dict[str, Any]) -> None:
        group_name, thing = self._group_from(body), self._thing_from(body)

        def op(tracker: _Tracker, now: int) -> None:
            self._group_or_404(group_name)
            if self._store.get_thing(thing) is None:
                raise _not_found(f"Thing {thing} cannot be found.")
            self._leave_group(group_name, thing, tracker, now)
        self._run(op)

    def _leave_group(self, group_name: str, thing: str, tracker: _Tracker, now: int) -> None:
        """Remove a membership; QUEUED executions of CONTINUOUS jobs the thing is no longer a
        target of become REMOVED (PROTOCOL.md 3.1)."""
        if not self._store.remove_member(group_name, thing):
            return
        groups = [group_name, *self._ancestors(group_name)]
        for job_id in self._store.jobs_targeting_groups(groups):
            latest = self._store.get_execution(job_id, thing)
            if latest is None or latest.status != "QUEUED" or self._is_target(job_id, thing):
                continue
            tracker.touch(thing)
            latest.status = "REMOVED"
            latest.last_updated_at = now
            latest.version_number += 1
            self._end_timers(latest)
            self._store.save_execution(latest)

    def list_things_in_thing_group(self, name: str, recursive: bool, max_results: Optional[int],
                                   token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            self._group_or_404(name)
            return _page(self._group_things(name, recursive), "things", max_results, token)
        return self._run(op)

    # -- control plane: jobs -------------------------------------------------------------------
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
        for unsupported in ("jobTemplateArn", "destinationPackageVersions"):
            if body.get(unsupported) is not None:
                raise _invalid(f"{unsupported} is not supported by jobsd; send `document`")
        document = self._document_from(body)
        targets = body.get("targets")
        if not isinstance(targets, list) or not targets:
            raise _invalid("targets must be a non-empty list of thing or thing-group ARNs")
        resolved = list(dict.fromkeys(self._target_from_arn(arn) for arn in targets))
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
        # Options kept verbatim for DescribeJob (rollout, abort, retry are not acted upon).
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
            for name in dict.fromkeys(names):
                tracker.touch(name)
                self._store.insert_execution(Execution(
                    job_id=job_id, thing_name=name, execution_number=1, status="QUEUED",
                    queued_at=now, last_updated_at=now, version_number=1))
            self._refresh_job(job_id, now)  # a SNAPSHOT of empty groups has nothing to do
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
        """The document as stored: presigned-URL placeholders are not replaced (as AWS)."""
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            return {"document": self._job_or_404(job_id).document}
        return self._run(op)

    def list_jobs(self, status: Optional[str], selection: Optional[str], group: Optional[str],
                  max_results: Optional[int], token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            group_arn = None if group is None else self.group_arn(group)
            rows = [views.job_summary(j, self.job_arn(j.job_id)) for j in self._store.list_jobs()
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
                    self._end_timers(ex)
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
            self._docs.pop(job_id, None)
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

    # -- AWS IoT commands: shared ---------------------------------------------------------------
    def _stamp(self) -> float:
        """Command timestamps: epoch seconds with milliseconds (botocore `timestamp`)."""
        return round(self._clock(), 3)

    def _here(self, region: str, account: str, arn: str) -> None:
        """ARNs of another region or account name nothing this service has."""
        if (region, account) != (self.region, self.account):
            raise _not_found(f"{arn} is not in {self.region}/{self.account}")

    def _command_event(self, cx: CommandExecution, tracker: _Tracker) -> None:
        tracker.publish(cmds.event_topic(cx.command_id, cx.status),
                        views.command_event(cx, self.command_arn(cx.command_id),
                                            self.target_arn(cx.target_kind, cx.target_name),
                                            self._clock()))

    def _command_or_404(self, command_id: str) -> Command:
        if not cmds.valid_id(command_id):
            raise cmds.validation("commandId must match [a-zA-Z0-9_-]{1,64}")
        cmd = self._store.get_command(command_id)
        if cmd is None:
            raise _not_found(f"Command {command_id} cannot be found.")
        return cmd

    # -- AWS IoT commands: control plane --------------------------------------------------------
    def create_command(self, command_id: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = cmds.parse_create(command_id, body)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_command(command_id) is not None:
                raise ApiError("ConflictException", 409, f"Command {command_id} already exists.",
                               resourceId=command_id)
            now = self._stamp()
            self._store.insert_command(Command(
                command_id=command_id, seq=self._store.next_counter("command"),
                namespace=spec.namespace, display_name=spec.display_name,
                description=spec.description, content=spec.content,
                content_type=spec.content_type, mandatory=spec.mandatory, created_at=now,
                last_updated_at=now, tags=spec.tags))
            return {"commandId": command_id, "commandArn": self.command_arn(command_id)}
        return self._run(op)

    def get_command(self, command_id: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            cmd = self._command_or_404(command_id)
            return views.command_view(cmd, self.command_arn(command_id))
        return self._run(op)

    def list_commands(self, namespace: Optional[str], parameter: Optional[str],
                      order: Optional[str], max_results: Optional[int],
                      token: Optional[str]) -> dict[str, Any]:
        if namespace is not None and namespace not in cmds.NAMESPACES:
            raise cmds.validation(f"namespace must be one of {', '.join(cmds.NAMESPACES)}")
        descending = _sort_order(order)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            found = [c for c in self._store.list_commands()
                     if (namespace is None or c.namespace == namespace)
                     and (parameter is None
                          or any(p["name"] == parameter for p in c.mandatory or []))]
            if descending:
                found.reverse()
            rows = [views.command_summary(c, self.command_arn(c.command_id)) for c in found]
            return _page(rows, "commands", max_results, token, default=cmds.DEFAULT_RESULTS,
                         limit=cmds.MAX_RESULTS, invalid=cmds.validation)
        return self._run(op)

    def update_command(self, command_id: str, body: dict[str, Any]) -> dict[str, Any]:
        change = cmds.parse_update_command(body)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            cmd = self._command_or_404(command_id)
            if cmd.pending_deletion:
                raise ApiError("ConflictException", 409,
                               f"Command {command_id} is pending deletion.",
                               resourceId=command_id)
            now = self._stamp()
            if change.display_name is not None:
                cmd.display_name = change.display_name
            if change.description is not None:
                cmd.description = change.description
            if change.deprecated is not None and change.deprecated != cmd.deprecated:
                cmd.deprecated = change.deprecated
                cmd.deprecated_at = now if change.deprecated else None
            cmd.last_updated_at = now
            self._store.save_command(cmd)
            out: dict[str, Any] = {"commandId": command_id}
            if cmd.display_name is not None:
                out["displayName"] = cmd.display_name
            if cmd.description is not None:
                out["description"] = cmd.description
            out.update(deprecated=cmd.deprecated, lastUpdatedAt=cmd.last_updated_at)
            return out
        return self._run(op)

    def delete_command(self, command_id: str) -> int:
        """The HTTP status DeleteCommand answers with (the model's `statusCode`): 204 when the
        command is gone now (it had been deprecated for longer than the 12-hour maximum
        execution timeout, or never existed), else 202: it is pending deletion, refuses new
        executions, and the timer thread removes it when that window has passed."""
        if not cmds.valid_id(command_id):
            raise cmds.validation("commandId must match [a-zA-Z0-9_-]{1,64}")

        def op(tracker: _Tracker, __: int) -> int:
            cmd = self._store.get_command(command_id)
            if cmd is None:
                return 204
            now = self._clock()
            if (cmd.deprecated and cmd.deprecated_at is not None
                    and now - cmd.deprecated_at >= cmds.DELETION_WINDOW):
                self._store.delete_command(command_id)
                return 204
            if cmd.delete_at is None:
                start = cmd.deprecated_at if cmd.deprecated and cmd.deprecated_at else now
                cmd.delete_at = start + cmds.DELETION_WINDOW
                cmd.last_updated_at = self._stamp()
                self._store.save_command(cmd)
                tracker.deadline(cmd.delete_at)
            return 202
        return self._run(op)

    def _target(self, target_arn: Optional[str]) -> tuple[str, str]:
        """(kind, name) of a targetArn query or filter."""
        if target_arn is None:
            raise cmds.validation("targetArn is required")
        region, account, kind, name = cmds.parse_arn(target_arn, "targetArn",
                                                     ("thing", "client"))
        self._here(region, account, target_arn)
        return kind, name

    def _execution_of(self, execution_id: str, target: tuple[str, str]) -> CommandExecution:
        if not cmds.valid_id(execution_id):
            raise cmds.validation("executionId must match [a-zA-Z0-9_-]{1,64}")
        cx = self._store.get_command_execution(execution_id)
        if cx is None or (cx.target_kind, cx.target_name) != target:
            raise _not_found(f"Command execution {execution_id} on"
                             f" {self.target_arn(*target)} cannot be found.")
        return cx

    def get_command_execution(self, execution_id: str, target_arn: Optional[str],
                              include_result: bool) -> dict[str, Any]:
        target = self._target(target_arn)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            cx = self._execution_of(execution_id, target)
            return views.command_execution(cx, self.command_arn(cx.command_id),
                                           self.target_arn(*target), include_result)
        return self._run(op)

    def list_command_executions(self, body: dict[str, Any], max_results: Optional[int],
                                token: Optional[str]) -> dict[str, Any]:
        namespace, status = body.get("namespace"), body.get("status")
        if namespace is not None and namespace not in cmds.NAMESPACES:
            raise cmds.validation(f"namespace must be one of {', '.join(cmds.NAMESPACES)}")
        if status is not None and status not in cmds.STATUSES:
            raise cmds.validation(f"status must be one of {', '.join(cmds.STATUSES)}")
        descending = _sort_order(body.get("sortOrder"))
        if body.get("targetArn") is not None and body.get("commandArn") is not None:
            raise cmds.validation("Filter by targetArn or by commandArn, not both")
        target = None if body.get("targetArn") is None else self._target(body["targetArn"])
        command_id = None
        if body.get("commandArn") is not None:
            region, account, _, command_id = cmds.parse_arn(body["commandArn"], "commandArn",
                                                            ("command",))
            self._here(region, account, body["commandArn"])
        started, completed = body.get("startedTimeFilter"), body.get("completedTimeFilter")
        if started is not None and completed is not None:
            raise cmds.validation("Give startedTimeFilter or completedTimeFilter, not both")
        window: Optional[tuple[str, Optional[float], Optional[float]]] = None
        if started is not None:
            window = ("started_at", *cmds.parse_time_filter(started, "startedTimeFilter"))
        elif completed is not None:
            window = ("completed_at", *cmds.parse_time_filter(completed, "completedTimeFilter"))

        def within(cx: CommandExecution) -> bool:
            if window is None:
                return True
            when = getattr(cx, window[0])
            return when is not None and (window[1] is None or when >= window[1]) and (
                window[2] is None or when <= window[2])

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            found = [] if namespace == cmds.FLEETWISE else [
                cx for cx in self._store.list_command_executions(command_id, target, status)
                if within(cx)]
            if descending:
                found.reverse()
            rows = [views.command_execution_summary(
                cx, self.command_arn(cx.command_id),
                self.target_arn(cx.target_kind, cx.target_name)) for cx in found]
            return _page(rows, "commandExecutions", max_results, token,
                         default=cmds.DEFAULT_RESULTS, limit=cmds.MAX_RESULTS,
                         invalid=cmds.validation)
        return self._run(op)

    def delete_command_execution(self, execution_id: str, target_arn: Optional[str]) -> None:
        """Only a terminal execution can be deleted (ConflictException otherwise); deleting one
        that does not exist succeeds (the model lists no ResourceNotFoundException here)."""
        target = self._target(target_arn)
        if not cmds.valid_id(execution_id):
            raise cmds.validation("executionId must match [a-zA-Z0-9_-]{1,64}")

        def op(_: _Tracker, __: int) -> None:
            cx = self._store.get_command_execution(execution_id)
            if cx is None or (cx.target_kind, cx.target_name) != target:
                return
            if cx.status not in cmds.TERMINAL:
                raise ApiError("ConflictException", 409,
                               f"Command execution {execution_id} is {cx.status}; only a"
                               " terminal execution can be deleted.", resourceId=execution_id)
            self._store.delete_command_execution(cx)
        self._run(op)

    # -- AWS IoT commands: StartCommandExecution (iot-jobs-data) ---------------------------------
    def start_command_execution(self, body: dict[str, Any]) -> dict[str, Any]:
        req = cmds.parse_start(body)
        (t_region, t_account, kind, name), command = req.target, req.command
        key = req.key()

        def op(tracker: _Tracker, __: int) -> dict[str, Any]:
            if req.client_token is not None:
                earlier = self._store.command_execution_by_token(req.client_token)
                if earlier is not None:
                    if earlier.request_key != key:
                        raise ApiError("ConflictException", 409,
                                       "clientToken was already used with a different request",
                                       resourceId=earlier.execution_id)
                    return {"executionId": earlier.execution_id}
            self._here(command[0], command[1], body["commandArn"])
            cmd = self._store.get_command(command[3])
            if cmd is None:
                raise _not_found(f"Command {command[3]} cannot be found.")
            if cmd.deprecated:
                raise cmds.validation(f"Command {cmd.command_id} is deprecated; restore it with"
                                      " UpdateCommand first.")
            if cmd.pending_deletion:
                raise cmds.validation(f"Command {cmd.command_id} is pending deletion.")
            self._here(t_region, t_account, body["targetArn"])
            if kind == "thing" and self._store.get_thing(name) is None:
                raise _not_found(f"Thing {name} cannot be found.")
            parameters = cmds.apply_mandatory(cmd.mandatory, req.parameters)
            now = self._stamp()
            cx = self._store.insert_command_execution(CommandExecution(
                execution_id=str(uuid.uuid4()), command_id=cmd.command_id, target_kind=kind,
                target_name=name, status="CREATED", timeout_seconds=req.timeout,
                request_key=key, created_at=now, last_updated_at=now, started_at=now,
                parameters=parameters, client_token=req.client_token,
                timeout_at=now + req.timeout))
            tracker.deadline(cx.timeout_at)
            tracker.publish(cmds.request_topic(kind, name, cx.execution_id, cmd.content_type),
                            cmd.content or b"", Delivery(cmd.content_type, req.timeout))
            self._command_event(cx, tracker)
            return {"executionId": cx.execution_id}
        return self._run(op)

    # -- AWS IoT commands: UpdateCommandExecution (MQTT) -----------------------------------------
    def update_command_execution(self, kind: str, name: str, execution_id: str,
                                 update: cmds.CommandUpdate) -> None:
        """Apply a device's report; DeviceError with the jobs codes otherwise. Terminal is final,
        except a TIMED_OUT the service set, which the device may settle once with a terminal
        status of its own (AWS guide, "Time out value and TIMED_OUT execution status")."""
        def op(tracker: _Tracker, __: int) -> None:
            cx = self._store.get_command_execution(execution_id)
            if cx is None or (cx.target_kind, cx.target_name) != (kind, name):
                raise DeviceError("ResourceNotFound",
                                  f"Command execution {execution_id} not found for"
                                  f" {cmds.DEVICE_KINDS[kind]}/{name}")
            if cx.completed_at is not None or (cx.status in cmds.TERMINAL
                                               and cx.status != "TIMED_OUT"):
                raise DeviceError("InvalidStateTransition",
                                  f"Command execution is already in terminal state {cx.status}")
            if cx.status == "TIMED_OUT" and update.status not in cmds.TERMINAL:
                raise DeviceError("InvalidStateTransition",
                                  "Command execution timed out; only a terminal status can"
                                  f" follow, not {update.status}")
            changed = update.status != cx.status
            if update.status_reason is not None:
                cx.status_reason = update.status_reason
            elif changed:
                cx.status_reason = None  # a reason explains one status, not the next
            if update.result is not None:
                cx.result = update.result
            cx.status = update.status
            now = self._stamp()
            cx.last_updated_at = now
            if update.status in cmds.TERMINAL:
                cx.completed_at = now
                cx.timeout_at = None
            self._store.save_command_execution(cx)
            if changed:
                self._command_event(cx, tracker)
        self._run(op)

    # -- streams: shared -------------------------------------------------------------------------
    def stream_arn(self, stream_id: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:stream/{stream_id}"

    def ota_arn(self, ota_update_id: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:otaupdate/{ota_update_id}"

    def _files_root(self) -> str:
        if self.files is None:
            raise sts.invalid("streams need jobsd to run with --files DIR (s3://BUCKET/KEY is"
                              " DIR/BUCKET/KEY)")
        return self.files.root

    def _measure(self, files: list[sts.StreamFile]) -> list[dict[str, Any]]:
        """Record each file's size and SHA-256 now (its ETag for the device side)."""
        root = self._files_root()
        out = []
        for f in files:
            try:
                f.size, f.sha256 = streamfiles.measure(root, f.bucket, f.key)
            except streamfiles.Missing as err:
                raise _not_found(f"{err} (looked under the --files folder)") from None
            except streamfiles.Unreadable as err:
                raise sts.invalid(str(err)) from None
            out.append(f.to_json())
        return out

    def _stream_or_404(self, stream_id: str) -> Stream:
        if not sts.valid_id(stream_id):
            raise sts.invalid("streamId must match [a-zA-Z0-9_-]{1,128}")
        found = self._store.get_stream(stream_id)
        if found is None:
            raise _not_found(f"Stream {stream_id} cannot be found.")
        return found

    def _stream_changed(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)
        if self._blocks is not None:
            self._blocks.forget(stream_id)

    def _stream_reply(self, s: Stream) -> dict[str, Any]:
        out: dict[str, Any] = {"streamId": s.stream_id, "streamArn": self.stream_arn(s.stream_id)}
        if s.description is not None:
            out["description"] = s.description
        out["streamVersion"] = s.version
        return out

    def _insert_stream(self, stream_id: str, spec: sts.StreamSpec, files: list[dict[str, Any]]
                       ) -> Stream:
        now = self._stamp()
        stream = Stream(stream_id=stream_id, seq=self._store.next_counter("stream"), version=1,
                        description=spec.description, role_arn=spec.role_arn or "",
                        files=files, created_at=now, last_updated_at=now, tags=spec.tags)
        self._store.insert_stream(stream)
        self._stream_changed(stream_id)
        return stream

    # -- streams: control plane -------------------------------------------------------------------
    def create_stream(self, stream_id: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = sts.parse_create(stream_id, body)
        assert spec.files is not None
        files = self._measure(spec.files)  # outside the lock: hashing takes a while

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_stream(stream_id) is not None:
                raise ApiError("ResourceAlreadyExistsException", 409,
                               f"Stream {stream_id} already exists.", resourceId=stream_id,
                               resourceArn=self.stream_arn(stream_id))
            return self._stream_reply(self._insert_stream(stream_id, spec, files))
        return self._run(op)

    def describe_stream(self, stream_id: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            s = self._stream_or_404(stream_id)
            info = {"streamId": s.stream_id, "streamArn": self.stream_arn(s.stream_id),
                    "streamVersion": s.version}
            if s.description is not None:
                info["description"] = s.description
            info.update(files=[{"fileId": f["fileId"],
                                "s3Location": sts.StreamFile.from_json(f).s3_location()}
                               for f in s.files],
                        createdAt=s.created_at, lastUpdatedAt=s.last_updated_at,
                        roleArn=s.role_arn)
            return {"streamInfo": info}
        return self._run(op)

    def list_streams(self, max_results: Optional[int], token: Optional[str],
                     ascending: bool) -> dict[str, Any]:
        """Creation order; newest first unless isAscendingOrder=true."""
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            found = self._store.list_streams()
            if not ascending:
                found.reverse()
            rows = []
            for s in found:
                row: dict[str, Any] = {"streamId": s.stream_id,
                                       "streamArn": self.stream_arn(s.stream_id),
                                       "streamVersion": s.version}
                if s.description is not None:
                    row["description"] = s.description
                rows.append(row)
            return _page(rows, "streams", max_results, token, limit=sts.MAX_RESULTS)
        return self._run(op)

    def update_stream(self, stream_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Every update adds one to the version and records the files' content anew (the
        operator's way to accept a changed file)."""
        spec = sts.parse_update(stream_id, body)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            s = self._stream_or_404(stream_id)
            if s.version >= sts.MAX_VERSION:
                raise ApiError("LimitExceededException", 410,
                               f"Stream {stream_id} is at version {sts.MAX_VERSION}, the"
                               " highest a stream can have.")
            files = spec.files if spec.files is not None else [
                sts.StreamFile.from_json(f) for f in s.files]
            s.files = self._measure(files)
            if spec.description is not None:
                s.description = spec.description
            if spec.role_arn is not None:
                s.role_arn = spec.role_arn
            s.version += 1
            s.last_updated_at = self._stamp()
            self._store.save_stream(s)
            self._stream_changed(stream_id)
            return self._stream_reply(s)
        return self._run(op)

    def delete_stream(self, stream_id: str) -> None:
        def op(_: _Tracker, __: int) -> None:
            self._stream_or_404(stream_id)
            users = self._store.ota_updates_using_stream(stream_id)
            if users:
                raise ApiError("DeleteConflictException", 409,
                               f"Stream {stream_id} is used by OTA update {users[0]}; delete"
                               " the OTA update first.")
            self._store.delete_stream(stream_id)
            self._stream_changed(stream_id)
        self._run(op)

    def set_test_hooks(self, body: dict[str, Any]) -> dict[str, Any]:
        """`PUT /_jobsd/test-hooks` (only with --test-hooks): `streamFault` = "InternalError"
        makes every stream request fail so, "Silent" leaves every stream request unanswered (a
        service that says nothing, STREAMS.md 11.23), null clears it; `streamStrictEof` switches
        the past-the-end rule of GetStream requests without `n`."""
        if not self.test_hooks:
            raise ApiError("UnknownOperationException", 404,
                           "test hooks are off (start jobsd with --test-hooks)")
        with self.lock:
            if "streamFault" in body:
                fault = body["streamFault"]
                if fault not in (None, "InternalError", "Silent"):
                    raise sts.invalid("streamFault must be InternalError, Silent or null")
                self.stream_fault = fault
            if "streamStrictEof" in body:
                if not isinstance(body["streamStrictEof"], bool):
                    raise sts.invalid("streamStrictEof must be a boolean")
                self.stream_strict_eof = body["streamStrictEof"]
            return {"streamFault": self.stream_fault, "streamStrictEof": self.stream_strict_eof}

    # -- streams: device side (MQTT) --------------------------------------------------------------
    def _stream_view(self, stream_id: str, token: Optional[str]) -> _StreamView:
        with self.lock:
            if self.stream_fault is not None:
                raise sts.StreamError(self.stream_fault, "Internal error", token)
            if stream_id not in self._streams:
                s = self._store.get_stream(stream_id)
                self._streams[stream_id] = None if s is None else _StreamView(
                    s.stream_id, s.version, s.description,
                    {f["fileId"]: sts.StreamFile.from_json(f) for f in s.files})
            view = self._streams[stream_id]
        if view is None:
            raise sts.StreamError("ResourceNotFound", f"Stream {stream_id} does not exist", token)
        return view

    def stream_describe(self, stream_id: str, token: Optional[str]
                        ) -> tuple[int, Optional[str], list[tuple[int, int]]]:
        """DescribeStream: (version, description, [(fileId, size)])."""
        view = self._stream_view(stream_id, token)
        return view.version, view.description, [(f.file_id, f.size)
                                                 for f in view.files.values()]

    def stream_blocks(self, stream_id: str, req: sts.GetRequest
                      ) -> tuple[list[int], memoryview]:
        """GetStream: the absolute indexes of the blocks to send and the file's bytes. No SQL
        and no hashing on the way once a stream file is cached (streamfiles.py)."""
        view = self._stream_view(stream_id, req.token)
        if req.version is not None and req.version != view.version:
            raise sts.StreamError("VersionMismatch", f"Stream {stream_id} is at version"
                                  f" {view.version}, not {req.version}", req.token)
        f = view.files.get(req.file_id)
        if f is None:
            raise sts.StreamError("ResourceNotFound", f"Stream {stream_id} has no file"
                                  f" {req.file_id}", req.token)
        with self.lock:
            if self._blocks is None or self.files is None or self._blocks.root != self.files.root:
                if self.files is None:
                    raise sts.StreamError("Unauthorized", "jobsd serves no files folder",
                                          req.token)
                self._blocks = streamfiles.BlockSource(self.files.root)
            blocks = self._blocks
            strict = self.stream_strict_eof
        data = blocks.content(stream_id, view.version, f.file_id, f.bucket, f.key, f.size,
                              f.sha256, req.token)
        return sts.select_blocks(req, len(data), strict), data

    # -- OTA updates ------------------------------------------------------------------------------
    def _ota_or_404(self, ota_update_id: str) -> OtaUpdate:
        if not sts.valid_id(ota_update_id):
            raise sts.invalid("otaUpdateId must match [a-zA-Z0-9_-]{1,128}")
        found = self._store.get_ota_update(ota_update_id)
        if found is None:
            raise _not_found(f"OTA update {ota_update_id} cannot be found.")
        return found

    def create_ota_update(self, ota_update_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Checks what can be checked at once and records the update CREATE_PENDING; a worker
        then creates the stream and the job (`_complete_ota`) and sets CREATE_COMPLETE."""
        spec = otas.parse_create(ota_update_id, body)
        for arn in spec.targets:
            self._target_from_arn(arn)
        job_id = otas.JOB_PREFIX + ota_update_id

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_ota_update(ota_update_id) is not None:
                raise ApiError("ResourceAlreadyExistsException", 409,
                               f"OTA update {ota_update_id} already exists.",
                               resourceId=ota_update_id, resourceArn=self.ota_arn(ota_update_id))
            if self._store.get_job(job_id) is not None:
                raise ApiError("ResourceAlreadyExistsException", 409,
                               f"Job {job_id} already exists.", resourceId=job_id,
                               resourceArn=self.job_arn(job_id))
            for arn in spec.targets:
                kind, name = self._target_from_arn(arn)
                if kind == "thing" and self._store.get_thing(name) is None:
                    raise _not_found(f"Thing {name} cannot be found.")
                if kind == "thinggroup":
                    self._group_or_404(name)
            self._ota_entries(spec)  # every file exists (ResourceNotFound otherwise)
            now = self._stamp()
            self._store.insert_ota_update(OtaUpdate(
                ota_update_id=ota_update_id, seq=self._store.next_counter("ota"),
                status="CREATE_PENDING", request=body, job_id=job_id, created_at=now,
                last_updated_at=now))
            return {"otaUpdateId": ota_update_id, "awsIotJobId": job_id,
                    "otaUpdateArn": self.ota_arn(ota_update_id),
                    "awsIotJobArn": self.job_arn(job_id), "otaUpdateStatus": "CREATE_PENDING"}
        out = self._run(op)
        threading.Thread(target=self._complete_ota, args=(ota_update_id,),
                         name=f"ota-{ota_update_id}", daemon=True).start()
        return out

    def _ota_entries(self, spec: otas.OtaSpec, stream_id: Optional[str] = None
                     ) -> list[dict[str, Any]]:
        """fileid, filesize, bucket and key of each file of an update (under the lock)."""
        out = []
        for f in spec.files:
            if f.stream is not None:
                s = self._store.get_stream(f.stream[0])
                if s is None:
                    raise _not_found(f"Stream {f.stream[0]} cannot be found.")
                match = [x for x in s.files if x["fileId"] == f.stream[1]]
                if not match:
                    raise sts.invalid(f"Stream {f.stream[0]} has no fileId {f.stream[1]}")
                out.append({"fileid": f.stream[1], "filesize": match[0]["size"],
                            "bucket": match[0]["bucket"], "key": match[0]["key"]})
                continue
            assert f.s3 is not None
            bucket, key, _ = f.s3
            size = None
            if stream_id is not None:
                s = self._store.get_stream(stream_id)
                match = [x for x in (s.files if s else []) if x["fileId"] == f.index]
                size = match[0]["size"] if match else None
            if size is None:
                try:
                    size = streamfiles.measure(self._files_root(), bucket, key)[0]
                except streamfiles.Missing as err:
                    raise _not_found(f"{err} (looked under the --files folder)") from None
                except streamfiles.Unreadable as err:
                    raise sts.invalid(str(err)) from None
            out.append({"fileid": f.index, "filesize": size, "bucket": bucket, "key": key})
        return out

    def _complete_ota(self, ota_update_id: str) -> None:
        """CREATE_PENDING -> the stream (MQTT, s3Location files), the job, CREATE_COMPLETE; or
        CREATE_FAILED with errorInfo. Safe to run again after a restart."""
        try:
            with self.lock:
                found = self._store.get_ota_update(ota_update_id)
                if found is None or found.status != "CREATE_PENDING":
                    return
                ota = found
            body = ota.request
            spec = otas.parse_create(ota_update_id, body)

            def stream_op(_: _Tracker, __: int) -> Optional[str]:
                current = self._store.get_ota_update(ota_update_id)
                if current is None:
                    return None
                if current.stream_id is not None or not spec.mqtt:
                    return current.stream_id
                if spec.files[0].stream is not None:
                    current.stream_id = spec.files[0].stream[0]
                else:
                    stream_id = otas.new_stream_id()
                    files = [sts.StreamFile(f.index, *f.s3) for f in spec.files  # type: ignore[misc]
                             if f.s3 is not None]
                    self._insert_stream(stream_id, sts.StreamSpec(
                        spec.description, files, spec.role_arn), self._measure(files))
                    current.stream_id, current.stream_created = stream_id, True
                current.last_updated_at = self._stamp()
                self._store.save_ota_update(current)
                return current.stream_id
            stream_id = self._run(stream_op)
            with self.lock:
                entries = self._ota_entries(spec, stream_id)
                exists = self._store.get_job(ota.job_id) is not None
            if not exists:
                job: dict[str, Any] = {
                    "targets": spec.targets, "targetSelection": spec.target_selection,
                    "document": json.dumps(otas.document(spec, stream_id, entries))}
                if spec.description is not None:
                    job["description"] = spec.description
                for ours, theirs in (("awsJobPresignedUrlConfig", "presignedUrlConfig"),
                                     ("awsJobTimeoutConfig", "timeoutConfig")):
                    if isinstance(body.get(ours), dict):
                        job[theirs] = body[ours]
                self.create_job(ota.job_id, job)
            self._ota_status(ota_update_id, "CREATE_COMPLETE", None)
        except ApiError as err:
            log.warning("OTA update %s failed: %s", ota_update_id, err)
            self._ota_status(ota_update_id, "CREATE_FAILED",
                             {"code": err.error_type, "message": err.message})
        except Exception as err:  # a worker thread: record, never raise
            log.exception("OTA update %s failed", ota_update_id)
            self._ota_status(ota_update_id, "CREATE_FAILED",
                             {"code": "InternalFailureException", "message": str(err)[:500]})

    def _ota_status(self, ota_update_id: str, status: str,
                    error: Optional[dict[str, str]]) -> None:
        def op(_: _Tracker, __: int) -> None:
            current = self._store.get_ota_update(ota_update_id)
            if current is None:
                return
            current.status, current.error = status, error
            current.last_updated_at = self._stamp()
            self._store.save_ota_update(current)
        self._run(op)

    def resume_ota_updates(self) -> None:
        """At start-up: finish the updates a stop left CREATE_PENDING."""
        with self.lock:
            pending = [o.ota_update_id for o in self._store.list_ota_updates()
                       if o.status == "CREATE_PENDING"]
        for ota_update_id in pending:
            threading.Thread(target=self._complete_ota, args=(ota_update_id,),
                             name=f"ota-{ota_update_id}", daemon=True).start()

    def get_ota_update(self, ota_update_id: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            o = self._ota_or_404(ota_update_id)
            body = o.request
            info: dict[str, Any] = {"otaUpdateId": o.ota_update_id,
                                    "otaUpdateArn": self.ota_arn(o.ota_update_id),
                                    "creationDate": o.created_at,
                                    "lastModifiedDate": o.last_updated_at}
            for member in ("description", "targets", "awsJobExecutionsRolloutConfig",
                           "awsJobPresignedUrlConfig", "additionalParameters"):
                if body.get(member) is not None:
                    info[member] = body[member]
            info["protocols"] = body.get("protocols", ["MQTT"])
            info["targetSelection"] = body.get("targetSelection", "SNAPSHOT")
            info["otaUpdateFiles"] = body["files"]
            info["otaUpdateStatus"] = o.status
            if o.status == "CREATE_COMPLETE" or self._store.get_job(o.job_id) is not None:
                info["awsIotJobId"] = o.job_id
                info["awsIotJobArn"] = self.job_arn(o.job_id)
            if o.error is not None:
                info["errorInfo"] = o.error
            return {"otaUpdateInfo": info}
        return self._run(op)

    def list_ota_updates(self, status: Optional[str], max_results: Optional[int],
                         token: Optional[str]) -> dict[str, Any]:
        if status is not None and status not in otas.STATUSES:
            raise sts.invalid(f"otaUpdateStatus must be one of {', '.join(otas.STATUSES)}")

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            rows = [{"otaUpdateId": o.ota_update_id, "otaUpdateArn": self.ota_arn(o.ota_update_id),
                     "creationDate": o.created_at}
                    for o in reversed(self._store.list_ota_updates())
                    if status is None or o.status == status]
            return _page(rows, "otaUpdates", max_results, token)
        return self._run(op)

    def delete_ota_update(self, ota_update_id: str, delete_stream: bool,
                          force_delete_job: bool) -> None:
        """The OTA record; with forceDeleteAWSJob also its job (even IN_PROGRESS), with
        deleteStream also the stream it created (a stream the caller supplied stays)."""
        with self.lock:
            o = self._ota_or_404(ota_update_id)
        if force_delete_job and self._job_exists(o.job_id):
            self.delete_job(o.job_id, True)

        def op(_: _Tracker, __: int) -> None:
            current = self._ota_or_404(ota_update_id)
            self._store.delete_ota_update(ota_update_id)
            if delete_stream and current.stream_created and current.stream_id is not None:
                if (self._store.get_stream(current.stream_id) is not None
                        and not self._store.ota_updates_using_stream(current.stream_id)):
                    self._store.delete_stream(current.stream_id)
                    self._stream_changed(current.stream_id)
        self._run(op)

    def _job_exists(self, job_id: str) -> bool:
        with self.lock:
            return self._store.get_job(job_id) is not None



@dataclass(frozen=True)
class _StreamView:
    """A stream as device requests see it (immutable; replaced on every change)."""
    stream_id: str
    version: int
    description: Optional[str]
    files: dict[int, sts.StreamFile]


def _attributes(payload: Any) -> dict[str, str]:
    """attributePayload.attributes as a string map (CreateThing, CreateThingGroup)."""
    payload = payload or {}
    attributes = payload.get("attributes") or {} if isinstance(payload, dict) else None
    if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()):
        raise _invalid("attributePayload.attributes must map strings to strings")
    return attributes


def _sort_order(order: Any) -> bool:
    """True for DESCENDING, the commands APIs' default."""
    if order is None:
        return True
    if order not in ("ASCENDING", "DESCENDING"):
        raise cmds.validation("sortOrder must be ASCENDING or DESCENDING")
    return order == "DESCENDING"


def _page(rows: list[Any], key: str, max_results: Optional[int], token: Optional[str], *,
          default: int = 250, limit: int = 250,
          invalid: Callable[[str], ApiError] = _invalid) -> dict[str, Any]:
    """Offset pagination; the token is opaque to clients, an offset to us."""
    try:
        start = int(token) if token else 0
    except ValueError:
        raise invalid("nextToken is invalid") from None
    if start < 0:
        raise invalid("nextToken is invalid")
    size = max_results if max_results is not None else default
    if not 1 <= size <= limit:
        raise invalid(f"maxResults must be 1..{limit}")
    out: dict[str, Any] = {key: rows[start:start + size]}
    if start + size < len(rows):
        out["nextToken"] = str(start + size)
    return out
