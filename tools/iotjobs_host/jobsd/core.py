"""The service's shared core: one lock, one transaction per request, events after the commit.

Every public method of the service is one request: it takes the service lock, runs in one store
transaction and, only after the commit, hands the notify / notify-next events it caused to
`publish`. Holding the lock while publishing keeps the events of successive requests in request
order on the single MQTT connection, which is the order a device observes them in.

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
from dataclasses import dataclass
from typing import Any, Optional, Protocol
from collections.abc import Callable

from . import commands as cmds
from . import streamfiles
from . import streams as sts
from . import views
from .files import PLACEHOLDER, FileStore
from .rules import MAX_PENDING_LISTED, ApiError, is_number
from .store import Execution, Store

log = logging.getLogger("jobsd.service")

CLOCK_OFFSET = "test-clock-offset"  # settings row: the advanceClock offset, seconds



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


class ServiceBase:
    """State and plumbing every part of the service shares (service.py composes them)."""

    def __init__(self, store: Store, publish: Publish, *, region: str = "us-east-1",
                 account: str = "123456789012", minute_seconds: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._publish = publish
        # jobsd's clock: every timer, rollout minute, schedule and window follows it. Only the
        # test hook `advanceClock` (with --test-hooks) moves the offset; it is 0 otherwise.
        self._wall = clock
        self.clock_offset = 0.0
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
        self.deletion_seconds = 0.0          # --deletion-seconds: DELETION_IN_PROGRESS lasts
        self.max_active_jobs = 0             # --max-active-jobs (0: no quota)
        self.max_concurrent_jobs = 0         # --max-concurrent-jobs (0: no quota)
        # called with the thing of every device request (jobs over MQTT or HTTPS, a command
        # report), before it is served: the dashboard's presence (dashboard.Presence.watch)
        self.device_seen: Optional[Callable[[str], None]] = None

    def resume_test_clock(self) -> None:
        """With --test-hooks: take up the clock offset an earlier run stored (advanceClock)."""
        stored = self._store.get_setting(CLOCK_OFFSET)
        if stored is not None:
            self.clock_offset = float(stored)

    # -- plumbing ------------------------------------------------------------------------------
    def _seen(self, thing: str) -> None:
        hook = self.device_seen
        if hook is not None:
            hook(thing)

    def _clock(self) -> float:
        return self._wall() + self.clock_offset

    def clock(self) -> float:
        """jobsd's time, epoch seconds (the wall clock unless a test moved it forward)."""
        return self._wall() + self.clock_offset

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

    def set_test_hooks(self, body: dict[str, Any]) -> dict[str, Any]:
        """`PUT /_jobsd/test-hooks` (only with --test-hooks): `streamFault` = "InternalError"
        makes every stream request fail so, "Silent" leaves every stream request unanswered (a
        service that says nothing, STREAMS.md 11.23), null clears it; `streamStrictEof` switches
        the past-the-end rule of GetStream requests without `n`; `advanceClock` (seconds, >= 0)
        moves jobsd's clock forward and, before replying, does everything then due (timeouts,
        rollout minutes, schedules, windows), so a test never waits for a minute."""
        if not self.test_hooks:
            raise ApiError("UnknownOperationException", 404,
                           "test hooks are off (start jobsd with --test-hooks)")
        with self.lock:
            if "advanceClock" in body:
                step = body["advanceClock"]
                if not is_number(step) or not 0 <= step <= 10 * 366 * 86400:
                    raise _invalid("advanceClock must be a number of seconds, 0..10 years")
                self.clock_offset += step
                # kept in the database: a restarted jobsd (with --test-hooks) resumes its
                # clock where it was, not behind the times it stored
                with self._store.transaction():
                    self._store.set_setting(CLOCK_OFFSET, repr(self.clock_offset))
                self.expire_due()  # type: ignore[attr-defined]  (service.py)
                # the timer thread planned its sleep on the old clock: make it plan again,
                # or a deadline the move brought closer (not past) is served late
                self.on_deadline(self.clock())
            if "streamFault" in body:
                fault = body["streamFault"]
                if fault not in (None, "InternalError", "Silent"):
                    raise sts.invalid("streamFault must be InternalError, Silent or null")
                self.stream_fault = fault
            if "streamStrictEof" in body:
                if not isinstance(body["streamStrictEof"], bool):
                    raise sts.invalid("streamStrictEof must be a boolean")
                self.stream_strict_eof = body["streamStrictEof"]
            return {"streamFault": self.stream_fault, "streamStrictEof": self.stream_strict_eof,
                    "now": self.clock()}

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

    def _refresh_job(self, job_id: str, now: int, tracker: _Tracker) -> None:
        """A SNAPSHOT job completes when every execution is terminal, its rollout is done and
        no retry is pending (campaign.py); CONTINUOUS never does."""
        if not self._store.job_can_complete(job_id) or not self._rollout_done(job_id):
            return
        job = self._store.get_job(job_id)
        assert job is not None
        job.status = "COMPLETED"
        job.completed_at = now
        job.last_updated_at = now
        self._store.save_job(job)
        self._job_event(tracker, job, "completed")

    # -- timers --------------------------------------------------------------------------------


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
