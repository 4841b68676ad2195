"""Jobs, sessions, bot state and job files in Redis, shared by a gateway and workers on several machines.

:class:`RedisJobStore` implements :class:`bot.store.JobStore` with the meaning :class:`bot.store.SQLiteJobStore`
gives every call; :class:`RedisEvents` is the pub/sub channel that wakes idle workers and stops cancelled jobs.
``JOB_STORE=redis://host:port/db`` selects it. One Redis server (not Redis Cluster: the scripts name keys they build).

Layout, every key under a prefix (``musicgen:`` by default, so deployments and tests can share a Redis):

- ``job:<id>``: a hash of strings, one field per :class:`~bot.jobs.Job` field; ``None`` is an absent field. Ints
  (Discord ids are 64-bit) are written in decimal and floats with ``repr``, so both come back exactly; types come
  back from the dataclass's field types. Ids come from ``INCR next:job``.
- ``jobs`` and ``job:idx:<field>:<value>``: sorted sets of job ids (score = id) over all jobs, per status, guild,
  member, session, guild and status, and per file a job names (upload, tune, tokens) by its base name.
- ``job:started``: the fair queue's state, ``guild,session,user`` -> the latest ``started_at``, raised (never lowered)
  in the same script that sets a job's ``started_at``, so several workers starting jobs keep it right.
- ``session:<id>``, ``sessions``, ``session:idx:...``: sessions, the same way. ``kv``: the key/value state (JSON).
- ``file:<base name>``: the bytes of a job's file (:meth:`RedisJobStore.share_file`), expiring after ``file_days``.

Every write is one Lua script (atomic): :meth:`RedisJobStore.update_if` compares and sets, and plain updates go
through the same script, so two workers claiming one queued job never both win, and an index never disagrees with
its job.

Durability: Redis acknowledges a write once it is in memory and, with AOF on, written to the AOF file (a script is
logged as one unit, so a replay never half-applies it). With ``appendonly yes``:

- ``appendfsync always``: every acknowledged write survives a crash of Redis and of its machine (each is fsynced
  before the reply).
- ``appendfsync everysec`` (the usual setting): a crash of Redis alone loses nothing acknowledged (the kernel has the
  writes); a crash of the machine (power, kernel) loses the last second or two.

RDB snapshots alone lose everything since the last snapshot; with no persistence a restart of Redis loses every job,
session, setting and shared file (workers then find an empty queue; members' requests are gone). Replicas are
asynchronous: a failover can lose the last writes too. Shared files expire after ``file_days`` whatever the setting.
Events (:class:`RedisEvents`) are never stored: they reach the processes listening at that moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from .jobs import MAX_JOB_ID, Job, JobStatus, Session, SessionStatus

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "musicgen:"
SOCKET_TIMEOUT = 5.0  # seconds a command may take before the call fails (a lost Redis is an error, not a hang)
HEALTH_CHECK_INTERVAL = 30  # seconds a pooled connection may sit idle before it is pinged on next use


class RedisUnavailable(ConnectionError):
    """Redis could not be reached when the store was opened (the message says what to check)."""


# -- values: every field a string, typed by the dataclass -------------------------------------------------------
def _field_types(cls: type) -> dict[str, type]:
    """``name -> base type`` (``int | None`` -> ``int``) of a dataclass's fields except ``id``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if f.name == "id":
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[f.name] = args[0] if args else hint
    return out


_JOB_TYPES = _field_types(Job)
_SESSION_TYPES = _field_types(Session)
_TYPES = {"job": _JOB_TYPES, "session": _SESSION_TYPES}
_DONE_OR_PENDING = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.DONE.value)


def _encode(kind: type, value: Any) -> str | None:
    """One field as stored (None: absent). Enums by value, bools as 1/0, floats by ``repr`` (exact)."""
    if value is None:
        return None
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if kind is float:
        return repr(float(value))
    if kind is int and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _decode(kind: type, raw: bytes) -> Any:
    text = raw.decode()
    if kind is bool:
        return text == "1"
    if kind is int:
        try:
            return int(text)
        except ValueError:  # a float written to an int field, as SQLite's INTEGER affinity would keep it
            return float(text)
    if kind is float:
        return float(text)
    return kind(text)  # str and the str enums


