"""jobsd's dashboard: a read-only, live view of the fleet on the control listener.

| path | what |
|---|---|
| `GET /dashboard` | the page: static HTML; everything on it comes from the snapshot below |
| `GET /dashboard/app.js`, `/dashboard/app.css` | its script and style (no build step, no framework) |
| `GET /dashboard/state` | one snapshot, JSON |
| `GET /dashboard/events` | server-sent events: one snapshot a second (`data: {...}`) |

**What it shows.** The things: connected or not, last seen, firmware version, current job and
their last report (the latest execution that is not QUEUED, with its statusDetails; a queued
retry does not hide the failure before it); the jobs (newest 30): a bar per outcome (queued,
in progress, succeeded, failed, rejected, timed out, canceled, removed: every attempt, as
DescribeJob's jobProcessDetails counts them; plus not yet released: the rollout's `pending`),
the rollout rate (campaign.rate_at / advance_step, as the next batch will use it) and, for each
abort criterion, how far it is from firing (campaign._check_abort's arithmetic: the failures in
a row that would fire it); the newest AWS IoT command executions.

"Connected" is inferred, since the broker does not tell jobsd who is connected: jobsd sees each
thing's requests (MQTT or the iot-jobs-data API), and a thing that made one in the last
`ONLINE_SECONDS` (330 s) is shown connected. Our device re-syncs (start-next) at least every
300 s (Runner recheck_s) and on every reconnect, on top of its keepalive of 60 s, which the
broker alone sees; so a device that died shows as disconnected at most 330 s later.

**Firmware version.** The device reports it only when an OTA job ends: SUCCEEDED
`{"version": V, ...}`, or FAILED `rolled_back` with the version it still runs. The dashboard
shows the latest of those among the executions jobsd holds (of jobs whose document is `ota` or
`afr_ota`); an app-update's SUCCEEDED version is shown as the application version.

**Nothing secret, nothing written.** Job documents are never shown (they may hold presigned
URLs or their placeholders): only the operation and the target version are read from them.
Every other text (statusDetails, descriptions, comments, command results) passes `redact()`,
which drops the query string of any URL and the value of any signature parameter. The page
builds its DOM with `textContent` only, and a Content-Security-Policy (`script-src 'self'`, no
inline script) would stop injected markup from running anyway. The snapshot is read under the
service lock from a separate read-only SQLite connection (`mode=ro`, `query_only`), so the
dashboard cannot change the database: one read a second however many watch (a dozen grouped
queries, none per thing; about 25 ms of lock for 10,000 executions, and no query at all when
nothing was committed since the last read: `PRAGMA data_version`).

**Who may see it.** Without `--credentials` jobsd listens on loopback only, and so does the
dashboard: open to local users, like the control API itself; requests whose Host header is not
a loopback name are refused (a web page cannot reach it by DNS rebinding). With
`--credentials`, the dashboard is closed to anyone without a signature, loopback or not: the
way in is a presigned SigV4 URL of `GET /dashboard` made with one of the accepted key pairs
(`tools/jobsd --dashboard-url --control HOST:PORT --credentials FILE` prints one, valid 10
minutes); jobsd checks it with the same Verifier as every control request, then answers with a
random session cookie (`jobsd_dashboard_<port>`, HttpOnly, SameSite=Lax, Path=/dashboard,
12 h, kept in jobsd's memory only: a restart signs everyone out) and
a redirect to the bare `/dashboard`, so the signed URL does not stay in the address bar. The
page's other requests (script, state, events) need the cookie.

**Live updates.** The page opens `/dashboard/events` (EventSource; it reconnects by itself)
and falls back to polling `/dashboard/state` every 2 s. Each stream holds one handler thread:
at most MAX_STREAMS at once (503 beyond), each ended after STREAM_SECONDS (the browser
reconnects), ended at once when the client closes its socket (the thread waits on the socket,
not on a timer) and within a second of jobsd stopping (`close()`).
"""

from __future__ import annotations

import hashlib
import http.cookies
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import select
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Optional
from urllib.parse import quote, unquote, urlsplit

from .campaign import DONE, FAILURE_TYPES, advance_step, rate_at

log = logging.getLogger("jobsd.dashboard")

PREFIX = "/dashboard"
TICK = 1.0                   # seconds between two snapshots (and two events of a stream)
ONLINE_SECONDS = 330.0       # seen within this: connected (device re-sync 300 s + slack)
SESSION_SECONDS = 12 * 3600  # a session cookie's life
MAX_SESSIONS = 64
MAX_STREAMS = 16             # event streams open at once
STREAM_SECONDS = 600.0       # one stream's life; EventSource reconnects
WRITE_TIMEOUT = 10.0         # a stream whose client does not read is dropped
URL_SECONDS = 600            # default life of a presigned dashboard URL
MAX_THINGS, MAX_JOBS, MAX_COMMANDS = 500, 30, 15
MAX_TEXT = 300               # characters of one shown text (statusDetails value, comment, ...)
MAX_SEEN = 20000             # things remembered by Presence

STATUSES = ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT",
            "CANCELED", "REMOVED")
NOT_RELEASED = "NOT_RELEASED"
OTA_KINDS = ("ota", "afr_ota")
APP_KINDS = ("app-update",)

# -- redaction --------------------------------------------------------------------------------
_URL_QUERY = re.compile(r"(?i)\b((?:https?|wss?|ftp|s3)://[^\s?#\"'<>]*)\?[^\s#\"'<>]*")
_SIGNATURE = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Signature|X-Expires|"
    r"Signature|AWSAccessKeyId|Policy|Key-Pair-Id)=[^&\s,;\"'<>]*")


