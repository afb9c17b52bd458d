"""SQLite persistence for jobsd.

One connection, used only while the service lock is held, so SQLite never sees two writers.
Every service request runs inside exactly one `transaction()`: either all of its changes land
or none do, which is what lets jobsd survive being killed at any instant without leaving a
half-applied update behind.

The schema carries a `PRAGMA user_version` so later issues can add tables or columns with a
numbered migration instead of asking users to delete their database.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Optional
from collections.abc import Iterator

SCHEMA_VERSION = 1

_SCHEMA = """
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

    @property
    def key(self) -> tuple[str, int]:
        """Identity of an execution on one thing (what notify-next compares)."""
        return (self.job_id, self.execution_number)


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


def _execution(row: sqlite3.Row) -> Execution:
    details = row["status_details"]
    return Execution(job_id=row["job_id"], thing_name=row["thing_name"],
                     execution_number=row["execution_number"], status=row["status"],
                     queued_at=row["queued_at"], last_updated_at=row["last_updated_at"],
                     version_number=row["version_number"],
                     status_details=None if details is None else json.loads(details),
                     started_at=row["started_at"], step_deadline=row["step_deadline"],
                     force_canceled=bool(row["force_canceled"]), seq=row["seq"])


class Store:
    """Typed access to the jobsd tables. Not thread-safe: the service serialises all calls."""

    def __init__(self, path: str) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per request.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
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
            for statement in _SCHEMA.split(";"):
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

    def delete_job(self, job_id: str) -> None:
        self._db.execute("DELETE FROM executions WHERE job_id=?", (job_id,))
        self._db.execute("DELETE FROM jobs WHERE job_id=?", (job_id,))

    def list_jobs(self) -> list[Job]:
        """Newest first, as the AWS console and ListJobs present them."""
        return [_job(r) for r in self._db.execute("SELECT * FROM jobs ORDER BY seq DESC")]

    # -- executions ----------------------------------------------------------------------------
    def get_execution(self, job_id: str, thing_name: str,
                      execution_number: Optional[int] = None) -> Optional[Execution]:
        """The named execution, or the latest one of the job on the thing."""
        if execution_number is None:
            row = self._db.execute(
                "SELECT * FROM executions WHERE job_id=? AND thing_name=?"
                " ORDER BY execution_number DESC LIMIT 1", (job_id, thing_name)).fetchone()
        else:
            row = self._db.execute(
                "SELECT * FROM executions WHERE job_id=? AND thing_name=? AND execution_number=?",
                (job_id, thing_name, execution_number)).fetchone()
        return None if row is None else _execution(row)

    def insert_execution(self, ex: Execution) -> Execution:
        cur = self._db.execute(
            "INSERT INTO executions (job_id, thing_name, execution_number, status, status_details,"
            " queued_at, started_at, last_updated_at, version_number, step_deadline,"
            " force_canceled)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ex.job_id, ex.thing_name, ex.execution_number, ex.status,
             None if ex.status_details is None else json.dumps(ex.status_details),
             ex.queued_at, ex.started_at, ex.last_updated_at, ex.version_number,
             ex.step_deadline, int(ex.force_canceled)))
        ex.seq = int(cur.lastrowid or 0)
        return ex

    def save_execution(self, ex: Execution) -> None:
        self._db.execute(
            "UPDATE executions SET status=?, status_details=?, started_at=?, last_updated_at=?,"
            " version_number=?, step_deadline=?, force_canceled=? WHERE seq=?",
            (ex.status, None if ex.status_details is None else json.dumps(ex.status_details),
             ex.started_at, ex.last_updated_at, ex.version_number, ex.step_deadline,
             int(ex.force_canceled), ex.seq))

    def delete_execution(self, ex: Execution) -> None:
        self._db.execute("DELETE FROM executions WHERE seq=?", (ex.seq,))

    def executions_for_job(self, job_id: str) -> list[Execution]:
        return [_execution(r) for r in self._db.execute(
            "SELECT * FROM executions WHERE job_id=? ORDER BY seq", (job_id,))]

    def executions_for_thing(self, thing_name: str) -> list[Execution]:
        """All executions on a thing, newest first (ListJobExecutionsForThing order)."""
        return [_execution(r) for r in self._db.execute(
            "SELECT * FROM executions WHERE thing_name=? ORDER BY seq DESC", (thing_name,))]

    def pending_for_thing(self, thing_name: str) -> list[Execution]:
        """Non-terminal executions, IN_PROGRESS first, each group in queue order (section 5)."""
        return [_execution(r) for r in self._db.execute(
            "SELECT * FROM executions WHERE thing_name=? AND status IN ('IN_PROGRESS', 'QUEUED')"
            " ORDER BY CASE status WHEN 'IN_PROGRESS' THEN 0 ELSE 1 END, seq", (thing_name,))]