def _row(types: dict[str, type], row_id: int, flat: list[bytes]) -> dict[str, Any]:
    values: dict[str, Any] = {name: None for name in types}
    for name, raw in zip(flat[::2], flat[1::2], strict=True):
        name = name.decode()
        if name in types:
            values[name] = _decode(types[name], raw)
    values["id"] = row_id
    return values


def _triples(types: dict[str, type], values: Mapping[str, Any]) -> list[str]:
    """``[field, "1", value]`` or ``[field, "0", ""]`` (absent) per field: the scripts' argument form."""
    out: list[str] = [str(len(values))]
    for name, value in values.items():
        encoded = _encode(types[name], value)
        out += [name, "0", ""] if encoded is None else [name, "1", encoded]
    return out


def _check_fields(table: str, types: dict[str, type], names: Iterable[str]) -> None:
    unknown = set(names) - set(types)
    if unknown:
        raise ValueError(f"unknown {table} field(s): {', '.join(sorted(unknown))}")


# -- the scripts ---------------------------------------------------------------------------------------------------
# Indexes per table: the fields a sorted set is keyed by, whether a job whose value is None is indexed (a job
# without a guild is one more guild; a job without an upload needs no entry), and whether a path is indexed by its
# base name (jobs name files by the path on the machine that wrote them).
_LUA_INDEXES = """
local INDEXES = {
  job = {{f = {"status"}, none = false}, {f = {"guild_id"}, none = true}, {f = {"user_id"}, none = false},
         {f = {"session_id"}, none = false}, {f = {"guild_id", "status"}, none = true},
         {f = {"prompt_tokens_path"}, base = true}, {f = {"prompt_audio_path"}, base = true},
         {f = {"melody_path"}, base = true}},
  session = {{f = {"status"}, none = false}, {f = {"thread_id"}, none = false}},
}
local function index_key(prefix, tbl, spec, get)
  local parts = {}
  for i, name in ipairs(spec.f) do
    local v = get(name)
    if not v then
      if not spec.none then return nil end
      v = ""
    elseif spec.base then
      v = string.match(v, "[^/]*$")  -- a file by its base name: the same file on every machine
    end
    parts[i] = v
  end
  return prefix .. tbl .. ":idx:" .. table.concat(spec.f, "+") .. ":" .. table.concat(parts, ":")
end
"""

# ARGV: prefix, table, n ids, ids ("new": create one), then expected and changes as counted triples
# (field, "1"/"0" present, value). Per id: the id when applied, 0 when ``expected`` did not match, -1 when missing.
_WRITE = _LUA_INDEXES + """
local prefix, tbl = ARGV[1], ARGV[2]
local n_ids = tonumber(ARGV[3])
local pos = 4 + n_ids
local function read_triples()
  local n = tonumber(ARGV[pos]); pos = pos + 1
  local out = {}
  for i = 1, n do
    out[i] = {ARGV[pos], ARGV[pos + 1] == "1", ARGV[pos + 2]}
    pos = pos + 3
  end
  return out
end
local expected = read_triples()
local changes = read_triples()
local results = {}
for k = 1, n_ids do
  local id = ARGV[3 + k]
  local key, exists
  if id == "new" then
    id = tostring(redis.call("INCR", prefix .. "next:" .. tbl))
    key = prefix .. tbl .. ":" .. id
    exists = true
  else
    key = prefix .. tbl .. ":" .. id
    exists = redis.call("EXISTS", key) == 1
  end
  local result = -1
  if exists then
    local matches = true
    for _, e in ipairs(expected) do
      local now = redis.call("HGET", key, e[1])
      if e[2] then
        if now ~= e[3] then matches = false end
      elseif now then
        matches = false
      end
    end
    result = 0
    if matches then
      local old = {}
      local function get_old(name)
        if old[name] == nil then old[name] = redis.call("HGET", key, name) end
        return old[name]
      end
      for _, spec in ipairs(INDEXES[tbl]) do
        local ik = index_key(prefix, tbl, spec, get_old)
        if ik then redis.call("ZREM", ik, id) end
      end
      for _, c in ipairs(changes) do
        if c[2] then redis.call("HSET", key, c[1], c[3]) else redis.call("HDEL", key, c[1]) end
      end
      local function get_new(name) return redis.call("HGET", key, name) end
      for _, spec in ipairs(INDEXES[tbl]) do
        local ik = index_key(prefix, tbl, spec, get_new)
        if ik then redis.call("ZADD", ik, id, id) end
      end
      redis.call("ZADD", prefix .. tbl .. "s", id, id)
      if tbl == "job" then
        local started = get_new("started_at")
        if started then
          local who = (get_new("guild_id") or "") .. "," .. (get_new("session_id") or "") .. "," ..
                      get_new("user_id")
          local before = redis.call("HGET", prefix .. "job:started", who)
          if not before or tonumber(started) > tonumber(before) then
            redis.call("HSET", prefix .. "job:started", who, started)
          end
        end
      end
      result = tonumber(id)
    end
  end
  results[k] = result
end
return results
"""

