"""SQLite persistence for jobsd.

One connection, used only while the service lock is held, so SQLite never sees two writers.
Every service request runs inside exactly one `transaction()`: either all of its changes land
or none do, which is what lets jobsd survive being killed at any instant without leaving a
half-applied update behind.

The schema carries a `PRAGMA user_version`; `_MIGRATIONS[n]` takes a database from version n to
n+1, so an existing database is upgraded in place instead of having to be deleted.

Durability choice: WAL journal with `synchronous=NORMAL`. A commit is a write to the WAL file
without an fsync; the WAL is synced at checkpoints. That survives any crash or kill of the
jobsd *process* (the OS still holds the written pages), which is the failure this local service
has to survive; only an OS crash or power loss can lose the last commits, never corrupt the
database. `synchronous=FULL` would fsync every request and cap the rate at the disk's sync rate.
Readers never block the single writer in WAL mode, and the one connection is only used under
the service lock, so concurrent requests from many things are serialised, never interleaved.

Timers are stored as absolute deadlines (epoch seconds, float) so they survive a restart:
`timeout_at` is the effective deadline of an IN_PROGRESS execution (the step deadline, already
capped by the in-progress deadline, else the in-progress deadline), NULL otherwise, and a partial
index over it makes "the next deadline" and "what is due" index lookups. AWS IoT commands keep
theirs the same way: `command_executions.timeout_at` (creation + executionTimeoutSeconds, while
the execution can still time out) and `commands.delete_at` (when a command pending deletion is
removed for good); `next_deadline()` is the earliest of all three.

Schema 5 adds fleet campaigns: each execution's `retry_attempt` and `hidden` (QUEUED but
outside its job's maintenance window: not pending for devices), job templates, and one
`rollouts` row per job with campaign state (unreleased targets, rate step, schedule) and
`next_at`, when the clock next has work for it; `next_deadline()` includes it.

Streams (schema 4) keep their files as one JSON list per row, with each file's size and SHA-256
as recorded at CreateStream / UpdateStream; device requests never read this table per block
(the service caches a stream's view until it changes). OTA updates keep the CreateOTAUpdate
body as received and the stream and job they led to.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Optional
from collections.abc import Callable, Iterator

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS things (
    name        TEXT PRIMARY KEY,
    thing_id    TEXT NOT NULL,
    attributes  TEXT NOT NULL,          -- JSON object
    thing_type  TEXT,
    version     INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id            TEXT PRIMARY KEY,
    seq               INTEGER NOT NULL,  -- creation order, survives deletes of older jobs
    document          TEXT NOT NULL,     -- the JSON text exactly as the operator sent it
    description       TEXT,
    target_selection  TEXT NOT NULL,
    targets           TEXT NOT NULL,     -- JSON list of ARNs
    status            TEXT NOT NULL,
    force_canceled    INTEGER NOT NULL DEFAULT 0,
    reason_code       TEXT,
    comment           TEXT,
    config            TEXT NOT NULL,     -- JSON object: timeoutConfig and other stored options
    created_at        REAL NOT NULL,
    last_updated_at   REAL NOT NULL,
    completed_at      REAL
);
CREATE TABLE IF NOT EXISTS executions (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order
    job_id            TEXT NOT NULL,
    thing_name        TEXT NOT NULL,
    execution_number  INTEGER NOT NULL,
    status            TEXT NOT NULL,
    status_details    TEXT,              -- JSON object or NULL when never set
    queued_at         INTEGER NOT NULL,
    started_at        INTEGER,
    last_updated_at   INTEGER NOT NULL,
    version_number    INTEGER NOT NULL,
    step_deadline     REAL,              -- absolute time, for the step timer (later issue)
    force_canceled    INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job_id, thing_name, execution_number)
);
CREATE INDEX IF NOT EXISTS executions_by_thing ON executions (thing_name, status);
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
"""

_SCHEMA_V2 = """
ALTER TABLE executions ADD COLUMN progress_deadline REAL;  -- in-progress timer, absolute
ALTER TABLE executions ADD COLUMN timeout_at REAL;         -- effective deadline (see docstring)
CREATE INDEX executions_timeout ON executions (timeout_at) WHERE timeout_at IS NOT NULL;
-- pending-per-thing (start-next, $next, notify) uses v1's executions_by_thing
-- (thing_name, status): two index seeks and a sort of one thing's few pending rows
CREATE INDEX executions_by_job_status ON executions (job_id, status);
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE thing_groups (
    name         TEXT PRIMARY KEY,
    group_id     TEXT NOT NULL,
    parent       TEXT,
    description  TEXT,
    attributes   TEXT NOT NULL,          -- JSON object
    version      INTEGER NOT NULL,
    created_at   REAL NOT NULL
);
CREATE TABLE group_members (
    group_name  TEXT NOT NULL,
    thing_name  TEXT NOT NULL,
    seq         INTEGER NOT NULL,        -- order of addition
    PRIMARY KEY (group_name, thing_name)
);
CREATE INDEX group_members_by_thing ON group_members (thing_name);
CREATE TABLE job_groups (                -- thing-group targets of each job
    job_id      TEXT NOT NULL,
    group_name  TEXT NOT NULL,
    PRIMARY KEY (job_id, group_name)
);
CREATE INDEX job_groups_by_group ON job_groups (group_name);
"""