def redact(text: str, limit: int = MAX_TEXT) -> str:
    """`text` without URL query strings or signature values, at most `limit` characters."""
    text = _URL_QUERY.sub(r"\1?[redacted]", text)
    text = _SIGNATURE.sub(r"\1=[redacted]", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _text(value: Any, limit: int = MAX_TEXT) -> Optional[str]:
    return None if value is None else redact(str(value), limit)


def _details(value: Any) -> Optional[dict[str, str]]:
    """statusDetails as shown: at most 16 entries, each redacted."""
    if not isinstance(value, dict):
        return None
    return {redact(str(k), 64): redact(str(v)) for k, v in list(value.items())[:16]}


# -- presence -------------------------------------------------------------------------------------
class Presence:
    """When each thing last made a request jobsd answered (monotonic seconds).

    `watch(service)` sets the service's `device_seen` hook, which the methods both device front
    ends call (mqtt.py and data.py) invoke with the thing, so no front end needs to know about
    the dashboard. Test hooks that move jobsd's clock do not move this one: connectivity is
    about real time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, thing: str) -> None:
        now = self._clock()
        with self._lock:
            self._seen[thing] = now
            if len(self._seen) > MAX_SEEN:  # names are the client's: keep the newest half
                keep = sorted(self._seen.items(), key=lambda kv: kv[1])[MAX_SEEN // 2:]
                self._seen = dict(keep)

    def ages(self) -> dict[str, float]:
        """Seconds since each thing was last seen."""
        now = self._clock()
        with self._lock:
            return {name: max(0.0, now - at) for name, at in self._seen.items()}

    def watch(self, service: Any) -> None:
        """Be told of every device request `service` serves (its `device_seen` hook, called by
        get_pending, start_next, describe, update and, for things, update_command_execution);
        replaces whoever watched before."""
        service.device_seen = self.seen


# -- the snapshot (pure functions of what was read) -----------------------------------------------
def job_kind(document: str) -> tuple[Optional[str], Optional[str]]:
    """(operation, target version) of a job document; never any URL or other content."""
    try:
        doc = json.loads(document)
    except (ValueError, TypeError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    version = doc.get("version") if isinstance(doc.get("version"), str) else None
    if "afr_ota" in doc:
        return "afr_ota", version
    op = doc.get("operation")
    if isinstance(op, str):
        return redact(op, 40), None if version is None else redact(version, 40)
    steps = doc.get("steps")
    if isinstance(steps, list):
        names = []
        for step in steps[:5]:
            action = step.get("action") if isinstance(step, dict) else None
            handler = ((action or {}).get("input") or {}).get("handler") \
                if isinstance(action, dict) else None
            if isinstance(handler, str):
                names.append(handler)
        return redact("steps: " + ", ".join(names), 60), None
    return None, None


def abort_progress(criterion: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """How close one abort criterion is to firing, with campaign._check_abort's arithmetic:
    over the executions that ended SUCCEEDED, FAILED, REJECTED or TIMED_OUT (every attempt),
    it fires once at least `minNumberOfExecutedThings` ended and `thresholdPercentage` or more
    of them are of its failureType. `failuresToFire` is how many more such endings in a row
    would fire it (None: never, e.g. a 100 % threshold with a success already counted)."""
    kind = criterion.get("failureType", "ALL")
    threshold = float(criterion.get("thresholdPercentage", 100))
    least = int(criterion.get("minNumberOfExecutedThings", 1))
    executed = sum(counts.get(s, 0) for s in DONE)
    bad = sum(counts.get(s, 0) for s in FAILURE_TYPES.get(kind, ()))

    def fires(b: int, e: int) -> bool:  # exactly as _check_abort writes it
        return e >= least and 100 * b >= threshold * e and b > 0

    more: Optional[int]
    if fires(bad, executed):
        more = 0
    elif threshold >= 100 and bad < executed:
        more = None
    else:
        need = 0.0 if threshold >= 100 else (threshold * executed - 100 * bad) / (100 - threshold)
        more = max(1, least - executed, math.ceil(need - 1e-9))
        while more > 1 and fires(bad + more - 1, executed + more - 1):  # float edges
            more -= 1
        while not fires(bad + more, executed + more):
            more += 1
    return {"failureType": kind, "thresholdPercentage": threshold,
            "minNumberOfExecutedThings": least, "executed": executed, "matching": bad,
            "percentage": round(100 * bad / executed, 2) if executed else 0.0,
            "failuresToFire": more}


def rollout_view(config: dict[str, Any], state: Optional[dict[str, Any]],
                 counts: dict[str, int], now: float, minute: float) -> Optional[dict[str, Any]]:
    """The staged rollout as the next batch will see it; None when the job was released at
    once (no rollouts row)."""
    if state is None or state.get("deleting"):
        return None
    cfg = config.get("jobExecutionsRolloutConfig") or {}
    pending = len(state.get("pending") or [])
    released = int(state.get("released") or 0)
    succeeded = counts.get("SUCCEEDED", 0)
    step = advance_step(cfg, int(state.get("step") or 0), released, succeeded)
    out: dict[str, Any] = {
        "released": released, "pending": pending, "step": step,
        "ratePerMinute": rate_at(cfg, step),
        "maximumPerMinute": cfg.get("maximumPerMinute"),
        "started": bool(state.get("started")), "ended": bool(state.get("ended")),
        "nextBatchIn": None, "startsIn": None,
    }
    if not out["started"] and state.get("start") is not None:
        out["startsIn"] = max(0.0, round(float(state["start"]) - now, 1))
    last = state.get("last_batch")
    if out["started"] and not out["ended"] and pending and last is not None:
        out["nextBatchIn"] = max(0.0, round(float(last) + minute - now, 1))
    exp = cfg.get("exponentialRate")
    if isinstance(exp, dict):
        crit = exp.get("rateIncreaseCriteria") or {}
        nn, ns = crit.get("numberOfNotifiedThings"), crit.get("numberOfSucceededThings")
        out["exponential"] = {
            "baseRatePerMinute": exp.get("baseRatePerMinute"),
            "incrementFactor": exp.get("incrementFactor"),
            "nextRatePerMinute": rate_at(cfg, step + 1),
            "moreNotified": (step + 1) * nn - released if nn else None,
            "moreSucceeded": (step + 1) * ns - succeeded if ns else None,
        }
    return out


def build_snapshot(rows: dict[str, Any], kinds: dict[tuple[str, int], tuple[Any, Any]],
                   ages: dict[str, float], now: float, minute: float,
                   online: float = ONLINE_SECONDS) -> dict[str, Any]:
    """The JSON the page shows, from what `Dashboard._read` read (one transaction)."""
    counts: dict[str, dict[str, int]] = {}
    for job_id, status, n in rows["counts"]:
        counts.setdefault(job_id, {s: 0 for s in STATUSES})[status] = n

    versions: dict[str, dict[str, str]] = {"firmware": {}, "app": {}}
    for name, found in versions.items():
        for thing, details, _ in rows[name]:
            try:
                version = json.loads(details).get("version")
            except (ValueError, TypeError, AttributeError):
                continue
            if isinstance(version, str):
                found[thing] = redact(version, 40)
    firmware, app = versions["firmware"], versions["app"]

    current: dict[str, dict[str, Any]] = {}
    for thing, job_id, number, status in rows["current"]:
        current.setdefault(thing, {"jobId": job_id, "executionNumber": number, "status": status})
    latest: dict[str, dict[str, Any]] = {}
    for thing, job_id, number, status, details, updated, _ in rows["latest"]:
        try:
            parsed = json.loads(details) if details else None
        except ValueError:
            parsed = None
        latest[thing] = {"jobId": job_id, "executionNumber": number, "status": status,
                         "statusDetails": _details(parsed), "lastUpdatedAt": updated}

    things = []
    for (name,) in rows["things"]:
        age = ages.get(name)
        things.append({
            "name": name, "connected": age is not None and age <= online,
            "lastSeenSecondsAgo": None if age is None else round(age, 1),
            "firmware": firmware.get(name), "app": app.get(name),
            "currentJob": current.get(name), "latest": latest.get(name)})

    rollouts = {job_id: (json.loads(state), next_at) for job_id, state, next_at in rows["rollouts"]}
    jobs = []
    for (job_id, seq, description, selection, status, reason, comment, config_text, created,
         updated, completed, targets) in rows["jobs"]:
        config = json.loads(config_text) if config_text else {}
        c = dict(counts.get(job_id) or {s: 0 for s in STATUSES})
        state = rollouts.get(job_id, (None, None))[0]
        roll = rollout_view(config, state, c, now, minute)
        c[NOT_RELEASED] = roll["pending"] if roll is not None else 0
        kind, version = kinds.get((job_id, seq), (None, None))
        abort = []
        if status in ("IN_PROGRESS", "SCHEDULED") or reason == "JOB_ABORT_CRITERIA_MET":
            for criterion in (config.get("abortConfig") or {}).get("criteriaList") or []:
                if isinstance(criterion, dict):
                    abort.append(abort_progress(criterion, c))
        retry = [{"failureType": r.get("failureType"), "numberOfRetries": r.get("numberOfRetries")}
                 for r in (config.get("jobExecutionsRetryConfig") or {}).get("criteriaList") or []
                 if isinstance(r, dict)]
        jobs.append({
            "jobId": job_id, "status": status, "targetSelection": selection,
            "kind": kind, "version": version, "description": _text(description),
            "reasonCode": _text(reason, 80), "comment": _text(comment),
            "createdAt": created, "lastUpdatedAt": updated, "completedAt": completed,
            "targets": len(json.loads(targets)) if targets else 0,
            "counts": c, "total": sum(c.values()), "rollout": roll, "abort": abort,
            "abortFired": reason == "JOB_ABORT_CRITERIA_MET", "retry": retry})

    commands = []
    for (execution_id, command_id, target_kind, target_name, status, reason, result, created,
         completed) in rows["commands"]:
        try:
            reason_obj = json.loads(reason) if reason else {}
            result_obj = json.loads(result) if result else {}
        except ValueError:
            reason_obj, result_obj = {}, {}
        shown = []
        if isinstance(result_obj, dict):
            for key, value in list(result_obj.items())[:8]:
                inner = next(iter(value.values()), "") if isinstance(value, dict) and value else value
                shown.append(f"{key}={inner}")
        commands.append({
            "executionId": execution_id, "commandId": command_id,
            "target": f"{target_kind}/{target_name}", "status": status,
            "reasonCode": _text(reason_obj.get("reasonCode"), 80) if isinstance(reason_obj, dict)
            else None,
            "reasonDescription": _text(reason_obj.get("reasonDescription"))
            if isinstance(reason_obj, dict) else None,
            "result": redact(", ".join(shown)) if shown else None,
            "createdAt": created, "completedAt": completed})

    return {"now": now, "onlineSeconds": online, "minuteSeconds": minute,
            "thingsTotal": rows["things_total"], "jobsTotal": rows["jobs_total"],
            "connected": sum(1 for t in things if t["connected"]),
            "things": things, "jobs": jobs, "commands": commands}


# -- HTTP -------------------------------------------------------------------------------------------
_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _loopback_host(header: Optional[str]) -> bool:
    """A Host header naming a loopback address or localhost (any port)."""
    if not header:
        return False
    host = header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Dashboard:
    """Serves the dashboard of one Service; `RestServer.dashboard` of the control listener."""

    def __init__(self, service: Any, db_path: str, *, watch: bool = True,
                 online_seconds: float = ONLINE_SECONDS) -> None:
        self.service = service
        self.db_path = db_path
        self.online_seconds = online_seconds
        self.presence = Presence()
        if watch:
            self.presence.watch(service)
        self._conn: Optional[sqlite3.Connection] = None
        self._kinds: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._rows: Optional[dict[str, Any]] = None  # the last read, and the database's
        self._data_version = -1                         # data_version then
        self._cache: tuple[float, Optional[bytes]] = (-math.inf, None)
        self._cache_lock = threading.Lock()
        self._failed: Optional[str] = None  # the last snapshot error logged (once each)
        self._sessions: dict[str, float] = {}  # sha256(token) -> expiry (monotonic)
        self._streams = 0
        self._lock = threading.Lock()  # sessions and the stream count
        self._stopping = threading.Event()
        self.closed = False

    # -- state -----------------------------------------------------------------------------
    @property
    def streams(self) -> int:
        """Event streams open now."""
        return self._streams

    def close(self) -> None:
        """jobsd is stopping: end every stream within a tick, drop the read connection."""
        self._stopping.set()
        with self.service.lock:
            self.closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._rows = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            uri = "file:" + quote(os.path.abspath(self.db_path)) + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            self._conn = conn
        return self._conn

    def _read(self) -> Optional[tuple[dict[str, Any], float, float]]:
        """Everything a snapshot needs, in one read transaction under the service lock."""
        with self.service.lock:
            if self.closed:
                return None
            db = self._connection()
            # nothing committed since the last read (an idle jobsd): the same rows again
            version = db.execute("PRAGMA data_version").fetchone()[0]
            if self._rows is not None and version == self._data_version:
                return self._rows, self.service.clock(), self.service.minute_seconds
            db.execute("BEGIN")
            try:
                q = db.execute
                rows: dict[str, Any] = {
                    "things": q("SELECT name FROM things ORDER BY name LIMIT ?",
                                (MAX_THINGS,)).fetchall(),
                    "things_total": q("SELECT COUNT(*) FROM things").fetchone()[0],
                    "jobs": q("SELECT job_id, seq, description, target_selection, status,"
                              " reason_code, comment, config, created_at, last_updated_at,"
                              " completed_at, targets FROM jobs ORDER BY seq DESC LIMIT ?",
                              (MAX_JOBS,)).fetchall(),
                    "jobs_total": q("SELECT COUNT(*) FROM jobs").fetchone()[0],
                    "job_seqs": q("SELECT job_id, seq FROM jobs").fetchall(),
                    "counts": q("SELECT job_id, status, COUNT(*) FROM executions"
                                " GROUP BY job_id, status").fetchall(),
                    "current": q("SELECT thing_name, job_id, execution_number, status"
                                 " FROM executions WHERE status='IN_PROGRESS' OR"
                                 " (status='QUEUED' AND hidden=0) ORDER BY thing_name,"
                                 " CASE status WHEN 'IN_PROGRESS' THEN 0 ELSE 1 END,"
                                 " seq").fetchall(),
                    # per thing, the newest execution (QUEUED ones last): SQLite takes the
                    # bare columns from the row of the MAX(); integer key, no float rounding
                    "latest": q("SELECT thing_name, job_id, execution_number, status,"
                                " status_details, last_updated_at, MAX((status!='QUEUED')"
                                " * 72057594037927936 + last_updated_at * 1048576"
                                " + seq % 1048576) FROM executions GROUP BY thing_name"
                                ).fetchall(),
                    "commands": q("SELECT execution_id, command_id, target_kind, target_name,"
                                  " status, status_reason, result, created_at, completed_at"
                                  " FROM command_executions ORDER BY seq DESC LIMIT ?",
                                  (MAX_COMMANDS,)).fetchall(),
                }
                shown = [r[0] for r in rows["jobs"]]
                rows["rollouts"] = q(
                    "SELECT job_id, state, next_at FROM rollouts WHERE job_id IN"
                    f" ({','.join('?' * len(shown))})", shown).fetchall() if shown else []
                # documents never change: each job's is parsed once (operation, version)
                live = {(job_id, seq) for job_id, seq in rows["job_seqs"]}
                for key in live - self._kinds.keys():
                    doc = q("SELECT document FROM jobs WHERE job_id=? AND seq=?", key).fetchone()
                    self._kinds[key] = job_kind(doc[0]) if doc else (None, None)
                for key in self._kinds.keys() - live:
                    del self._kinds[key]
                # the version each thing last reported from an OTA job (SUCCEEDED, or FAILED
                # rolled back: the one it still runs) and from an app-update
                for name, kinds, statuses in (("firmware", OTA_KINDS, "'SUCCEEDED', 'FAILED'"),
                                              ("app", APP_KINDS, "'SUCCEEDED'")):
                    ids = [job_id for (job_id, _), (kind, _) in self._kinds.items()
                           if kind in kinds]
                    rows[name] = q(
                        "SELECT thing_name, status_details, MAX(last_updated_at * 1048576"
                        " + seq % 1048576) FROM executions WHERE job_id IN (SELECT value FROM"
                        f" json_each(?)) AND status IN ({statuses}) AND status_details LIKE"
                        " '%\"version\"%' GROUP BY thing_name",
                        (json.dumps(ids),)).fetchall() if ids else []
            finally:
                db.execute("COMMIT")
            self._rows, self._data_version = rows, version
            return rows, self.service.clock(), self.service.minute_seconds

    def snapshot(self) -> Optional[dict[str, Any]]:
        """A fresh snapshot (None once closed)."""
        read = self._read()
        if read is None:
            return None
        rows, now, minute = read
        return build_snapshot(rows, dict(self._kinds), self.presence.ages(), now, minute,
                              self.online_seconds)

    def snapshot_json(self) -> Optional[bytes]:
        """The snapshot as JSON, taken at most once a tick however many are watching."""
        with self._cache_lock:
            at, data = self._cache
            if data is None or time.monotonic() - at >= TICK * 0.9:
                try:
                    snap = self.snapshot()
                except Exception as err:  # a bug must not take the streams down: say so
                    if repr(err) != self._failed:
                        log.exception("dashboard: cannot take a snapshot")
                    self._failed = repr(err)
                    snap = {"error": "jobsd could not read its state for the dashboard "
                                     "(see jobsd's log)"}
                else:
                    self._failed = None
                data = None if snap is None else json.dumps(snap, separators=(",", ":")).encode()
                self._cache = (time.monotonic(), data)
            return data

    # -- HTTP --------------------------------------------------------------------------------
    @staticmethod
    def claims(target: str) -> bool:
        path = target.split("?", 1)[0]
        return path == PREFIX or path.startswith(PREFIX + "/")

    def serve(self, h: Any) -> None:
        """Answer one request on the control listener whose path is /dashboard or below (rest.py
        calls it after reading any body)."""
        parts = urlsplit(h.path)
        path = parts.path
        # the request line is logged at DEBUG: never with a signature in it
        h.requestline = f"{h.command} {path} {h.request_version}"
        if h.command not in ("GET", "HEAD"):
            self._reply(h, 405, "text/plain", b"The dashboard is read-only: GET only.\n",
                        {"Allow": "GET, HEAD"})
            return
        name = path[len(PREFIX):].strip("/")
        if name == "" and h.server.auth is not None and "X-Amz-Algorithm=" in parts.query:
            self._sign_in(h, parts.query)
            return
        refused = self._access(h)
        if refused is not None:
            self._reply(h, 403, "text/plain; charset=utf-8", refused.encode() + b"\n")
            return
        if name == "" and parts.query:
            self._reply(h, 303, "text/plain", b"", {"Location": PREFIX})
        elif name == "":
            self._reply(h, 200, "text/html; charset=utf-8", PAGE_HTML)
        elif name == "app.js":
            self._reply(h, 200, "text/javascript; charset=utf-8", PAGE_JS)
        elif name == "app.css":
            self._reply(h, 200, "text/css; charset=utf-8", PAGE_CSS)
        elif name == "state":
            data = self.snapshot_json()
            if data is None:
                self._reply(h, 503, "text/plain", b"jobsd is stopping\n")
            else:
                self._reply(h, 200, "application/json", data)
        elif name == "events":
            self._events(h)
        else:
            self._reply(h, 404, "text/plain", b"No such dashboard page.\n")

    def _reply(self, h: Any, status: int, ctype: str, body: bytes,
               extra: Optional[dict[str, str]] = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for name, value in {**_HEADERS, **(extra or {})}.items():
            h.send_header(name, value)
        h.end_headers()
        if h.command != "HEAD" and body:
            h.wfile.write(body)

    # -- access ------------------------------------------------------------------------------
    def _cookie_name(self, h: Any) -> str:
        return f"jobsd_dashboard_{h.server.server_address[1]}"

    def _access(self, h: Any) -> Optional[str]:
        """None when the request may see the dashboard; else why not (a 403)."""
        if h.server.auth is None:  # jobsd listens on loopback only: so does its dashboard
            if not _loopback_host(h.headers.get("Host")):
                return "The dashboard answers only requests addressed to a loopback host."
            return None
        if self._session_ok(h):
            return None
        return ("This dashboard needs a signed link: `tools/jobsd --dashboard-url --control "
                "HOST:PORT --credentials FILE` prints one (valid 10 minutes).")

    def _sign_in(self, h: Any, query: str) -> None:
        """A presigned GET /dashboard (with --credentials): checked by the control listener's
        Verifier; a session cookie and a redirect to the bare page, or a 403."""
        refusal = h.server.auth.verify("GET", h.path, h.headers, b"")
        if refusal is not None:
            log.warning("dashboard: refused a signed link from %s: %s", h.client_address[0],
                        refusal.error_type)
            text = f"{refusal.error_type}: {refusal.message.splitlines()[0]}\n"
            self._reply(h, 403, "text/plain; charset=utf-8", text.encode())
            return
        token = self._open_session()
        params = dict(p.partition("=")[::2] for p in query.split("&"))
        key_id = unquote(params.get("X-Amz-Credential", "")).split("/", 1)[0]
        log.info("dashboard: session opened from %s (access key %s)", h.client_address[0],
                 key_id[:40].encode("unicode_escape").decode())
        cookie = (f"{self._cookie_name(h)}={token}; Path={PREFIX}; HttpOnly; SameSite=Lax; "
                  f"Max-Age={SESSION_SECONDS}")
        self._reply(h, 303, "text/plain", b"", {"Location": PREFIX, "Set-Cookie": cookie})

    def _open_session(self) -> str:
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v > now}
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[min(self._sessions, key=self._sessions.__getitem__)]
            self._sessions[hashlib.sha256(token.encode()).hexdigest()] = now + SESSION_SECONDS
        return token

    def _session_ok(self, h: Any) -> bool:
        raw = h.headers.get_all("Cookie") or []
        jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        for header in raw:
            try:
                jar.load(header)
            except http.cookies.CookieError:
                continue
        morsel = jar.get(self._cookie_name(h))
        if morsel is None:
            return False
        digest = hashlib.sha256(morsel.value.encode()).hexdigest()
        with self._lock:
            expiry = self._sessions.get(digest)
        return expiry is not None and expiry > time.monotonic()

    # -- server-sent events --------------------------------------------------------------------
    def _events(self, h: Any) -> None:
        with self._lock:
            full = self._streams >= MAX_STREAMS
            if not full:
                self._streams += 1
        if full:
            self._reply(h, 503, "text/plain", b"Too many dashboard streams.\n",
                        {"Retry-After": "5"})
            return
        try:
            h.close_connection = True  # no Content-Length: the stream ends with the connection
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream; charset=utf-8")
            for name, value in _HEADERS.items():
                h.send_header(name, value)
            h.send_header("Connection", "close")
            h.end_headers()
            if h.command == "HEAD":
                return
            sock = h.connection
            sock.settimeout(WRITE_TIMEOUT)
            h.wfile.write(b"retry: 2000\n\n")
            until = time.monotonic() + STREAM_SECONDS
            while not self._stopping.is_set() and time.monotonic() < until:
                data = self.snapshot_json()
                if data is None:
                    break
                h.wfile.write(b"data: " + data + b"\n\n")
                h.wfile.flush()
                if _client_gone(sock, TICK):
                    break
        except (OSError, ValueError):
            pass  # the client went away (reset, broken pipe, write timeout)
        finally:
            with self._lock:
                self._streams -= 1


def _client_gone(sock: socket.socket, timeout: float) -> bool:
    """Wait up to `timeout` for the client to close its end (an event stream's client sends
    nothing after its request, so readable means closed, or misbehaving)."""
    try:
        readable, _, _ = select.select([sock], [], [], timeout)
    except (OSError, ValueError):
        return True
    return bool(readable)


# -- a signed link ------------------------------------------------------------------------------
def presign_url(control_url: str, access_key: str, secret_key: str, region: str,
                token: Optional[str] = None, expires: int = URL_SECONDS) -> str:
    """A presigned SigV4 URL of `GET /dashboard` on `control_url` (http://HOST:PORT), as jobsd
    with --credentials accepts it (signing name `iot`, `region`), valid `expires` seconds."""
    from botocore.auth import SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method="GET", url=control_url.rstrip("/") + PREFIX)
    SigV4QueryAuth(Credentials(access_key, secret_key, token), "iot", region,
                   expires=expires).add_auth(request)
    return request.url


def dashboard_url(control: tuple[str, int], credentials: Optional[str], profile: Optional[str],
                  region: str, expires: int) -> str:
    """What `jobsd --dashboard-url` prints: the bare URL without --credentials, else a signed
    link made with the key pair of `profile` (the file's first section by default)."""
    host, port = control
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if credentials is None:
        return base + PREFIX
    from .auth import CredentialsError, load_credentials

    keys = list(load_credentials(credentials).values())
    chosen = [k for k in keys if profile is None or k.profile == profile]
    if not chosen:
        raise CredentialsError(f"{credentials} has no section [{profile}]")
    pair = chosen[0]
    return presign_url(base, pair.access_key, pair.secret_key, region, pair.token, expires)


# -- the page ------------------------------------------------------------------------------------
PAGE_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>jobsd dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/app.css">
<script src="/dashboard/app.js" defer></script>
</head>
<body>
<header class="top">
  <h1>jobsd</h1>
  <span id="summary" class="muted">loading&hellip;</span>
  <span class="spacer"></span>
  <span id="clock" class="muted" title="jobsd's clock (tests may move it forward)"></span>
  <span id="live" class="live wait">connecting</span>
</header>
<main>
  <section>
    <h2>Jobs <span id="jobs-note" class="muted"></span></h2>
    <div id="jobs" class="jobs"></div>
  </section>
  <div class="cols">
    <section class="things">
      <h2>Things <span id="things-note" class="muted"></span></h2>
      <table id="things">
        <thead><tr><th>thing</th><th>last seen</th><th>firmware</th><th>current job</th>
        <th>last report: execution, status details</th></tr></thead>
        <tbody></tbody>
      </table>
      <p class="note" id="online-note"></p>
    </section>
    <section class="commands">
      <h2>Recent commands</h2>
      <table id="commands">
        <thead><tr><th>command</th><th>target</th><th>status</th><th>reason / result</th></tr></thead>
        <tbody></tbody>
      </table>
    </section>
  </div>
</main>
<footer class="muted">Read-only. Job documents are not shown; URLs lose their query strings.</footer>
</body>
</html>
"""

PAGE_CSS = b""":root {
  --ok: #2e9e5b; --fail: #d64541; --rej: #e67e22; --tmo: #8e44ad; --can: #7f8c8d;
  --rem: #c3c9cc; --run: #2f80ed; --que: #9cc3f5; --ink: #1d2330; --mute: #6b7383;
  --line: #e3e6eb; --card: #ffffff; --bg: #f4f6f9;
}
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
.top { display: flex; align-items: center; gap: 14px; padding: 10px 20px;
       background: #1d2330; color: #fff; }
.top h1 { margin: 0; font-size: 18px; letter-spacing: .5px; }
.top .muted { color: #b8c0cc; }
.spacer { flex: 1; }
main { padding: 14px 20px; }
h2 { font-size: 15px; margin: 8px 0 10px; }
.muted { color: var(--mute); font-weight: normal; }
.live { padding: 2px 10px; border-radius: 10px; font-size: 12px; background: #555; }
.live.on { background: var(--ok); } .live.wait { background: #b8860b; }
.live.off { background: var(--fail); }
.jobs { display: grid; grid-template-columns: repeat(auto-fill, minmax(430px, 1fr)); gap: 12px; }
.job { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
       padding: 10px 12px; }
.job header { display: flex; align-items: baseline; gap: 8px; flex-wrap: wrap; }
.job h3 { margin: 0; font-size: 15px; }
.kind { font-family: ui-monospace, Menlo, monospace; font-size: 12px; color: var(--mute); }
.badge { font-size: 11px; padding: 1px 7px; border-radius: 8px; background: var(--line);
         text-transform: lowercase; }
.b-IN_PROGRESS { background: #dbe8fd; color: #1b4f9c; }
.b-COMPLETED { background: #d8f0e2; color: #1d6b3f; }
.b-CANCELED { background: #f6dcdb; color: #8e2622; }
.b-SCHEDULED { background: #fdf0d5; color: #7a5a00; }
.bar { display: flex; height: 16px; margin: 8px 0 4px; border-radius: 4px; overflow: hidden;
       background: var(--line); }
.seg { height: 100%; transition: width .4s; }
.s-SUCCEEDED { background: var(--ok); } .s-FAILED { background: var(--fail); }
.s-REJECTED { background: var(--rej); } .s-TIMED_OUT { background: var(--tmo); }
.s-CANCELED { background: var(--can); } .s-REMOVED { background: var(--rem); }
.s-IN_PROGRESS { background: var(--run); } .s-QUEUED { background: var(--que); }
.s-NOT_RELEASED { background: repeating-linear-gradient(45deg, #e3e6eb 0 4px, #f7f8fa 4px 8px); }
.legend { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap;
          gap: 2px 12px; font-size: 12px; }
.legend li { background: none; display: flex; align-items: center; gap: 4px; }
.legend li.zero { color: #aab1bd; }
.sw { display: inline-block; width: 10px; height: 10px; border-radius: 2px; }
.line { margin: 6px 0 0; font-size: 12.5px; }
.meter { display: inline-block; width: 80px; height: 7px; background: var(--line);
         border-radius: 4px; overflow: hidden; vertical-align: middle; margin-right: 6px; }
.meter i { display: block; height: 100%; background: #e0a100; }
.meter.fired i { background: var(--fail); }
.comment { color: #8e2622; }
.cols { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 16px;
        margin-top: 8px; }
table { width: 100%; border-collapse: collapse; background: var(--card);
        border: 1px solid var(--line); border-radius: 8px; font-size: 12.5px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-weight: 600; color: var(--mute); background: #fafbfc; }
td.name, td.seen, td.firmware, td.current, #commands td { white-space: nowrap; }
.dot { display: inline-block; width: 8px; height: 8px; border-radius: 50%;
       background: #c3c9cc; margin-right: 6px; }
tr.on .dot { background: var(--ok); }
.st { font-size: 11px; padding: 0 5px; border-radius: 6px; color: #fff; }
.kv { display: inline-block; margin: 0 6px 2px 0; padding: 0 5px; background: #f0f2f5;
      border-radius: 4px; font-family: ui-monospace, Menlo, monospace; font-size: 11.5px;
      max-width: 100%; overflow-wrap: anywhere; }
.note { font-size: 12px; color: var(--mute); }
footer { padding: 8px 20px 16px; font-size: 12px; }
@media (max-width: 900px) { .cols { grid-template-columns: 1fr; } }
"""

PAGE_JS = b"""\"use strict\";
// jobsd dashboard: renders /dashboard/events (or /dashboard/state) with textContent only.
(() => {
  const ORDER = [["SUCCEEDED", "succeeded"], ["FAILED", "failed"], ["REJECTED", "rejected"],
    ["TIMED_OUT", "timed out"], ["CANCELED", "canceled"], ["REMOVED", "removed"],
    ["IN_PROGRESS", "in progress"], ["QUEUED", "queued"], ["NOT_RELEASED", "not yet released"]];

  function h(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function ago(s) {
    if (s === null || s === undefined) return "never";
    if (s < 2) return "just now";
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }
  function span(s) {
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return Math.round(s / 3600) + " h";
  }
  function when(t) {
    return t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "";
  }
  function pretty(status) { return String(status).replace("_", " ").toLowerCase(); }

  function bar(job) {
    const wrap = h("div", "bar");
    const total = Math.max(job.total, 1);
    for (const [key, label] of ORDER) {
      const n = job.counts[key] || 0;
      if (!n) continue;
      const seg = h("span", "seg s-" + key);
      seg.style.width = (100 * n / total) + "%";
      seg.title = n + " " + label;
      wrap.append(seg);
    }
    return wrap;
  }
  function legend(job) {
    const ul = h("ul", "legend");
    for (const [key, label] of ORDER) {
      const n = job.counts[key] || 0;
      const li = h("li", n ? "" : "zero");
      const count = h("b", "count", n);
      count.dataset.count = key;
      li.append(h("i", "sw s-" + key), count, " " + label);
      ul.append(li);
    }
    return ul;
  }
  function rolloutLine(r) {
    const p = h("p", "line rollout");
    let text;
    if (!r.started) {
      text = "scheduled" + (r.startsIn !== null ? ": starts in " + span(r.startsIn) : "");
    } else if (r.ended) {
      text = "rollout ended" + (r.pending ? " (" + r.pending + " never released)" : "");
    } else if (!r.pending) {
      text = "all " + r.released + " released";
    } else {
      text = "released " + r.released + " of " + (r.released + r.pending) + " \\u00b7 rate " +
        r.ratePerMinute + "/min";
      if (r.nextBatchIn !== null) text += " \\u00b7 next batch in " + span(r.nextBatchIn);
    }
    const x = r.exponential;
    if (x && r.started && !r.ended && r.pending) {
      const when = [];
      if (x.moreNotified !== null) when.push(x.moreNotified + " more notified");
      if (x.moreSucceeded !== null) when.push(x.moreSucceeded + " more succeeded");
      text += " \\u00b7 " + x.nextRatePerMinute + "/min after " + when.join(" or ");
    }
    p.textContent = text;
    return p;
  }
  function abortLine(a, fired) {
    const p = h("p", "line abort");
    const m = h("span", "meter");
    const fill = h("i");
    const pct = a.thresholdPercentage > 0 ? a.percentage / a.thresholdPercentage : 1;
    const executed = a.executed / Math.max(a.minNumberOfExecutedThings, 1);
    fill.style.width = Math.min(100, 100 * Math.min(1, pct) * Math.min(1, executed)) + "%";
    m.append(fill);
    if (a.failuresToFire === 0) m.classList.add("fired");
    let text = "abort at \\u2265 " + a.thresholdPercentage + "% " + a.failureType + " once " +
      a.minNumberOfExecutedThings + " executed: " + a.matching + " of " + a.executed +
      " (" + a.percentage + "%)";
    if (a.failuresToFire === 0) text += fired ? " \\u2014 fired" : " \\u2014 firing";
    else if (a.failuresToFire === null) text += " \\u2014 cannot fire";
    else text += " \\u2014 fires after " + a.failuresToFire + " more " +
      (a.failuresToFire === 1 ? "failure" : "failures") + " in a row";
    p.append(m, text);
    return p;
  }
  function jobCard(job) {
    const card = h("article", "job");
    card.dataset.job = job.jobId;
    const head = h("header");
    head.append(h("h3", null, job.jobId), h("span", "badge b-" + job.status, pretty(job.status)));
    if (job.kind) head.append(h("span", "kind", job.kind + (job.version ? " " + job.version : "")));
    const done = ["SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"]
      .reduce((n, k) => n + (job.counts[k] || 0), 0);
    head.append(h("span", "muted", done + " of " + job.total + " ended"));
    card.append(head);
    if (job.description) card.append(h("p", "line muted", job.description));
    card.append(bar(job), legend(job));
    if (job.rollout) card.append(rolloutLine(job.rollout));
    for (const a of job.abort) card.append(abortLine(a, job.abortFired));
    if (job.retry.length) {
      card.append(h("p", "line", "retries: " +
        job.retry.map((r) => r.failureType + " \\u00d7" + r.numberOfRetries).join(", ")));
    }
    if (job.reasonCode || job.comment) {
      card.append(h("p", "line comment", [job.reasonCode, job.comment].filter(Boolean).join(": ")));
    }
    return card;
  }
  function statusChip(status) {
    const s = h("span", "st s-" + status, pretty(status));
    return s;
  }
  function thingRow(t) {
    const tr = h("tr", t.connected ? "on" : "off");
    tr.dataset.thing = t.name;
    const name = h("td", "name");
    name.append(h("span", "dot"), t.name);
    name.title = t.connected ? "connected" : "not connected";
    const seen = h("td", "seen", ago(t.lastSeenSecondsAgo));
    const fw = h("td", "firmware", t.firmware || "?");
    if (t.app) fw.append(h("div", "muted", "app " + t.app));
    const cur = h("td", "current");
    if (t.currentJob) cur.append(t.currentJob.jobId + " ", statusChip(t.currentJob.status));
    const det = h("td", "details");
    if (t.latest) {
      det.append(t.latest.jobId + " #" + t.latest.executionNumber + " ", statusChip(t.latest.status), " ");
      for (const [k, v] of Object.entries(t.latest.statusDetails || {})) {
        det.append(h("span", "kv", k + ": " + v));
      }
    }
    tr.append(name, seen, fw, cur, det);
    return tr;
  }
  function commandRow(c) {
    const tr = h("tr");
    tr.dataset.execution = c.executionId;
    tr.append(h("td", null, c.commandId), h("td", null, c.target));
    const st = h("td");
    st.append(statusChip(c.status));
    const why = [c.reasonCode, c.reasonDescription, c.result].filter(Boolean).join(" \\u00b7 ");
    tr.append(st, h("td", "muted", why));
    return tr;
  }
  function empty(columns, text) {
    const tr = h("tr");
    const td = h("td", "note", text);
    td.colSpan = columns;
    tr.append(td);
    return tr;
  }
  function fill(id, rows) {
    document.querySelector("#" + id + " tbody").replaceChildren(...rows);
  }

  function render(s) {
    if (s.error) { status("off", s.error); return; }
    document.getElementById("clock").textContent = when(s.now);
    document.getElementById("summary").textContent = s.thingsTotal + " things, " +
      s.connected + " connected \\u00b7 " + s.jobsTotal + " jobs";
    document.getElementById("jobs").replaceChildren(
      ...(s.jobs.length ? s.jobs.map(jobCard) : [h("p", "note", "No jobs yet.")]));
    document.getElementById("jobs-note").textContent =
      s.jobsTotal > s.jobs.length ? "(newest " + s.jobs.length + " of " + s.jobsTotal + ")" : "";
    fill("things", s.things.length ? s.things.map(thingRow) : [empty(5, "No things yet.")]);
    document.getElementById("things-note").textContent =
      s.thingsTotal > s.things.length ? "(first " + s.things.length + " of " + s.thingsTotal + ")" : "";
    document.getElementById("online-note").textContent = "Connected: jobsd answered a request " +
      "from the thing (MQTT or HTTPS) in the last " + Math.round(s.onlineSeconds) + " s; devices " +
      "ask for work at least every 300 s. Firmware: the version the last OTA job reported.";
    fill("commands", s.commands.length ? s.commands.map(commandRow) :
      [empty(4, "No command executions yet.")]);
    document.body.dataset.updated = String(Date.now());
  }

  const live = document.getElementById("live");
  function status(cls, text) { live.className = "live " + cls; live.textContent = text; }
  let polling = null;
  async function poll() {
    try {
      const r = await fetch("/dashboard/state", {cache: "no-store", credentials: "same-origin"});
      if (r.status === 403) { status("off", "signed out"); clearInterval(polling); return; }
      if (!r.ok) { status("wait", "jobsd answered " + r.status); return; }
      render(await r.json());
      status("on", "live (polling)");
    } catch (e) {
      status("wait", "jobsd unreachable");
    }
  }
  function startPolling() {
    if (polling === null) { polling = setInterval(poll, 2000); poll(); }
  }
  if (!window.EventSource) { startPolling(); return; }
  const es = new EventSource("/dashboard/events");
  es.onopen = () => status("on", "live");
  es.onmessage = (e) => { render(JSON.parse(e.data)); status("on", "live"); };
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) { startPolling(); return; }
    status("wait", "reconnecting");
  };
})();
"""