# KEYS: sorted sets of ids (their union is read). ARGV: row key prefix, limit (0: all), "1" newest first, then
# filters: n, then per filter field, n values, values ("=" .. value, or "-" for absent). Returns id, row, id, row...
_READ = """
local row_prefix, limit, newest_first = ARGV[1], tonumber(ARGV[2]), ARGV[3] == "1"
local pos = 5
local filters = {}
for i = 1, tonumber(ARGV[4]) do
  local name, n = ARGV[pos], tonumber(ARGV[pos + 1])
  local allowed = {}
  for j = 1, n do allowed[ARGV[pos + 1 + j]] = true end
  filters[i] = {name, allowed}
  pos = pos + 2 + n
end
local ids = {}
local seen = {}
for _, k in ipairs(KEYS) do
  for _, id in ipairs(redis.call("ZRANGE", k, 0, -1)) do
    if not seen[id] then seen[id] = true; ids[#ids + 1] = id end
  end
end
table.sort(ids, function(a, b) return tonumber(a) < tonumber(b) end)  -- ids stay strings: Lua prints big numbers as 1e+14
local out = {}
local found = 0
local first, last, step = 1, #ids, 1
if newest_first then first, last, step = #ids, 1, -1 end
for i = first, last, step do
  if limit > 0 and found >= limit then break end
  local row = redis.call("HGETALL", row_prefix .. ids[i])
  if #row > 0 then
    local values = {}
    for j = 1, #row, 2 do values[row[j]] = row[j + 1] end
    local keep = true
    for _, f in ipairs(filters) do
      local v = values[f[1]]
      if not f[2][v and ("=" .. v) or "-"] then keep = false; break end
    end
    if keep then
      out[#out + 1] = ids[i]
      out[#out + 1] = row
      found = found + 1
    end
  end
end
return out
"""