_SCHEMA_V3 = """
CREATE TABLE commands (
    command_id       TEXT PRIMARY KEY,
    seq              INTEGER NOT NULL,   -- creation order (ListCommands sorts by it)
    namespace        TEXT NOT NULL,
    display_name     TEXT,
    description      TEXT,
    content          BLOB,               -- the payload bytes exactly as the operator sent them
    content_type     TEXT,
    mandatory        TEXT,               -- JSON list (mandatoryParameters) or NULL
    tags             TEXT NOT NULL,      -- JSON list of Key/Value objects
    deprecated       INTEGER NOT NULL DEFAULT 0,
    deprecated_at    REAL,
    delete_at        REAL,               -- pending deletion: removed for good at this time
    created_at       REAL NOT NULL,
    last_updated_at  REAL NOT NULL
);
CREATE INDEX commands_delete_at ON commands (delete_at) WHERE delete_at IS NOT NULL;
CREATE TABLE command_executions (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order
    execution_id     TEXT NOT NULL UNIQUE,
    command_id       TEXT NOT NULL,
    target_kind      TEXT NOT NULL,      -- thing or client
    target_name      TEXT NOT NULL,
    status           TEXT NOT NULL,
    status_reason    TEXT,               -- JSON object or NULL
    result           TEXT,               -- JSON object, REST spelling (S, B, BIN), or NULL
    parameters       TEXT,               -- JSON object, REST spelling, or NULL
    timeout_seconds  INTEGER NOT NULL,
    client_token     TEXT UNIQUE,        -- StartCommandExecution idempotency
    request_key      TEXT NOT NULL,      -- the canonical request the token was first used with
    created_at       REAL NOT NULL,
    started_at       REAL,
    completed_at     REAL,
    last_updated_at  REAL NOT NULL,
    timeout_at       REAL                -- absolute deadline while the execution can time out
);
CREATE INDEX command_executions_timeout ON command_executions (timeout_at)
    WHERE timeout_at IS NOT NULL;
CREATE INDEX command_executions_by_command ON command_executions (command_id);
CREATE INDEX command_executions_by_target ON command_executions (target_kind, target_name);
"""

_SCHEMA_V4 = """
CREATE TABLE streams (
    stream_id        TEXT PRIMARY KEY,
    seq              INTEGER NOT NULL,   -- creation order (ListStreams sorts by it)
    version          INTEGER NOT NULL,   -- 1 at creation, + 1 per UpdateStream
    description      TEXT,
    role_arn         TEXT NOT NULL,
    files            TEXT NOT NULL,      -- JSON list: fileId, bucket, key, version, size, sha256
    tags             TEXT NOT NULL,      -- JSON list of Key/Value objects
    created_at       REAL NOT NULL,
    last_updated_at  REAL NOT NULL
);
CREATE TABLE ota_updates (
    ota_update_id    TEXT PRIMARY KEY,
    seq              INTEGER NOT NULL,   -- creation order
    status           TEXT NOT NULL,      -- CREATE_PENDING -> CREATE_COMPLETE | CREATE_FAILED
    request          TEXT NOT NULL,      -- JSON: the CreateOTAUpdate body as received
    stream_id        TEXT,               -- the stream its MQTT files come from
    stream_created   INTEGER NOT NULL DEFAULT 0,  -- 1: created by this OTA update
    job_id           TEXT NOT NULL,
    error            TEXT,               -- JSON {code, message} when CREATE_FAILED
    created_at       REAL NOT NULL,
    last_updated_at  REAL NOT NULL
);
CREATE INDEX ota_updates_by_stream ON ota_updates (stream_id);
"""

_SCHEMA_V5 = """
ALTER TABLE executions ADD COLUMN retry_attempt INTEGER NOT NULL DEFAULT 0;  -- 0: the first
-- a QUEUED execution of a job whose maintenance window is closed: devices do not see it
ALTER TABLE executions ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0;
CREATE TABLE job_templates (
    template_id  TEXT PRIMARY KEY,
    seq          INTEGER NOT NULL,       -- creation order (ListJobTemplates)
    body         TEXT NOT NULL,          -- JSON: description, document, configs as stored
    created_at   REAL NOT NULL
);
CREATE TABLE rollouts (                  -- campaign state of a job (campaign.py)
    job_id   TEXT PRIMARY KEY,
    state    TEXT NOT NULL,              -- JSON object
    next_at  REAL                        -- when the clock next has work for this job
);
CREATE INDEX rollouts_next ON rollouts (next_at) WHERE next_at IS NOT NULL;
"""

_MIGRATIONS = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4, _SCHEMA_V5)
SCHEMA_VERSION = len(_MIGRATIONS)

