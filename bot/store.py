"""Durable jobs, sessions and bot state in SQLite (stdlib ``sqlite3``, WAL).

:class:`JobStore` is the interface the queue and the cogs use; :class:`SQLiteJobStore` implements it with one
connection that is used only from the event-loop thread (every call is a few small statements).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

from .jobs import Job, JobKind, JobStatus, Session, SessionStatus

log = logging.getLogger(__name__)

_JOB_FIELDS = [f.name for f in fields(Job) if f.name != "id"]
_JOB_COLUMNS = {*_JOB_FIELDS, "id"}
_SESSION_FIELDS = [f.name for f in fields(Session) if f.name != "id"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id INTEGER,
    channel_id INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    user_name TEXT NOT NULL,
    prompt TEXT NOT NULL,
    model_prompt TEXT NOT NULL,
    new_seconds INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    session_id INTEGER REFERENCES sessions(id),
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    interaction_id INTEGER,
    interaction_token TEXT,
    application_id INTEGER,
    interaction_created_at REAL,
    status_message_id INTEGER,
    delivered_message_id INTEGER,
    delivered_url TEXT,
    error TEXT,
    format TEXT NOT NULL DEFAULT 'wav',
    attempts INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'music',
    parent_id INTEGER,
    temperature REAL NOT NULL DEFAULT 1.0,
    prompt_tokens_path TEXT,
    prompt_audio_path TEXT,
    upload_limit INTEGER,
    prompt_seconds REAL NOT NULL DEFAULT 0,
    melody_path TEXT,
    melody_name TEXT,
    delivering_at REAL,
    worker_id TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, id);
CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user_id, id);
CREATE INDEX IF NOT EXISTS jobs_by_session ON jobs (session_id, id);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id INTEGER,
    channel_id INTEGER NOT NULL,
    thread_id INTEGER,
    host_id INTEGER NOT NULL,
    theme TEXT NOT NULL DEFAULT '',
    default_seconds INTEGER,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    closed_at REAL
);
CREATE INDEX IF NOT EXISTS sessions_by_thread ON sessions (thread_id);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


# Columns added after the first release: a database made before gets them on open (ALTER TABLE ADD COLUMN keeps
# every row and gives old jobs the default).
ADDED_JOB_COLUMNS = {
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "kind": "TEXT NOT NULL DEFAULT 'music'",
    "parent_id": "INTEGER",
    "temperature": "REAL NOT NULL DEFAULT 1.0",
    "prompt_tokens_path": "TEXT",
    "prompt_audio_path": "TEXT",
    "upload_limit": "INTEGER",
    "prompt_seconds": "REAL NOT NULL DEFAULT 0",
    "melody_path": "TEXT",
    "melody_name": "TEXT",
}
# Columns of idempotent delivery (kept apart from the others so each feature's migration reads on its own).
DELIVERY_JOB_COLUMNS = {
    "delivering_at": "REAL",
}
# Columns of leases (workers that hold running jobs; see JobStore.update_if).
LEASE_JOB_COLUMNS = {
    "worker_id": "TEXT",
    "lease_until": "REAL",
}
# Columns renamed since: old name -> new name (RENAME COLUMN keeps the values).
RENAMED_JOB_COLUMNS = {
    "seconds": "new_seconds",  # the new audio a member asked for, not the clip's total length
}


class JobStore(Protocol):
    """What the queue and the cogs need from storage (SQLite now; another backend can implement the same)."""

    def add(self, job: Job) -> Job: ...
    def get(self, job_id: int) -> Job | None: ...
    def update(self, job_id: int, **changes: Any) -> Job: ...
    def update_many(self, job_ids: Iterable[int], **changes: Any) -> None: ...
    def update_if(self, job_id: int, expected: Mapping[str, Any], **changes: Any) -> Job | None:
        """Compare and set, atomically: apply ``changes`` only if every field named in ``expected`` has that value
        now (``None`` matches a missing value). The job as stored after the change, or None when it did not match
        or there is no such job. Claims, lease renewals and take-overs of several workers rest on it."""
        ...
    def by_status(self, *statuses: JobStatus) -> list[Job]: ...
    def jobs_of(self, user_id: int, *statuses: JobStatus) -> list[Job]: ...
    def session_jobs(self, session_id: int, *statuses: JobStatus) -> list[Job]: ...
    def count(self, *statuses: JobStatus) -> int: ...
    def last_created_at(self, user_id: int) -> float | None: ...
    def last_started(self) -> list[tuple[int | None, int, float]]: ...
    def add_session(self, session: Session) -> Session: ...
    def get_session(self, session_id: int) -> Session | None: ...
    def session_for_thread(self, thread_id: int) -> Session | None: ...
    def open_sessions(self, guild_id: int | None = None) -> list[Session]: ...
    def update_session(self, session_id: int, **changes: Any) -> Session: ...
    def close_session(self, session_id: int) -> Session: ...
    def get_value(self, key: str, default: Any = None) -> Any: ...
    def set_value(self, key: str, value: Any) -> None: ...
    def recent_done(self, user_id: int, limit: int = 10) -> list[Job]: ...
    # per guild (``guild_id`` None: jobs without a guild, i.e. rows written before guilds were kept)
    def guild_jobs(self, guild_id: int | None, *statuses: JobStatus) -> list[Job]: ...
    def last_created_in(self, guild_id: int | None, user_id: int) -> float | None: ...
    def recent_done_in(self, guild_id: int | None, user_id: int, limit: int = 10) -> list[Job]: ...
    def last_started_by_guild(self) -> list[tuple[int | None, int | None, int, float]]: ...
    # the files of jobs (bot.job_files)
    def file_in_use(self, path: str, *, besides: int) -> bool: ...
    def jobs_since(self, cutoff: float) -> list[Job]: ...
    def close(self) -> None: ...

    @property
    def files_dir(self) -> Path | None:
        """Folder for the files that belong to jobs (tokens, uploads); None when there is nowhere to keep them."""
        ...

    @property
    def shared(self) -> bool:
        """Whether processes on other machines use this store at once (a gateway and workers): True for Redis, False
        for the embedded SQLite file, which one bot process owns."""
        ...

    # files of jobs across machines: a job names a file by the path it was written to on one machine
    def share_file(self, path: str | Path) -> None:
        """Make a file just written under :attr:`files_dir` readable on every machine (a no-op on one machine)."""
        ...

    def local_file(self, path: str | Path) -> Path:
        """Where the file a job names can be read on this machine (fetched when it is elsewhere; a missing file
        gives a path that does not exist, so the reader reports the file gone)."""
        ...

    def drop_file(self, path: str | Path) -> None:
        """Delete a job's file here and wherever it was shared."""
        ...