class RedisJobStore:
    """A :class:`~bot.store.JobStore` in Redis that a gateway and workers on several machines use at once.

    ``files_dir`` is this machine's folder for job files (a cache of what :meth:`share_file` put in Redis);
    shared files expire after ``file_days`` days. Use :meth:`from_url` to connect; the client should have socket
    timeouts (a call is a few round trips and fails rather than hangs when Redis is gone).
    """

    def __init__(self, client: redis.Redis, *, files_dir: str | Path | None, prefix: str = DEFAULT_PREFIX,
                 file_days: float = 30) -> None:
        self._redis = client
        self.prefix = prefix
        self._files_dir = Path(files_dir) if files_dir is not None else None
        self.file_days = file_days
        try:
            client.ping()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            kwargs = client.connection_pool.connection_kwargs
            where = f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"
            raise RedisUnavailable(f"Cannot reach Redis at {where} ({exc}): check JOB_STORE and that redis-server "
                                   "is running and accepts connections from this machine") from exc
        self._write = client.register_script(_WRITE)
        self._read = client.register_script(_READ)
        log.debug("job store on Redis, prefix %r", prefix)

    @classmethod
    def from_url(cls, url: str, *, files_dir: str | Path | None, prefix: str = DEFAULT_PREFIX,
                 file_days: float = 30) -> RedisJobStore:
        """Connect to ``redis://host:port/db`` (or ``rediss://``, ``unix://``); :class:`RedisUnavailable` when it
        does not answer."""
        client = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
                                      socket_keepalive=True, health_check_interval=HEALTH_CHECK_INTERVAL)
        try:
            return cls(client, files_dir=files_dir, prefix=prefix, file_days=file_days)
        except RedisUnavailable:
            client.close()
            raise

    def close(self) -> None:
        """Close the connections (every write was acknowledged by Redis when its call returned)."""
        self._redis.close()

    @property
    def files_dir(self) -> Path | None:
        return self._files_dir

    @property
    def shared(self) -> bool:
        """Processes on several machines use this store at once."""
        return True

    # -- scripts ---------------------------------------------------------------------------------------------------
    def _apply(self, table: str, ids: list[str], expected: Mapping[str, Any],
               changes: Mapping[str, Any]) -> list[int]:
        """Run the write script: per id, the id when applied, 0 when ``expected`` did not match, -1 when missing."""
        types = _TYPES[table]
        args = [self.prefix, table, str(len(ids)), *ids, *_triples(types, expected), *_triples(types, changes)]
        return [int(r) for r in self._write(args=args)]

    def _key(self, table: str, *parts: Any) -> str:
        return self.prefix + table + ":" + ":".join(str(p) for p in parts)

    def _index(self, table: str, *pairs: tuple[str, Any]) -> str:
        """The sorted set of ``table`` rows whose fields have these values (None: the rows without a value)."""
        names = "+".join(name for name, _ in pairs)
        values = ":".join("" if v is None else _encode(_TYPES[table][n], v) for n, v in pairs)
        return f"{self.prefix}{table}:idx:{names}:{values}"

    def _query(self, table: str, keys: list[str], *, filters: Mapping[str, Iterable[Any]] | None = None,
               limit: int = 0, newest_first: bool = False) -> list[dict[str, Any]]:
        """Rows of the union of the sorted sets ``keys`` whose fields have one of the allowed values, by id."""
        types = _TYPES[table]
        filters = filters or {}
        args: list[Any] = [f"{self.prefix}{table}:", limit, "1" if newest_first else "0", len(filters)]
        for name, allowed in filters.items():
            encoded = [_encode(types[name], v) for v in allowed]
            args += [name, len(encoded), *("-" if e is None else "=" + e for e in encoded)]
        flat = self._read(keys=keys, args=args)
        return [_row(types, int(row_id), row) for row_id, row in zip(flat[::2], flat[1::2], strict=True)]

    def _jobs(self, keys: list[str], statuses: tuple[JobStatus, ...] = (), **kw: Any) -> list[Job]:
        filters = kw.pop("filters", None) or {}
        if statuses:
            filters = {**filters, "status": [JobStatus(s) for s in statuses]}
        return [Job(**row) for row in self._query("job", keys, filters=filters, **kw)]

    def _status_keys(self, statuses: tuple[JobStatus, ...]) -> list[str]:
        if not statuses:
            return [self.prefix + "jobs"]
        return [self._index("job", ("status", JobStatus(s))) for s in dict.fromkeys(statuses)]

    # -- jobs --------------------------------------------------------------------------------------------------------
    def add(self, job: Job) -> Job:
        """Write a new job and set its ``id``; returns the same object."""
        values = {name: getattr(job, name) for name in _JOB_TYPES}
        (job_id,) = self._apply("job", ["new"], {}, {k: v for k, v in values.items() if v is not None})
        job.id = job_id
        return job

    def get(self, job_id: int) -> Job | None:
        flat = self._redis.hgetall(self._key("job", int(job_id)))
        if not flat:
            return None
        return Job(**_row(_JOB_TYPES, int(job_id), [x for kv in flat.items() for x in kv]))

    def update(self, job_id: int, **changes: Any) -> Job:
        """Change some fields of a job and return it as stored; unknown field names are a ValueError, an unknown
        job a KeyError."""
        _check_fields("job", _JOB_TYPES, changes)
        (result,) = self._apply("job", [str(int(job_id))], {}, changes)
        job = self.get(job_id) if result > 0 else None
        if job is None:
            raise KeyError(f"no job {job_id}")
        return job

    def update_many(self, job_ids: Iterable[int], **changes: Any) -> None:
        """Apply the same change to several jobs in one script (all or none); unknown ids are skipped."""
        ids = [str(int(i)) for i in job_ids]
        if not ids or not changes:
            return
        _check_fields("job", _JOB_TYPES, changes)
        self._apply("job", ids, {}, changes)

    def update_if(self, job_id: int, expected: Mapping[str, Any], **changes: Any) -> Job | None:
        """Compare and set in one script (see :meth:`bot.store.JobStore.update_if`)."""
        _check_fields("job", _JOB_TYPES, [*changes, *expected])
        (result,) = self._apply("job", [str(int(job_id))], expected, changes)
        return self.get(job_id) if result > 0 else None

    def by_status(self, *statuses: JobStatus) -> list[Job]:
        """Jobs with any of these statuses (all jobs when none is given), in creation order."""
        return self._jobs(self._status_keys(statuses))

    def jobs_of(self, user_id: int, *statuses: JobStatus) -> list[Job]:
        return self._jobs([self._index("job", ("user_id", user_id))], statuses)

    def session_jobs(self, session_id: int, *statuses: JobStatus) -> list[Job]:
        return self._jobs([self._index("job", ("session_id", session_id))], statuses)

    def count(self, *statuses: JobStatus) -> int:
        pipe = self._redis.pipeline(transaction=True)
        for key in self._status_keys(statuses):
            pipe.zcard(key)
        return sum(pipe.execute())

    def last_created_at(self, user_id: int) -> float | None:
        """When this member's latest accepted request was made (for the cooldown)."""
        return max((j.created_at for j in self.jobs_of(user_id)), default=None)

    def recent_done(self, user_id: int, limit: int = 10) -> list[Job]:
        """This member's latest delivered clips, newest first."""
        return self._jobs([self._index("job", ("user_id", user_id))], (JobStatus.DONE,), limit=limit,
                          newest_first=True)

    def last_started(self) -> list[tuple[int | None, int, float]]:
        """``(session_id, user_id, latest started_at)`` for every member that had a job started."""
        latest: dict[tuple[int | None, int], float] = {}
        for _, session_id, user_id, started in self.last_started_by_guild():
            key = (session_id, user_id)
            latest[key] = max(latest.get(key, started), started)
        return [(s, u, t) for (s, u), t in latest.items()]

    # -- per guild ---------------------------------------------------------------------------------------------
    def guild_jobs(self, guild_id: int | None, *statuses: JobStatus) -> list[Job]:
        """One guild's jobs (``None``: the jobs without a guild) with any of these statuses, in creation order."""
        if not statuses:
            return self._jobs([self._index("job", ("guild_id", guild_id))])
        return self._jobs([self._index("job", ("guild_id", guild_id), ("status", JobStatus(s)))
                           for s in dict.fromkeys(statuses)])

    def last_created_in(self, guild_id: int | None, user_id: int) -> float | None:
        jobs = self._jobs([self._index("job", ("user_id", user_id))], filters={"guild_id": [guild_id]})
        return max((j.created_at for j in jobs), default=None)

    def recent_done_in(self, guild_id: int | None, user_id: int, limit: int = 10) -> list[Job]:
        return self._jobs([self._index("job", ("user_id", user_id))], (JobStatus.DONE,),
                          filters={"guild_id": [guild_id]}, limit=limit, newest_first=True)

    def last_started_by_guild(self) -> list[tuple[int | None, int | None, int, float]]:
        """``(guild_id, session_id, user_id, latest started_at)``: kept by the script that sets ``started_at``."""
        out = []
        for who, started in self._redis.hgetall(self.prefix + "job:started").items():
            guild, session, user = (int(p) if p else None for p in who.decode().split(","))
            out.append((guild, session, user, float(started)))
        return out

    # -- the files of jobs ---------------------------------------------------------------------------------------
    def file_in_use(self, path: str, *, besides: int) -> bool:
        """Whether a job other than ``besides`` that is queued, running or done names this file (by its base name:
        a job names the path on the machine that wrote it) as its upload, tune or the tokens it extends."""
        name = Path(path).name
        keys = [self._index("job", (field, name)) for field in ("prompt_tokens_path", "prompt_audio_path",
                                                                "melody_path")]
        return any(j.id != besides for j in self._jobs(keys, _DONE_OR_PENDING))  # type: ignore[arg-type]

    def jobs_since(self, cutoff: float) -> list[Job]:
        """Jobs queued or running, or finished at ``cutoff`` or later (the ones whose files are kept)."""
        return [j for j in self.by_status() if j.status.pending or j.finished_at is None or j.finished_at >= cutoff]

    def _file_key(self, path: str | Path) -> tuple[str, str]:
        name = Path(path).name
        if name in ("", ".", ".."):
            raise ValueError(f"not a file name: {str(path)!r}")
        return name, self.prefix + "file:" + name

    def share_file(self, path: str | Path) -> None:
        """Upload a file just written under :attr:`files_dir`, by its base name, for ``file_days`` days."""
        _, key = self._file_key(path)
        self._redis.set(key, Path(path).read_bytes(), ex=max(1, int(self.file_days * 86400)))

    def local_file(self, path: str | Path) -> Path:
        """``files_dir / <base name>``, downloaded from Redis when it is not here yet; a path that does not exist
        when Redis has no such file either (the caller reports it gone)."""
        name, key = self._file_key(path)
        if self._files_dir is None:
            return Path(path)
        local = self._files_dir / name
        if local.exists():
            return local
        data = self._redis.get(key)
        if data is None:
            return local
        self._files_dir.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{name}.{secrets.token_hex(4)}.partial")
        partial.write_bytes(data)
        os.replace(partial, local)  # readers see the whole file or none
        return local

    def drop_file(self, path: str | Path) -> None:
        """Delete a job's file in this machine's :attr:`files_dir` and in Redis."""
        name, key = self._file_key(path)
        if self._files_dir is not None:
            (self._files_dir / name).unlink(missing_ok=True)
        self._redis.delete(key)

    # -- sessions --------------------------------------------------------------------------------------------------
    def add_session(self, session: Session) -> Session:
        values = {name: getattr(session, name) for name in _SESSION_TYPES}
        (session_id,) = self._apply("session", ["new"], {}, {k: v for k, v in values.items() if v is not None})
        session.id = session_id
        return session

    def get_session(self, session_id: int) -> Session | None:
        flat = self._redis.hgetall(self._key("session", int(session_id)))
        if not flat:
            return None
        return Session(**_row(_SESSION_TYPES, int(session_id), [x for kv in flat.items() for x in kv]))

    def session_for_thread(self, thread_id: int) -> Session | None:
        """The open session that lives in this thread, if any."""
        rows = self._query("session", [self._index("session", ("thread_id", thread_id))],
                           filters={"status": [SessionStatus.OPEN]}, limit=1, newest_first=True)
        return Session(**rows[0]) if rows else None

    def open_sessions(self, guild_id: int | None = None) -> list[Session]:
        filters = {} if guild_id is None else {"guild_id": [guild_id]}
        rows = self._query("session", [self._index("session", ("status", SessionStatus.OPEN))], filters=filters)
        return [Session(**row) for row in rows]

    def update_session(self, session_id: int, **changes: Any) -> Session:
        _check_fields("session", _SESSION_TYPES, changes)
        (result,) = self._apply("session", [str(int(session_id))], {}, changes)
        session = self.get_session(session_id) if result > 0 else None
        if session is None:
            raise KeyError(f"no session {session_id}")
        return session

    def close_session(self, session_id: int) -> Session:
        return self.update_session(session_id, status=SessionStatus.CLOSED, closed_at=time.time())

    # -- key/value state -------------------------------------------------------------------------------------------
    def get_value(self, key: str, default: Any = None) -> Any:
        raw = self._redis.hget(self.prefix + "kv", key)
        return json.loads(raw) if raw is not None else default

    def set_value(self, key: str, value: Any) -> None:
        self._redis.hset(self.prefix + "kv", key, json.dumps(value))