# what a device sees as pending: a QUEUED execution outside its job's window is hidden
_PENDING = "(status='IN_PROGRESS' OR (status='QUEUED' AND hidden=0))"


@dataclass
class Thing:
    name: str
    thing_id: str
    attributes: dict[str, str]
    thing_type: Optional[str]
    version: int
    created_at: float


@dataclass
class Job:
    job_id: str
    seq: int
    document: str
    description: Optional[str]
    target_selection: str
    targets: list[str]
    status: str
    created_at: float
    last_updated_at: float
    completed_at: Optional[float] = None
    force_canceled: bool = False
    reason_code: Optional[str] = None
    comment: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Execution:
    job_id: str
    thing_name: str
    execution_number: int
    status: str
    queued_at: int
    last_updated_at: int
    version_number: int
    status_details: Optional[dict[str, str]] = None
    started_at: Optional[int] = None
    step_deadline: Optional[float] = None
    force_canceled: bool = False
    seq: int = 0
    progress_deadline: Optional[float] = None
    retry_attempt: int = 0       # retries done for this job on this thing before this one
    hidden: bool = False         # QUEUED outside its job's maintenance window

    @property
    def key(self) -> tuple[str, int]:
        """Identity of an execution on one thing (what notify-next compares)."""
        return (self.job_id, self.execution_number)

    @property
    def timeout_at(self) -> Optional[float]:
        """When the service times this execution out; only IN_PROGRESS executions have timers.
        The step deadline is capped by the in-progress one when it is set (PROTOCOL.md 3.3)."""
        if self.status != "IN_PROGRESS":
            return None
        return self.step_deadline if self.step_deadline is not None else self.progress_deadline


@dataclass
class ThingGroup:
    name: str
    group_id: str
    parent: Optional[str]
    description: Optional[str]
    attributes: dict[str, str]
    version: int
    created_at: float


@dataclass
class Command:
    """An AWS IoT command (static payload, AWS-IoT namespace)."""
    command_id: str
    seq: int
    namespace: str
    display_name: Optional[str]
    description: Optional[str]
    content: Optional[bytes]
    content_type: Optional[str]
    mandatory: Optional[list[dict[str, Any]]]
    created_at: float
    last_updated_at: float
    tags: list[dict[str, str]] = field(default_factory=list)
    deprecated: bool = False
    deprecated_at: Optional[float] = None
    delete_at: Optional[float] = None

    @property
    def pending_deletion(self) -> bool:
        return self.delete_at is not None


@dataclass
class CommandExecution:
    execution_id: str
    command_id: str
    target_kind: str             # "thing" or "client"
    target_name: str
    status: str
    timeout_seconds: int
    request_key: str
    created_at: float
    last_updated_at: float
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    status_reason: Optional[dict[str, str]] = None
    result: Optional[dict[str, dict[str, Any]]] = None
    parameters: Optional[dict[str, dict[str, Any]]] = None
    client_token: Optional[str] = None
    timeout_at: Optional[float] = None
    seq: int = 0


@dataclass
class Stream:
    """An AWS IoT stream: files (StreamFile JSON dicts, see streams.py) under one version."""
    stream_id: str
    seq: int
    version: int
    description: Optional[str]
    role_arn: str
    files: list[dict[str, Any]]
    created_at: float
    last_updated_at: float
    tags: list[dict[str, str]] = field(default_factory=list)


@dataclass
class OtaUpdate:
    ota_update_id: str
    seq: int
    status: str
    request: dict[str, Any]
    job_id: str
    created_at: float
    last_updated_at: float
    stream_id: Optional[str] = None
    stream_created: bool = False
    error: Optional[dict[str, str]] = None


def _stream(row: sqlite3.Row) -> Stream:
    return Stream(stream_id=row["stream_id"], seq=row["seq"], version=row["version"],
                  description=row["description"], role_arn=row["role_arn"],
                  files=json.loads(row["files"]), created_at=row["created_at"],
                  last_updated_at=row["last_updated_at"], tags=json.loads(row["tags"]))


def _ota(row: sqlite3.Row) -> OtaUpdate:
    return OtaUpdate(ota_update_id=row["ota_update_id"], seq=row["seq"], status=row["status"],
                     request=json.loads(row["request"]), job_id=row["job_id"],
                     created_at=row["created_at"], last_updated_at=row["last_updated_at"],
                     stream_id=row["stream_id"], stream_created=bool(row["stream_created"]),
                     error=_json_or_none(row["error"]))


def _thing(row: sqlite3.Row) -> Thing:
    return Thing(row["name"], row["thing_id"], json.loads(row["attributes"]), row["thing_type"],
                 row["version"], row["created_at"])


def _job(row: sqlite3.Row) -> Job:
    return Job(job_id=row["job_id"], seq=row["seq"], document=row["document"],
               description=row["description"], target_selection=row["target_selection"],
               targets=json.loads(row["targets"]), status=row["status"],
               created_at=row["created_at"], last_updated_at=row["last_updated_at"],
               completed_at=row["completed_at"], force_canceled=bool(row["force_canceled"]),
               reason_code=row["reason_code"], comment=row["comment"],
               config=json.loads(row["config"]))