class SQLiteJobStore:
    """A :class:`JobStore` in one SQLite file. Every write is committed before the call returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit; multi-statement changes use explicit transactions.
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._migrate_guilds()
        self._migrate_delivery()
        self._check_writable()
        self._files_dir = None if str(path) == ":memory:" else self.path.parent / "clips"
        log.debug("job store opened at %s", self.path)

    def _migrate(self) -> None:
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for old, new in RENAMED_JOB_COLUMNS.items():
            if old in have and new not in have:
                self._db.execute(f"ALTER TABLE jobs RENAME COLUMN {old} TO {new}")
                have = (have - {old}) | {new}
                log.info("job store: renamed column %s to %s", old, new)
        for name, declaration in ADDED_JOB_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
                log.info("job store: added column %s", name)

    def _migrate_guilds(self) -> None:
        """Per-guild queues: an index for the guild's queries. Jobs always had a ``guild_id`` column; rows where it
        is NULL (none from a server, as /music refuses DMs) are one more guild, served and listed to owners."""
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_by_guild ON jobs (guild_id, status, id)")

    def _migrate_delivery(self) -> None:
        """Add the columns of idempotent delivery and of leases to a database made before them."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, declaration in {**DELIVERY_JOB_COLUMNS, **LEASE_JOB_COLUMNS}.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
                log.info("job store: added column %s", name)

    def _check_writable(self) -> None:
        """Fail now, not at the first request, when the database can be read but not written (a read-only file
        or folder, a lock held by another process): rewrite the header's ``user_version`` unchanged and roll back."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(f"PRAGMA user_version = {int(version)}")
        finally:
            self._db.execute("ROLLBACK")


    @property
    def files_dir(self) -> Path | None:
        """``clips/`` next to the database file (created on first use by the caller); None for ``:memory:``."""
        return self._files_dir

    @property
    def shared(self) -> bool:
        """One bot process owns the file: never shared."""
        return False

    def share_file(self, path: str | Path) -> None:
        """Every reader is on this machine: nothing to do."""

    def local_file(self, path: str | Path) -> Path:
        return Path(path)

    def drop_file(self, path: str | Path) -> None:
        Path(path).unlink(missing_ok=True)

    # -- jobs ---------------------------------------------------------------------------------------------------
    def add(self, job: Job) -> Job:
        """Write a new job and set its ``id``; returns the same object."""
        values = [_to_db(getattr(job, name)) for name in _JOB_FIELDS]
        cur = self._db.execute(
            f"INSERT INTO jobs ({', '.join(_JOB_FIELDS)}) VALUES ({', '.join('?' * len(_JOB_FIELDS))})", values)
        job.id = int(cur.lastrowid)
        return job

    def get(self, job_id: int) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def _update_row(self, table: str, columns: Iterable[str], row_id: int, changes: dict[str, Any]) -> None:
        """``UPDATE table SET …`` for the named fields of one row; unknown names are a ValueError."""
        unknown = set(changes) - set(columns)
        if unknown:
            raise ValueError(f"unknown {table[:-1]} field(s): {', '.join(sorted(unknown))}")
        if changes:
            sets = ", ".join(f"{name} = ?" for name in changes)
            self._db.execute(f"UPDATE {table} SET {sets} WHERE id = ?",
                             [*(_to_db(v) for v in changes.values()), row_id])

    def update(self, job_id: int, **changes: Any) -> Job:
        """Change some fields of a job and return it as stored; unknown field names are a ValueError."""
        self._update_row("jobs", _JOB_FIELDS, job_id, changes)
        job = self.get(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        return job

    def update_many(self, job_ids: Iterable[int], **changes: Any) -> None:
        """Apply the same change to several jobs in one transaction."""
        ids = list(job_ids)
        if not ids or not changes:
            return
        unknown = set(changes) - set(_JOB_FIELDS)
        if unknown:
            raise ValueError(f"unknown job field(s): {', '.join(sorted(unknown))}")
        sets = ", ".join(f"{name} = ?" for name in changes)
        with self._transaction():
            self._db.executemany(f"UPDATE jobs SET {sets} WHERE id = ?",
                                 [[*(_to_db(v) for v in changes.values()), i] for i in ids])

    def update_if(self, job_id: int, expected: Mapping[str, Any], **changes: Any) -> Job | None:
        """Compare and set in one transaction (see :meth:`JobStore.update_if`)."""
        unknown = (set(changes) | set(expected)) - set(_JOB_FIELDS)
        if unknown:
            raise ValueError(f"unknown job field(s): {', '.join(sorted(unknown))}")
        with self._transaction():
            current = self.get(job_id)
            if current is None or any(_to_db(getattr(current, k)) != _to_db(v) for k, v in expected.items()):
                return None
            self._update_row("jobs", _JOB_FIELDS, job_id, changes)
        return self.get(job_id)

    def by_status(self, *statuses: JobStatus) -> list[Job]:
        """Jobs with any of these statuses (all jobs when none is given), in creation order."""
        where, args = _status_clause(statuses)
        rows = self._db.execute(f"SELECT * FROM jobs {('WHERE ' + where) if where else ''} ORDER BY id", args)
        return [_job(r) for r in rows]

    def jobs_of(self, user_id: int, *statuses: JobStatus) -> list[Job]:
        where, args = _status_clause(statuses)
        rows = self._db.execute(f"SELECT * FROM jobs WHERE user_id = ? {('AND ' + where) if where else ''} ORDER BY id",
                                [user_id, *args])
        return [_job(r) for r in rows]

    def session_jobs(self, session_id: int, *statuses: JobStatus) -> list[Job]:
        where, args = _status_clause(statuses)
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE session_id = ? {('AND ' + where) if where else ''} ORDER BY id",
            [session_id, *args])
        return [_job(r) for r in rows]

    def count(self, *statuses: JobStatus) -> int:
        where, args = _status_clause(statuses)
        return self._db.execute(f"SELECT COUNT(*) FROM jobs {('WHERE ' + where) if where else ''}", args).fetchone()[0]

    def last_created_at(self, user_id: int) -> float | None:
        """When this member's latest accepted request was made (for the cooldown)."""
        return self._db.execute("SELECT MAX(created_at) FROM jobs WHERE user_id = ?", (user_id,)).fetchone()[0]

    def recent_done(self, user_id: int, limit: int = 10) -> list[Job]:
        """This member's latest delivered clips, newest first."""
        rows = self._db.execute("SELECT * FROM jobs WHERE user_id = ? AND status = ? ORDER BY id DESC LIMIT ?",
                                (user_id, JobStatus.DONE.value, limit))
        return [_job(r) for r in rows]

    def last_started(self) -> list[tuple[int | None, int, float]]:
        """``(session_id, user_id, latest started_at)`` for every member that had a job started (fair-queue state)."""
        rows = self._db.execute("SELECT session_id, user_id, MAX(started_at) FROM jobs "
                                "WHERE started_at IS NOT NULL GROUP BY session_id, user_id")
        return [(r[0], r[1], r[2]) for r in rows]

    # -- per guild ----------------------------------------------------------------------------------------------
    def guild_jobs(self, guild_id: int | None, *statuses: JobStatus) -> list[Job]:
        """One guild's jobs with any of these statuses (all when none is given), in creation order."""
        where, args = _status_clause(statuses)
        rows = self._db.execute(f"SELECT * FROM jobs WHERE guild_id IS ? {('AND ' + where) if where else ''} "
                                "ORDER BY id", [guild_id, *args])
        return [_job(r) for r in rows]

    def last_created_in(self, guild_id: int | None, user_id: int) -> float | None:
        """When this member's latest accepted request in this guild was made (for the guild's cooldown)."""
        return self._db.execute("SELECT MAX(created_at) FROM jobs WHERE guild_id IS ? AND user_id = ?",
                                (guild_id, user_id)).fetchone()[0]

    def recent_done_in(self, guild_id: int | None, user_id: int, limit: int = 10) -> list[Job]:
        """This member's latest delivered clips in this guild, newest first."""
        rows = self._db.execute("SELECT * FROM jobs WHERE guild_id IS ? AND user_id = ? AND status = ? "
                                "ORDER BY id DESC LIMIT ?", (guild_id, user_id, JobStatus.DONE.value, limit))
        return [_job(r) for r in rows]

    def last_started_by_guild(self) -> list[tuple[int | None, int | None, int, float]]:
        """``(guild_id, session_id, user_id, latest started_at)`` for every member that had a job started in a
        guild (the fair queue's state)."""
        rows = self._db.execute("SELECT guild_id, session_id, user_id, MAX(started_at) FROM jobs "
                                "WHERE started_at IS NOT NULL GROUP BY guild_id, session_id, user_id")
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    # -- the files of jobs ---------------------------------------------------------------------------------------
    def file_in_use(self, path: str, *, besides: int) -> bool:
        """Whether a job other than ``besides`` that is queued, running or done names ``path`` as its upload, tune
        or the tokens it extends (a job that ended without a clip needs its files no more)."""
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE id != ? AND status IN (?, ?, ?) "
            "AND (prompt_audio_path = ? OR melody_path = ? OR prompt_tokens_path = ?) LIMIT 1",
            (besides, JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.DONE.value, path, path, path))
        return row.fetchone() is not None

    def jobs_since(self, cutoff: float) -> list[Job]:
        """Jobs queued or running, or finished at ``cutoff`` or later (the ones whose files are kept)."""
        rows = self._db.execute("SELECT * FROM jobs WHERE status IN (?, ?) OR finished_at IS NULL OR finished_at >= ? "
                                "ORDER BY id", (JobStatus.QUEUED.value, JobStatus.RUNNING.value, cutoff))
        return [_job(r) for r in rows]

    # -- sessions -----------------------------------------------------------------------------------------------
    def add_session(self, session: Session) -> Session:
        values = [_to_db(getattr(session, name)) for name in _SESSION_FIELDS]
        cur = self._db.execute(
            f"INSERT INTO sessions ({', '.join(_SESSION_FIELDS)}) VALUES ({', '.join('?' * len(_SESSION_FIELDS))})",
            values)
        session.id = int(cur.lastrowid)
        return session

    def get_session(self, session_id: int) -> Session | None:
        row = self._db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return _session(row) if row else None

    def session_for_thread(self, thread_id: int) -> Session | None:
        """The open session that lives in this thread, if any."""
        row = self._db.execute("SELECT * FROM sessions WHERE thread_id = ? AND status = ? ORDER BY id DESC LIMIT 1",
                               (thread_id, SessionStatus.OPEN.value)).fetchone()
        return _session(row) if row else None

    def open_sessions(self, guild_id: int | None = None) -> list[Session]:
        if guild_id is None:
            rows = self._db.execute("SELECT * FROM sessions WHERE status = ? ORDER BY id", (SessionStatus.OPEN.value,))
        else:
            rows = self._db.execute("SELECT * FROM sessions WHERE status = ? AND guild_id = ? ORDER BY id",
                                    (SessionStatus.OPEN.value, guild_id))
        return [_session(r) for r in rows]

    def update_session(self, session_id: int, **changes: Any) -> Session:
        self._update_row("sessions", _SESSION_FIELDS, session_id, changes)
        session = self.get_session(session_id)
        if session is None:
            raise KeyError(f"no session {session_id}")
        return session

    def close_session(self, session_id: int) -> Session:
        return self.update_session(session_id, status=SessionStatus.CLOSED, closed_at=time.time())

    # -- key/value state (pause, limits, timing averages) --------------------------------------------------------
    def get_value(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_value(self, key: str, value: Any) -> None:
        self._db.execute("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, json.dumps(value)))

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close the connection."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._db.close()

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _status_clause(statuses: tuple[JobStatus, ...]) -> tuple[str, list[str]]:
    if not statuses:
        return "", []
    return f"status IN ({', '.join('?' * len(statuses))})", [JobStatus(s).value for s in statuses]


def _to_db(value: Any) -> Any:
    if isinstance(value, (JobStatus, SessionStatus, JobKind)):
        return value.value
    if isinstance(value, bool):
        return int(value)
    return value


def _job(row: sqlite3.Row) -> Job:
    return Job(**{k: row[k] for k in row.keys() if k in _JOB_COLUMNS})


def _session(row: sqlite3.Row) -> Session:
    return Session(**{k: row[k] for k in row.keys()})