# -- events ------------------------------------------------------------------------------------------------------------
WAKE = "wake"
CANCEL = "cancel"
MAX_MESSAGE = 64  # bytes: a longer payload is not one of ours


def parse_event(data: Any) -> tuple[str, int | None] | None:
    """``("wake", None)``, ``("cancel", job_id)``, or None for anything else (the channel is not trusted)."""
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, bytes) or len(data) > MAX_MESSAGE:
        return None
    if data == WAKE.encode():
        return WAKE, None
    verb, _, arg = data.partition(b" ")
    if verb == CANCEL.encode() and arg.isdigit() and arg.isascii():
        job_id = int(arg)
        if 1 <= job_id <= MAX_JOB_ID:
            return CANCEL, job_id
    return None


class RedisEvents:
    """The ``<prefix>events`` pub/sub channel between a gateway and its workers: ``wake`` (a job was queued or the
    queue resumed: idle workers look now) and ``cancel <job id>`` (the worker running that job stops it).

    Delivery is at most once and only to processes listening at the time: the store stays the truth, the events
    only make workers look sooner than their next poll.
    """

    def __init__(self, client: redis.asyncio.Redis, *, prefix: str = DEFAULT_PREFIX,
                 max_backoff: float = 30.0) -> None:
        self._redis = client
        self.channel = prefix + "events"
        self.max_backoff = max_backoff

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> RedisEvents:
        # no socket timeout: a subscription waits for messages; keepalive and health checks find a dead peer
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=SOCKET_TIMEOUT, socket_keepalive=True,
                                              health_check_interval=HEALTH_CHECK_INTERVAL)
        return cls(client, prefix=prefix)

    async def publish_wake(self) -> int:
        """Tell idle workers to look at the queue; returns how many listeners got it."""
        return await self._redis.publish(self.channel, WAKE)

    async def publish_cancel(self, job_id: int) -> int:
        """Tell the worker running ``job_id`` to stop it; returns how many listeners got it."""
        return await self._redis.publish(self.channel, f"{CANCEL} {int(job_id)}")

    async def listen(self, on_wake: Callable[[], None], on_cancel: Callable[[int], None]) -> None:
        """Call ``on_wake()`` or ``on_cancel(job_id)`` for each event until cancelled. A lost connection is logged
        and the subscription made again after a growing pause (0.1 s doubling up to ``max_backoff``); malformed
        messages are ignored; an exception from a callback is logged and listening goes on."""
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                if backoff > 0.1:
                    log.info("events: subscribed to %s again", self.channel)
                backoff = 0.1
                while True:
                    # a timeout, not a block forever: each read past the health-check interval pings first
                    message = await pubsub.get_message(timeout=HEALTH_CHECK_INTERVAL)
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message.get("data"), on_wake, on_cancel)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("events: lost the connection to Redis (%s); subscribing again in %.1f s", exc, backoff)
            finally:
                try:
                    await pubsub.aclose()
                except (redis.RedisError, OSError):
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    @staticmethod
    def _dispatch(data: Any, on_wake: Callable[[], None], on_cancel: Callable[[int], None]) -> None:
        event = parse_event(data)
        if event is None:
            log.debug("events: ignored a malformed message %.80r", data)
            return
        try:
            if event[0] == WAKE:
                on_wake()
            else:
                on_cancel(event[1])  # type: ignore[arg-type]
        except Exception:
            log.exception("events: the %s handler failed", event[0])

    async def close(self) -> None:
        await self._redis.aclose()