# Executions are read often (every device request): explicit columns, positional access.
_EX_COLS = ("seq, job_id, thing_name, execution_number, status, status_details, queued_at,"
            " started_at, last_updated_at, version_number, step_deadline, force_canceled,"
            " progress_deadline, retry_attempt, hidden")
_EX_SELECT = f"SELECT {_EX_COLS} FROM executions"


def _execution(row: Any) -> Execution:
    (seq, job_id, thing_name, number, status, details, queued_at, started_at, last_updated_at,
     version, step_deadline, force_canceled, progress_deadline, retry_attempt, hidden) = row
    return Execution(job_id, thing_name, number, status, queued_at, last_updated_at, version,
                     None if details is None else json.loads(details), started_at,
                     step_deadline, bool(force_canceled), seq, progress_deadline,
                     retry_attempt, bool(hidden))


def _json_or_none(text: Optional[str]) -> Any:
    return None if text is None else json.loads(text)


def _dump_or_none(value: Any) -> Optional[str]:
    return None if value is None else json.dumps(value)


def _command(row: sqlite3.Row) -> Command:
    return Command(command_id=row["command_id"], seq=row["seq"], namespace=row["namespace"],
                   display_name=row["display_name"], description=row["description"],
                   content=None if row["content"] is None else bytes(row["content"]),
                   content_type=row["content_type"], mandatory=_json_or_none(row["mandatory"]),
                   created_at=row["created_at"], last_updated_at=row["last_updated_at"],
                   tags=json.loads(row["tags"]), deprecated=bool(row["deprecated"]),
                   deprecated_at=row["deprecated_at"], delete_at=row["delete_at"])


def _command_execution(row: sqlite3.Row) -> CommandExecution:
    return CommandExecution(
        execution_id=row["execution_id"], command_id=row["command_id"],
        target_kind=row["target_kind"], target_name=row["target_name"], status=row["status"],
        timeout_seconds=row["timeout_seconds"], request_key=row["request_key"],
        created_at=row["created_at"], last_updated_at=row["last_updated_at"],
        started_at=row["started_at"], completed_at=row["completed_at"],
        status_reason=_json_or_none(row["status_reason"]), result=_json_or_none(row["result"]),
        parameters=_json_or_none(row["parameters"]), client_token=row["client_token"],
        timeout_at=row["timeout_at"], seq=row["seq"])


def _group(row: sqlite3.Row) -> ThingGroup:
    return ThingGroup(row["name"], row["group_id"], row["parent"], row["description"],
                      json.loads(row["attributes"]), row["version"], row["created_at"])


class Store:
    """Typed access to the jobsd tables. Not thread-safe: the service serialises all calls."""

    def __init__(self, path: str) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per request.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        # plain tuples for the hot execution queries (results are always read at once)
        self._plain = self._db.cursor()
        self._plain.row_factory = None
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a killed process
        self._db.execute("PRAGMA foreign_keys=ON")
        self._in_tx = False
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema {version} is newer than this jobsd ({SCHEMA_VERSION})")
        with self.transaction():
            for script in _MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing scope for one request; nested use joins the outer transaction."""
        if self._in_tx:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield
        except BaseException:
            self._in_tx = False
            self._db.execute("ROLLBACK")
            raise
        self._in_tx = False
        self._db.execute("COMMIT")

    # -- counters ------------------------------------------------------------------------------
    def next_counter(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        value = 1 if row is None else row[0] + 1
        self._db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
                         (name, value))
        return value

    # -- settings (per-database values such as the file-signing secret) -------------------------
    def setting(self, name: str, default: Callable[[], str]) -> str:
        """The stored value, or `default()` stored now (generated once per database)."""
        with self.transaction():
            row = self._db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
            if row is not None:
                return str(row[0])
            value = default()
            self._db.execute("INSERT INTO settings (name, value) VALUES (?, ?)", (name, value))
            return value

    def set_setting(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)",
                         (name, value))

    def get_setting(self, name: str) -> Optional[str]:
        row = self._db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    # -- job templates -------------------------------------------------------------------------
    def get_template(self, template_id: str) -> Optional[dict[str, Any]]:
        """{templateId, seq, body (dict), createdAt} or None."""
        row = self._db.execute("SELECT * FROM job_templates WHERE template_id=?",
                               (template_id,)).fetchone()
        return None if row is None else {"templateId": row["template_id"], "seq": row["seq"],
                                         "body": json.loads(row["body"]),
                                         "createdAt": row["created_at"]}

    def insert_template(self, template_id: str, body: dict[str, Any], created_at: float) -> None:
        self._db.execute("INSERT INTO job_templates (template_id, seq, body, created_at)"
                         " VALUES (?, ?, ?, ?)", (template_id, self.next_counter("template"),
                                                  json.dumps(body), created_at))

    def delete_template(self, template_id: str) -> bool:
        return self._db.execute("DELETE FROM job_templates WHERE template_id=?",
                                (template_id,)).rowcount > 0

    def list_templates(self) -> list[dict[str, Any]]:
        """Oldest first."""
        return [{"templateId": r["template_id"], "seq": r["seq"], "body": json.loads(r["body"]),
                 "createdAt": r["created_at"]}
                for r in self._db.execute("SELECT * FROM job_templates ORDER BY seq")]

    # -- rollouts (campaign state) -------------------------------------------------------------
    def get_rollout(self, job_id: str) -> Optional[dict[str, Any]]:
        row = self._db.execute("SELECT state FROM rollouts WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def save_rollout(self, job_id: str, state: dict[str, Any], next_at: Optional[float]) -> None:
        self._db.execute("INSERT OR REPLACE INTO rollouts (job_id, state, next_at)"
                         " VALUES (?, ?, ?)", (job_id, json.dumps(state), next_at))

    def delete_rollout(self, job_id: str) -> None:
        self._db.execute("DELETE FROM rollouts WHERE job_id=?", (job_id,))

    def due_rollouts(self, now: float) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT job_id FROM rollouts WHERE next_at IS NOT NULL AND next_at <= ?"
            " ORDER BY next_at, job_id", (now,))]

    def next_rollout_at(self) -> Optional[float]:
        row = self._db.execute("SELECT MIN(next_at) FROM rollouts WHERE next_at IS NOT NULL"
                               ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # -- things --------------------------------------------------------------------------------
    def get_thing(self, name: str) -> Optional[Thing]:
        row = self._db.execute("SELECT * FROM things WHERE name=?", (name,)).fetchone()
        return None if row is None else _thing(row)

    def insert_thing(self, thing: Thing) -> None:
        self._db.execute(
            "INSERT INTO things (name, thing_id, attributes, thing_type, version, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (thing.name, thing.thing_id, json.dumps(thing.attributes), thing.thing_type,
             thing.version, thing.created_at))

    def list_things(self) -> list[Thing]:
        return [_thing(r) for r in self._db.execute("SELECT * FROM things ORDER BY name")]

    # -- jobs ----------------------------------------------------------------------------------
    def get_job(self, job_id: str) -> Optional[Job]:
        row = self._db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def insert_job(self, job: Job) -> None:
        self._db.execute(
            "INSERT INTO jobs (job_id, seq, document, description, target_selection, targets,"
            " status, force_canceled, reason_code, comment, config, created_at, last_updated_at,"
            " completed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.job_id, job.seq, job.document, job.description, job.target_selection,
             json.dumps(job.targets), job.status, int(job.force_canceled), job.reason_code,
             job.comment, json.dumps(job.config), job.created_at, job.last_updated_at,
             job.completed_at))

    def save_job(self, job: Job) -> None:
        self._db.execute(
            "UPDATE jobs SET status=?, force_canceled=?, reason_code=?, comment=?, config=?,"
            " description=?, last_updated_at=?, completed_at=? WHERE job_id=?",
            (job.status, int(job.force_canceled), job.reason_code, job.comment,
             json.dumps(job.config), job.description, job.last_updated_at, job.completed_at,
             job.job_id))

    def save_job_targets(self, job: Job) -> None:
        """AssociateTargetsWithJob: the targets and what save_job writes."""
        self._db.execute("UPDATE jobs SET targets=? WHERE job_id=?",
                         (json.dumps(job.targets), job.job_id))
        self.save_job(job)

    def delete_job(self, job_id: str) -> None:
        self._db.execute("DELETE FROM rollouts WHERE job_id=?", (job_id,))
        self._db.execute("DELETE FROM executions WHERE job_id=?", (job_id,))
        self._db.execute("DELETE FROM job_groups WHERE job_id=?", (job_id,))
        self._db.execute("DELETE FROM jobs WHERE job_id=?", (job_id,))

    def list_jobs(self) -> list[Job]:
        """Newest first, as the AWS console and ListJobs present them."""
        return [_job(r) for r in self._db.execute("SELECT * FROM jobs ORDER BY seq DESC")]

    # -- executions ----------------------------------------------------------------------------
    def get_execution(self, job_id: str, thing_name: str,
                      execution_number: Optional[int] = None) -> Optional[Execution]:
        """The named execution, or the latest one of the job on the thing."""
        if execution_number is None:
            row = self._plain.execute(
                _EX_SELECT + " WHERE job_id=? AND thing_name=?"
                " ORDER BY execution_number DESC LIMIT 1", (job_id, thing_name)).fetchone()
        else:
            row = self._plain.execute(
                _EX_SELECT + " WHERE job_id=? AND thing_name=? AND execution_number=?",
                (job_id, thing_name, execution_number)).fetchone()
        return None if row is None else _execution(row)

    def insert_execution(self, ex: Execution) -> Execution:
        cur = self._db.execute(
            "INSERT INTO executions (job_id, thing_name, execution_number, status, status_details,"
            " queued_at, started_at, last_updated_at, version_number, step_deadline,"
            " force_canceled, progress_deadline, timeout_at, retry_attempt, hidden)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ex.job_id, ex.thing_name, ex.execution_number, ex.status,
             None if ex.status_details is None else json.dumps(ex.status_details),
             ex.queued_at, ex.started_at, ex.last_updated_at, ex.version_number,
             ex.step_deadline, int(ex.force_canceled), ex.progress_deadline, ex.timeout_at,
             ex.retry_attempt, int(ex.hidden)))
        ex.seq = int(cur.lastrowid or 0)
        return ex

    def save_execution(self, ex: Execution) -> None:
        self._db.execute(
            "UPDATE executions SET status=?, status_details=?, started_at=?, last_updated_at=?,"
            " version_number=?, step_deadline=?, force_canceled=?, progress_deadline=?,"
            " timeout_at=?, hidden=? WHERE seq=?",
            (ex.status, None if ex.status_details is None else json.dumps(ex.status_details),
             ex.started_at, ex.last_updated_at, ex.version_number, ex.step_deadline,
             int(ex.force_canceled), ex.progress_deadline, ex.timeout_at, int(ex.hidden),
             ex.seq))

    def delete_execution(self, ex: Execution) -> None:
        self._db.execute("DELETE FROM executions WHERE seq=?", (ex.seq,))

    def executions_for_job(self, job_id: str) -> list[Execution]:
        return [_execution(r) for r in self._plain.execute(
            _EX_SELECT + " WHERE job_id=? ORDER BY seq", (job_id,))]

    def executions_for_thing(self, thing_name: str) -> list[Execution]:
        """All executions on a thing, newest first (ListJobExecutionsForThing order)."""
        return [_execution(r) for r in self._plain.execute(
            _EX_SELECT + " WHERE thing_name=? ORDER BY seq DESC", (thing_name,))]

    def pending_for_thing(self, thing_name: str, limit: int = -1) -> list[Execution]:
        """Non-terminal executions, IN_PROGRESS first, each group in queue order (section 5);
        the first `limit` of them when it is not -1."""
        return [_execution(r) for r in self._plain.execute(
            _EX_SELECT + f" WHERE thing_name=? AND {_PENDING}"
            " ORDER BY CASE status WHEN 'IN_PROGRESS' THEN 0 ELSE 1 END, seq LIMIT ?",
            (thing_name, limit))]

    def pending_keys(self, thing_name: str) -> list[tuple[str, int]]:
        """(job id, execution number) of `pending_for_thing`, in the same order, cheaply."""
        return self._plain.execute(
            f"SELECT job_id, execution_number FROM executions WHERE thing_name=? AND {_PENDING}"
            " ORDER BY CASE status WHEN 'IN_PROGRESS' THEN 0 ELSE 1 END, seq",
            (thing_name,)).fetchall()

    def job_can_complete(self, job_id: str) -> bool:
        """An IN_PROGRESS SNAPSHOT job none of whose executions is pending."""
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE job_id=? AND status='IN_PROGRESS'"
            " AND target_selection='SNAPSHOT' AND NOT EXISTS (SELECT 1 FROM executions"
            " WHERE job_id=? AND status IN ('QUEUED', 'IN_PROGRESS'))",
            (job_id, job_id)).fetchone()
        return row is not None

    def job_document(self, job_id: str) -> Optional[tuple[str, str]]:
        """(document, config JSON): what delivering a document needs, nothing more."""
        row = self._db.execute("SELECT document, config FROM jobs WHERE job_id=?",
                               (job_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    # -- timers --------------------------------------------------------------------------------
    def next_deadline(self) -> Optional[float]:
        """The earliest job-execution, command-execution or command-deletion deadline."""
        row = self._db.execute(
            "SELECT MIN(t) FROM ("
            " SELECT MIN(timeout_at) AS t FROM executions WHERE timeout_at IS NOT NULL"
            " UNION ALL SELECT MIN(timeout_at) FROM command_executions"
            " WHERE timeout_at IS NOT NULL"
            " UNION ALL SELECT MIN(delete_at) FROM commands WHERE delete_at IS NOT NULL"
            " UNION ALL SELECT MIN(next_at) FROM rollouts WHERE next_at IS NOT NULL)"
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def due_executions(self, now: float) -> list[Execution]:
        return [_execution(r) for r in self._plain.execute(
            _EX_SELECT + " WHERE timeout_at IS NOT NULL AND timeout_at <= ?"
            " ORDER BY timeout_at, seq", (now,))]

    # -- thing groups --------------------------------------------------------------------------
    def get_group(self, name: str) -> Optional[ThingGroup]:
        row = self._db.execute("SELECT * FROM thing_groups WHERE name=?", (name,)).fetchone()
        return None if row is None else _group(row)

    def insert_group(self, group: ThingGroup) -> None:
        self._db.execute(
            "INSERT INTO thing_groups (name, group_id, parent, description, attributes, version,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (group.name, group.group_id, group.parent, group.description,
             json.dumps(group.attributes), group.version, group.created_at))

    def delete_group(self, name: str) -> None:
        self._db.execute("DELETE FROM group_members WHERE group_name=?", (name,))
        self._db.execute("DELETE FROM job_groups WHERE group_name=?", (name,))
        self._db.execute("DELETE FROM thing_groups WHERE name=?", (name,))

    def child_groups(self, name: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT name FROM thing_groups WHERE parent=? ORDER BY name", (name,))]

    def list_groups(self) -> list[ThingGroup]:
        return [_group(r) for r in self._db.execute("SELECT * FROM thing_groups ORDER BY name")]

    def add_member(self, group: str, thing: str) -> bool:
        """False when the thing already was a member."""
        if self.is_member(group, thing):
            return False
        self._db.execute(
            "INSERT INTO group_members (group_name, thing_name, seq) VALUES (?, ?, ?)",
            (group, thing, self.next_counter("member")))
        return True

    def remove_member(self, group: str, thing: str) -> bool:
        cur = self._db.execute("DELETE FROM group_members WHERE group_name=? AND thing_name=?",
                               (group, thing))
        return cur.rowcount > 0

    def is_member(self, group: str, thing: str) -> bool:
        return self._db.execute(
            "SELECT 1 FROM group_members WHERE group_name=? AND thing_name=?",
            (group, thing)).fetchone() is not None

    def members(self, group: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT thing_name FROM group_members WHERE group_name=? ORDER BY seq", (group,))]

    def groups_of_thing(self, thing: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT group_name FROM group_members WHERE thing_name=? ORDER BY seq", (thing,))]

    def add_job_group(self, job_id: str, group: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO job_groups (job_id, group_name) VALUES (?, ?)",
                         (job_id, group))

    def jobs_targeting_groups(self, groups: list[str]) -> list[str]:
        """Ids of IN_PROGRESS CONTINUOUS jobs that target any of `groups`, in creation order."""
        if not groups:
            return []
        marks = ",".join("?" * len(groups))
        return [r[0] for r in self._db.execute(
            "SELECT DISTINCT j.job_id FROM job_groups g JOIN jobs j ON j.job_id = g.job_id"
            f" WHERE g.group_name IN ({marks}) AND j.target_selection='CONTINUOUS'"
            " AND j.status='IN_PROGRESS' ORDER BY j.seq", groups)]

    def job_groups(self, job_id: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT group_name FROM job_groups WHERE job_id=?", (job_id,))]

    # -- commands ------------------------------------------------------------------------------
    def get_command(self, command_id: str) -> Optional[Command]:
        row = self._db.execute("SELECT * FROM commands WHERE command_id=?",
                               (command_id,)).fetchone()
        return None if row is None else _command(row)

    def insert_command(self, cmd: Command) -> None:
        self._db.execute(
            "INSERT INTO commands (command_id, seq, namespace, display_name, description,"
            " content, content_type, mandatory, tags, deprecated, deprecated_at, delete_at,"
            " created_at, last_updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (cmd.command_id, cmd.seq, cmd.namespace, cmd.display_name, cmd.description,
             cmd.content, cmd.content_type, _dump_or_none(cmd.mandatory), json.dumps(cmd.tags),
             int(cmd.deprecated), cmd.deprecated_at, cmd.delete_at, cmd.created_at,
             cmd.last_updated_at))

    def save_command(self, cmd: Command) -> None:
        """The mutable part: UpdateCommand and DeleteCommand."""
        self._db.execute(
            "UPDATE commands SET display_name=?, description=?, deprecated=?, deprecated_at=?,"
            " delete_at=?, last_updated_at=? WHERE command_id=?",
            (cmd.display_name, cmd.description, int(cmd.deprecated), cmd.deprecated_at,
             cmd.delete_at, cmd.last_updated_at, cmd.command_id))

    def delete_command(self, command_id: str) -> None:
        """The command only: its executions stay readable, as AWS keeps them."""
        self._db.execute("DELETE FROM commands WHERE command_id=?", (command_id,))

    def list_commands(self) -> list[Command]:
        """Oldest first."""
        return [_command(r) for r in self._db.execute("SELECT * FROM commands ORDER BY seq")]

    def due_command_deletions(self, now: float) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT command_id FROM commands WHERE delete_at IS NOT NULL AND delete_at <= ?"
            " ORDER BY delete_at", (now,))]

    # -- command executions --------------------------------------------------------------------
    def get_command_execution(self, execution_id: str) -> Optional[CommandExecution]:
        row = self._db.execute("SELECT * FROM command_executions WHERE execution_id=?",
                               (execution_id,)).fetchone()
        return None if row is None else _command_execution(row)

    def command_execution_by_token(self, token: str) -> Optional[CommandExecution]:
        row = self._db.execute("SELECT * FROM command_executions WHERE client_token=?",
                               (token,)).fetchone()
        return None if row is None else _command_execution(row)

    def insert_command_execution(self, cx: CommandExecution) -> CommandExecution:
        cur = self._db.execute(
            "INSERT INTO command_executions (execution_id, command_id, target_kind, target_name,"
            " status, status_reason, result, parameters, timeout_seconds, client_token,"
            " request_key, created_at, started_at, completed_at, last_updated_at, timeout_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (cx.execution_id, cx.command_id, cx.target_kind, cx.target_name, cx.status,
             _dump_or_none(cx.status_reason), _dump_or_none(cx.result),
             _dump_or_none(cx.parameters), cx.timeout_seconds, cx.client_token, cx.request_key,
             cx.created_at, cx.started_at, cx.completed_at, cx.last_updated_at, cx.timeout_at))
        cx.seq = int(cur.lastrowid or 0)
        return cx

    def save_command_execution(self, cx: CommandExecution) -> None:
        self._db.execute(
            "UPDATE command_executions SET status=?, status_reason=?, result=?, completed_at=?,"
            " last_updated_at=?, timeout_at=? WHERE seq=?",
            (cx.status, _dump_or_none(cx.status_reason), _dump_or_none(cx.result),
             cx.completed_at, cx.last_updated_at, cx.timeout_at, cx.seq))

    def delete_command_execution(self, cx: CommandExecution) -> None:
        self._db.execute("DELETE FROM command_executions WHERE seq=?", (cx.seq,))

    def list_command_executions(self, command_id: Optional[str] = None,
                                target: Optional[tuple[str, str]] = None,
                                status: Optional[str] = None) -> list[CommandExecution]:
        """Oldest first, filtered in SQL (both filters have an index)."""
        where, args = [], []
        if command_id is not None:
            where.append("command_id=?")
            args.append(command_id)
        if target is not None:
            where.append("target_kind=? AND target_name=?")
            args.extend(target)
        if status is not None:
            where.append("status=?")
            args.append(status)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        return [_command_execution(r) for r in self._db.execute(
            f"SELECT * FROM command_executions{clause} ORDER BY seq", args)]

    def due_command_executions(self, now: float) -> list[CommandExecution]:
        return [_command_execution(r) for r in self._db.execute(
            "SELECT * FROM command_executions WHERE timeout_at IS NOT NULL AND timeout_at <= ?"
            " ORDER BY timeout_at, seq", (now,))]

    # -- streams -------------------------------------------------------------------------------
    def get_stream(self, stream_id: str) -> Optional[Stream]:
        row = self._db.execute("SELECT * FROM streams WHERE stream_id=?",
                               (stream_id,)).fetchone()
        return None if row is None else _stream(row)

    def insert_stream(self, st: Stream) -> None:
        self._db.execute(
            "INSERT INTO streams (stream_id, seq, version, description, role_arn, files, tags,"
            " created_at, last_updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (st.stream_id, st.seq, st.version, st.description, st.role_arn,
             json.dumps(st.files), json.dumps(st.tags), st.created_at, st.last_updated_at))

    def save_stream(self, st: Stream) -> None:
        self._db.execute(
            "UPDATE streams SET version=?, description=?, role_arn=?, files=?,"
            " last_updated_at=? WHERE stream_id=?",
            (st.version, st.description, st.role_arn, json.dumps(st.files),
             st.last_updated_at, st.stream_id))

    def delete_stream(self, stream_id: str) -> None:
        self._db.execute("DELETE FROM streams WHERE stream_id=?", (stream_id,))

    def list_streams(self) -> list[Stream]:
        """Oldest first."""
        return [_stream(r) for r in self._db.execute("SELECT * FROM streams ORDER BY seq")]

    # -- OTA updates ---------------------------------------------------------------------------
    def get_ota_update(self, ota_update_id: str) -> Optional[OtaUpdate]:
        row = self._db.execute("SELECT * FROM ota_updates WHERE ota_update_id=?",
                               (ota_update_id,)).fetchone()
        return None if row is None else _ota(row)

    def insert_ota_update(self, ota: OtaUpdate) -> None:
        self._db.execute(
            "INSERT INTO ota_updates (ota_update_id, seq, status, request, stream_id,"
            " stream_created, job_id, error, created_at, last_updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ota.ota_update_id, ota.seq, ota.status, json.dumps(ota.request), ota.stream_id,
             int(ota.stream_created), ota.job_id, _dump_or_none(ota.error), ota.created_at,
             ota.last_updated_at))

    def save_ota_update(self, ota: OtaUpdate) -> None:
        self._db.execute(
            "UPDATE ota_updates SET status=?, stream_id=?, stream_created=?, error=?,"
            " last_updated_at=? WHERE ota_update_id=?",
            (ota.status, ota.stream_id, int(ota.stream_created), _dump_or_none(ota.error),
             ota.last_updated_at, ota.ota_update_id))

    def delete_ota_update(self, ota_update_id: str) -> None:
        self._db.execute("DELETE FROM ota_updates WHERE ota_update_id=?", (ota_update_id,))

    def list_ota_updates(self) -> list[OtaUpdate]:
        """Oldest first."""
        return [_ota(r) for r in self._db.execute("SELECT * FROM ota_updates ORDER BY seq")]

    def ota_updates_using_stream(self, stream_id: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT ota_update_id FROM ota_updates WHERE stream_id=? ORDER BY seq",
            (stream_id,))]
